"""``ServiceSettings``: the one settings model shared by the CLI, ``serve build`` and ``serve deploy``.

Sources, highest priority first: explicit arguments (the builder's ``args`` dict), the
environment (``WANSERVE_*``, e.g. ``WANSERVE_GPUS=4``), a YAML file (``ServiceSettings.from_yaml``).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from wan_model.config import VARIANTS, VariantSpec, get_variant

Degree = Union[int, Literal["auto"]]


class WarmupShape(BaseModel):
    """One job an engine replica runs before it reports ready, so that the first user job of this
    shape does not pay for compiling kernels (``compile: true``, FA4's JIT, cuDNN plans).
    Sizes left out are the variant's defaults."""

    model_config = ConfigDict(extra="forbid")

    width: Optional[int] = None
    height: Optional[int] = None
    num_frames: Optional[int] = None
    steps: int = Field(2, ge=1)  # compiled code is the same for every step; two also run the sampler's second order
    # 1: warm up the steps that run the conditional branch alone over every GPU (under CFG-parallel
    # they have a layout, and so compiled graphs, of their own).
    guidance: Optional[float] = Field(None, ge=0, le=100)


DEFAULT_GENERATOR_FACTORY = "wan_model.pipeline.generator:build_generator"


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WANSERVE_", extra="forbid", validate_assignment=True)

    # --- model ---
    model: str = "tiny"  # a model folder, or "tiny" for random tiny weights (noise videos)
    variant: Optional[str] = None  # a name from wan_model.config.VARIANTS; None: detected / "tiny-t2v"
    gpus: int = Field(0, ge=0)  # workers per engine replica on GPUs; 0 = CPU workers (gloo)
    cpu_workers: int = Field(2, ge=1)  # workers per engine replica when gpus == 0
    ulysses: Degree = "auto"
    ring: Degree = "auto"
    cfg_parallel: Degree = "auto"  # 1, 2 (the cond and uncond passes on two rank groups) or auto
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on GPUs, fp32 on CPU
    offload: bool = False
    fsdp: bool = False
    memory_fraction: Optional[float] = Field(None, gt=0.0, le=1.0)
    generator_factory: str = DEFAULT_GENERATOR_FACTORY
    # Extra fields for the factory's config (e.g. text_encoder, attention, cache_dir for the real one).
    generator_options: dict[str, Any] = Field(default_factory=dict)

    # --- service ---
    app_name: str = "wanserve"
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    engine_replicas: int = Field(1, ge=1)
    queue_size: int = Field(64, ge=1)  # queued + running jobs; more gets 429
    data_dir: str = "./wanserve-data"
    # SQLite's journal for jobs.sqlite3: "auto" takes WAL where data_dir is on a local filesystem and
    # the rollback journal ("delete") where other hosts mount it (NFS, EFS, CephFS...), because WAL's
    # shared-memory index is not shared between hosts (service/store_journal.py).
    store_journal: Literal["auto", "wal", "delete"] = "auto"
    lora_dir: Optional[str] = None
    auth_token: Optional[str] = None
    auth_token_file: Optional[str] = None
    # Per-client bearer tokens, token -> client name: a client sees and reads only its own jobs.
    # The single auth_token (if any) stays an operator token that sees every job.
    client_tokens: dict[str, str] = Field(default_factory=dict)
    # Queued + running jobs one client (of client_tokens) may hold, so that one client cannot fill
    # the queue for the others. None: only queue_size bounds them. The auth_token holder is not bound.
    max_jobs_per_client: Optional[int] = Field(None, ge=1)
    # The highest ``priority`` a client token may ask for; higher is refused (403). Jobs of equal
    # priority run in order, so without a cap any client could jump the queue. Without tokens, or
    # with the auth_token, every priority (-100..100) is allowed.
    max_client_priority: int = Field(0, ge=-100, le=100)
    # Webhooks (service/webhooks.py): a request's webhook_url gets the job's outcome when it finishes.
    # Only URLs on these hosts are accepted ("hooks.example.com", "*.example.com", "10.0.0.7:8080");
    # empty: webhooks are off. The JobQueue sends from inside the cluster: list only receivers.
    webhook_allowed_hosts: list[str] = Field(default_factory=list)
    # A listed *name* must resolve to public addresses at each try, so that a name whose DNS answer
    # turns internal (rebinding) cannot reach inside the cluster. True allows names that resolve to
    # private, loopback or link-local addresses (in-cluster receivers such as hooks.ns.svc).
    # Addresses listed as such (10.0.0.7) are always allowed.
    webhook_private_networks: bool = False
    webhook_secret: Optional[str] = None  # signs each message (Standard Webhooks, "whsec_..." or any string)
    webhook_secret_file: Optional[str] = None
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_max_attempts: int = Field(8, ge=1)
    webhook_retry_s: float = Field(5.0, gt=0)  # the wait after the first failed attempt; doubles each time
    # The service's address as clients see it ("https://video.example.com"): webhook messages carry
    # absolute video links under it. None: the links are paths (/jobs/<id>/video).
    public_url: Optional[str] = None
    max_tokens: int = Field(75_600, ge=1)  # latent tokens F'*H'*W' per request (1280x720x81 on 14B)
    max_steps: int = Field(100, ge=1)
    max_prompt_chars: int = Field(4000, ge=1)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    # Open GET /jobs/{id}/events streams per Ingress replica. Each lasts as long as its job (queue time
    # included) and holds one of the replica's requests; past this, 429 (poll GET /jobs/{id} instead),
    # so that submissions and status calls always find a free slot.
    max_event_streams: int = Field(200, ge=1)
    max_attempts: int = Field(2, ge=1)  # a job that was running on a replica that died runs again once
    # Jobs each engine replica runs before it reports ready (the shapes users will ask for).
    warmup: list[WarmupShape] = Field(default_factory=list)
    # How long a finished job's video and preview stay in data_dir; then they are deleted and the
    # job's record says so (its video URL answers 410). 0 keeps them forever (the disk then fills).
    result_ttl_s: float = Field(7 * 24 * 3600.0, ge=0)
    # Where workers keep what torch.compile built (``compile: true``), so that a new replica loads it
    # instead of compiling again. None: <data_dir>/compile-cache, shared like the results.
    compile_cache_dir: Optional[str] = None

    # --- timeouts and periods (seconds) ---
    nccl_timeout_s: float = Field(600.0, gt=0)
    health_timeout_s: float = Field(30.0, gt=0)
    health_check_period_s: float = Field(10.0, gt=0)
    job_timeout_s: float = Field(3600.0, gt=0)
    progress_interval_s: float = Field(0.5, ge=0)  # rank 0 reports progress at most this often
    worker_init_timeout_s: float = Field(900.0, gt=0)
    # How long an engine replica that Serve stops (a redeploy, a downscale, `serve shutdown`) lets its
    # running job finish first. A job still running then is stopped and runs again elsewhere, which
    # counts as one of its max_attempts.
    drain_timeout_s: float = Field(600.0, ge=0)

    # --- logs ---
    # "json": every deployment and worker logs one JSON object per line, job lines with a
    # wanserve_job_id field (service/logs.py); "text" for people reading a terminal.
    log_format: Literal["text", "json"] = "text"
    # A custom Ray resource only the head node has (KubeRay: rayStartParams resources on the head
    # group): the Ingress and JobQueue replicas are placed where it is, not on GPU pods that the
    # autoscaler removes. None: Serve places them anywhere.
    control_plane_resource: Optional[str] = Field(None, min_length=1)

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            get_variant(value)  # raises naming the known variants
        return value

    @field_validator("cfg_parallel")
    @classmethod
    def _cfg_parallel(cls, value: Any) -> Any:
        if value != "auto" and value not in (1, 2):
            raise ValueError(f"cfg_parallel must be 1, 2 or auto, got {value!r}")
        return value

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _host_patterns(cls, value: list[str]) -> list[str]:
        from service.webhooks import parse_host_pattern  # here: webhooks imports this module

        for pattern in value:
            parse_host_pattern(pattern)  # raises naming a bad entry
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"public_url {value!r} must start with http:// or https://")
        return value

    @field_validator("data_dir", "lora_dir", "auth_token_file", "webhook_secret_file", "compile_cache_dir")
    @classmethod
    def _absolute(cls, value: Optional[str]) -> Optional[str]:
        # Replicas and workers do not share the builder's working directory: store absolute paths.
        return None if value is None else str(Path(value).expanduser().absolute())

    @model_validator(mode="after")
    def _check(self) -> "ServiceSettings":
        if self.auth_token and self.auth_token_file:
            raise ValueError("set auth_token or auth_token_file, not both")
        if self.webhook_secret and self.webhook_secret_file:
            raise ValueError("set webhook_secret or webhook_secret_file, not both")
        for token, client in self.client_tokens.items():
            if len(token) < 16 or not client.strip():
                raise ValueError("client_tokens maps tokens of 16+ characters to non-empty client names")
        if self.model == "tiny" and self.variant is not None and not get_variant(self.variant).tiny:
            raise ValueError(f"model 'tiny' needs a tiny variant, got {self.variant!r}")
        if self.generator_factory == DEFAULT_GENERATOR_FACTORY:
            # The workers would refuse these when the replica starts, after minutes of scheduling; a
            # custom factory takes settings of its own, which only it can check.
            from wan_model.pipeline.generator import GeneratorConfig

            try:
                GeneratorConfig.from_dict(self.generator_config()).check()
            except (ValueError, TypeError) as exc:
                raise ValueError(f"generator_options: {exc}") from None
        return self

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> "ServiceSettings":
        """Settings from a YAML mapping; the environment and ``overrides`` win over the file."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a YAML mapping of settings, got {type(data).__name__}")
        env_set = {name for name in cls.model_fields if f"WANSERVE_{name.upper()}" in os.environ}
        data = {k: v for k, v in data.items() if k not in env_set}
        return cls(**{**data, **overrides})

    @classmethod
    def coerce(cls, args: "dict | ServiceSettings | None") -> "ServiceSettings":
        """The builder's ``args``: settings, a dict of fields, or a dict with ``config_file``."""
        if isinstance(args, ServiceSettings):
            return args
        args = dict(args or {})
        config_file = args.pop("config_file", None)
        if config_file:
            return cls.from_yaml(config_file, **args)
        return cls(**args)

    # ---------------------------------------------------------------- derived

    @property
    def world_size(self) -> int:
        return self.gpus if self.gpus > 0 else self.cpu_workers

    @property
    def use_gpu(self) -> bool:
        return self.gpus > 0

    @property
    def variant_name(self) -> str:
        if self.variant:
            return self.variant
        if self.model == "tiny":
            return "tiny-t2v"
        detected = _variant_from_model_dir(self.model)
        if detected is None:
            raise ValueError(f"cannot tell the variant of model folder {self.model!r}; set 'variant' "
                             f"(one of {', '.join(sorted(VARIANTS))})")
        return detected

    @property
    def variant_spec(self) -> VariantSpec:
        return get_variant(self.variant_name)

    @property
    def results_dir(self) -> Path:
        return Path(self.data_dir) / "results"

    @property
    def db_path(self) -> Path:
        return Path(self.data_dir) / "jobs.sqlite3"

    @property
    def resolved_compile_cache_dir(self) -> str:
        return self.compile_cache_dir or str(Path(self.data_dir) / "compile-cache")

    def resolved_auth_token(self) -> Optional[str]:
        """The bearer token, read from the file when one is configured (stripped of whitespace)."""
        return _secret(self.auth_token, self.auth_token_file, "auth token")

    def resolved_webhook_secret(self) -> Optional[str]:
        """The webhook signing secret, read from the file when one is configured."""
        return _secret(self.webhook_secret, self.webhook_secret_file, "webhook secret")

    def generator_config(self) -> dict[str, Any]:
        """What the generator factory receives as ``config`` (``GeneratorConfig`` fields)."""
        degrees = {"ulysses": self.ulysses, "ring": self.ring, "cfg_parallel": self.cfg_parallel}
        manual = any(v != "auto" for v in degrees.values())
        config: dict[str, Any] = {
            "model": self.model,
            "variant": self.variant_name,
            "device": "auto" if self.use_gpu else "cpu",
            "dtype": self.dtype,
            "parallel": "manual" if manual else "auto",
            "fsdp": self.fsdp,
            "offload": self.offload,
            "memory_fraction": self.memory_fraction if self.use_gpu else None,
        }
        if manual:
            # Degrees left on "auto" go to the generator as None: it picks them for the world it gets
            # (wan_model.pipeline.layout.choose_degrees), so the service and the workers never disagree.
            config.update(
                ulysses=None if self.ulysses == "auto" else int(self.ulysses),
                ring=None if self.ring == "auto" else int(self.ring),
                cfg_parallel=None if self.cfg_parallel == "auto" else int(self.cfg_parallel) == 2,
            )
        config.update(self.generator_options)
        return config

    def parallel_layout(self):
        """The ``ParallelConfig`` the workers will use: the generator's own rule (``choose_degrees``) on
        exactly the config they are handed. Raises ``ValueError`` when the degrees cannot lay out the ranks."""
        from wan_model.pipeline.generator import GeneratorConfig
        from wan_model.pipeline.layout import choose_degrees

        # Only GeneratorConfig's fields: generator_options may hold a custom factory's own keys.
        config = {k: v for k, v in self.generator_config().items() if k in GeneratorConfig.__dataclass_fields__}
        return choose_degrees(GeneratorConfig.from_dict(config), self.variant_spec, self.world_size)

    def warmup_requests(self, output_dir: str) -> list[dict[str, Any]]:
        """``GenerationRequest`` fields of the warm-up jobs, checked against the variant like a user's
        request; raises ``ValueError`` naming the entry and the field. Image-to-video variants get a
        mid-grey input image of the job's size."""
        from wan_model.pipeline.request import GenerationRequest, InvalidRequest
        from wan_model.pipeline.validation import resolve_request

        spec = self.variant_spec
        requests = []
        for i, shape in enumerate(self.warmup):
            fields: dict[str, Any] = {"prompt": "warm-up", "output_dir": output_dir, "seed": 0,
                                      "job_id": f"warmup-{i}", **shape.model_dump(exclude_none=True)}
            if spec.task == "i2v":
                fields["image"] = _grey_png(shape.width or spec.default_size[0], shape.height or spec.default_size[1])
            try:
                resolve_request(GenerationRequest(**fields), spec)
            except InvalidRequest as exc:
                raise ValueError(f"warmup[{i}] {shape.model_dump(exclude_none=True)}: {exc}") from None
            requests.append(fields)
        return requests

    def to_args(self) -> dict[str, Any]:
        """A plain dict that ``build_app`` / ``serve deploy`` accept back."""
        return self.model_dump(mode="json")


def _secret(value: Optional[str], path: Optional[str], what: str) -> Optional[str]:
    """A secret given inline or as a file (its content stripped of whitespace; empty is an error)."""
    if path:
        text = Path(path).read_text().strip()
        if not text:
            raise ValueError(f"{what} file {path} is empty")
        return text
    return value or None


def _variant_from_model_dir(model_dir: str) -> Optional[str]:
    """The variant named in ``<model_dir>/wanserve.json`` or the folder's name, if any."""
    path = Path(model_dir)
    marker = path / "wanserve.json"
    if marker.is_file():
        import json

        name = json.loads(marker.read_text()).get("variant")
        if name in VARIANTS:
            return name
    lowered = path.name.lower()
    for name, spec in VARIANTS.items():
        if not spec.tiny and name in lowered.replace("_", "-"):
            return name
    return _variant_from_contents(str(path))


@functools.lru_cache(maxsize=16)
def _variant_from_contents(model_dir: str) -> Optional[str]:
    """The variant the folder's files tell (its configs, experts, VAE), for folders whose name says
    nothing: a Hugging Face cache snapshot (``models--Wan-AI--.../snapshots/<hash>``)."""
    try:
        from wan_model.pipeline.model_dir import detect_model_dir

        return detect_model_dir(model_dir).variant
    except Exception:  # noqa: BLE001 - not a model folder (the caller says to set 'variant')
        return None


def _grey_png(width: int, height: int) -> bytes:
    """A mid-grey PNG (the input image of an image-to-video warm-up job)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()
