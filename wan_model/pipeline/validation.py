"""Check a ``GenerationRequest`` against the model and fill in the variant's defaults.

Runs before any compute: every problem found is reported at once as ``InvalidRequest``
(field -> message), so a client can fix them all in one go.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

from wan_model.config import VariantSpec

from .request import GenerationRequest, InvalidRequest
from .schedulers import SAMPLERS

MAX_STEPS = 1000  # the number of training timesteps: more steps than that is meaningless
MAX_FRAMES = 1001
MAX_SIDE = 4096
MAX_GUIDANCE = 100.0
MAX_SHIFT = 100.0


@dataclass(frozen=True)
class ResolvedJob:
    """A request with every default filled in, known to be runnable."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    steps: int
    guidance: dict[str, float]  # expert name -> scale
    shift: float
    sampler: str
    seed: int
    image: Optional[object]  # decoded RGB PIL image, for I2V/TI2V
    lora: Optional[str]
    lora_scale: float

    def latent_shape(self, variant: VariantSpec) -> tuple[int, int, int, int, int]:
        ts, hs, ws = variant.vae_stride
        return (1, variant.z_dim, (self.num_frames - 1) // ts + 1, self.height // hs, self.width // ws)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def resolve_request(request: GenerationRequest, variant: VariantSpec) -> ResolvedJob:
    """The request with the variant's defaults filled in; raises ``InvalidRequest`` listing every problem."""
    from .conditioning import decode_image

    errors: dict[str, str] = {}
    width = variant.default_size[0] if request.width is None else request.width
    height = variant.default_size[1] if request.height is None else request.height
    frames = variant.default_frames if request.num_frames is None else request.num_frames
    steps = variant.steps if request.steps is None else request.steps
    shift = variant.shift if request.shift is None else request.shift
    sampler = variant.sampler if request.sampler is None else request.sampler

    if not isinstance(request.prompt, str) or not request.prompt.strip():
        errors["prompt"] = "the prompt is empty"
    if not isinstance(request.negative_prompt, str):
        errors["negative_prompt"] = "must be a string"
    if not request.output_dir:
        errors["output_dir"] = "no output directory given"
    multiple = variant.size_multiple
    for name, value in (("width", width), ("height", height)):
        if not _is_int(value) or value < multiple or value > MAX_SIDE:
            errors[name] = f"must be an integer in [{multiple}, {MAX_SIDE}], got {value!r}"
        elif value % multiple:
            errors[name] = (f"{value} is not a multiple of {multiple} (VAE stride x patch size of {variant.name}); "
                            f"nearest: {max(multiple, round(value / multiple) * multiple)}")
    stride_t = variant.vae_stride[0]
    if not _is_int(frames) or frames < 1 or frames > MAX_FRAMES:
        errors["num_frames"] = f"must be an integer in [1, {MAX_FRAMES}], got {frames!r}"
    elif (frames - 1) % stride_t:
        errors["num_frames"] = f"{frames} is not of the form {stride_t}n+1 (e.g. {(frames - 1) // stride_t * stride_t + 1})"
    if not _is_int(steps) or steps < 1 or steps > MAX_STEPS:
        errors["steps"] = f"must be an integer in [1, {MAX_STEPS}], got {steps!r}"
    if not _is_number(shift) or shift <= 0 or shift > MAX_SHIFT:
        errors["shift"] = f"must be a number in (0, {MAX_SHIFT}], got {shift!r}"
    if sampler not in SAMPLERS:
        errors["sampler"] = f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}"
    if not _is_int(request.seed) or request.seed < 0 or request.seed >= 2**63:
        errors["seed"] = f"must be an integer in [0, 2^63), got {request.seed!r}"

    guidance = _resolve_guidance(request.guidance, variant, errors)

    image = None
    if variant.task == "i2v" and request.image is None:
        errors["image"] = f"{variant.name} is an image-to-video model: an input image is required"
    elif variant.task == "t2v" and request.image is not None:
        errors["image"] = f"{variant.name} is a text-to-video model: it takes no input image"
    elif request.image is not None:
        if not isinstance(request.image, (bytes, bytearray)):
            errors["image"] = f"must be encoded image bytes, got {type(request.image).__name__}"
        else:
            try:
                image = decode_image(bytes(request.image))
            except ValueError as exc:
                errors["image"] = str(exc)
            else:
                if request.width is None or request.height is None:
                    width, height, problem = video_size_for_image(image, variant, request.width, request.height)
                    if problem:
                        errors["image"] = problem

    if request.shift is None and not errors.keys() & {"width", "height", "image"}:
        shift = default_shift(variant, width, height)

    if request.lora is not None:
        if not os.path.exists(request.lora):
            errors["lora"] = f"no such file or folder: {request.lora}"
        else:
            from wan_model.lora import expert_lora_files

            try:
                expert_lora_files(request.lora, variant)
            except (ValueError, OSError) as exc:
                errors["lora"] = str(exc)
    if not _is_number(request.lora_scale):
        errors["lora_scale"] = f"must be a number, got {request.lora_scale!r}"

    if errors:
        raise InvalidRequest(errors)
    return ResolvedJob(
        prompt=request.prompt, negative_prompt=request.negative_prompt, width=width, height=height,
        num_frames=frames, steps=steps, guidance=guidance, shift=float(shift), sampler=sampler,
        seed=request.seed, image=image, lora=request.lora, lora_scale=float(request.lora_scale),
    )


def video_size_for_image(image, variant: VariantSpec, width: Optional[int] = None,
                         height: Optional[int] = None) -> tuple[int, int, Optional[str]]:
    """The video size for an input image when the request gives at most one side, and why that video
    cannot be made (or None).

    No side given: the variant's default area in the image's aspect ratio, rounded as the official
    pipeline rounds it (Wan2.1/Wan2.2 I2V round each side down; Wan2.2 TI2V keeps the closest ratio).
    One side given: the other follows the image's aspect ratio, to the nearest multiple, so that the
    image is not cropped to the variant's default for the missing side."""
    from .conditioning import closest_ratio_size, size_for_image

    multiple = variant.size_multiple
    if width is None and height is None:
        area = variant.default_size[0] * variant.default_size[1]
        sizing = closest_ratio_size if variant.task == "ti2v" else size_for_image
        width, height = sizing(image.width, image.height, area, multiple)
    elif height is None and _is_int(width):
        height = max(multiple, round(width * image.height / image.width / multiple) * multiple)
    elif width is None and _is_int(height):
        width = max(multiple, round(height * image.width / image.height / multiple) * multiple)
    else:
        return width, height, None  # both given, or a bad side (reported with its field)
    problem = None
    if max(width, height) > MAX_SIDE:
        problem = (f"a {image.width}x{image.height} image gives a {width}x{height} video, over {MAX_SIDE} pixels "
                   "a side: give width and height")
    return width, height, problem


def default_shift(variant: VariantSpec, width: int, height: int) -> float:
    """The sampling shift when the request names none. Official Wan2.1 samples image-to-video of the
    480p area (``--size 832*480``, either way round) with 3.0 and of the 720p area with 5.0
    (``generate.py``); the video then takes the image's aspect ratio within that area, e.g. 832x464.
    The 480P diffusers checkpoint's scheduler says 3.0 too."""
    if variant.name == "wan2.1-i2v-14b" and width * height <= 832 * 480:
        return 3.0
    return variant.shift


def _resolve_guidance(value, variant: VariantSpec, errors: dict[str, str]) -> dict[str, float]:
    """Expert -> guidance scale. A pair is (low-noise, high-noise), as official, and only for A14B."""
    value = variant.guidance if value is None else value
    if isinstance(value, (list, tuple)):
        if not variant.is_moe:
            errors["guidance"] = (f"a (low-noise, high-noise) guidance pair is only for the two-expert "
                                  f"Wan2.2 A14B models; {variant.name} takes one number")
            return {}
        if len(value) != 2 or not all(_is_number(v) for v in value):
            errors["guidance"] = f"must be one number or a (low-noise, high-noise) pair, got {value!r}"
            return {}
        low, high = (float(v) for v in value)
    elif _is_number(value):
        low = high = float(value)
    else:
        errors["guidance"] = f"must be a number, got {value!r}"
        return {}
    if not (0 <= low <= MAX_GUIDANCE and 0 <= high <= MAX_GUIDANCE):
        errors["guidance"] = f"must be in [0, {MAX_GUIDANCE}], got {value!r}"
        return {}
    if variant.is_moe:
        high_name, low_name = variant.experts  # high-noise expert first (see VariantSpec)
        return {high_name: high, low_name: low}
    return {variant.experts[0]: low}
