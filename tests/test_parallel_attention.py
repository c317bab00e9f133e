"""USP attention (Ulysses x Ring over gloo ranks) equals one-device attention.

The inputs make the chunks of the sequence differ (keys scaled by a factor growing along the
sequence, values offset along it), so each ring chunk has a different log-sum-exp: a merge
that ignored the LSE would fail here (shown by the negative control). Padded positions hold
large garbage instead of zeros, so a padded key that leaked into attention would show.
"""
from __future__ import annotations

import pytest
import torch

from _dist import run_ranks
from wan_model.parallel import (
    ParallelConfig,
    UlyssesRingAttention,
    pick_parallel_degrees,
    setup_sequence_parallel,
)
from wan_model.parallel.kernels import cpu_attention
from wan_model.parallel.ring import merge_partial

HEADS, HEAD_DIM, BATCH = 4, 16, 2
TOL = 1e-5


def make_inputs(length: int, padded_len: int, heads: int = HEADS, seed: int = 0, batch: int = BATCH):
    """q, k, v [B, padded_len, H, D]: real tokens whose chunks differ, then garbage padding."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, padded_len, heads, HEAD_DIM, generator=gen) for _ in range(3))
    position = torch.linspace(0.0, 1.0, padded_len).view(1, -1, 1, 1)
    k = k * (0.25 + 3.0 * position)  # later keys are sharper: their chunks' LSEs are larger
    v = v + 4.0 * position  # and their values are shifted
    k[:, length:] = 50.0  # padding: would dominate every softmax if it leaked in
    v[:, length:] = 1e3
    return q, k, v


def reference_attention(q, k, v, valid_len):
    """Float64 attention over the first valid_len keys, [B, L, H, D]."""
    q64, k64, v64 = (x.double().transpose(1, 2) for x in (q, k[:, :valid_len], v[:, :valid_len]))
    scores = q64 @ k64.transpose(-1, -2) * HEAD_DIM ** -0.5
    return (scores.softmax(-1) @ v64).transpose(1, 2)


def zero_lse_kernel(q, k, v):
    """Negative control: the right per-chunk outputs, but a zero LSE (what a broken kernel returns)."""
    out, lse = cpu_attention(q, k, v)
    return out, torch.zeros_like(lse)


def _run_cases(rank, world_size, cases):
    """On each rank: for every (ulysses, ring, length, kernel) run USP attention and return the max error."""
    results = []
    for ulysses, ring, length, kernel in cases:
        state = setup_sequence_parallel(ParallelConfig(ulysses=ulysses, ring=ring))
        sharding = state.sharding()
        padded = sharding.padded_len(length)
        q, k, v = make_inputs(length, padded)
        attention = UlyssesRingAttention(state, kernel=zero_lse_kernel if kernel == "zero_lse" else kernel)
        local = [sharding.shard(x, dim=1) for x in (q, k, v)]
        start, end = sharding.local_range(length)
        assert torch.equal(local[0], q[:, start:end])
        out = attention(*local, valid_len=length)
        assert out.shape == local[0].shape and out.dtype == torch.float32
        full = sharding.gather(out, length, dim=1)
        err = (full.double() - reference_attention(q, k, v, length)[:, :length]).abs().max().item()
        results.append(((ulysses, ring, length, kernel), err, attention.kernel_name))
    return results


def _check(results_per_rank, tol=TOL):
    # Every rank gathers the full output, so every rank checks the whole sequence.
    for results in results_per_rank:
        for case, err, _ in results:
            assert err <= tol, f"{case}: max abs err {err:.3g} > {tol}"


LENGTHS = (24, 21, 9)  # a multiple of 2 and 4; not a multiple; short enough that whole ring chunks are padding


def test_one_rank_equals_reference():
    results = run_ranks(_run_cases, 1, [(1, 1, n, "auto") for n in LENGTHS], timeout=120)
    _check(results)
    assert results[0][0][2] == "sdpa"


def _wrong_world(rank, world_size):
    try:
        setup_sequence_parallel(ParallelConfig(ulysses=2, ring=2))
    except ValueError as err:
        return str(err)
    return None


def _two_rank_cases(rank, world_size, cases):
    # One pool of ranks for all checks: spawning ranks costs more than the checks.
    return _run_cases(rank, world_size, cases), _wrong_heads(rank, world_size), _wrong_world(rank, world_size)


@pytest.mark.slow
def test_two_ranks_ulysses_and_ring_and_wrong_head_split():
    cases = [(u, r, n, kern) for u, r in [(2, 1), (1, 2)] for n in LENGTHS for kern in ("auto", "math")]
    results, messages, world_messages = zip(*run_ranks(_two_rank_cases, 2, cases, timeout=180))
    _check(results)
    for message in world_messages:
        assert message is not None and "needs cfg_parallel * ulysses * ring = 4 ranks" in message
        assert "process group has 2" in message
    # A Ulysses degree that does not divide the heads raises the clear error on every rank.
    for message in messages:
        assert message is not None and "ulysses degree 2 does not divide the 3 attention heads" in message
        assert "1 (the rest" in message
    names = {case: name for case, _, name in results[0]}
    assert names[(1, 2, 21, "auto")] == "cpu" and names[(1, 2, 21, "math")] == "math"
    assert names[(2, 1, 21, "auto")] == "sdpa"


@pytest.mark.slow
def test_four_ranks_all_layouts_and_zero_lse_control():
    layouts = [(2, 2), (4, 1), (1, 4)]
    cases = [(u, r, n, "auto") for u, r in layouts for n in LENGTHS]
    controls = [(u, r, 21, "zero_lse") for u, r in [(2, 2), (1, 4)]]
    results = run_ranks(_run_cases, 4, cases + controls, timeout=180)
    _check([res[: len(cases)] for res in results])
    # Negative control: the same inputs through a merge that sees LSE = 0 must fail the tolerance
    # by far; otherwise these inputs could not catch an LSE bug.
    for case, err, _ in results[0][len(cases):]:
        assert err > 100 * TOL, f"zero-LSE merge passed on {case} (err {err:.3g}): inputs too uniform"


def _head_chunk_cases(rank, world_size, heads, chunk_counts):
    """Overlapped Ulysses (heads in groups) vs plain Ulysses and the float64 reference, per length."""
    state = setup_sequence_parallel(ParallelConfig(ulysses=world_size, ring=1))
    sharding = state.sharding()
    results = []
    # Batch 1 takes the copy-free views around the collectives; batch 2 the reshapes that copy.
    for length, batch in [(n, 1) for n in LENGTHS] + [(n, 2) for n in LENGTHS]:
        q, k, v = make_inputs(length, sharding.padded_len(length), heads=heads, seed=length, batch=batch)
        local = [sharding.shard(x, dim=1) for x in (q, k, v)]
        plain = UlyssesRingAttention(state, kernel="cpu")(*local, valid_len=length)
        expected = reference_attention(q, k, v, length)[:, :length]
        for chunks in chunk_counts:
            out = UlyssesRingAttention(state, kernel="cpu", head_chunks=chunks)(*local, valid_len=length)
            full = sharding.gather(out, length, dim=1)
            results.append((length, chunks, (out - plain).abs().max().item(),
                            (full.double() - expected).abs().max().item()))
    try:
        UlyssesRingAttention(state, head_chunks=3)(*local, valid_len=LENGTHS[-1])
        message = None
    except ValueError as err:
        message = str(err)
    return results, message


def test_overlapped_head_chunks_equal_plain_ulysses():
    """head_chunks > 1 (all-to-all overlapped with attention) gives plain Ulysses' output."""
    heads = 8
    for results, message in run_ranks(_head_chunk_cases, 2, heads, (2, 4), timeout=120):
        assert len(results) == 2 * 2 * len(LENGTHS)
        for length, chunks, vs_plain, vs_reference in results:
            assert vs_plain <= 1e-6, f"L={length} chunks={chunks}: differs from plain Ulysses by {vs_plain:.3g}"
            assert vs_reference <= TOL, f"L={length} chunks={chunks}: error {vs_reference:.3g}"
        assert message is not None and "head_chunks=3 does not split 8 heads" in message and "[1, 2, 4]" in message
    with pytest.raises(ValueError, match="head_chunks must be an integer >= 1"):
        UlyssesRingAttention(None, head_chunks=0)


def test_padding_would_show_if_it_leaked():
    """Control for the padding tests: attending to the garbage padding changes the output a lot."""
    length, padded = 21, 24
    q, k, v = make_inputs(length, padded)
    leaked = reference_attention(q, k, v, padded)[:, :length]
    assert (leaked - reference_attention(q, k, v, length)[:, :length]).abs().max() > 1.0


def test_merge_partial_matches_full_softmax():
    q, k, v = make_inputs(12, 12)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    out, lse = None, None
    for part in (slice(0, 5), slice(5, 7), slice(7, 12)):
        out, lse = merge_partial(out, lse, *cpu_attention(q, k[:, :, part], v[:, :, part]))
    full_out, full_lse = cpu_attention(q, k, v)
    assert (out - full_out).abs().max() <= TOL and (lse - full_lse).abs().max() <= TOL


def _wrong_heads(rank, world_size):
    state = setup_sequence_parallel(ParallelConfig(ulysses=2, ring=1))
    x = torch.randn(1, 4, 3, HEAD_DIM)
    try:
        UlyssesRingAttention(state)(x, x, x, valid_len=8)
    except ValueError as err:
        return str(err)
    return None


def test_degree_errors_list_working_degrees():
    with pytest.raises(ValueError, match=r"ulysses degree 8 does not divide the 12 attention heads.*: 1, 2, 4 "):
        ParallelConfig(ulysses=8, ring=1).check_heads(12)
    ParallelConfig(ulysses=4, ring=2).check_heads(12)
    with pytest.raises(ValueError, match="cfg_parallel must be 1 or 2"):
        ParallelConfig(ulysses=1, ring=1, cfg_parallel=3)
    with pytest.raises(ValueError, match="unknown attention kernel 'fast'"):
        UlyssesRingAttention(None, kernel="fast")


def test_init_distributed_rejects_bad_backend_before_connecting():
    from wan_model.parallel import init_distributed

    with pytest.raises(ValueError, match="unknown backend 'mpi'"):
        init_distributed(0, 1, "127.0.0.1", 1, backend="mpi")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'nccl' needs CUDA"):
            init_distributed(0, 1, "127.0.0.1", 1, backend="nccl")


def test_kernel_names_resolve_without_silent_fallback():
    from wan_model.parallel.kernels import resolve_kernel_name

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_kernel_name("auto", cpu, torch.float32) == "cpu"
    assert resolve_kernel_name("auto", cuda, torch.bfloat16) == "cudnn"
    assert resolve_kernel_name("auto", cuda, torch.float32) == "efficient"
    with pytest.raises(ValueError, match="'cudnn' supports float16/bfloat16 only"):
        resolve_kernel_name("cudnn", cuda, torch.float32)
    with pytest.raises(ValueError, match="'flash' needs CUDA tensors"):
        resolve_kernel_name("flash", cpu, torch.bfloat16)


@pytest.mark.parametrize(
    "world, heads, cfg, expected",
    [
        (8, 12, False, ParallelConfig(ulysses=4, ring=2)),  # Wan2.1 1.3B on 8 GPUs
        (4, 40, False, ParallelConfig(ulysses=4, ring=1)),  # 14B on 4
        (8, 40, False, ParallelConfig(ulysses=8, ring=1)),
        (8, 12, True, ParallelConfig(ulysses=4, ring=1, cfg_parallel=2)),
        (2, 12, True, ParallelConfig(ulysses=1, ring=1, cfg_parallel=2)),
        (6, 4, False, ParallelConfig(ulysses=2, ring=3)),
        (1, 12, False, ParallelConfig(ulysses=1, ring=1)),
    ],
)
def test_pick_parallel_degrees(world, heads, cfg, expected):
    config = pick_parallel_degrees(world, heads, cfg_parallel=cfg)
    assert config == expected and config.world_size == world


def test_pick_parallel_degrees_rejects_odd_cfg_world():
    with pytest.raises(ValueError, match="CFG-parallel needs an even world size"):
        pick_parallel_degrees(3, 12, cfg_parallel=True)


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu_smoke(tmp_path):
    """bench/check_parallel_gpu.py has the same code path on gloo at toy sizes (--smoke); keep it working."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "check_parallel_gpu.py"
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), "--nproc", "2", "--smoke"], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "parallel_gpu.jsonl").read_text().splitlines()]
    ran = [r for r in rows if r.get("status") == "ok"]
    assert {(r["check"], r["ulysses"], r["ring"]) for r in ran} == {
        (check, u, r) for check in ("attention", "model") for u, r in [(1, 2), (2, 1)]}
    for row in ran:
        assert row["max_abs"] <= TOL, row
    # A kernel that cannot run is reported as such, never replaced by another one.
    assert any(r.get("status") == "unsupported" and r["kernel"] == "cudnn" for r in rows)
