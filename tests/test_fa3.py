"""FlashAttention-3 kernels (``fa3``, lossy ``fa3_fp8``): optional, never a silent substitute.

The real kernels need a Hopper GPU (bench/bench_attention.py and bench/check_parallel_gpu.py check
them there against a float32 reference and across ring layouts on NCCL). Here a CPU stand-in for
the ``fa3-fwd`` package, with FA3's call signature and its descale semantics, runs our layout,
quantization, compile and ring-merge code paths.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from wan_model.attention import LocalAttention
from wan_model.parallel import fa3, fa4
from wan_model.parallel.kernels import fast_kernel, get_lse_kernel, math_attention, resolve_kernel_name
from wan_model.parallel.ring import merge_partial

CUDA, BF16 = torch.device("cuda", 0), torch.bfloat16
calls: list[dict] = []


def _fa3_reference(q, k, v, q_descale=None, k_descale=None, v_descale=None, **_):
    """Stands in for fa3_fwd_interface._flash_attn_forward: [B, L, H, D] in, (out, lse [B, H, L], ...) out.
    With fp8 inputs it multiplies the per-(batch, head) descales back in, as FA3's fp8 kernel does."""
    calls.append({"dtype": q.dtype, "descaled": q_descale is not None})

    def real(x, descale):
        x = x.float()
        return x if descale is None else x * descale[:, None, :, None]

    qf, kf, vf = real(q, q_descale), real(k, k_descale), real(v, v_descale)
    out, lse = math_attention(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2))
    out_dtype = torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype
    return out.transpose(1, 2).to(out_dtype), lse, None, None


def _fake_package(monkeypatch, *, fp16: bool = False) -> None:
    interface, config = types.ModuleType("fa3_fwd_interface"), types.ModuleType("fa3_fwd_config")
    interface._flash_attn_forward = _fa3_reference
    config.CONFIG = {"build_flags": {"FLASHATTENTION_DISABLE_FP16": not fp16}}
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", interface)
    monkeypatch.setitem(sys.modules, "fa3_fwd_config", config)
    fa3.import_problem.cache_clear()
    fa3.float16_built.cache_clear()


@pytest.fixture
def fake_fa3(monkeypatch):
    _fake_package(monkeypatch)
    calls.clear()
    yield
    fa3.import_problem.cache_clear()
    fa3.float16_built.cache_clear()


def _on(monkeypatch, major: int) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))


def test_missing_fa3_is_a_clear_error_and_auto_passes_it_over(monkeypatch):
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    fa3.import_problem.cache_clear()
    fa4.import_problem.cache_clear()
    try:
        for name in ("fa3", "fa3_fp8"):
            with pytest.raises(ValueError, match=rf"'{name}' is unavailable.*wanserve\[fa3\]"):
                resolve_kernel_name(name, CUDA, BF16, 128)  # no CUDA call: the import is checked first
        assert resolve_kernel_name("auto", CUDA, BF16, 128) == "cudnn"
        assert fast_kernel(CUDA, BF16, 128) is None
    finally:
        fa3.import_problem.cache_clear()
        fa4.import_problem.cache_clear()
    with pytest.raises(ValueError, match="'fa3' needs CUDA tensors"):
        resolve_kernel_name("fa3", torch.device("cpu"), BF16)
    with pytest.raises(ValueError, match="'fa3_fp8' supports float16/bfloat16 only"):
        resolve_kernel_name("fa3_fp8", CUDA, torch.float32)
    q = torch.randn(1, 9, 4, 8)
    with pytest.raises(ValueError, match="fa3.*CUDA"):
        LocalAttention("fa3")(q, q, q)


def test_auto_takes_fa3_on_hopper_only_and_never_the_lossy_fp8(fake_fa3, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # FA4 absent
    fa4.import_problem.cache_clear()
    try:
        _on(monkeypatch, 9)
        assert resolve_kernel_name("auto", CUDA, BF16, 128) == "fa3"
        assert LocalAttention("auto").check(CUDA, BF16, 128) == "fa3"
        assert resolve_kernel_name("fa3_fp8", CUDA, BF16, 128) == "fa3_fp8"  # only when named
        assert resolve_kernel_name("auto", CUDA, BF16, 12) == "cudnn"  # head_dim FA3 cannot take
        with pytest.raises(ValueError, match="'fa3': head_dim must be a multiple of 8 in \\[8, 256\\], got 12"):
            resolve_kernel_name("fa3", CUDA, BF16, 12)
        # The published wheel has no float16 kernels: a float16 model is told so, and auto passes FA3 over.
        with pytest.raises(ValueError, match="no float16 kernels"):
            resolve_kernel_name("fa3", CUDA, torch.float16, 128)
        assert resolve_kernel_name("auto", CUDA, torch.float16, 128) == "cudnn"
        assert resolve_kernel_name("fa3_fp8", CUDA, torch.float16, 128) == "fa3_fp8"  # fp8 in, bf16 out: no fp16 kernel
        for major in (8, 10):
            _on(monkeypatch, major)
            assert resolve_kernel_name("auto", CUDA, BF16, 128) == "cudnn"
            with pytest.raises(ValueError, match=f"needs a Hopper \\(sm90\\) GPU, got sm{major}0"):
                resolve_kernel_name("fa3", CUDA, BF16, 128)
    finally:
        fa4.import_problem.cache_clear()
    _fake_package(monkeypatch, fp16=True)  # an upstream build with float16
    _on(monkeypatch, 9)
    assert resolve_kernel_name("fa3", CUDA, torch.float16, 128) == "fa3"


def test_fa3_is_preferred_to_fa4_where_both_run(fake_fa3, monkeypatch):
    package, cute = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = lambda *a, **k: None
    package.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    fa4.import_problem.cache_clear()
    try:
        _on(monkeypatch, 9)
        assert fast_kernel(CUDA, BF16, 128) == "fa3"
        _on(monkeypatch, 10)  # Blackwell: FA3 does not run there, FA4 does
        assert fast_kernel(CUDA, BF16, 128) == "fa4"
    finally:
        fa4.import_problem.cache_clear()


def _inputs(seed: int, length: int = 40):
    torch.manual_seed(seed)
    q, k, v = (torch.randn(2, 3, length, 16) for _ in range(3))  # [B, H, L, D]
    k = k * torch.linspace(0.2, 3.0, length).view(1, 1, length, 1)  # LSE differs along the sequence
    v = v * torch.tensor([1.0, 30.0, 0.05]).view(1, 3, 1, 1)  # heads of very different magnitude
    return q, k, v


def test_fa3_layout_lse_compile_and_ring_merge(fake_fa3):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = _inputs(3)
    expected_out, expected_lse = math_attention(q, k, v)
    kernel = get_lse_kernel("fa3")
    out, lse = kernel(q, k, v)
    assert out.shape == q.shape and lse.shape == (2, 3, 40) and lse.dtype == torch.float32
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)
    merged = None, None
    for chunk in (slice(0, 13), slice(13, 40)):  # chunks with different LSEs
        merged = merge_partial(*merged, *kernel(q, k[:, :, chunk], v[:, :, chunk]))
    torch.testing.assert_close(merged[0], expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged[1], expected_lse, rtol=1e-5, atol=1e-5)
    mode = FakeTensorMode()  # the shape-only fake torch.compile traces with
    fq = mode.from_tensor(q.transpose(1, 2).contiguous())
    with mode:
        fake_out, fake_lse = fa3._fa3_blhd(fq, fq, fq)
        assert fake_out.shape == (2, 40, 3, 16) and fake_lse.shape == (2, 3, 40) and fake_lse.dtype == torch.float32
    compiled = torch.compile(lambda a, b, c: kernel(a, b, c)[0] * 2.0, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), expected_out * 2.0, rtol=1e-5, atol=1e-5)


def test_fp8_quantization_is_per_batch_and_head():
    _, _, v = _inputs(5)
    x = v.transpose(1, 2)  # [B, L, H, D]
    quantized, descale = fa3.quantize_fp8_per_head(x)
    assert quantized.dtype == torch.float8_e4m3fn and quantized.shape == x.shape and descale.shape == (2, 3)
    torch.testing.assert_close(descale, x.abs().amax(dim=(1, 3)) / 448.0)
    restored = quantized.float() * descale[:, None, :, None]
    for h in range(3):  # each head keeps e4m3's relative precision, whatever its magnitude
        err = (restored[:, :, h] - x[:, :, h]).norm() / x[:, :, h].norm()
        assert 0 < err < 0.04, (h, err)


def test_fa3_fp8_is_close_lossy_and_merges_with_its_lse(fake_fa3):
    q, k, v = _inputs(7)
    expected_out, expected_lse = math_attention(q, k, v)
    kernel = get_lse_kernel("fa3_fp8")
    out, lse = kernel(q, k, v)
    assert calls[-1] == {"dtype": torch.float8_e4m3fn, "descaled": True}
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == (2, 3, 40)
    err = ((out - expected_out).norm() / expected_out.norm()).item()
    assert 1e-4 < err < 0.08, err  # lossy, but close
    assert ((lse - expected_lse).abs().max() / expected_lse.abs().max()).item() < 0.05
    merged = None, None
    for chunk in (slice(0, 13), slice(13, 40)):
        merged = merge_partial(*merged, *kernel(q, k[:, :, chunk], v[:, :, chunk]))
    merge_err = ((merged[0] - expected_out).norm() / expected_out.norm()).item()
    assert merge_err < 0.08, merge_err  # the true (de-scaled) LSE keeps the ring merge right
    assert get_lse_kernel("fa3")(q.to(BF16), k.to(BF16), v.to(BF16))[0].dtype == BF16
    assert kernel(q.half(), k.half(), v.half())[0].dtype == torch.float16  # the kernel's bf16, cast back


def test_kernel_availability_checks_trace_cleanly_under_compile():
    """The checks run on every attention call inside compiled blocks: dynamo must trace them as a read
    of a remembered value (functools.lru_cache made it warn and trace around the cache)."""
    import warnings

    fa3.import_problem()  # computed eagerly once, as the generator's build-time check does
    fa4.import_problem()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x * (2.0 if fa3.import_problem() is None else 3.0)
                             + (fa4.import_problem() is None), fullgraph=True, backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(torch.ones(2))
    expected = (2.0 if fa3.import_problem() is None else 3.0) + (fa4.import_problem() is None)
    assert torch.equal(out, torch.full((2,), expected))
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]


def test_fa3_fp8_centres_the_keys_so_a_shared_offset_costs_no_precision(fake_fa3):
    """Keys with a large offset shared by every token (as DiT keys carry from biases and modulation):
    softmax ignores it, and so must the fp8 rounding. The LSE still includes it (the true one)."""
    q, k, v = _inputs(11)
    offset = 40.0 * torch.randn(2, 3, 1, 16)  # per batch, head and channel: the same for every token
    kernel = get_lse_kernel("fa3_fp8")
    plain_out, _ = kernel(q, k, v)
    out, lse = kernel(q, k + offset, v)
    expected_out, expected_lse = math_attention(q, k + offset, v)
    plain_err = ((plain_out - expected_out).norm() / expected_out.norm()).item()
    err = ((out - expected_out).norm() / expected_out.norm()).item()
    assert err < 1.5 * plain_err, (err, plain_err)  # without centring: about 10x worse
    torch.testing.assert_close(lse, expected_lse, rtol=2e-2, atol=0.5)
    merged = None, None
    for chunk in (slice(0, 13), slice(13, 40)):  # each chunk centred on its own mean: merge still right
        merged = merge_partial(*merged, *kernel(q, (k + offset)[:, :, chunk], v[:, :, chunk]))
    assert ((merged[0] - expected_out).norm() / expected_out.norm()).item() < 1.5 * plain_err
