"""The whole generation path at the real Wan2.1-T2V-1.3B shapes, random weights, on N GPUs.

    python bench/run_pipeline_gpu.py --gpus 2                     # spawns 2 ranks (NCCL), CFG-parallel
    torchrun --nproc-per-node 4 bench/run_pipeline_gpu.py         # or under torchrun
    python bench/run_pipeline_gpu.py --gpus 2 --smoke             # CPU/gloo, toy shapes: tests the script
    python bench/run_pipeline_gpu.py --gpus 4 --compile --step-cache 1.0   # levers of issue #6

No files are needed: the DiT (1.3B config), the Wan2.1 VAE (release config) and a UMT5 encoder
are built in memory with random init in bf16 and handed to ``Generator`` as prebuilt components;
then one warm-up job and one timed job run through ``Generator.generate`` (text encode, denoise with
CFG / CFG-parallel, VAE decode, H.264 encode). ``--t5 small`` (default) uses a 2-layer UMT5 with the
real width 4096 (the DiT's text_dim); ``--t5 real`` builds the full 24-layer UMT5-XXL (5.7B
parameters, ~11 GB bf16 per rank, slower to build). Random weights make a noise video; the
timings are what this is for.

Prints the stage timings on rank 0 and writes them to ``$OUT/pipeline_gpu.json`` (``./.out`` if
``$OUT`` is unset).

Wan2.2 A14B variants (``--variant wan2.2-t2v-a14b``) get both experts, each with its own random
weights; the report lists the expert of every step and each expert's step time. ``--guidance`` takes
one scale or the (low-noise, high-noise) pair; left out, the variant's default applies.

Image-to-video variants (``--variant wan2.1-i2v-14b``, ``wan2.2-ti2v-5b``, ...) get a random image of
the job's size in each request, and Wan2.1 I2V a CLIP ViT-H/14 of the real shape (fp16); the
timings then include ``image_encode`` (VAE encode, and CLIP) and ``image_encode_ranks``.

``--compile``: ``GeneratorConfig.compile`` (regional torch.compile; the warm-up job pays the
compilation). ``--step-cache X``: after the timed uncached job, the same generator runs the same
job again with ``GeneratorConfig.step_cache=X``; the report gives both denoise
times, the skipped steps and the error of the cached final latents vs the uncached ones
(``step_cache`` in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wan_model.config import get_variant  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=None, help="ranks to spawn (default: all visible GPUs); "
                   "ignored under torchrun")
    p.add_argument("--variant", default="wan2.1-t2v-1.3b")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--steps", type=int, default=20, help="timed job's steps (the release default is 50)")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--guidance", type=float, nargs="+", default=None,
                   help="one scale, or low-noise and high-noise scales for A14B (default: the variant's)")
    p.add_argument("--sampler", default="unipc")
    p.add_argument("--cfg-parallel", dest="cfg_parallel", action="store_true", default=None,
                   help="force CFG-parallel (default: auto = on for an even number of ranks)")
    p.add_argument("--no-cfg-parallel", dest="cfg_parallel", action="store_false")
    p.add_argument("--ulysses", type=int)
    p.add_argument("--ring", type=int)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--attention", default="auto")
    p.add_argument("--compile", action="store_true", help="GeneratorConfig.compile: torch.compile every block")
    p.add_argument("--fp8", action="store_true", help="GeneratorConfig.fp8: fp8 GEMMs in the blocks (lossy)")
    p.add_argument("--step-cache", type=float, default=None, metavar="THRESHOLD",
                   help="also run the timed job with GeneratorConfig.step_cache=THRESHOLD and compare")
    p.add_argument("--t5", choices=["small", "real"], default="small")
    p.add_argument("--vae-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--vae", choices=["rows", "rank0"], default="rows",
                   help="GeneratorConfig.parallel_vae: split the VAE (decode, image encode) by rows over the "
                        "ranks (default), or run it on rank 0 alone")
    p.add_argument("--save-latents", help="write the timed job's final latents here (rank 0)")
    p.add_argument("--compare-latents", help="report the max/mean abs difference to latents saved by an earlier "
                   "run (e.g. --gpus 1 --save-latents ref.pt, then --gpus 2 --compare-latents ref.pt)")
    p.add_argument("--smoke", action="store_true", help="CPU/gloo at toy shapes (tiny-t2v), to test the script")
    return p.parse_args(argv)


def build_components(args, device: torch.device, dtype: torch.dtype, rank: int):
    """Random-weight DiT, UMT5 encoder and VAE at the variant's real shapes, built on ``device``."""
    from transformers import UMT5EncoderModel

    from wan_model.model import WanModel
    from wan_model.pipeline.components import Components
    from wan_model.pipeline.text_encoder import UMT5_XXL, TextEncoder, umt5_config
    from wan_model.pipeline.tiny import build_tiny_tokenizer
    from wan_model.pipeline.vae import WanVAE, vae_config

    variant = get_variant(args.variant)
    torch.manual_seed(0)  # the same weights on every rank
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            experts = {}
            for index, name in enumerate(variant.experts):  # Wan2.2 A14B: high_noise, low_noise
                torch.manual_seed(10 + index)
                dit = WanModel(variant.transformer).eval().requires_grad_(False)
                # init_weights zeroes the output head (official); give it weights so the steps do work.
                torch.nn.init.normal_(dit.head.head.weight, std=0.02)
                experts[name] = dit
            if args.smoke:
                t5_shape = dict(d_model=variant.text_encoder_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                vocab_size=256)
            elif args.t5 == "real":
                t5_shape = UMT5_XXL
            else:
                t5_shape = dict(UMT5_XXL, num_layers=2, vocab_size=32128)
            t5 = UMT5EncoderModel(umt5_config(**t5_shape)).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)

    # Any T5 SentencePiece tokenizer does for timing; the tiny one is built locally in a second.
    tok_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"wanserve-bench-tokenizer-{rank}"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tok_dir))
    text_encoder = TextEncoder(t5, tokenizer, device=device, placement="replicated")

    vae = None
    if rank == 0 or args.vae == "rows":  # a split VAE needs the (same) VAE on every rank
        from diffusers import AutoencoderKLWan

        torch.manual_seed(1)
        config = vae_config(variant.vae, base_dim=8 if args.smoke else None)
        vae_model = AutoencoderKLWan(**config).eval().requires_grad_(False)
        vae = WanVAE(vae_model.to(getattr(torch, args.vae_dtype)), device=device)
    clip = None
    if variant.uses_clip:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        from wan_model.pipeline.clip import CLIPImageEncoder

        width = variant.transformer.image_dim  # 1280: ViT-H/14, as the official I2V release
        shape = dict(intermediate_size=64, num_attention_heads=2, num_hidden_layers=3) if args.smoke else dict(
            intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32)
        clip_config = CLIPVisionConfig(hidden_size=width, image_size=224, patch_size=14, hidden_act="gelu",
                                       layer_norm_eps=1e-5, **shape)
        torch.manual_seed(2)
        clip_dtype = torch.float32 if args.smoke else torch.float16
        clip = CLIPImageEncoder(CLIPVisionModel(clip_config).eval().requires_grad_(False).to(clip_dtype),
                                device=device)
    return Components(variant=variant, model_dir=Path("<random weights in memory>"), experts=experts,
                      text_encoder=text_encoder, vae=vae, clip=clip)


def random_png(width: int, height: int) -> bytes:
    """A random image for image-to-video jobs (its content does not change the timings)."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def run(rank: int, world_size: int, args) -> None:
    from wan_model.pipeline.generator import Generator, GeneratorConfig
    from wan_model.pipeline.request import GenerationRequest

    device = torch.device("cpu") if args.smoke else torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:
        spec = get_variant(args.variant)
        args.variant = {"i2v": "tiny-i2v", "ti2v": "tiny-ti2v"}.get(spec.task, "tiny-a14b" if spec.is_moe else "tiny-t2v")
        args.frames, args.width, args.height = 5, 64, 64
        args.steps, args.warmup_steps = min(args.steps, 8 if args.step_cache is not None else 3), 1
    build_start = time.perf_counter()
    components = build_components(args, device, dtype, rank)
    manual = args.ulysses is not None or args.ring is not None or args.cfg_parallel is not None
    config = GeneratorConfig(model="<in-memory>", device=str(device), dtype="float32" if args.smoke else "bfloat16",
                             parallel="manual" if manual else "auto", ulysses=args.ulysses, ring=args.ring,
                             cfg_parallel=args.cfg_parallel, fsdp=args.fsdp, attention=args.attention,
                             compile=args.compile, fp8=args.fp8, parallel_vae=args.vae == "rows")
    generator = Generator(config, components=components)
    build_s = time.perf_counter() - build_start

    out_dir = Path(os.environ.get("OUT") or REPO / ".out")
    out_dir.mkdir(parents=True, exist_ok=True)

    image = random_png(args.width, args.height) if generator.variant.task != "t2v" else None

    guidance = None if args.guidance is None else (
        args.guidance[0] if len(args.guidance) == 1 else tuple(args.guidance))

    def job(steps: int, name: str) -> GenerationRequest:
        return GenerationRequest(prompt="a red fox running through fresh snow, cinematic", output_dir=str(out_dir / name),
                                 num_frames=args.frames, width=args.width, height=args.height, steps=steps,
                                 guidance=guidance, sampler=args.sampler, seed=0, image=image)

    generator.generate(job(args.warmup_steps, "pipeline_warmup"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = generator.generate(job(args.steps, "pipeline_video"))
    latents = generator.last_latents
    cached = None
    if args.step_cache is not None:
        # The same generator (weights, process groups, compiled blocks), only the step cache switched on:
        # Generator.generate reads config.step_cache per job.
        from dataclasses import replace

        generator.config = replace(config, step_cache=args.step_cache)
        cached_result = generator.generate(job(args.steps, "pipeline_cached_video"))
        cached = (generator.last_latents, cached_result)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    peaks = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(peaks, peak)
    else:
        peaks = [peak]
    if rank != 0:
        return
    steps = result.timings["step_s"]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "variant": args.variant, "world": world_size, "layout": result.layout,
        "video": {"frames": args.frames, "width": args.width, "height": args.height},
        "steps": args.steps, "guidance": guidance, "sampler": args.sampler, "t5": args.t5,
        "build_s": build_s, "timings": result.timings,
        "step_s_mean": sum(steps[1:]) / max(1, len(steps) - 1) if len(steps) > 1 else steps[0],
        "experts_per_step": result.experts_per_step, "step_s_by_expert": _by_expert(steps, result.experts_per_step),
        "peak_memory_gib_per_rank": peaks, "video_path": result.video_path,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "timings"}, indent=2))
    print("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items() if isinstance(v, float)))
    if cached is not None:
        cached_latents, cached_result = cached
        diff = cached_latents - latents
        report["step_cache"] = {
            "threshold": args.step_cache, "layout": cached_result.layout,
            "skipped_steps": cached_result.timings["skipped_steps"],
            "steps_skipped": cached_result.timings["steps_skipped"],
            "denoise_s": cached_result.timings["denoise"], "uncached_denoise_s": result.timings["denoise"],
            "denoise_speedup": result.timings["denoise"] / cached_result.timings["denoise"],
            "total_s": cached_result.timings["total"], "uncached_total_s": result.timings["total"],
            "latents_rel_l2": (diff.norm() / latents.norm()).item(), "latents_max_abs": diff.abs().max().item(),
            "latents_mean_abs": diff.abs().mean().item(), "uncached_latents_mean_abs": latents.abs().mean().item(),
            "timings": cached_result.timings,
        }
        print("step cache: " + json.dumps({k: v for k, v in report["step_cache"].items() if k != "timings"}))
    if args.save_latents:
        torch.save(latents, args.save_latents)
    if args.compare_latents:
        reference = torch.load(args.compare_latents)
        diff = (latents - reference).abs()
        report["latents_vs_reference"] = {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
                                          "reference_mean_abs": reference.abs().mean().item()}
        print(f"latents vs {args.compare_latents}: {report['latents_vs_reference']}")
    (out_dir / "pipeline_gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_dir / 'pipeline_gpu.json'}")


def _by_expert(step_s: list, experts: list) -> dict:
    """Steps and mean step seconds per expert (A14B); the first step of each expert is left out of
    the mean when it has others, since it may pay first-call costs."""
    out = {}
    for name in dict.fromkeys(experts):
        times = [t for t, e in zip(step_s, experts) if e == name]
        rest = times[1:] or times
        out[name] = {"steps": len(times), "first_s": times[0], "mean_s": sum(rest) / len(rest)}
    return out


def _spawned(rank: int, world_size: int, port: int, args) -> None:
    from wan_model.parallel import init_distributed

    os.environ["LOCAL_RANK"] = str(rank)
    if args.smoke:
        torch.set_num_threads(1)
    init_distributed(rank, world_size, "127.0.0.1", port, backend="gloo" if args.smoke else "nccl")
    try:
        run(rank, world_size, args)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # torchrun
        from wan_model.parallel import init_distributed

        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        init_distributed(rank, world_size, os.environ.get("MASTER_ADDR", "127.0.0.1"),
                         int(os.environ.get("MASTER_PORT", 29500)), backend="gloo" if args.smoke else "nccl",
                         local_rank=int(os.environ.get("LOCAL_RANK", rank)))
        try:
            run(rank, world_size, args)
        finally:
            dist.destroy_process_group()
        return
    world_size = args.gpus or (1 if args.smoke else torch.cuda.device_count())
    if world_size < 1:
        raise SystemExit("no GPU visible (use --smoke to test the script on the CPU)")
    if world_size == 1:
        if not args.smoke:
            torch.cuda.set_device(0)
        run(0, 1, args)
        return
    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_spawned, args=(world_size, port, args), nprocs=world_size, join=True)


if __name__ == "__main__":
    main()
