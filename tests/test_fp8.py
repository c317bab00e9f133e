"""fp8 GEMMs (wan_model.fp8), the lossy opt-in lever of issue #6, on CPU (torch runs the same
row-wise-scaled ``_scaled_mm`` arithmetic there):

* ``Fp8Linear`` equals the dequantized reference product exactly up to fp32 summation order, and
  nn.Linear within the e4m3 rounding (a few %); a zero row gives zeros, not NaN.
* The tiny model with fp8 blocks stays within 5% of bf16/fp32 and compiles to the same result.
* The generator option: layout string says fp8=on, latents differ from the exact run by a
  bounded amount, fsdp with fp8 is refused with a clear error, and a LoRA request runs on the fp8
  weights (close to the exact run with the same LoRA; after it, the job without LoRA is as before).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from test_generator import tiny_cache
from test_perf_levers import request, tiny_model
from wan_model.compile import compile_blocks
from wan_model.fp8 import FP8, FP8_MAX, Fp8Linear, blocks_fp8, quantize_blocks_fp8
from wan_model.pipeline.generator import Generator, GeneratorConfig
from test_generator_parallel import write_lora


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_linear_is_the_scaled_e4m3_product():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(3, 7, 96) * torch.linspace(0.01, 50, 96)  # channels of very different size
    x[0, 0] = 0.0  # an all-zero token
    fp8 = Fp8Linear(linear)
    got = fp8(x)
    assert got.shape == (3, 7, 40) and got.dtype == linear.weight.dtype
    # Reference: quantize each row of x and of W by its amax to e4m3, multiply dequantized values.
    rows = x.reshape(-1, 96)
    x_scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12 * FP8_MAX) / FP8_MAX
    w_scale = linear.weight.abs().amax(dim=1, keepdim=True) / FP8_MAX
    x_deq = (rows / x_scale).to(FP8).float() * x_scale
    w_deq = (linear.weight / w_scale).to(FP8).float() * w_scale
    expected = (x_deq @ w_deq.t() + linear.bias).view(3, 7, 40)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0, 0], linear.bias.detach(), rtol=0, atol=1e-6)
    error = rel(got, linear(x).detach())
    assert 1e-4 < error < 0.06, error  # really quantized, and only by e4m3 rounding


def test_a_float32_fp8_layer_adds_its_bias_itself(monkeypatch):
    """CUDA's _scaled_mm refuses a bias with a float32 output ("Bias is not supported when out_dtype is
    set to Float32"); the CPU one takes it, so the rule is enforced here as the GPU enforces it."""
    real = torch._scaled_mm

    def as_on_cuda(*args, bias=None, out_dtype=None, **kwargs):
        if bias is not None and out_dtype == torch.float32:
            raise RuntimeError("Bias is not supported when out_dtype is set to Float32")
        return real(*args, bias=bias, out_dtype=out_dtype, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", as_on_cuda)
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16)
    x = torch.randn(5, 32)
    got = Fp8Linear(linear)(x)
    assert got.dtype == torch.float32
    assert rel(got, linear(x).detach()) < 0.06
    torch.testing.assert_close(Fp8Linear(linear)(torch.zeros(1, 32))[0], linear.bias.detach(), rtol=0, atol=1e-6)
    bf16 = torch.nn.Linear(32, 16).to(torch.bfloat16)
    assert Fp8Linear(bf16)(x.to(torch.bfloat16)).dtype == torch.bfloat16  # 16-bit keeps the fused bias


def test_fp8_blocks_stay_close_to_exact_and_compile_the_same():
    model, inputs = tiny_model()
    torch.nn.init.normal_(model.head.head.weight, std=0.1)  # the head starts at zero: make the output non-trivial
    with torch.no_grad():
        exact = model(*inputs)
    quantized = copy.deepcopy(model)
    swapped = quantize_blocks_fp8(quantized)
    assert swapped == 10 * len(model.blocks) and blocks_fp8(quantized) and not blocks_fp8(model)
    with torch.no_grad():
        got = quantized(*inputs)
    assert 1e-4 < rel(got, exact) < 0.05
    compile_blocks(quantized)
    with torch.no_grad():
        compiled = quantized(*inputs)
    torch.testing.assert_close(compiled, got, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="ModuleList `blocks`"):
        quantize_blocks_fp8(torch.nn.Linear(2, 2))


def test_generator_fp8_option_is_lossy_bounded_takes_a_lora_and_refuses_fsdp(tmp_path_factory, tmp_path):
    cache = tiny_cache(tmp_path_factory)
    exact = Generator(GeneratorConfig(model="tiny", cache_dir=cache))
    exact.generate(request(str(tmp_path / "exact")))
    generator = Generator(GeneratorConfig(model="tiny", cache_dir=cache, fp8=True))
    result = generator.generate(request(str(tmp_path / "fp8")))
    assert "fp8=on" in result.layout and "fp8=off" in exact.layout_string()
    a, b = generator.last_latents.numpy(), exact.last_latents.numpy()
    error = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    assert 0 < error < 0.05, error
    fp8_latents = generator.last_latents.clone()

    lora = write_lora(tmp_path / "style.safetensors", "tiny-t2v")
    with_lora = request(str(tmp_path / "lora"))
    # This random LoRA is as large as the weights at scale 1, which inflates the fp8 error (0.12);
    # that the fp8 weights are exactly the LoRA-merged weights quantized is tested in test_lora.py.
    with_lora.lora, with_lora.lora_scale = lora, 0.1
    generator.generate(with_lora)
    fp8_lora = generator.last_latents.numpy()
    exact.generate(with_lora)
    exact_lora = exact.last_latents.numpy()
    rel_np = lambda x, y: float(np.linalg.norm(x - y) / np.linalg.norm(y))  # noqa: E731
    # The fp8 run with the LoRA is the exact run with the LoRA up to fp8 rounding, and much closer to
    # it than to the fp8 run without the LoRA: the LoRA was applied.
    assert 0 < rel_np(fp8_lora, exact_lora) < 0.06, rel_np(fp8_lora, exact_lora)
    assert rel_np(fp8_lora, a) > 2 * rel_np(fp8_lora, exact_lora), (rel_np(fp8_lora, a), rel_np(fp8_lora, exact_lora))
    generator.generate(request(str(tmp_path / "fp8_again")))
    assert torch.equal(generator.last_latents, fp8_latents)  # unmerged: the fp8 weights of the start
    with pytest.raises(ValueError, match="fp8 together with fsdp"):
        Generator(GeneratorConfig(model="tiny", cache_dir=cache, fp8=True, fsdp=True))
