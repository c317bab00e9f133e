"""The contract between whoever drives generation (CLI, service) and the ``Generator``.

``Generator.generate(request, progress_callback) -> GenerationResult | None`` runs one job
on every rank of the group (SPMD). Rank 0 writes the files and returns the result; other
ranks return ``None``. ``progress_callback(progress)`` is called on every rank at each stage
and step; its return value on rank 0 is the cancellation request (truthy = cancel), which
the generator broadcasts so that all ranks stop together between steps, raising
``JobCancelled``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional


@dataclass
class GenerationRequest:
    prompt: str
    output_dir: str  # rank 0 writes video.mp4 and preview.png here
    negative_prompt: str = ""
    width: Optional[int] = None  # None: the variant's default
    height: Optional[int] = None
    num_frames: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float | tuple[float, float]] = None  # (low-noise, high-noise) for A14B
    shift: Optional[float] = None
    sampler: Optional[str] = None  # "unipc" or "euler"
    seed: int = 0
    image: Optional[bytes] = None  # encoded PNG/JPEG, for image-to-video
    lora: Optional[str] = None  # a resolved path (file, or folder with one file per A14B expert)
    lora_scale: float = 1.0
    job_id: str = ""


@dataclass
class Progress:
    stage: str  # "text_encode" | "image_encode" (jobs with an image) | "denoise" | "decode" | "encode"
    step: int = 0  # steps done so far (denoise)
    total_steps: int = 0
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    video_path: str
    preview_path: str
    width: int
    height: int
    num_frames: int
    fps: int
    seed: int
    # Seconds per stage: text_encode, denoise, decode, encode, total; step_s lists each step.
    timings: dict = field(default_factory=dict)
    experts_per_step: list = field(default_factory=list)  # which expert ran each step (A14B)
    layout: str = ""  # e.g. "world=4 cfg=2 ulysses=2 ring=1 fsdp=off attention=cudnn"
    encoder: str = ""  # which H.264 encoder wrote the MP4 ("imageio-ffmpeg" or "pyav")
    # What the user should know about how the request was run, e.g. a prompt cut to the encoder's length.
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


ProgressCallback = Callable[[Progress], Optional[bool]]


class JobCancelled(RuntimeError):
    """Raised on every rank when a cancellation was requested between steps."""


class InvalidRequest(ValueError):
    """The request cannot be run; raised before any compute. ``errors`` maps field -> message."""

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
