"""The VAE split by rows over N GPUs (ours) against diffusers' whole-frame pass on one GPU.

``--op decode``: the anchor is diffusers ``AutoencoderKLWan.decode`` on rank 0 alone, which is also
what a generator with ``parallel_vae: false`` runs; ours is ``wan_model.parallel.vae_rows.decode_by_rows``
on all ranks, gathered on rank 0. ``--op encode`` (the image encode of image-to-video jobs): the anchor
is ``AutoencoderKLWan.encode(video).latent_dist.mode()`` on rank 0, which then broadcasts it; ours is
``encode_by_rows``, gathered on every rank. Same random weights of the real shapes (float32, as the
generator loads the VAE), same input; the difference between the two outputs is reported
(``--fp32-check``: also with TF32 off, against the TF32 rounding of the whole-frame pass itself). For
each size: median seconds, speed-up, max abs difference, peak memory per GPU.

    python3 bench/bench_vae_rows.py --gpus 4 --sizes 1280x720x81,832x480x81 --op decode,encode --out $OUT
    python3 bench/bench_vae_rows.py --smoke   # CPU/gloo, toy VAE, to test the script
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

from ranks import finish_ranks, join_group, spawn_ranks

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _passes(op: str, vae, x: torch.Tensor, group, rank: int):
    """(whole-frame pass on rank 0 alone, split pass) for ``op``; each returns its output on the ranks
    that get one (None elsewhere)."""
    from wan_model.parallel.vae_rows import decode_by_rows, encode_by_rows

    if op == "decode":
        return (lambda: vae.decode(x, return_dict=False)[0] if rank == 0 else None,
                lambda: decode_by_rows(vae, x, group, dst=0))

    def whole_encode():  # as the generator does without a split: rank 0 encodes, then broadcasts
        mu = vae.encode(x).latent_dist.mode().contiguous() if rank == 0 else None
        if rank != 0:
            shape = (1, vae.config.z_dim, (x.shape[2] - 1) // vae.config.scale_factor_temporal + 1,
                     x.shape[3] // vae.config.scale_factor_spatial, x.shape[4] // vae.config.scale_factor_spatial)
            mu = torch.empty(shape, device=x.device)
        dist.broadcast(mu, src=0, group=group)
        return mu if rank == 0 else None
    return whole_encode, lambda: encode_by_rows(vae, x, group)


def _input(op: str, vae, width: int, height: int, frames: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ratio_t, ratio_s = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    if op == "decode":
        shape = (1, vae.config.z_dim, (frames - 1) // ratio_t + 1, height // ratio_s, width // ratio_s)
        return torch.randn(shape, generator=g).to(device)
    return (torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1).to(device)


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out_file: str) -> None:
    from diffusers import AutoencoderKLWan

    from wan_model.pipeline.vae import vae_config

    if args.smoke:
        torch.set_num_threads(1)
    device = join_group(rank, world, port, cpu=args.smoke)
    group = dist.group.WORLD
    torch.manual_seed(0)  # the same weights on every rank
    vae = AutoencoderKLWan(**vae_config(args.kind, base_dim=8 if args.smoke else None)).eval().requires_grad_(False)
    vae = vae.to(device)
    rows: list[dict] = []

    for op in args.op.split(","):
        for size in args.sizes.split(","):
            width, height, frames = (int(v) for v in size.split("x"))
            x = _input(op, vae, width, height, frames, device)
            whole_pass, split_pass = _passes(op, vae, x, group, rank)
            names = {"diffusers_1gpu": whole_pass, f"ours_rows_{world}gpu": split_pass}
            timings: dict[str, list[float]] = {name: [] for name in names}
            outputs: dict[str, torch.Tensor] = {}
            peaks: dict[str, list[float]] = {}
            for name, run in names.items():
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                for i in range(args.warmup + args.iters):
                    dist.barrier()
                    _sync(device)
                    start = time.perf_counter()
                    with torch.no_grad():
                        out = run()
                    _sync(device)
                    if i >= args.warmup:
                        timings[name].append(time.perf_counter() - start)
                    if rank == 0:
                        outputs[name] = out.cpu()
                    del out
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
                gathered = [None] * world
                dist.all_gather_object(gathered, peak)
                peaks[name] = [round(p, 2) for p in gathered]
            whole, split = (outputs.get(name) for name in names)
            fp32 = None
            if args.fp32_check and device.type == "cuda":
                # cuDNN convolutions run in TF32 by default: the two passes above differ by TF32 rounding.
                # Once more in full fp32: the split against the whole frame, and TF32 against fp32.
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False
                with torch.no_grad():
                    whole32, split32 = whole_pass(), split_pass()
                torch.backends.cudnn.allow_tf32 = True
                torch.backends.cuda.matmul.allow_tf32 = True
                if rank == 0:
                    fp32 = dict(split_vs_whole_max_abs=float((split32 - whole32).abs().amax()),
                                tf32_whole_vs_fp32_whole_max_abs=float((whole - whole32.cpu()).abs().amax()))
            if rank == 0:
                single = statistics.median(timings["diffusers_1gpu"])
                ours = statistics.median(timings[f"ours_rows_{world}gpu"])
                row = dict(kind=f"vae_{op}", vae=args.kind, size=size, input=list(x.shape), gpus=world,
                           tag=args.tag, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           diffusers_1gpu_s=round(single, 3), ours_rows_s=round(ours, 3),
                           speedup=round(single / ours, 2), efficiency=round(single / ours / world, 3),
                           max_abs_diff=float((split - whole).abs().amax()), max_abs_output=float(whole.abs().amax()),
                           fp32=fp32, peak_gib=peaks, times={k: [round(t, 3) for t in v] for k, v in timings.items()})
                print(json.dumps(row), flush=True)
                rows.append(row)
            del x
    finish_ranks(rank, rows, out_file)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=max(1, torch.cuda.device_count()))
    p.add_argument("--kind", choices=["wan2.1", "wan2.2"], default="wan2.1")
    p.add_argument("--sizes", default="1280x720x81,832x480x81", help="WIDTHxHEIGHTxFRAMES, comma-separated")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--op", default="decode", help="decode, encode or decode,encode")
    p.add_argument("--fp32-check", action="store_true",
                   help="also run both ways once with TF32 off and report the differences")
    p.add_argument("--tag", default="")
    p.add_argument("--smoke", action="store_true", help="CPU/gloo, toy VAE (base_dim 8), 2 ranks, 64x48x9")
    p.add_argument("--out", default=os.environ.get("OUT", ".out/bench"))
    args = p.parse_args()
    if args.smoke:
        args.gpus, args.sizes, args.warmup, args.iters, args.op = 2, "64x48x9", 0, 1, "decode,encode"
    bad = set(args.op.split(",")) - {"decode", "encode"}
    if bad:
        print(f"unknown --op {', '.join(sorted(bad))}: decode, encode", file=sys.stderr)
        return 2
    return spawn_ranks(rank_main, args.gpus, args, Path(args.out) / "vae_rows.jsonl", min_world=2)


if __name__ == "__main__":
    sys.exit(main())
