"""Request models and the checks that need the service's settings; errors are per field (422)."""
from __future__ import annotations

import base64
import binascii
import math
import secrets
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.config import ServiceSettings
from service.lora import resolve_lora
from service.webhooks import url_problem
from wan_model.config import VariantSpec
from wan_model.lora import expert_lora_files
from wan_model.pipeline.conditioning import decode_image
from wan_model.pipeline.validation import MAX_FRAMES, MAX_GUIDANCE, MAX_SHIFT, MAX_SIDE, video_size_for_image


def _no_bool(value: Any) -> Any:
    """JSON ``true`` is no number: pydantic's lax mode would take it as 1."""
    if isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value)):
        raise ValueError("must be a number, not true/false")
    return value


def image_base64(value: Any) -> Any:
    """The base64 text of an image field: a data URL's payload (``data:image/png;base64,...``), with
    line breaks and spaces removed (``base64`` wraps its output at 76 characters)."""
    if not isinstance(value, str):
        return value
    if value.startswith("data:") and ";base64," in value[:100]:
        value = value.split(";base64,", 1)[1]
    return "".join(value.split())


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str
    scale: float = Field(1.0, ge=-10.0, le=10.0)


class GenerateRequest(BaseModel):
    """``POST /generate``. Fields left out take the served variant's defaults."""

    # No inf or NaN (JSON has no such numbers, but Python's parser reads 1e999 and NaN): they are no
    # guidance or shift, and a stored NaN could not be shown back as JSON.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: Optional[str] = None
    prompt: str
    negative_prompt: str = ""
    width: Optional[int] = None
    height: Optional[int] = None
    num_frames: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[Union[float, tuple[float, float]]] = None
    shift: Optional[float] = Field(None, gt=0.0, le=MAX_SHIFT)
    sampler: Optional[Literal["unipc", "euler"]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    lora: Optional[LoraRef] = None
    image: Optional[str] = None  # base64 PNG/JPEG
    priority: int = Field(0, ge=-100, le=100)
    webhook_url: Optional[str] = None  # POSTed the job's outcome when it finishes (service/webhooks.py)
    # The client's own labels (an order id, a user), kept with the job and shown in its view and webhook.
    metadata: Optional[dict[str, str]] = None

    _numbers = field_validator("width", "height", "num_frames", "steps", "guidance", "shift", "seed", "priority",
                               mode="before")(_no_bool)
    _image = field_validator("image", mode="before")(image_base64)


class VideoCreateRequest(BaseModel):
    """``POST /v1/videos`` (OpenAI-style): ``size`` "WxH" and ``seconds`` besides the native fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: Optional[str] = None
    prompt: str
    size: Optional[str] = None
    seconds: Optional[Union[str, float]] = None
    negative_prompt: str = ""
    steps: Optional[int] = None
    guidance: Optional[Union[float, tuple[float, float]]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    input_reference: Optional[str] = None  # base64 image

    _numbers = field_validator("seconds", "steps", "guidance", "seed", mode="before")(_no_bool)
    _image = field_validator("input_reference", mode="before")(image_base64)


def field_errors(errors: dict[str, str]) -> list[dict[str, Any]]:
    """FastAPI's 422 body shape: one entry per field."""
    return [{"loc": ["body", name], "msg": msg, "type": "value_error"} for name, msg in errors.items()]


# ``POST /v1/videos`` fields the native fields come from: its 422s name what the client sent.
OPENAI_FIELDS = {"width": "size", "height": "size", "num_frames": "seconds", "image": "input_reference"}


def as_openai_errors(errors: dict[str, str]) -> dict[str, str]:
    """Per-field errors of a native request, keyed by the ``/v1/videos`` fields they came from."""
    out: dict[str, str] = {}
    for name, msg in errors.items():
        key = OPENAI_FIELDS.get(name, name)
        out[key] = f"{out[key]}; {msg}" if key in out else msg
    return out


_TYPE_TAGS = {"float", "int", "str", "bool", "list", "dict", "tuple"}


def _field_path(loc: tuple) -> list[str]:
    """A pydantic error's location without its union-branch tags ("tuple[float, float]", "str")."""
    return [str(p) for p in loc if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]


def pydantic_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """One entry per field, named as the client sent it: the messages of a union's branches are joined."""
    entries: dict[tuple, dict[str, Any]] = {}
    for e in exc.errors():
        loc = ("body", *_field_path(e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if loc in entries:
            entries[loc]["msg"] += f"; or: {msg}"
        else:
            entries[loc] = {"loc": list(loc), "msg": msg, "type": e["type"]}
    return list(entries.values())


def latent_tokens(spec: VariantSpec, width: int, height: int, num_frames: int) -> int:
    """Transformer tokens F' * H' * W' for a video of this size on this variant."""
    st, sh, sw = spec.vae_stride
    pt, ph, pw = spec.transformer.patch_size
    frames = (num_frames - 1) // st + 1
    return (frames // pt) * (height // sh // ph) * (width // sw // pw)


def served_model_names(settings: ServiceSettings) -> set[str]:
    return {settings.variant_name, settings.model}


def check_generate(req: GenerateRequest, settings: ServiceSettings) -> dict[str, str]:
    """Everything the served model and settings rule out, as ``{field: message}`` (empty: fine)."""
    return resolve_generate(req, settings)[1]


def resolve_generate(req: GenerateRequest, settings: ServiceSettings) -> tuple[GenerateRequest, dict[str, str]]:
    """The request with the video size an input image implies filled in (as the workers would size it;
    the size limits apply to it, and the job's views show it), and everything the served model and
    settings rule out, as ``{field: message}`` (empty: fine)."""
    spec = settings.variant_spec
    errors: dict[str, str] = {}
    image_size: Optional[tuple[int, int]] = None
    if req.image is not None:
        if spec.task == "t2v":
            errors["image"] = f"{spec.name} is text-to-video and takes no image"
        else:
            problem, image_size = image_problem(req.image, spec, req.width, req.height)
            if problem:
                errors["image"] = problem
    elif spec.task == "i2v":
        errors["image"] = f"{spec.name} is image-to-video: an image is required"
    if image_size is not None and (req.width is None or req.height is None):
        req = req.model_copy(update={"width": image_size[0], "height": image_size[1]})
    if req.model is not None and req.model not in served_model_names(settings):
        errors["model"] = f"unknown model {req.model!r}; this server serves {settings.variant_name!r}"
    if not req.prompt.strip():
        errors["prompt"] = "prompt is empty"
    elif len(req.prompt) > settings.max_prompt_chars:
        errors["prompt"] = f"prompt has {len(req.prompt)} characters; the maximum is {settings.max_prompt_chars}"
    if len(req.negative_prompt) > settings.max_prompt_chars:
        errors["negative_prompt"] = f"negative_prompt is longer than {settings.max_prompt_chars} characters"
    # 0 is a value here, not "the default": the workers would refuse it after a 202.
    width = spec.default_size[0] if req.width is None else req.width
    height = spec.default_size[1] if req.height is None else req.height
    frames = spec.default_frames if req.num_frames is None else req.num_frames
    multiple = spec.size_multiple
    for name, value in (("width", width), ("height", height)):
        if not multiple <= value <= MAX_SIDE or value % multiple:
            errors[name] = f"{name} {value} must be a multiple of {multiple} from {multiple} to {MAX_SIDE} for {spec.name}"
    if not 1 <= frames <= MAX_FRAMES or (frames - 1) % 4:
        errors["num_frames"] = f"num_frames {frames} must be 4n+1 (e.g. 5, 17, 81), at most {MAX_FRAMES}"
    if not errors.keys() & {"width", "height", "num_frames"}:
        tokens = latent_tokens(spec, width, height, frames)
        if tokens > settings.max_tokens:
            sized = " (the size the image implies)" if image_size is not None else ""
            errors["num_frames"] = (f"{width}x{height}x{frames}{sized} is {tokens} latent tokens; this server "
                                    f"allows {settings.max_tokens} (fewer frames or a smaller size)")
    if req.steps is None and spec.steps > settings.max_steps:  # the default is held to the limit too
        errors["steps"] = (f"{spec.name} takes {spec.steps} steps by default, over this server's limit of "
                           f"{settings.max_steps}: give steps from 1 to {settings.max_steps}")
    elif req.steps is not None and not 1 <= req.steps <= settings.max_steps:
        errors["steps"] = f"steps {req.steps} must be between 1 and {settings.max_steps}"
    if isinstance(req.guidance, tuple) and not spec.is_moe:
        errors["guidance"] = f"a (low-noise, high-noise) pair needs a two-expert model; {spec.name} takes one number"
    elif req.guidance is not None:
        scales = req.guidance if isinstance(req.guidance, tuple) else (req.guidance,)
        if not all(0.0 <= g <= MAX_GUIDANCE for g in scales):
            errors["guidance"] = f"guidance must be from 0 to {MAX_GUIDANCE}"
    if req.lora is not None:
        try:
            # The layout the workers will read (one .safetensors file, a PEFT folder, or one file per
            # A14B expert), checked now rather than after the job has waited for its GPUs.
            expert_lora_files(str(resolve_lora(settings.lora_dir, req.lora.name)), spec)
        except (ValueError, OSError) as exc:
            errors["lora"] = str(exc)
    if req.metadata is not None:
        problem = metadata_problem(req.metadata)
        if problem:
            errors["metadata"] = problem
    if req.webhook_url is not None:
        problem = url_problem(req.webhook_url, settings.webhook_allowed_hosts)
        if problem:
            errors["webhook_url"] = problem
    for name, value in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt),
                        ("metadata", req.metadata), ("lora", req.lora and req.lora.name),
                        ("webhook_url", req.webhook_url)):
        if not _valid_unicode(value):  # a lone surrogate ("\ud800") parses, but is no text
            errors[name] = f"{name} is not valid Unicode (it holds a lone surrogate)"
    return req, errors


def _valid_unicode(value: Any) -> bool:
    texts = [*value.keys(), *value.values()] if isinstance(value, dict) else [value]
    try:
        for text in texts:
            if isinstance(text, str):
                text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def image_problem(data: str, spec: VariantSpec, width: Optional[int], height: Optional[int]
                  ) -> tuple[Optional[str], Optional[tuple[int, int]]]:
    """Why the workers would refuse this base64 image (or None), and the video size it implies where
    the request leaves a side to it (or None). It must decode as they decode it, and that video must
    fit ``MAX_SIDE``."""
    raw = _decode_image(data)
    if raw is None:
        return "image is not valid base64 PNG/JPEG/WebP data", None
    try:
        image = decode_image(raw)
    except ValueError as exc:
        return str(exc), None
    w, h, problem = video_size_for_image(image, spec, width, height)
    if problem or (width is not None and height is not None):
        return problem, None
    return None, (w, h)


def _decode_image(data: str) -> Optional[bytes]:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
    if raw.startswith(b"\x89PNG\r\n\x1a\n") or raw.startswith(b"\xff\xd8\xff") or raw[8:12] == b"WEBP":
        return raw
    return None


def to_job_request(req: GenerateRequest) -> dict[str, Any]:
    """What the queue stores: the validated request with a seed fixed (random if not given)."""
    data = req.model_dump(exclude={"priority", "webhook_url"})  # the queue keeps these beside the request
    if data["seed"] is None:
        data["seed"] = secrets.randbelow(2**31)
    if isinstance(data.get("guidance"), tuple):
        data["guidance"] = list(data["guidance"])
    return data


METADATA_MAX_KEYS, METADATA_MAX_KEY_CHARS, METADATA_MAX_VALUE_CHARS = 16, 64, 512


def metadata_problem(metadata: dict[str, str]) -> Optional[str]:
    if len(metadata) > METADATA_MAX_KEYS:
        return f"metadata has {len(metadata)} keys; at most {METADATA_MAX_KEYS}"
    for key, value in metadata.items():
        if not 1 <= len(key) <= METADATA_MAX_KEY_CHARS:
            return f"metadata key {key[:80]!r} must be 1 to {METADATA_MAX_KEY_CHARS} characters"
        if len(value) > METADATA_MAX_VALUE_CHARS:
            return f"metadata[{key!r}] is {len(value)} characters; at most {METADATA_MAX_VALUE_CHARS}"
    return None


def fingerprint_fields(req: GenerateRequest) -> dict[str, Any]:
    """What an Idempotency-Key's fingerprint hashes: the request as sent. Fields added in the twelfth
    release hash only when given, so that a retry across that upgrade still matches its job."""
    added = {name for name in ("webhook_url", "metadata") if getattr(req, name) is None}
    return req.model_dump(mode="json", exclude=added or None)


def from_openai(req: VideoCreateRequest, settings: ServiceSettings) -> tuple[GenerateRequest, dict[str, str]]:
    """``POST /v1/videos`` body -> a native request; ``size``/``seconds`` errors per field."""
    spec = settings.variant_spec
    errors: dict[str, str] = {}
    image = req.input_reference  # a data URL's payload already (image_base64)
    fields: dict[str, Any] = {"model": req.model, "prompt": req.prompt, "negative_prompt": req.negative_prompt,
                              "steps": req.steps, "guidance": req.guidance, "seed": req.seed, "image": image}
    if req.size is not None:
        try:
            w, h = (int(v) for v in req.size.lower().split("x"))
            if w < 1 or h < 1:
                raise ValueError
            fields.update(width=w, height=h)
        except ValueError:
            errors["size"] = f"size {req.size!r} must look like '832x480'"
    if req.seconds is not None:
        try:
            seconds = float(req.seconds)
            if not 0 < seconds < math.inf:
                raise ValueError
            fields["num_frames"] = 4 * max(1, round(seconds * spec.fps / 4)) + 1
        except (ValueError, OverflowError):
            errors["seconds"] = f"seconds {req.seconds!r} must be a positive number"
        else:
            if fields["num_frames"] > MAX_FRAMES:
                errors["seconds"] = (f"seconds {req.seconds!r} is {fields.pop('num_frames')} frames at "
                                     f"{spec.fps} fps; the most is {MAX_FRAMES} ({MAX_FRAMES / spec.fps:.1f} s)")
    return GenerateRequest(**fields), errors


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its body itself (JSON or form): the model's schema,
    with its ``$defs`` inlined, so that /openapi.json documents the body (and fuzzers can use it)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.split("/")[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}
