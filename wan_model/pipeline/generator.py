"""The ``Generator``: built once per rank, it turns a ``GenerationRequest`` into an MP4.

SPMD over one process group: every rank builds a ``Generator`` with the same config and calls
``generate`` with the same request; the ranks split each sequence (Ulysses x Ring) and/or the
two CFG branches, and run the VAE on a band of rows each (``parallel_vae``); rank 0 writes the files.
See ``docs/DESIGN.md``.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.distributed as dist

from wan_model.config import VariantSpec
from wan_model.step_cache import StepCache

from .denoise import Branch, ExpertPlan, FirstFrameLock, broadcast_cancel, denoise
from .request import GenerationRequest, GenerationResult, InvalidRequest, JobCancelled, Progress, ProgressCallback
from .schedulers import make_sampler
from .validation import ResolvedJob, resolve_request
from .video import frames_to_uint8, mp4_encoder, write_mp4, write_png

logger = logging.getLogger(__name__)

# Official ``sample_neg_prompt`` (wan/configs/shared_config.py), used when the request gives none.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


@dataclass
class GeneratorConfig:
    """How one rank builds its generator. Every rank of a group must use the same config."""

    model: str = "tiny"  # a model folder, or "tiny" / "tiny-<variant>" (random weights: noise videos)
    variant: Optional[str] = None  # override the variant detected from the folder
    device: str = "auto"  # "auto" (this rank's CUDA device, else CPU), "cuda", "cuda:N", "cpu"
    dtype: str = "auto"  # transformer dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "bfloat16", ...
    parallel: str = "auto"  # "auto": CFG-parallel on even worlds, then the largest Ulysses; "manual": below
    ulysses: Optional[int] = None
    ring: Optional[int] = None
    cfg_parallel: Optional[bool] = None
    fsdp: bool = False  # shard transformer weights over all ranks (FSDP2)
    offload: bool = False  # keep idle models (the other A14B expert, a replicated T5, the VAE) on the CPU
    # T5 placement: "replicated" (on every rank's device), "fsdp" (sharded over the ranks) or "cpu"
    # (saves ~11 GB of GPU memory per rank for UMT5-XXL; rank 0 encodes and broadcasts, 7.3 s for
    # a prompt and its negative on a 4-GPU H200 host).
    text_encoder: str = "replicated"
    memory_fraction: Optional[float] = None  # cap this process's CUDA memory (0, 1]
    # attention kernel: auto, cudnn, fa3, fa3_fp8 (lossy), fa4, flash, cpu, math (see wan_model.parallel)
    attention: str = "auto"
    cache_dir: Optional[str] = None  # where "tiny" model folders are built (default ~/.cache/wanserve)
    # torch.compile each transformer block (wan_model.compile): ~10-20% faster forwards on GPU once
    # warm; the first job (and each new video size) pays the compilation, tens of seconds.
    compile: bool = False
    # Lossy step caching (wan_model.step_cache, TeaCache-style): skip the transformer blocks on steps
    # whose accumulated relative change of the time modulation stays below this threshold. None: off.
    step_cache: Optional[float] = None
    # Lossy fp8 GEMMs in the transformer blocks (wan_model.fp8): e4m3 weights (per channel) and
    # activations (per token) on sm89+ GPUs; faster GEMMs. Relative error of one forward against bf16:
    # 0.20 on random 14B weights (bf16 against another bf16 implementation: 0.03); see bench/RESULTS.md.
    fp8: bool = False
    # Ulysses layouts (ring degree 1): split the heads into this many groups so that each group's
    # all-to-all overlaps the attention of the others (wan_model.parallel.ulysses_overlap). Same result.
    head_chunks: int = 1
    # Split the VAE by rows over all ranks (wan_model.parallel.vae_rows): the decode, and the image
    # encode of image-to-video jobs. The whole-frame result (up to float rounding) in a fraction of the
    # time; every rank then holds the VAE. False: rank 0 loads the VAE and runs it alone.
    parallel_vae: bool = True

    @classmethod
    def from_dict(cls, values: dict) -> "GeneratorConfig":
        if "parallel_decode" in values:  # its name until the VAE encode was split too
            if "parallel_vae" in values:
                raise ValueError("give parallel_vae only (parallel_decode is its old name)")
            warnings.warn("generator setting parallel_decode is now called parallel_vae", DeprecationWarning,
                          stacklevel=2)
            values = {("parallel_vae" if k == "parallel_decode" else k): v for k, v in values.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown generator settings: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> "GeneratorConfig":
        """Raise ``ValueError`` naming the first setting that cannot work, whatever the machine (the
        service checks this when it starts, before any worker loads a model); returns self."""
        from wan_model.parallel import KERNEL_NAMES

        from .text_encoder import PLACEMENTS

        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of auto, {', '.join(_DTYPES)}")
        if self.memory_fraction is not None and not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.attention not in (*KERNEL_NAMES, "sdpa"):
            raise ValueError(f"unknown attention kernel {self.attention!r}; choose one of sdpa, {', '.join(KERNEL_NAMES)}")
        if self.text_encoder not in PLACEMENTS:
            raise ValueError(f"unknown text_encoder {self.text_encoder!r}; choose one of {', '.join(PLACEMENTS)}")
        if self.parallel not in ("auto", "manual"):
            raise ValueError(f"parallel must be 'auto' or 'manual', got {self.parallel!r}")
        if not isinstance(self.head_chunks, int) or self.head_chunks < 1:
            raise ValueError(f"head_chunks must be an integer >= 1, got {self.head_chunks!r}")
        if self.fp8 and self.fsdp:
            raise ValueError("fp8 together with fsdp is not supported (fp8 replaces the weights FSDP shards); choose one")
        if self.fsdp and self.offload:
            raise ValueError("fsdp and offload are two ways to save memory that do not combine; choose one")
        if self.step_cache is not None and not (isinstance(self.step_cache, (int, float)) and self.step_cache >= 0):
            raise ValueError(f"step_cache must be a threshold >= 0 or None, got {self.step_cache!r}")
        return self


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            # init_distributed (or the caller) has set this rank's device already.
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``name`` as ``GeneratorConfig.check`` has accepted it."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class Generator:
    """One rank's share of the pipeline: weights loaded once, ``generate`` per job."""

    def __init__(self, config: GeneratorConfig, components=None):
        """Load everything ``config.model`` names; or take prebuilt ``components`` (a
        ``components.Components``, e.g. random weights at real shapes for a benchmark)."""
        from .components import load_components
        from .layout import setup_layout

        self.config = config.check()
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.device = _resolve_device(config.device)
        self.dtype = _resolve_dtype(config.dtype, self.device)
        if config.memory_fraction is not None and self.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(config.memory_fraction, self.device)
        if config.fsdp and not self.distributed:
            raise ValueError("fsdp needs several ranks in an initialized process group")

        load_start = time.perf_counter()
        if components is None:
            components = load_components(config, self.device, self.dtype, rank=self.rank)
        self.parts = components
        self.variant: VariantSpec = self.parts.variant
        self.layout = setup_layout(config, self.variant, self.world_size, self.distributed)
        self.split_vae = config.parallel_vae and self.distributed and self.world_size > 1
        if self.split_vae and self.parts.vae is None:
            raise ValueError("parallel_vae needs the VAE on every rank; these components have it on rank 0 only")
        check = getattr(self.layout.attention, "check", None)
        if check is not None:  # one rank, named kernel: fail now if it cannot run here (never swapped)
            check(self.device, self.dtype, self.variant.transformer.head_dim)
        for model in self.parts.experts.values():
            model.set_parallel(self.layout.sharding, self.layout.attention)
        if config.fsdp:
            from .fsdp import is_sharded, shard_transformer

            for model in self.parts.experts.values():
                if not is_sharded(model):  # load_components shards while loading; prebuilt components may not be
                    shard_transformer(model, self.device)
        if config.fp8:
            from wan_model.fp8 import quantize_blocks_fp8

            for model in self.parts.experts.values():
                quantize_blocks_fp8(model)
        if config.compile:
            from wan_model.compile import compile_blocks

            for model in self.parts.experts.values():
                compile_blocks(model)
        self.load_s = time.perf_counter() - load_start
        self._lora: Optional[tuple[str, float]] = None
        # The last job's final latents (float32, CPU, every rank) and decoded frames (uint8, rank 0).
        self.last_latents: Optional[torch.Tensor] = None
        self.last_frames = None

    # --- the job -------------------------------------------------------------------------------

    def layout_string(self) -> str:
        lay = self.layout
        return (f"world={self.world_size} cfg={lay.cfg_parallel} ulysses={lay.ulysses} ring={lay.ring} "
                f"fsdp={'on' if self.config.fsdp else 'off'} offload={'on' if self.config.offload else 'off'} "
                f"attention={lay.attention_name()} dtype={str(self.dtype).replace('torch.', '')} "
                f"device={self.device.type} compile={'on' if self.config.compile else 'off'} "
                f"step_cache={'off' if self.config.step_cache is None else self.config.step_cache} "
                f"fp8={'on' if self.config.fp8 else 'off'} head_chunks={lay.head_chunks} "
                f"vae={'rows' if self.split_vae else 'rank0'}"
                + (f" guidance1=ulysses{lay.whole_world.ulysses}xring{lay.whole_world.ring}" if lay.whole_world else ""))

    def validate(self, request: GenerationRequest) -> ResolvedJob:
        """Check ``request`` against this model; raises ``InvalidRequest`` (no compute done)."""
        return resolve_request(request, self.variant)

    def generate(self, request: GenerationRequest,
                 progress_callback: Optional[ProgressCallback] = None) -> Optional[GenerationResult]:
        """Run one job on every rank; rank 0 writes ``video.mp4`` + ``preview.png`` and returns the result."""
        job = self.validate(request)
        total_start = time.perf_counter()
        timings: dict = {}

        def report(progress: Progress) -> bool:
            wish = progress_callback(progress) if progress_callback is not None else None
            return broadcast_cancel(bool(wish) and self.rank == 0, self.device)

        def stage(name: str) -> None:
            if report(Progress(stage=name, elapsed_s=time.perf_counter() - total_start)):
                raise JobCancelled(f"cancelled before {name}")

        try:
            self._apply_lora(job.lora, job.lora_scale)
            stage("text_encode")
            start = time.perf_counter()
            cond, uncond = self._encode_text(job)
            notices = self._prompt_notices(job) if self.rank == 0 else []
            self._sync()
            timings["text_encode"] = time.perf_counter() - start

            latent_shape = job.latent_shape(self.variant)
            if job.image is not None:
                stage("image_encode")
            start = time.perf_counter()
            lock, encode_ranks = self._condition_on_image(job, cond, uncond, latent_shape)
            timings["image_encode"] = time.perf_counter() - start
            if encode_ranks:
                timings["image_encode_ranks"] = encode_ranks

            # The noise depends on the seed only: the same on every rank, whatever the layout.
            noise_gen = torch.Generator(device="cpu").manual_seed(job.seed)
            latents = torch.randn(latent_shape, generator=noise_gen, dtype=torch.float32).to(self.device)

            stage("denoise")
            start = time.perf_counter()
            plan = ExpertPlan(names=self.variant.experts, guidance=job.guidance, boundary=self.variant.boundary)
            step_cache = StepCache(self.config.step_cache) if self.config.step_cache is not None else None
            outcome = denoise(
                get_model=self._expert, plan=plan, sampler=make_sampler(job.sampler, job.steps, job.shift),
                latents=latents, cond=cond, uncond=uncond, cfg=self.layout.cfg_split, dtype=self.dtype,
                progress=report, lock=lock, step_cache=step_cache,
            )
            self._sync()
            timings["denoise"] = time.perf_counter() - start
            timings["step_s"] = outcome.step_s
            if step_cache is not None:
                timings["steps_skipped"] = len(step_cache.skipped)
                timings["skipped_steps"] = list(step_cache.skipped)
            self.last_latents = outcome.latents.detach().float().cpu()
        finally:
            self._park_experts()

        # Past the last step nothing can be cancelled any more: these reports are for display only.
        def done(stage_name: str) -> Progress:
            return Progress(stage=stage_name, step=job.steps, total_steps=job.steps,
                            elapsed_s=time.perf_counter() - total_start)

        report(done("decode"))
        start = time.perf_counter()
        video, decode_ranks = self._decode(outcome.latents)  # every rank joins a split decode
        if self.rank != 0:
            return None
        timings["decode"] = time.perf_counter() - start
        timings["decode_ranks"] = decode_ranks
        if progress_callback is not None:
            progress_callback(done("encode"))
        start = time.perf_counter()
        frames = frames_to_uint8(video)
        self.last_frames = frames
        result = self._write(request, job, frames)
        timings["encode"] = time.perf_counter() - start
        timings["total"] = time.perf_counter() - total_start
        result.timings = timings
        result.experts_per_step = list(outcome.experts_per_step) if self.variant.is_moe else []
        result.layout = self.layout_string()
        result.warnings = notices
        return result

    # --- stages --------------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _prompts(self, job: ResolvedJob) -> list[tuple[str, str]]:
        """(field, text) of what the text encoder reads: the prompt, and the negative prompt (the
        variant's default when none is given) only when a guidance scale needs the unconditional pass."""
        named = [("prompt", job.prompt)]
        if any(scale != 1.0 for scale in job.guidance.values()):
            named.append(("negative_prompt", job.negative_prompt if job.negative_prompt.strip()
                          else self.variant.negative_prompt_prefix + DEFAULT_NEGATIVE_PROMPT))
        return named

    def _encode_text(self, job: ResolvedJob) -> tuple[Branch, Optional[Branch]]:
        prompts = [text for _, text in self._prompts(job)]
        needs_uncond = len(prompts) == 2
        with torch.no_grad():
            if self.config.text_encoder == "cpu" and self.distributed and self.world_size > 1:
                context = self._encode_on_rank0(prompts)
            else:
                context = self._encode_here(prompts)
        cond = Branch(context=context[:1])
        uncond = Branch(context=context[1:2]) if needs_uncond else None
        return cond, uncond

    def _prompt_notices(self, job: ResolvedJob) -> list[str]:
        """Say when a prompt is longer than the text encoder reads: official Wan cuts it to 512 tokens
        without a word, and the end of a long prompt then has no effect on the video."""
        encoder = self.parts.text_encoder
        if encoder is None:
            return []
        named = self._prompts(job)
        notices = []
        for (field_name, text), count in zip(named, encoder.token_counts([text for _, text in named])):
            if count > encoder.text_len:
                notices.append(f"{field_name} is {count} tokens; the text encoder reads only the first "
                               f"{encoder.text_len}, so the rest does not shape the video")
                logger.warning("%s", notices[-1])
        return notices

    def _encode_here(self, prompts: list[str]) -> torch.Tensor:
        encoder = self.parts.text_encoder
        # offload: a replicated T5 waits on the CPU between jobs and comes to the GPU to encode.
        swap = self.config.offload and encoder.placement == "replicated" and self.device.type == "cuda"
        if swap:
            encoder.model.to(self.device)
        try:
            return encoder.encode(prompts).to(self.device)
        finally:
            if swap:
                encoder.model.to("cpu")

    def _encode_on_rank0(self, prompts: list[str]) -> torch.Tensor:
        """A CPU text encoder is loaded and run on rank 0 alone, and the others receive its output: the
        ranks of a node share its cores, and four UMT5-XXL encodes at once took 29 s on a 4-GPU host."""
        if self.rank == 0:
            context = self.parts.text_encoder.encode(prompts).to(self.device)
        else:
            from .components import text_encoder_dtype
            from .text_encoder import TEXT_LEN

            context = torch.empty(len(prompts), TEXT_LEN, self.variant.text_encoder_dim,
                                  dtype=text_encoder_dtype(self.device), device=self.device)
        dist.broadcast(context, src=0)
        return context

    def _vae_ranks(self, latent_rows: int) -> int:
        """How many ranks run the VAE on latents of ``latent_rows`` rows: all of them when ``parallel_vae``
        is on and each gets a row (only toy sizes have fewer rows than ranks), else rank 0 alone."""
        return self.world_size if self.split_vae and latent_rows >= self.world_size else 1

    def _vae_on_device(self):
        """The VAE (rank 0, or every rank with a split VAE) on the device; with offload it waits on
        the CPU between uses."""
        vae = self.parts.vae
        if self.config.offload:
            vae.model.to(self.device)
            vae.device = self.device
        return vae

    def _vae_park(self) -> None:
        if self.config.offload:
            self.parts.vae.model.to("cpu")
            self.parts.vae.device = torch.device("cpu")

    def _encode_video(self, make_video, latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        """The normalized latents ``latent_shape`` (float32) of the video ``make_video()`` on every rank,
        and how many ranks encoded it: split by rows, or rank 0 alone and then broadcast."""
        ranks = self._vae_ranks(latent_shape[-2])
        if ranks > 1 or self.rank == 0:
            vae = self._vae_on_device()
            try:
                video = make_video()
                latent = vae.encode_by_rows(video, dist.group.WORLD) if ranks > 1 else vae.encode(video)
            finally:
                self._vae_park()
        else:
            latent = torch.empty(latent_shape, dtype=torch.float32, device=self.device)
        if ranks == 1:
            latent = self._broadcast(latent)
        return latent, ranks

    def _condition_on_image(self, job: ResolvedJob, cond: Branch, uncond: Optional[Branch],
                            latent_shape: tuple[int, ...]) -> tuple[Optional[FirstFrameLock], int]:
        """Fill ``y``/``clip_fea`` on the branches (I2V) or build the first-frame lock (TI2V); also how
        many ranks encoded the image (0 without one)."""
        if job.image is None:
            return None, 0
        from .conditioning import i2v_video, i2v_y, image_to_tensor, ti2v_lock

        resample = "lanczos" if self.variant.task == "ti2v" else "bicubic"  # as the official pipelines
        image = image_to_tensor(job.image, job.width, job.height, resample).to(self.device)
        # Every rank conditions on identical latents: a split encode gathers the same bytes everywhere.
        with torch.no_grad():
            if self.variant.task == "i2v":
                latent, ranks = self._encode_video(lambda: i2v_video(image, job.num_frames), latent_shape)
                y = i2v_y(latent, job.num_frames, self.variant.vae_stride)
                clip_fea = None
                if self.variant.uses_clip:
                    clip_fea = self.parts.clip.encode(image.unsqueeze(0)).float()
                for branch in (cond, uncond):
                    if branch is not None:
                        branch.y, branch.clip_fea = y, clip_fea
                return None, ranks
            image_shape = (*latent_shape[:2], 1, *latent_shape[3:])
            image_latent, ranks = self._encode_video(lambda: image[None, :, None], image_shape)
            return ti2v_lock(image_latent, latent_shape, self.variant.transformer.patch_size), ranks

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed and self.world_size > 1:
            tensor = tensor.contiguous()
            dist.broadcast(tensor, src=0)
        return tensor

    def _expert(self, name: str) -> torch.nn.Module:
        """The expert ``name`` on the device; with offload, the other experts go back to the CPU."""
        experts = self.parts.experts
        if self.config.offload:
            for other, model in experts.items():
                if other != name:
                    model.to("cpu")
            experts[name].to(self.device)
        return experts[name]

    def _park_experts(self) -> None:
        if self.config.offload:
            for model in self.parts.experts.values():
                model.to("cpu")

    def _decode(self, latents: torch.Tensor) -> tuple[Optional[torch.Tensor], int]:
        """The video [3, F, H, W] in [-1, 1] on rank 0 (None elsewhere), and how many ranks decoded it.

        Split by rows over every rank, or rank 0 alone: see ``_vae_ranks``.
        """
        ranks = self._vae_ranks(latents.shape[-2])
        if ranks == 1 and self.rank != 0:
            return None, ranks
        vae = self._vae_on_device()
        try:
            with torch.no_grad():
                if ranks > 1:
                    video = vae.decode_by_rows(latents, dist.group.WORLD, dst=0)
                else:
                    video = vae.decode(latents)
        finally:
            self._vae_park()
        return (None if video is None else video[0].float()), ranks

    def _write(self, request: GenerationRequest, job: ResolvedJob, frames) -> GenerationResult:
        os.makedirs(request.output_dir, exist_ok=True)
        video_path = write_mp4(frames, os.path.join(request.output_dir, "video.mp4"), self.variant.fps)
        preview_path = write_png(frames[0], os.path.join(request.output_dir, "preview.png"))
        return GenerationResult(
            video_path=video_path, preview_path=preview_path, width=frames.shape[2], height=frames.shape[1],
            num_frames=frames.shape[0], fps=self.variant.fps, seed=job.seed, encoder=mp4_encoder(),
        )

    # --- LoRA ----------------------------------------------------------------------------------

    def _apply_lora(self, path: Optional[str], scale: float) -> None:
        """Keep the merged LoRA cached by (path, scale, its files' size and mtime): merge on change,
        unmerge when dropped. A file replaced under the same name is merged again."""
        from wan_model.lora import expert_lora_files, lora_stamp, merge_lora, unmerge_lora

        wanted = (os.path.abspath(path), scale, lora_stamp(path)) if path else None
        if wanted == self._lora:
            return

        if self._lora is not None:
            for model in self.parts.experts.values():
                unmerge_lora(model)
            self._lora = None
        if wanted is not None:
            try:
                for name, file in expert_lora_files(wanted[0], self.variant).items():
                    merge_lora(self.parts.experts[name], file, scale)
            except ValueError as exc:  # LoraError is a ValueError: keys or shapes that do not fit
                for model in self.parts.experts.values():
                    unmerge_lora(model)
                raise InvalidRequest({"lora": f"{path}: {exc}"}) from None
            self._lora = wanted


def build_generator(config: dict, rank: int, world_size: int) -> Generator:
    """The service's factory: ``config`` is a ``GeneratorConfig`` as a dict.

    The caller has initialized the process group when ``world_size > 1``; with one rank and no
    group, the generator runs without one.
    """
    initialized = dist.is_available() and dist.is_initialized()
    if world_size > 1 and not initialized:
        raise RuntimeError(f"world_size {world_size} needs an initialized process group before build_generator")
    if initialized and (dist.get_rank() != rank or dist.get_world_size() != world_size):
        raise RuntimeError(f"build_generator(rank={rank}, world_size={world_size}) does not match the process "
                           f"group (rank {dist.get_rank()} of {dist.get_world_size()})")
    return Generator(GeneratorConfig.from_dict(dict(config)))
