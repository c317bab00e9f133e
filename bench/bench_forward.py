"""Time one transformer forward (one denoising step, no CFG): ours vs diffusers, on 1..N GPUs.

Self-spawning (one command covers every world size; each gets fresh processes and a fresh port):

    python bench/bench_forward.py --model 14b,1.3b --gpus 1,2,4 --impl ours,diffusers --out $OUT

or one world per launch: ``torchrun --nproc-per-node 4 bench/bench_forward.py --model 14b ...``.
CPU smoke test (gloo): ``python bench/bench_forward.py --device cpu --model tiny --gpus 1,2 --iters 1``.

Every case (model x shape x impl x world) is timed on its own; a failing case is recorded and the
rest go on; a world that hangs is killed at its deadline. Results: JSON lines (``bench.jsonl``) and a
markdown table (``bench.md``) in ``--out`` (default ``$OUT`` or ``.out/bench``). See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import queue as queue_module
import socket
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repo root: wan_model
sys.path.insert(0, str(HERE))

from bench_models import MODELS, Shape, get_model_config, with_layers  # noqa: E402
from bench_rank import environment, one_line, rank_main  # noqa: E402
from bench_table import format_table  # noqa: E402


# --- arguments -----------------------------------------------------------------------------------


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"bad list {text!r}: {exc}") from None

    return parse


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 1280x720, got {text!r}") from None
    return width, height


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=_csv(str), default=["14b"], help="comma list of 14b, 1.3b, tiny")
    p.add_argument("--size", type=_csv(_size), default=None, help="comma list of WxH (default: the model's own)")
    p.add_argument("--frames", type=_csv(int), default=None, help="comma list of frame counts (4k+1; default 81)")
    p.add_argument("--impl", type=_csv(str), default=["ours", "diffusers"], help="ours, diffusers")
    p.add_argument("--gpus", type=_csv(int), default=None,
                   help="world sizes to spawn, e.g. 1,2,4 (default: under torchrun its world, else 1)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: gloo smoke test")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=90.0,
                   help="per case: fewer timed iterations (at least 1) if warmup shows they would not fit")
    p.add_argument("--deadline", type=float, default=480.0,
                   help="whole command: no world starts after this many seconds, a running one is killed")
    p.add_argument("--attn", default=None, help="our kernel: cudnn, fa3, fa3_fp8, fa4, flash, sdpa (default cudnn; cpu on --device cpu)")
    p.add_argument("--diffusers-attn", default=None,
                   help="diffusers attention backend (default _native_cudnn; native on --device cpu)")
    p.add_argument("--ulysses", type=int, default=None,
                   help="Ulysses degree (rest ring), both impls; default: the largest that divides heads and world")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of every block (both impls)")
    p.add_argument("--compile-mode", default=None,
                   help="ours, with --compile: torch.compile mode (max-autotune-no-cudagraphs, reduce-overhead, ...)")
    p.add_argument("--compile-dynamic", choices=["auto", "off"], default="auto",
                   help="ours, with --compile: auto = the product's automatic dynamic shapes (the first shape "
                        "of a run specialised, later shapes share one symbolic graph), off = one graph per shape")
    p.add_argument("--anchor-eager", action="store_true",
                   help="with --compile: leave diffusers uncompiled (the issue's anchor), so one run gives the ratio")
    p.add_argument("--fp8", action="store_true",
                   help="ours: fp8 GEMMs in the blocks (lossy; the check then reports the error vs diffusers bf16)")
    p.add_argument("--head-chunks", type=int, default=1,
                   help="ours: overlap the Ulysses all-to-alls with attention in this many groups of heads")
    p.add_argument("--sm-margin", type=int, default=0,
                   help="ours, fa3 kernels: SMs attention leaves free for overlapped all-to-alls (with --head-chunks)")
    p.add_argument("--batch", type=int, default=1,
                   help="samples per forward (2: CFG's cond and uncond passes batched into one forward)")
    p.add_argument("--fsdp", action="store_true", help="ours: FSDP2 fully_shard per block over the world")
    p.add_argument("--mem-fraction", type=float, default=None,
                   help="cap each process's CUDA memory (torch.cuda.set_per_process_memory_fraction); 24 GB of 141: 0.17")
    p.add_argument("--check", choices=["auto", "off", "all"], default="auto",
                   help="ours vs diffusers on the same weights: auto = once per model/shape on the largest world")
    p.add_argument("--layers", type=int, default=None, help="override the number of blocks (smoke runs only)")
    p.add_argument("--sweep", action="store_true",
                   help="cost-vs-work sweep: frames 33,81,121 x 832x480,1280x720, impl ours, model 1.3b by default")
    p.add_argument("--profile", action="store_true",
                   help="one extra forward per case under torch.profiler: kernel time by category (rank 0's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default $OUT, else .out/bench)")
    p.add_argument("--tag", default="", help="free text stored in every record (e.g. which lever is on)")
    p.add_argument("--dry-run", action="store_true", help="print the planned cases and budgets, run nothing")
    p.add_argument("--world-timeout", type=float, default=None,
                   help="seconds one world may run (default: cases x (max-seconds + 60) + 120)")
    args = p.parse_args(argv)
    if args.sweep:
        args.size = args.size or [(832, 480), (1280, 720)]
        args.frames = args.frames or [33, 81, 121]
        if "--impl" not in " ".join(argv if argv is not None else sys.argv):
            args.impl = ["ours"]
        if "--model" not in " ".join(argv if argv is not None else sys.argv):
            args.model = ["1.3b"]
    for name in args.model:
        if name not in MODELS:
            p.error(f"unknown --model {name!r}; choose from {', '.join(MODELS)}")
    for impl in args.impl:
        if impl not in ("ours", "diffusers"):
            p.error(f"unknown --impl {impl!r}; choose ours, diffusers")
    if args.warmup < 0 or args.iters < 1:
        p.error("--warmup must be >= 0 and --iters >= 1")
    if args.attn is None:
        args.attn = "cudnn" if args.device == "cuda" else "cpu"
    if args.attn not in ("cudnn", "fa3", "fa3_fp8", "fa4", "flash", "sdpa", "cpu", "math"):
        p.error(f"unknown --attn {args.attn!r}; choose cudnn, fa3, fa3_fp8, fa4, flash, sdpa (cuda) or cpu, math")
    if args.diffusers_attn is None:
        args.diffusers_attn = "_native_cudnn" if args.device == "cuda" else "native"
    if args.out is None:
        args.out = os.environ.get("OUT") or ".out/bench"
    return args


def plan_cases(args: argparse.Namespace) -> list[dict]:
    """Every (model, shape, impl) a world runs, in order; ids are stable across worlds."""
    cases = []
    for model in args.model:
        config = with_layers(get_model_config(model), args.layers)
        _, default_size, default_frames = MODELS[model]
        for width, height in args.size or [default_size]:
            for frames in args.frames or [default_frames]:
                shape = Shape(width, height, frames)
                shape.check(config)
                for impl in args.impl:
                    cases.append(dict(model=model, impl=impl, width=width, height=height, frames=frames,
                                      tokens=shape.tokens(config), layers=config.num_layers))
    return cases


# --- orchestration -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawned_rank(args, cases, check_here, results, rank, world, port) -> None:
    def emit(record: dict) -> None:
        results.put(record)

    try:
        rank_main(args, cases, check_here, emit, rank, world, port)
        results.put(dict(kind="_done", rank=rank))
    except BaseException as exc:
        results.put(dict(kind="world_error", gpus=world, rank=rank, error=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc()[-3000:]))
        results.put(dict(kind="_done", rank=rank))


class Sink:
    """Appends records to the JSONL file as they come (partial results survive a kill) and keeps them."""

    def __init__(self, out_dir: Path, name: str):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / name
        self.records: list[dict] = []

    def __call__(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if record.get("kind") in ("case", "check", "world_error", "skip"):
            print(one_line(record), flush=True)


def run_world(args, cases, check_here: bool, world: int, sink: Sink, deadline: float) -> None:
    """Spawn ``world`` ranks, stream their records into ``sink``; kill them at ``deadline``."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    # Not daemonic: a daemonic process may not start children, and torch.compile's workers are children.
    # The finally below ends every rank whatever happens.
    procs = [ctx.Process(target=_spawned_rank, args=(args, cases, check_here, results, rank, world, port))
             for rank in range(world)]
    for proc in procs:
        proc.start()
    done: set[int] = set()
    reported = False
    try:
        while len(done) < world:
            if time.monotonic() > deadline:
                sink(dict(kind="world_error", gpus=world, error=f"world of {world} killed at its deadline "
                          "(a case hung or the budget ran out); its missing cases have no record"))
                reported = True
                break
            try:
                record = results.get(timeout=1.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
                if dead:
                    sink(dict(kind="world_error", gpus=world, rank=dead[0],
                              error=f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} (crash or OOM kill)"))
                    reported = True
                    break
                continue
            if record["kind"] == "_done":
                done.add(record["rank"])
            else:
                sink(record)
    finally:
        for proc in procs:
            proc.join(timeout=10 if (len(done) == world and not reported) else 0.5)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


def finish(sink: Sink, out_dir: Path, md_name: str) -> None:
    table = format_table(sink.records)
    print("\n" + table, flush=True)
    (out_dir / md_name).write_text(table + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        cases = plan_cases(args)
    except ValueError as exc:
        sys.exit(f"bench_forward.py: error: {exc}")
    out_dir = Path(args.out)
    stem = "bench_sweep" if args.sweep else "bench"

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun: one world, this process is a rank
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        sink = Sink(out_dir, f"{stem}.jsonl") if rank == 0 else None
        if sink:
            sink(environment(args.device) | dict(argv=sys.argv, world=world))

        def emit(record: dict) -> None:  # rank 0 writes the file; the others print their own errors
            if sink is not None:
                sink(record)
            elif record.get("status") == "error":
                print(one_line(record), flush=True)

        rank_main(args, cases, args.check != "off", emit, rank, world, None, int(os.environ.get("LOCAL_RANK", 0)))
        if sink:
            finish(sink, out_dir, f"{stem}.md")
        return

    worlds = args.gpus or [1]
    per_world = args.world_timeout or len(cases) * (args.max_seconds + 60) + 120
    if args.dry_run:
        for case in cases:
            print(f"case: {case}")
        print(f"worlds {worlds}; per world at most {per_world:.0f} s; whole command at most {args.deadline:.0f} s; "
              f"check: {args.check} (auto: on the largest world); output {out_dir / (stem + '.jsonl')}")
        return
    sink = Sink(out_dir, f"{stem}.jsonl")
    sink(environment(args.device) | dict(argv=sys.argv, worlds=worlds, cases=len(cases)))
    available = torch.cuda.device_count() if args.device == "cuda" else max(worlds)
    check_world = max(w for w in worlds if w <= available) if any(w <= available for w in worlds) else None
    for world in worlds:
        remaining = args.deadline - (time.monotonic() - started)
        if world > available:
            sink(dict(kind="skip", gpus=world, reason=f"only {available} {args.device} devices"))
            continue
        if remaining < 30:
            sink(dict(kind="skip", gpus=world, reason=f"--deadline {args.deadline:.0f} s reached"))
            continue
        check_here = args.check == "all" or (args.check == "auto" and world == check_world)
        run_world(args, cases, check_here, world, sink, time.monotonic() + min(per_world, remaining))
    finish(sink, out_dir, f"{stem}.md")
    print(f"records: {sink.path}  total {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
