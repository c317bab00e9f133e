"""``wanserve generate``: one prompt (and image) to one MP4, on this machine, on 1 or N local ranks.

    python -m wan_model.pipeline.cli --prompt "a cat surfing" --num-frames 81 --width 832 \
        --height 480 --steps 50 --seed 0 --output cat.mp4 --model /models/Wan2.1-T2V-1.3B --gpus 2

``--model tiny`` (the default when WANSERVE_MODEL is not set) uses a tiny random-weight model:
it runs anywhere in seconds and produces noise, not a video of the prompt.
With ``--gpus N > 1`` it starts N local ranks (NCCL on GPUs, gloo on the CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from typing import Optional, Sequence

from .request import GenerationRequest, InvalidRequest, JobCancelled


def _guidance(text: str):
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"guidance must be a number or LOW,HIGH; got {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return tuple(values)
    raise argparse.ArgumentTypeError(f"guidance must be a number or LOW,HIGH; got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wanserve generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="", help="default: the official Wan negative prompt")
    p.add_argument("--image", help="input image (PNG/JPEG) for image-to-video models")
    p.add_argument("--num-frames", type=int, help="4n+1 (default: the model's)")
    p.add_argument("--width", type=int, help="pixels (default: the model's; with --image and no size, the "
                   "model's default area in the image's aspect ratio)")
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="FILE.mp4 (a FILE.png preview is written beside it)")
    p.add_argument("--model", default=os.environ.get("WANSERVE_MODEL", "tiny"),
                   help="model folder, or tiny / tiny-<variant> (random weights: noise) [default: %(default)s]")
    p.add_argument("--variant", help="override the variant detected from the model folder")
    p.add_argument("--gpus", type=int, default=1, help="number of local ranks (GPUs, or CPU processes)")
    p.add_argument("--ulysses", type=int)
    p.add_argument("--ring", type=int)
    p.add_argument("--cfg-parallel", action="store_true", default=None)
    p.add_argument("--sampler", choices=["unipc", "euler"])
    p.add_argument("--guidance", type=_guidance, help="scale, or LOW,HIGH for the two A14B experts")
    p.add_argument("--shift", type=float)
    p.add_argument("--preset", choices=["lightning"], help="lightning: 4 Euler steps at shift 5, guidance 1 (distilled LoRA)")
    p.add_argument("--lora", help="LoRA file (or folder with one file per A14B expert)")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--text-encoder", default="replicated", choices=["replicated", "fsdp", "cpu"])
    p.add_argument("--attention", default="auto",
                   help="auto (FlashAttention-3/-4 where installed, else cuDNN/SDPA), fa3, fa3_fp8 (lossy), fa4, cudnn, flash, sdpa, ...")
    p.add_argument("--compile", action="store_true", help="torch.compile every transformer block (GPU speed-up "
                   "after a warm-up)")
    p.add_argument("--fp8", action="store_true", help="fp8 GEMMs in the transformer blocks (faster on sm89+, lossy)")
    p.add_argument("--memory-fraction", type=float)
    p.add_argument("--cache-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _generator_config(args) -> dict:
    manual = args.ulysses is not None or args.ring is not None or args.cfg_parallel is not None
    return dict(
        model=args.model, variant=args.variant, device=args.device, dtype=args.dtype,
        parallel="manual" if manual else "auto", ulysses=args.ulysses, ring=args.ring,
        cfg_parallel=args.cfg_parallel, fsdp=args.fsdp, offload=args.offload, text_encoder=args.text_encoder,
        memory_fraction=args.memory_fraction, attention=args.attention, cache_dir=args.cache_dir,
        compile=args.compile, fp8=args.fp8,
    )


def _request(args, output_dir: str) -> GenerationRequest:
    image = None
    if args.image:
        with open(args.image, "rb") as f:
            image = f.read()
    request = GenerationRequest(
        prompt=args.prompt, output_dir=output_dir, negative_prompt=args.negative_prompt, width=args.width,
        height=args.height, num_frames=args.num_frames, steps=args.steps, guidance=args.guidance, shift=args.shift,
        sampler=args.sampler, seed=args.seed, image=image, lora=args.lora, lora_scale=args.lora_scale,
    )
    if args.preset == "lightning":
        from .schedulers import LIGHTNING_PRESET

        # The preset fills what the user did not set explicitly.
        request = replace(request, **{k: v for k, v in LIGHTNING_PRESET.items() if getattr(request, k) is None})
    return request


def _progress_bar(enabled: bool):
    """A progress callback drawing a tqdm bar over the denoising steps (rank 0)."""
    state = {"bar": None}

    def callback(progress) -> bool:
        if not enabled:
            return False
        if progress.stage == "denoise":
            if state["bar"] is None:
                from tqdm import tqdm

                state["bar"] = tqdm(total=progress.total_steps, desc="denoise", unit="step", file=sys.stderr)
            state["bar"].n = progress.step
            state["bar"].refresh()
        else:
            if state["bar"] is not None:
                state["bar"].close()
                state["bar"] = None
            print(f"[wanserve] {progress.stage} ({progress.elapsed_s:.1f} s)", file=sys.stderr)
        return False

    return callback


def _run_rank(rank: int, world_size: int, port: int, config: dict, request: GenerationRequest, show: bool, results):
    """One rank of a multi-rank run (a spawned process)."""
    try:
        import torch

        from wan_model.parallel import init_distributed

        backend = "nccl" if torch.cuda.is_available() and config.get("device", "auto") != "cpu" else "gloo"
        if backend == "gloo":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        os.environ["LOCAL_RANK"] = str(rank)
        init_distributed(rank, world_size, "127.0.0.1", port, backend=backend)
        import torch.distributed as dist

        try:
            from .generator import build_generator

            generator = build_generator(config, rank, world_size)
            result = generator.generate(request, _progress_bar(show and rank == 0))
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", result))
    except InvalidRequest as exc:
        results.put((rank, "invalid", exc.errors))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_local(config: dict, request: GenerationRequest, world_size: int, show_progress: bool = True,
              timeout_s: float = 24 * 3600):
    """Generate on ``world_size`` local ranks; returns rank 0's ``GenerationResult``."""
    if world_size == 1:
        from .generator import build_generator

        return build_generator(config, 0, 1).generate(request, _progress_bar(show_progress))
    import queue as queue_module
    import socket

    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_run_rank, args=(r, world_size, port, config, request, show_progress, results),
                         daemon=True) for r in range(world_size)]
    outcome: dict = {}
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            proc.start()
        while len(outcome) < world_size:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if r not in outcome and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks did not finish within {timeout_s:.0f} s")
                continue
            if status == "invalid":
                raise InvalidRequest(value)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            outcome[rank] = value
        for proc in procs:
            proc.join(timeout=30)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
    return outcome[0]


def _variant_of(args):
    """The variant the model names (tiny, or detected from the folder's files) -- no weights loaded."""
    from wan_model.config import get_variant

    from .components import tiny_variant_name

    tiny = tiny_variant_name(args.model, args.variant)
    if tiny is not None:
        return get_variant(tiny)
    from .model_dir import detect_model_dir

    return get_variant(detect_model_dir(args.model, variant=args.variant).variant)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.gpus < 1:
        print("error: --gpus must be >= 1", file=sys.stderr)
        return 2
    output = os.path.abspath(args.output)
    if not output.endswith(".mp4"):
        print(f"error: --output must be a .mp4 file, got {args.output}", file=sys.stderr)
        return 2
    if args.image and not os.path.isfile(args.image):
        print(f"error: --image {args.image}: no such file", file=sys.stderr)
        return 2
    if args.model.startswith("tiny"):
        print(f"[wanserve] model {args.model!r}: tiny RANDOM weights -- the output is noise, not a video of the "
              f"prompt (use --model DIR for a real model)", file=sys.stderr)
    try:
        variant = _variant_of(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: --model {args.model}: {exc}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(output), exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix=".wanserve-", dir=os.path.dirname(output))
    try:
        request = _request(args, work_dir)
        # Check the request before starting ranks and loading weights (each rank checks again).
        from .validation import resolve_request

        resolve_request(request, variant)
        result = run_local(_generator_config(args), request, args.gpus, not args.no_progress)
        preview = os.path.splitext(output)[0] + ".png"
        os.replace(result.video_path, output)
        os.replace(result.preview_path, preview)
        result.video_path, result.preview_path = output, preview
    except InvalidRequest as exc:
        for field_name, message in exc.errors.items():
            print(f"error: {field_name}: {message}", file=sys.stderr)
        return 2
    except JobCancelled as exc:
        print(f"cancelled: {exc}", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        t = result.timings
        print(f"wrote {output} ({result.num_frames} frames {result.width}x{result.height} @ {result.fps} fps), "
              f"preview {result.preview_path}")
        print(f"layout: {result.layout}")
        print("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items() if isinstance(v, float)))
        for notice in result.warnings:
            print(f"warning: {notice}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
