"""Does a compile cache made on one GPU host serve another? (A KubeRay pod that starts on a new node.)

    python3 bench/check_compile_cache_gpu.py --cache /tmp/cc --runs 2 --pack $OUT/cache.tar.gz   # host A
    python3 bench/check_compile_cache_gpu.py --cache /tmp/cc --unpack cache.tar.gz --runs 1     # host B

Each run is a new process, as a new replica's worker is: random bf16 weights of the model's real
shapes (seeded, so every run has the same), ``wan_model.compile.use_cache_dir(--cache)``, regional
``torch.compile``, then timed forwards: the first (compiling or loading from the cache), then
``--iters`` more. It prints and appends to ``$OUT/compile_cache.jsonl`` the host, the GPU, the time of
the first forward, the graphs compiled and loaded from the cache, and a checksum of the output (the
same kernels on the same GPU model give the same bits). ``--pack`` tars the cache folder after the
runs; ``--unpack`` restores one before them. ``--smoke``: tiny model on the CPU (tests this script).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(args) -> dict:
    """Run in a fresh process: build, compile, time; the record."""
    import torch

    sys.path[:0] = [str(REPO), str(REPO / "bench")]
    from bench_models import MODELS, Shape, build_ours, make_inputs

    from wan_model.compile import compile_blocks, compile_stats, use_cache_dir

    use_cache_dir(args.cache)
    device = torch.device("cpu" if args.smoke else "cuda", 0)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    config, (width, height), frames = MODELS["tiny" if args.smoke else args.model]
    shape = Shape(width, height, frames)
    model = build_ours(config, device, dtype, seed=0).eval().requires_grad_(False)
    compile_blocks(model)
    inputs = make_inputs(config, shape, device, dtype, seed=1)
    times = []
    with torch.no_grad():
        for _ in range(1 + args.iters):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            out = model(*inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    digest = hashlib.sha256(out.float().cpu().numpy().tobytes()).hexdigest()[:16]
    gpu_uuid = str(torch.cuda.get_device_properties(0).uuid) if device.type == "cuda" else None
    return {"host": socket.gethostname(), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "gpu_uuid": gpu_uuid,  # host names can repeat between loans; the GPU's id does not
            "model": "tiny" if args.smoke else args.model, "tokens": shape.tokens(config),
            "first_forward_s": round(times[0], 3), "later_forward_s": [round(t, 4) for t in times[1:]],
            **compile_stats(), "output_sha256": digest, "torch": torch.__version__}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="1.3b", choices=["1.3b", "14b"])
    p.add_argument("--cache", required=True, help="the compile cache folder")
    p.add_argument("--runs", type=int, default=1, help="new processes, one after another")
    p.add_argument("--iters", type=int, default=2, help="forwards after the first")
    p.add_argument("--pack", help="write the cache folder to this .tar.gz after the runs")
    p.add_argument("--unpack", help="restore the cache folder from this .tar.gz first")
    p.add_argument("--tag", default="")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RECORD " + json.dumps(one_run(args)))
        return 0
    out = Path(os.environ.get("OUT") or REPO / ".out")
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    if args.unpack:
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.unpack) as tar:
            tar.extractall(cache, filter="data")
    child = [sys.executable, __file__, "--child", "--model", args.model, "--cache", str(cache),
             "--iters", str(args.iters)] + (["--smoke"] if args.smoke else [])
    ok = True
    for i in range(args.runs):
        done = subprocess.run(child, capture_output=True, text=True, timeout=900)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RECORD ")]
        if done.returncode != 0 or not lines:
            print(done.stderr[-4000:], file=sys.stderr)
            ok = False
            break
        record = {**json.loads(lines[0][len("RECORD "):]), "run": i, "tag": args.tag,
                  "cache_was_restored": bool(args.unpack)}
        print(json.dumps(record))
        with open(out / "compile_cache.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    if args.pack:
        with tarfile.open(args.pack, "w:gz") as tar:
            tar.add(cache, arcname=".")
        print(f"packed {cache} into {args.pack} ({Path(args.pack).stat().st_size / 1e6:.1f} MB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
