"""VAE decode: split by rows over N GPUs (ours) against diffusers' whole-frame decode on one GPU.

The anchor is diffusers ``AutoencoderKLWan.decode`` on rank 0 alone, which is also what a
generator with ``parallel_decode: false`` runs. Ours is ``wan_model.parallel.vae_decode`` on all
ranks, gathered on rank 0. Same random weights of the real shapes (float32, as the generator loads
the VAE), same latents; the difference between the two videos is reported (``--fp32-check``: also
with TF32 off, against the TF32 rounding of the whole-frame decode itself). For each video size:
median seconds, speed-up, max abs difference (video values in [-1, 1]), peak memory per GPU.

    python3 bench/bench_vae_decode.py --gpus 4 --sizes 1280x720x81,832x480x81 --out $OUT
    python3 bench/bench_vae_decode.py --smoke   # CPU/gloo, toy VAE, to test the script
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ranks import finish_ranks, spawn_ranks

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out_file: str) -> None:
    from diffusers import AutoencoderKLWan

    from wan_model.parallel.vae_decode import decode_by_rows
    from wan_model.pipeline.vae import vae_config

    if args.smoke:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            **({"device_id": device} if device.type == "cuda" else {}))
    group = dist.group.WORLD
    torch.manual_seed(0)  # the same weights on every rank
    vae = AutoencoderKLWan(**vae_config(args.kind, base_dim=8 if args.smoke else None)).eval().requires_grad_(False)
    vae = vae.to(device)
    ratio_t, ratio_s = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    rows: list[dict] = []

    for size in args.sizes.split(","):
        width, height, frames = (int(v) for v in size.split("x"))
        g = torch.Generator().manual_seed(1)
        z = torch.randn(1, vae.config.z_dim, (frames - 1) // ratio_t + 1, height // ratio_s, width // ratio_s,
                        generator=g).to(device)
        timings: dict[str, list[float]] = {"diffusers_1gpu": [], f"ours_rows_{world}gpu": []}
        peaks: dict[str, float] = {}
        whole = split = None
        for name in timings:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            for i in range(args.warmup + args.iters):
                dist.barrier()
                _sync(device)
                start = time.perf_counter()
                with torch.no_grad():
                    if name == "diffusers_1gpu":
                        out = vae.decode(z, return_dict=False)[0] if rank == 0 else None
                    else:
                        out = decode_by_rows(vae, z, group, dst=0)
                _sync(device)
                if i >= args.warmup:
                    timings[name].append(time.perf_counter() - start)
                if rank == 0:
                    if name == "diffusers_1gpu":
                        whole = out.cpu()
                    else:
                        split = out.cpu()
                del out
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
            gathered = [None] * world
            dist.all_gather_object(gathered, peak)
            peaks[name] = [round(p, 2) for p in gathered]
        fp32 = None
        if args.fp32_check and device.type == "cuda":
            # cuDNN convolutions run in TF32 by default: the two decodes above differ by TF32 rounding.
            # Once more in full fp32: the split against the whole frame, and TF32 against fp32.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            with torch.no_grad():
                whole32 = vae.decode(z, return_dict=False)[0].cpu() if rank == 0 else None
                split32 = decode_by_rows(vae, z, group, dst=0)
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cuda.matmul.allow_tf32 = True
            if rank == 0:
                fp32 = dict(split_vs_whole_max_abs=float((split32.cpu() - whole32).abs().amax()),
                            tf32_whole_vs_fp32_whole_max_abs=float((whole - whole32).abs().amax()))
        if rank == 0:
            single = statistics.median(timings["diffusers_1gpu"])
            ours = statistics.median(timings[f"ours_rows_{world}gpu"])
            row = dict(kind="vae_decode", vae=args.kind, size=size, latent=list(z.shape), gpus=world, tag=args.tag,
                       device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       diffusers_1gpu_s=round(single, 3), ours_rows_s=round(ours, 3),
                       speedup=round(single / ours, 2), efficiency=round(single / ours / world, 3),
                       max_abs_diff=float((split - whole).abs().amax()), fp32=fp32, peak_gib=peaks,
                       times={k: [round(t, 3) for t in v] for k, v in timings.items()})
            print(json.dumps(row), flush=True)
            rows.append(row)
    finish_ranks(rank, rows, out_file)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=max(1, torch.cuda.device_count()))
    p.add_argument("--kind", choices=["wan2.1", "wan2.2"], default="wan2.1")
    p.add_argument("--sizes", default="1280x720x81,832x480x81", help="WIDTHxHEIGHTxFRAMES, comma-separated")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--fp32-check", action="store_true",
                   help="also decode both ways once with TF32 off and report the differences")
    p.add_argument("--tag", default="")
    p.add_argument("--smoke", action="store_true", help="CPU/gloo, toy VAE (base_dim 8), 2 ranks, 64x48x9")
    p.add_argument("--out", default=os.environ.get("OUT", ".out/bench"))
    args = p.parse_args()
    if args.smoke:
        args.gpus, args.sizes, args.warmup, args.iters = 2, "64x48x9", 0, 1
    if args.gpus < 2:
        print("bench_vae_decode needs at least 2 ranks", file=sys.stderr)
        return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    spawn_ranks(rank_main, args.gpus, args, Path(args.out) / "vae_decode.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
