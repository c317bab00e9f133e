"""The tiny Wan transformer on N gloo ranks (USP: Ulysses x Ring) equals the same model on one rank.

Issue (a): sequence-parallel output must equal the 1-rank output. The token count (27) is not a
multiple of any world size used, so the padded tail is exercised in every layout.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from _dist import run_ranks
from test_parallel_attention import TOL as ATTENTION_TOL
from test_parallel_attention import make_inputs as attention_inputs
from test_parallel_attention import reference_attention
from wan_model.attention import LocalAttention
from wan_model.config import get_variant
from wan_model.model import WanModel
from wan_model.parallel import ParallelConfig, setup_sequence_parallel
from wan_model.sequence import SequenceSharding

TOL = 1e-5
LATENT_SHAPE = (3, 6, 6)  # F, H, W -> 3 * 3 * 3 = 27 tokens with patch (1, 2, 2)


def build_model(variant: str, num_heads: int | None = None) -> WanModel:
    """A tiny model whose weights are all random (the official init zeroes the output head)."""
    config = get_variant(variant).transformer
    if num_heads is not None:
        config = replace(config, num_heads=num_heads)
    torch.manual_seed(0)
    model = WanModel(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def make_inputs(model: WanModel, seed: int, per_token_t: bool):
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    frames, height, width = LATENT_SHAPE
    x = torch.randn(1, config.in_dim, frames, height, width, generator=gen)
    context = torch.randn(1, 7, config.text_dim, generator=gen)
    length = frames * (height // 2) * (width // 2)
    if per_token_t:
        # TI2V: the first (image) frame is clean (t = 0), the rest at the step's t; vary it a bit per token.
        t = torch.full((1, length), 700.0) + 50.0 * torch.rand(1, length, generator=gen)
        t[:, : length // frames] = 0.0
    else:
        t = torch.tensor([700.0])
    return x, t, context


def _run_model_cases(rank, world_size, cases, num_heads=None):
    """For each (variant, ulysses, ring, cfg): max |N-rank output - 1-rank output| for this rank's CFG branch."""
    results = []
    models = {}
    for variant, ulysses, ring, cfg in cases:
        if variant not in models:
            models[variant] = build_model(variant, num_heads)
        model = models[variant]
        state = setup_sequence_parallel(ParallelConfig(ulysses=ulysses, ring=ring, cfg_parallel=cfg))
        # Each CFG half runs its own branch (different inputs), as CFG-parallel does.
        inputs = make_inputs(model, seed=10 + state.cfg_rank, per_token_t=variant == "tiny-ti2v")
        with torch.no_grad():
            model.set_parallel(SequenceSharding(), LocalAttention())  # one rank
            reference = model(*inputs)
            model.set_parallel(state.sharding(), state.attention())
            parallel = model(*inputs)
        assert parallel.shape == reference.shape, (parallel.shape, reference.shape)
        scale = reference.abs().max().item()
        err = (parallel - reference).abs().max().item()
        results.append(((variant, ulysses, ring, cfg), err, scale, model.attention.kernel_name))
    return results


def _check(results_per_rank):
    for results in results_per_rank:
        for case, err, scale, _ in results:
            assert scale > 1e-2, f"{case}: the model output is ~0 ({scale:.3g}); the comparison would be vacuous"
            assert err <= TOL, f"{case}: N-rank output differs from 1-rank by {err:.3g} > {TOL}"


@pytest.mark.slow
def test_model_two_ranks_ulysses2_and_ring2():
    cases = [(variant, u, r, 1) for variant in ("tiny-t2v", "tiny-ti2v") for u, r in [(2, 1), (1, 2)]]
    _check(run_ranks(_run_model_cases, 2, cases, timeout=240))


@pytest.mark.slow
def test_model_four_ranks_ulysses2_ring2_and_ulysses4():
    cases = [(variant, u, r, 1) for variant in ("tiny-t2v", "tiny-ti2v") for u, r in [(2, 2), (4, 1)]]
    results = run_ranks(_run_model_cases, 4, cases, timeout=240)
    _check(results)
    assert {name for _, _, _, name in results[0]} == {"cpu", "sdpa"}  # ring used the LSE kernel


# 8 ranks (tiny dims, 8 heads): attention and model level share one pool of ranks, since
# starting 8 processes costs more than the checks.
def _eight_rank_attention(rank, world_size):
    """Attention level on 8 ranks, 8 heads: ulysses 8, ulysses 4 x ring 2, CFG 2 x ulysses 4."""
    heads, out = 8, {}
    for ulysses, ring in [(8, 1), (4, 2)]:
        state = setup_sequence_parallel(ParallelConfig(ulysses=ulysses, ring=ring))
        errs = []
        for length in (32, 27, 13):
            sharding = state.sharding()
            q, k, v = attention_inputs(length, sharding.padded_len(length), heads=heads)
            local = [sharding.shard(x, 1) for x in (q, k, v)]
            full = sharding.gather(state.attention()(*local, valid_len=length), length, 1)
            errs.append((full.double() - reference_attention(q, k, v, length)[:, :length]).abs().max().item())
        out[(ulysses, ring)] = max(errs)

    state = setup_sequence_parallel(ParallelConfig(ulysses=4, ring=1, cfg_parallel=2))
    sharding = state.sharding()
    length = 27
    # Each CFG half attends over its own inputs (cond / uncond).
    q, k, v = attention_inputs(length, sharding.padded_len(length), heads=heads, seed=100 + state.cfg_rank)
    local = [sharding.shard(x, 1) for x in (q, k, v)]
    local_out = state.attention()(*local, valid_len=length)
    full = sharding.gather(local_out, length, 1)
    out["cfg"] = (full.double() - reference_attention(q, k, v, length)[:, :length]).abs().max().item()
    # The CFG group pairs the ranks holding the same chunk in both halves: gathering over it gives
    # this chunk of both halves' outputs, as the pipeline's per-step all-gather does.
    both = [torch.empty_like(local_out) for _ in range(2)]
    dist.all_gather(both, local_out.contiguous(), group=state.cfg_group)
    out["cfg_layout"] = dict(sp_ranks=state.sp_ranks, cfg_ranks=state.cfg_ranks, sp_rank=state.sp_rank,
                             cfg_rank=state.cfg_rank, ulysses_rank=state.ulysses_rank, ring_rank=state.ring_rank)
    out["cfg_gather_self"] = torch.equal(both[state.cfg_rank], local_out)
    out["cfg_gather_other_differs"] = not torch.equal(both[1 - state.cfg_rank], local_out)
    return out


def _eight_rank_cases(rank, world_size, model_cases):
    return _eight_rank_attention(rank, world_size), _run_model_cases(rank, world_size, model_cases, 8)


@pytest.mark.slow
def test_eight_ranks_eight_heads_attention_and_model():
    """8 heads: ulysses 8; ulysses 4 x ring 2; CFG 2 x ulysses 4 -- attention and the tiny model."""
    model_cases = [("tiny-t2v", 8, 1, 1), ("tiny-t2v", 4, 2, 1), ("tiny-t2v", 4, 1, 2)]
    attention_results, model_results = zip(*run_ranks(_eight_rank_cases, 8, model_cases, timeout=300))
    _check(model_results)
    for rank, res in enumerate(attention_results):
        tol = ATTENTION_TOL
        assert res[(8, 1)] <= tol and res[(4, 2)] <= tol and res["cfg"] <= tol, res
        layout = res["cfg_layout"]
        half = rank // 4
        assert layout["sp_ranks"] == list(range(4 * half, 4 * half + 4))
        assert layout["cfg_ranks"] == [rank % 4, rank % 4 + 4]
        assert (layout["cfg_rank"], layout["sp_rank"]) == (half, rank % 4)
        assert (layout["ulysses_rank"], layout["ring_rank"]) == (rank % 4, 0)
        assert res["cfg_gather_self"] and res["cfg_gather_other_differs"]
