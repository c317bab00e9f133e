"""What each rank does: join the group, build each model, time its forwards, check ours vs diffusers.

Used by ``bench_forward.py`` (spawned ranks or torchrun). Records go out through ``emit(dict)``;
rank 0 reports the results, any rank reports its own errors.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import subprocess
import time
import traceback
from pathlib import Path

import torch

from bench_models import Shape, get_model_config, with_layers

GIB = 1024**3
HERE = Path(__file__).resolve().parent



class Dist:
    """The few collectives the timing loop needs, on this rank's device."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.device = device
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        flag = torch.zeros(1, device=self.device)
        self.dist.all_reduce(flag)
        self.sync()

    def reduce(self, values: list[float], op: str) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(tensor, op=getattr(self.dist.ReduceOp, op))
        return tensor.tolist()

    def gather(self, value: float) -> list[float]:
        out = [torch.zeros(1, dtype=torch.float64, device=self.device) for _ in range(self.world)]
        self.dist.all_gather(out, torch.tensor([value], dtype=torch.float64, device=self.device))
        return [t.item() for t in out]


def time_forward(fn, comm: Dist, warmup: int, iters: int, max_seconds: float) -> dict:
    """Warm up, then time ``iters`` calls (fewer if they would overrun ``max_seconds``); the step time of an
    iteration is the slowest rank's."""
    start = time.perf_counter()
    warm = []
    for _ in range(warmup):
        comm.barrier()
        t0 = time.perf_counter()
        fn()
        comm.sync()
        warm.append(time.perf_counter() - t0)
    iters_run = iters
    if warm:
        per_iter, elapsed = comm.reduce([warm[-1], time.perf_counter() - start], "MAX")
        iters_run = max(1, min(iters, int((max_seconds - elapsed) // max(per_iter, 1e-9))))
    times = []
    out = None
    for _ in range(iters_run):
        out = None  # free the previous output before the next forward
        comm.barrier()
        t0 = time.perf_counter()
        out = fn()
        comm.sync()
        times.append(time.perf_counter() - t0)
    # Random weights must still give finite, non-degenerate outputs (catches uninitialised memory).
    out = out.float()
    finite = bool(torch.isfinite(out).all())
    rms = out.pow(2).mean().sqrt().item() if finite else float("nan")
    del out
    times = comm.reduce(times, "MAX")
    warm = comm.reduce(warm, "MAX") if warm else []
    return dict(median_s=statistics.median(times), min_s=min(times), max_s=max(times), times_s=times,
                warmup_s=warm, iters=iters_run, iters_requested=iters, truncated=iters_run < iters,
                output_finite=finite, output_rms=rms)


# Kernel-name fragments -> category, first match wins (FA4 and cuDNN attention kernels come before
# the GEMM patterns because their names also mention cutlass/sm90).
_KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "cudnn_generated", "sdpa")),
    ("nccl", ("nccl",)),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "matmul", "splitkreduce")),
    ("triton", ("triton",)),
)


def kernel_breakdown(fn, device: torch.device, top: int = 15) -> dict:
    """One call of ``fn`` under the profiler: GPU kernel time per category and the top kernels, in ms."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    totals: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for event in prof.events():
        if event.device_type.name != "CUDA":
            continue
        ms = event.device_time / 1e3
        name = event.name
        kernels[name] = kernels.get(name, 0.0) + ms
        lowered = name.lower()
        category = next((c for c, keys in _KERNEL_CATEGORIES if any(k in lowered for k in keys)), "other")
        totals[category] = totals.get(category, 0.0) + ms
    top_kernels = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return dict(category_ms={k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
                total_kernel_ms=round(sum(totals.values()), 2),
                top_kernels_ms=[(name[:120], round(ms, 2)) for name, ms in top_kernels])


def _memory(device: torch.device) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, None
    return torch.cuda.memory_allocated(device) / GIB, torch.cuda.max_memory_allocated(device) / GIB


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class Runner:
    """Builds and times the cases of one world on this rank; reports through ``emit``."""

    def __init__(self, args: argparse.Namespace, device: torch.device, emit):
        from wan_model.parallel import ParallelConfig, pick_parallel_degrees, setup_sequence_parallel

        self.args, self.device, self.emit = args, device, emit
        self.dtype = torch.bfloat16
        self.comm = Dist(device)
        self.world, self.rank = self.comm.world, self.comm.rank
        self._setup_sp, self._pick, self._config_cls = setup_sequence_parallel, pick_parallel_degrees, ParallelConfig
        self._sp_states: dict[tuple[int, int], object] = {}
        if self.rank == 0 and device.type == "cuda":
            emit(dict(kind="env_world", gpus=self.world, gpu=torch.cuda.get_device_name(device),
                      cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                      total_gib=torch.cuda.get_device_properties(device).total_memory / GIB))

    def degrees(self, num_heads: int) -> tuple[int, int]:
        if self.args.ulysses is None:
            picked = self._pick(self.world, num_heads)
            return picked.ulysses, picked.ring
        ulysses = self.args.ulysses
        if self.world % ulysses or num_heads % ulysses:
            raise ValueError(f"--ulysses {ulysses} must divide the world {self.world} and the {num_heads} heads")
        return ulysses, self.world // ulysses

    def sp_state(self, ulysses: int, ring: int):
        key = (ulysses, ring)
        if key not in self._sp_states:
            self._sp_states[key] = self._setup_sp(self._config_cls(ulysses=ulysses, ring=ring))
        return self._sp_states[key]

    # builders -----------------------------------------------------------------------------------

    def build(self, impl: str, config, ulysses: int, ring: int):
        from bench_models import build_diffusers, build_ours

        args = self.args
        if impl == "ours":
            model = build_ours(config, self.device, self.dtype, args.seed, fsdp=args.fsdp)
            self.parallelize_ours(model, ulysses, ring)
        else:
            model = build_diffusers(config, self.device, self.dtype, args.seed)
            self.parallelize_diffusers(model, ulysses, ring)
        self.maybe_compile(impl, model)
        return model

    def compiles(self, impl: str) -> bool:
        """``--compile`` compiles both implementations, unless ``--anchor-eager`` keeps diffusers eager."""
        return self.args.compile and not (impl == "diffusers" and getattr(self.args, "anchor_eager", False))

    def maybe_compile(self, impl: str, model) -> None:
        """``--fp8`` (ours): fp8 GEMMs in the blocks. ``--compile``: regional compilation, every
        transformer block on its own (both impls alike)."""
        if impl == "ours" and getattr(self.args, "fp8", False):
            from wan_model.fp8 import quantize_blocks_fp8  # the product's own option (GeneratorConfig.fp8)

            quantize_blocks_fp8(model)
        if not self.compiles(impl):
            return
        if impl == "ours":
            from wan_model.compile import compile_blocks  # the product's own option (GeneratorConfig.compile)

            dynamic = {"auto": None, "off": False}[getattr(self.args, "compile_dynamic", "auto")]
            compile_blocks(model, mode=getattr(self.args, "compile_mode", None), dynamic=dynamic)
        else:
            model.compile_repeated_blocks()

    def parallelize_ours(self, model, ulysses: int, ring: int) -> None:
        state = self.sp_state(ulysses, ring)
        kernel = "auto" if self.args.attn == "sdpa" else self.args.attn
        model.set_parallel(state.sharding(), state.attention(kernel=kernel, head_chunks=self.args.head_chunks))

    def parallelize_diffusers(self, model, ulysses: int, ring: int) -> None:
        model.set_attention_backend(self.args.diffusers_attn)
        if self.world > 1:
            from diffusers import ContextParallelConfig

            if self.device.type == "cpu" and torch.accelerator.device_count() == 0:
                # diffusers picks the device as rank % device_count(): on a CPU-only host that divides by 0.
                torch.accelerator.device_count = lambda: 1
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring))

    def forward_fn(self, impl: str, model, inputs):
        x, t, context = inputs
        if impl == "ours":
            return lambda: model(x, t, context)
        return lambda: model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]

    # cases --------------------------------------------------------------------------------------

    def record(self, case: dict, **fields) -> dict:
        args = self.args
        return dict(kind="case", **case, gpus=self.world, device=args.device, compile=self.compiles(case["impl"]),
                    compile_requested=args.compile, anchor_eager=getattr(args, "anchor_eager", False),
                    fp8=getattr(args, "fp8", False) and case["impl"] == "ours", ours_fp8_requested=getattr(args, "fp8", False),
                    head_chunks=args.head_chunks, sm_margin=getattr(args, "sm_margin", 0),
                    compile_mode=getattr(args, "compile_mode", None),
                    compile_dynamic=getattr(args, "compile_dynamic", "auto"), batch=getattr(args, "batch", 1),
                    fsdp=args.fsdp and case["impl"] == "ours", mem_fraction=args.mem_fraction, tag=args.tag,
                    ours_attn_requested=args.attn, ulysses_requested=args.ulysses,
                    **fields)

    def run_group(self, cases: list[dict]) -> None:
        """Cases of one model and impl: build once, time every shape."""
        from bench_models import make_inputs

        first = cases[0]
        impl = first["impl"]
        config = with_layers(get_model_config(first["model"]), self.args.layers)
        model = None
        try:
            ulysses, ring = self.degrees(config.num_heads)
            _free(self.device)
            t0 = time.perf_counter()
            model = self.build(impl, config, ulysses, ring)
            self.comm.barrier()
            build_s = time.perf_counter() - t0
            weights_gib, _ = _memory(self.device)
        except Exception as exc:
            self.fail_all(cases, "build", exc)
            model = None
            _free(self.device)
            return
        attn = self.args.attn if impl == "ours" else self.args.diffusers_attn
        for case in cases:
            try:
                shape = Shape(case["width"], case["height"], case["frames"])
                inputs = make_inputs(config, shape, self.device, self.dtype, self.args.seed + 1,
                                     batch=getattr(self.args, "batch", 1))
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                with torch.no_grad():
                    timing = time_forward(self.forward_fn(impl, model, inputs), self.comm,
                                          self.args.warmup, self.args.iters, self.args.max_seconds)
                _, peak = _memory(self.device)
                peaks = self.comm.gather(peak if peak is not None else float("nan"))
                if impl == "ours":
                    attn = getattr(model.attention, "kernel_name", None) or attn  # the kernel that actually ran
                profile = {}
                if self.args.profile and self.device.type == "cuda":
                    self.comm.barrier()
                    with torch.no_grad():
                        profile = dict(profile=kernel_breakdown(self.forward_fn(impl, model, inputs), self.device))
                if self.rank == 0:
                    self.emit(self.record(case, status="ok", ulysses=ulysses, ring=ring, attn=attn, build_s=build_s,
                                          weights_gib=weights_gib, peak_gib=max(peaks), peak_gib_per_rank=peaks,
                                          **timing, **profile))
            except Exception as exc:
                self.fail(case, "run", exc)
            finally:
                inputs = None
                _free(self.device)
        model = None
        _free(self.device)

    def run_check(self, case: dict) -> bool:
        """Ours vs diffusers on the same random weights and inputs: relative error of the outputs."""
        from bench_models import build_diffusers, make_inputs, ours_from_diffusers

        config = with_layers(get_model_config(case["model"]), self.args.layers)
        reference = ours = None
        try:
            ulysses, ring = self.degrees(config.num_heads)
            _free(self.device)
            reference = build_diffusers(config, self.device, self.dtype, self.args.seed)
            ours = ours_from_diffusers(reference, config, self.device, self.dtype)
            self.parallelize_diffusers(reference, ulysses, ring)
            self.parallelize_ours(ours, ulysses, ring)
            self.maybe_compile("diffusers", reference)  # with --compile, check the compiled code that was timed
            self.maybe_compile("ours", ours)
            shape = Shape(case["width"], case["height"], case["frames"])
            inputs = make_inputs(config, shape, self.device, self.dtype, self.args.seed + 1,
                                     batch=getattr(self.args, "batch", 1))
            with torch.no_grad():
                expected = self.forward_fn("diffusers", reference, inputs)().float()
                got = self.forward_fn("ours", ours, inputs)().float()
            diff = got - expected
            rel = (diff.norm() / expected.norm()).item()
            fields = dict(rel_err=rel, max_abs_err=diff.abs().max().item(), ref_rms=expected.pow(2).mean().sqrt().item(),
                          finite=bool(torch.isfinite(got).all() and torch.isfinite(expected).all()),
                          ours_attn=getattr(ours.attention, "kernel_name", None))
            rels = self.comm.gather(rel)
            if self.rank == 0:
                self.emit(dict(kind="check", model=case["model"], width=case["width"], height=case["height"],
                               frames=case["frames"], tokens=case["tokens"], gpus=self.world, ulysses=ulysses,
                               ring=ring, diffusers_attn=self.args.diffusers_attn, compile=self.args.compile,
                               fp8=getattr(self.args, "fp8", False), status="ok",
                               rel_err_per_rank=rels, tag=self.args.tag, **fields))
            return True
        except Exception as exc:
            self.emit(dict(kind="check", model=case["model"], width=case["width"], height=case["height"],
                           frames=case["frames"], gpus=self.world, rank=self.rank, status="error",
                           error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:]))
            return False
        finally:
            del reference, ours
            _free(self.device)

    def fail(self, case: dict, stage: str, exc: BaseException) -> None:
        self.emit(self.record(case, status="error", stage=stage, rank=self.rank,
                              error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:]))

    def fail_all(self, cases: list[dict], stage: str, exc: BaseException) -> None:
        for case in cases:
            self.fail(case, stage, exc)

    def run(self, cases: list[dict], check_here: bool) -> None:
        groups: dict[tuple[str, str], list[dict]] = {}
        for case in cases:
            groups.setdefault((case["model"], case["impl"]), []).append(case)
        for group in groups.values():
            self.run_group(group)
        if check_here:  # builds its own pair of models: independent of --impl
            # auto: one check per model (its first shape that works); all: every shape.
            checked, passed = set(), set()
            for case in cases:
                shape_key = (case["model"], case["width"], case["height"], case["frames"])
                if shape_key in checked or (self.args.check == "auto" and case["model"] in passed):
                    continue
                checked.add(shape_key)
                if self.run_check(case):
                    passed.add(case["model"])


def environment(device_type: str) -> dict:
    info = dict(kind="env", time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                host=platform.node(), python=platform.python_version(), torch=torch.__version__,
                nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"))
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except Exception as exc:  # recorded, the diffusers cases will fail on their own
        info["diffusers"] = f"unavailable: {exc}"
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                     text=True, timeout=10).stdout.strip()
    except Exception:
        info["git"] = None
    try:
        import yunchang

        info["yunchang"] = getattr(yunchang, "__version__", "installed")
    except Exception as exc:
        info["yunchang"] = f"unavailable: {exc}"
    return info


def rank_main(args: argparse.Namespace, cases: list[dict], check_here: bool, emit, rank: int, world: int,
              port: int | None, local_rank: int | None = None) -> None:
    """One rank of one world: join the group, run every case, leave."""
    import warnings

    import torch.distributed as dist

    # Keep the output tail readable: diffusers warns on every forward under CP (timestep not split).
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    except Exception:  # diffusers missing: its cases report that themselves
        pass
    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(world, 1)))
    if port is None:  # torchrun: its env:// store
        backend = "nccl" if args.device == "cuda" else "gloo"
        if backend == "nccl":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.max_seconds * 2 + 300))
    else:
        from wan_model.parallel import init_distributed

        device = init_distributed(rank, world, "127.0.0.1", port, backend="nccl" if args.device == "cuda" else "gloo",
                                  timeout_s=args.max_seconds * 2 + 300)
    if getattr(args, "sm_margin", 0):
        from wan_model.parallel import fa3

        fa3.sm_margin = args.sm_margin
    if args.mem_fraction is not None and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(args.mem_fraction, device)
    try:
        Runner(args, device, emit).run(cases, check_here)
    finally:
        dist.destroy_process_group()


def one_line(r: dict) -> str:
    size = f" {r['width']}x{r['height']}x{r['frames']}" if "width" in r else ""
    where = f"{r.get('model', '')}{size} gpus={r.get('gpus')}"
    if r.get("status") == "error" or r["kind"] in ("world_error", "skip"):
        return f"[{r['kind']}] {r.get('impl', '')} {where}: {r.get('error') or r.get('reason')}"
    if r["kind"] == "check":
        return f"[check] {where}: rel_err {r['rel_err']:.3e} max_abs {r['max_abs_err']:.3e} finite={r['finite']}"
    peak = f"{r['peak_gib']:.1f} GiB" if r.get("peak_gib") == r.get("peak_gib") and r.get("peak_gib") is not None else "-"
    return (f"[case] {r['impl']:9s} {where}: median {r['median_s']:.3f} s (min {r['min_s']:.3f}, max {r['max_s']:.3f},"
            f" n={r['iters']}) peak {peak} attn={r.get('attn')} build {r['build_s']:.1f} s"
            f" out_rms {r.get('output_rms', float('nan')):.3g} finite={r.get('output_finite')}")
