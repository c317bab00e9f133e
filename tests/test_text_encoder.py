"""Text encoder: official .pth and HF folder layouts, zero padding, direct UMT5 peer check, FSDP on gloo."""
from __future__ import annotations

import pytest
import torch

from wan_model.pipeline.model_dir import detect_model_dir
from wan_model.pipeline.text_encoder import (
    OFFICIAL_T5_FILE, TextEncoder, clean_prompt, hf_t5_to_official, official_t5_to_hf, umt5_config_from_official,
)
from wan_model.pipeline.tiny import build_tiny_model_dir

from _dist import run_ranks

PROMPTS = ["a cat walks on the grass", "A red car drives down a rainy street at night, neon lights.", ""]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    return {layout: detect_model_dir(build_tiny_model_dir(root / layout, "tiny-t2v", layout, seed=3))
            for layout in ("official", "diffusers")}


def _load(files, **kw):
    return TextEncoder.load(files.text_encoder, files.tokenizer, dtype=torch.float32, **kw)


def test_official_and_hf_layouts_give_identical_embeddings(tiny_dirs):
    official = _load(tiny_dirs["official"])
    hf = _load(tiny_dirs["diffusers"])
    assert tiny_dirs["official"].text_encoder.name == OFFICIAL_T5_FILE
    assert tiny_dirs["diffusers"].text_encoder.is_dir()
    a, b = official.encode(PROMPTS), hf.encode(PROMPTS)
    assert a.shape == (3, 512, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.abs().sum() > 0


def test_padding_is_zero_and_real_tokens_match_umt5_on_the_prompt_alone(tiny_dirs):
    enc = _load(tiny_dirs["diffusers"])
    out, lengths = enc.encode_with_lengths(PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        ids = enc.tokenizer(clean_prompt(prompt), return_tensors="pt").input_ids  # with the end token
        n = ids.shape[1]
        assert lengths[b] == n
        assert ids[0, -1] == enc.tokenizer.eos_token_id
        direct = enc.model(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(out[b, :n], direct, rtol=1e-5, atol=1e-5)
        assert torch.all(out[b, n:] == 0)
        assert torch.all(out[b, :n].abs().sum(-1) > 0)
    # The empty prompt still has its end token.
    assert lengths[2] == 1


def test_bf16_default_and_cpu_placement(tiny_dirs):
    enc = TextEncoder.load(tiny_dirs["official"].text_encoder, tiny_dirs["official"].tokenizer, placement="cpu")
    out = enc.encode(PROMPTS[:1])
    assert out.dtype == torch.bfloat16 and out.shape == (1, 512, 32)
    assert enc.compute_device.type == "cpu"


def test_long_prompt_is_truncated_to_text_len(tiny_dirs):
    enc = _load(tiny_dirs["diffusers"], text_len=16)
    out, lengths = enc.encode_with_lengths(["the quick brown fox jumps over the lazy dog " * 20])
    assert out.shape == (1, 16, 32) and lengths.tolist() == [16]


def test_token_counts_are_taken_before_truncation(tiny_dirs):
    enc = _load(tiny_dirs["diffusers"], text_len=16)
    long, short = "the quick brown fox jumps over the lazy dog " * 20, "a fox"
    counts = enc.token_counts([long, short])
    assert counts[0] > 16
    # the short prompt: as many tokens as encode keeps (nothing is cut from it)
    assert counts[1] == enc.encode_with_lengths([short])[1].item() < 16


def test_key_mapping_round_trip_and_official_names(tiny_dirs):
    state = torch.load(tiny_dirs["official"].text_encoder, weights_only=True)
    # Names of official wan/modules/t5.py (T5Encoder with shared_pos=False).
    for key in ["token_embedding.weight", "norm.weight", "blocks.1.attn.q.weight", "blocks.1.attn.o.weight",
                "blocks.0.pos_embedding.embedding.weight", "blocks.0.ffn.gate.0.weight", "blocks.0.ffn.fc1.weight",
                "blocks.0.ffn.fc2.weight", "blocks.0.norm1.weight", "blocks.0.norm2.weight"]:
        assert key in state, key
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert hf_t5_to_official(official_t5_to_hf(state)).keys() == state.keys()
    config = umt5_config_from_official(state)
    assert (config.d_model, config.num_layers, config.num_heads, config.d_kv) == (32, 2, 4, 8)


def test_bad_inputs_are_named(tiny_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        TextEncoder.load(tmp_path / "nope.pth", tiny_dirs["official"].tokenizer)
    with pytest.raises(ValueError, match="placement"):
        TextEncoder.load(tiny_dirs["official"].text_encoder, tiny_dirs["official"].tokenizer, placement="gpu")
    enc = _load(tiny_dirs["official"])
    with pytest.raises(TypeError):
        enc.encode("not a list")
    with pytest.raises(ValueError):
        enc.encode([])
    bad = tmp_path / "bad.pth"
    torch.save({"something.weight": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="token_embedding"):
        TextEncoder.load(bad, tiny_dirs["official"].tokenizer)


def _encode_on_rank(rank, world, checkpoint, tokenizer, placement, prompts):
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor

    outs = []
    # The default mesh (whole default group), then an explicit one built from a new group.
    for mesh in (None, DeviceMesh.from_group(dist.new_group(backend="gloo"), "cpu")):
        enc = TextEncoder.load(checkpoint, tokenizer, dtype=torch.float32, placement=placement, mesh=mesh)
        weight = enc.model.encoder.block[0].layer[0].SelfAttention.q.weight
        assert isinstance(weight, DTensor), type(weight)
        assert weight.to_local().shape[0] * world == weight.shape[0]  # each rank holds a shard
        outs.append(enc.encode(prompts).numpy())  # numpy pickles by value (tensors would need the rank alive)
    return outs


@pytest.mark.slow
def test_fsdp_on_two_gloo_ranks_equals_replicated(tiny_dirs):
    files = tiny_dirs["official"]
    args = (str(files.text_encoder), str(files.tokenizer))
    fsdp = run_ranks(_encode_on_rank, 2, *args, "fsdp", PROMPTS, timeout=120)
    replicated = _load(files).encode(PROMPTS)
    fsdp = [torch.from_numpy(out) for per_rank in fsdp for out in per_rank]
    assert len(fsdp) == 4
    for out in fsdp:
        torch.testing.assert_close(out, replicated, rtol=1e-5, atol=1e-5)
    lengths = _load(files).encode_with_lengths(PROMPTS)[1]
    for out in fsdp:
        for b, n in enumerate(lengths.tolist()):
            assert torch.all(out[b, n:] == 0)


def test_release_size_umt5_xxl_names_map_both_ways():
    """The real UMT5-XXL encoder (built on meta) has exactly the official checkpoint's 24-block key set."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    hf = model.state_dict()
    official = hf_t5_to_official(hf)
    assert len(official) == 2 + 24 * 10
    assert official["blocks.23.pos_embedding.embedding.weight"].shape == (32, 64)
    assert official["blocks.0.ffn.gate.0.weight"].shape == (10240, 4096)
    assert set(official_t5_to_hf(official)) == set(hf)
    derived = umt5_config_from_official(official)
    assert (derived.d_model, derived.num_layers, derived.num_heads, derived.d_kv, derived.d_ff, derived.vocab_size) == (
        4096, 24, 64, 64, 10240, 256384)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_replicated_close_to_cpu_fp32(tiny_dirs):
    files = tiny_dirs["official"]
    cpu = _load(files).encode(PROMPTS)
    gpu = TextEncoder.load(files.text_encoder, files.tokenizer, device="cuda").encode(PROMPTS)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    # bf16 (8-bit mantissa) against fp32: judge the whole embedding, not single elements.
    rel = (gpu.float().cpu() - cpu).norm() / cpu.norm()
    assert rel < 2e-2, f"bf16 GPU embeddings differ from fp32 CPU by {rel:.3g} (relative L2)"
    cpu_placed = TextEncoder.load(files.text_encoder, files.tokenizer, device="cuda", placement="cpu")
    assert cpu_placed.encode(PROMPTS).device.type == "cuda"


def _official_t5_reference(state, ids, mask, eps=1e-6, max_dist=128):
    """Official wan/modules/t5.py semantics written out on the official names (float32)."""
    import math

    import torch.nn.functional as F

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def gelu_tanh(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))

    def buckets(length, num_buckets):
        rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
        half = num_buckets // 2
        out = (rel > 0).long() * half
        rel = rel.abs()
        exact = half // 2
        large = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(max_dist / exact)
                         * (half - exact)).long()
        large = large.clamp(max=half - 1)
        return out + torch.where(rel < exact, rel, large)

    w = {k: v.float() for k, v in state.items()}
    x = w["token_embedding.weight"][ids]
    b, length, _ = x.shape
    num_layers = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
    for i in range(num_layers):
        p = f"blocks.{i}."
        table = w[p + "pos_embedding.embedding.weight"]
        heads = table.shape[1]
        bias = table[buckets(length, table.shape[0])].permute(2, 0, 1)[None]
        h = rms(x, w[p + "norm1.weight"])
        q, k, v = (F.linear(h, w[p + f"attn.{n}.weight"]).view(b, length, heads, -1) for n in "qkv")
        scores = torch.einsum("binc,bjnc->bnij", q, k) + bias  # T5: no 1/sqrt(d) scaling
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        attn = torch.einsum("bnij,bjnc->binc", scores.softmax(-1), v).reshape(b, length, -1)
        x = x + F.linear(attn, w[p + "attn.o.weight"])
        h = rms(x, w[p + "norm2.weight"])
        ffn = F.linear(h, w[p + "ffn.fc1.weight"]) * gelu_tanh(F.linear(h, w[p + "ffn.gate.0.weight"]))
        x = x + F.linear(ffn, w[p + "ffn.fc2.weight"])
    return rms(x, w["norm.weight"])


def test_matches_official_t5_semantics_on_official_weights(tiny_dirs):
    """Peer check of the name mapping: the official forward written out on the .pth gives the same context."""
    files = tiny_dirs["official"]
    enc = _load(files)
    long_prompt = "the quick brown fox jumps over the lazy dog " * 3  # > 16 tokens: log-spaced buckets used
    prompts = PROMPTS + [long_prompt]
    out, lengths = enc.encode_with_lengths(prompts)
    ids, mask = enc.tokenize(prompts)
    assert ids.shape[1] > 16
    ref = _official_t5_reference(torch.load(files.text_encoder, weights_only=True), ids, mask)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[b, :n], ref[b, :n], rtol=1e-4, atol=1e-4)


def _nccl_fsdp_on_rank(rank, world, checkpoint, tokenizer, prompts):
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    torch.cuda.set_device(rank)
    nccl = dist.new_group(backend="nccl")  # the default group of run_ranks is gloo
    mesh = DeviceMesh.from_group(nccl, "cuda")
    enc = TextEncoder.load(checkpoint, tokenizer, dtype=torch.float32, device=f"cuda:{rank}", placement="fsdp",
                           mesh=mesh)
    return enc.encode(prompts).cpu().numpy()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_fsdp_on_two_nccl_ranks_equals_replicated(tiny_dirs):
    files = tiny_dirs["official"]
    outs = run_ranks(_nccl_fsdp_on_rank, 2, str(files.text_encoder), str(files.tokenizer), PROMPTS, timeout=300)
    replicated = TextEncoder.load(files.text_encoder, files.tokenizer, dtype=torch.float32, device="cuda:0")
    expected = replicated.encode(PROMPTS).cpu()
    for out in outs:
        torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-4)
