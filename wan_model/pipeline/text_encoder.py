"""UMT5-XXL text encoder: prompts -> [B, text_len, dim] embeddings, zero past each prompt's tokens.

    encoder = TextEncoder.load(checkpoint, tokenizer, dtype=torch.bfloat16, device="cuda:0",
                               placement="replicated")   # or "fsdp" (collective), or "cpu"
    context = encoder.encode(["a cat on the grass", ""])   # [2, 512, 4096] on `device`

``checkpoint`` is either the official ``models_t5_umt5-xxl-enc-bf16.pth`` (a state dict with
Wan's own T5 names, ``wan/modules/t5.py``) or a Hugging Face folder (the diffusers release's
``text_encoder/``). ``tokenizer`` is a folder that ``AutoTokenizer`` loads (``google/umt5-xxl/``
in the official release, ``tokenizer/`` in the diffusers one).

As in the official ``T5EncoderModel.__call__``: the prompt is cleaned (HTML unescape, whitespace
collapse; ftfy when installed), tokenized with the end token, truncated to ``text_len``, encoded
with the padding masked, and only the real tokens are kept; the transformer pads with zeros, so
``encode`` returns the zeros already in place. Running on the batch's longest prompt instead of
all 512 positions gives the same values (masked keys get exactly zero attention weight, and
UMT5's relative position bias depends only on distances).
"""
from __future__ import annotations

import html
import logging
import re
from pathlib import Path

import torch
from torch import nn

from .pth import load_pth

logger = logging.getLogger(__name__)

OFFICIAL_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
PLACEMENTS = ("replicated", "fsdp", "cpu")
TEXT_LEN = 512

# Official per-block names (wan/modules/t5.py, T5SelfAttention) -> HF UMT5 names inside encoder.block.N.
_BLOCK_RENAMES = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    # Official FFN: fc2(fc1(x) * gelu(gate(x))); HF gated-gelu: wo(gelu(wi_0(x)) * wi_1(x)).
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_RENAMES_INV = {v: k for k, v in _BLOCK_RENAMES.items()}


def official_t5_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official Wan T5 encoder state dict to ``UMT5EncoderModel`` names (tensors shared)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            if rest not in _BLOCK_RENAMES:
                raise KeyError(f"unexpected key {key!r} in the official T5 encoder checkpoint")
            out[f"encoder.block.{index}.{_BLOCK_RENAMES[rest]}"] = value
        else:
            raise KeyError(f"unexpected key {key!r} in the official T5 encoder checkpoint")
    return out


def hf_t5_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_t5_to_hf` (used to write official-layout files)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "shared.weight":
            out["token_embedding.weight"] = value
        elif key == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        elif key.startswith("encoder.block."):
            _, _, index, rest = key.split(".", 3)
            out[f"blocks.{index}.{_BLOCK_RENAMES_INV[rest]}"] = value
        else:
            raise KeyError(f"unexpected key {key!r} in a UMT5 encoder state dict")
    return out


def save_official_t5(model: nn.Module, path: str | Path) -> None:
    """Write a ``UMT5EncoderModel``'s weights as the official ``.pth`` (official key names, on the CPU)."""
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in hf_t5_to_official(model.state_dict()).items()}
    torch.save(state, path)


# The sizes of Wan's text encoder, UMT5-XXL (5.7B parameters), for building one with random weights.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)


def umt5_config(*, vocab_size: int, d_model: int, d_kv: int, d_ff: int, num_layers: int, num_heads: int,
                num_buckets: int = 32):
    """The ``UMT5Config`` of a Wan text encoder of these sizes (the other settings are official T5's)."""
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
        num_decoder_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
        dropout_rate=0.0, tie_word_embeddings=False,
    )


def umt5_config_from_official(state_dict: dict[str, torch.Tensor]):
    """The ``UMT5Config`` that an official-layout state dict implies (every size is in a shape)."""
    vocab, d_model = state_dict["token_embedding.weight"].shape
    num_layers = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    num_buckets, num_heads = state_dict["blocks.0.pos_embedding.embedding.weight"].shape
    d_ff = state_dict["blocks.0.ffn.fc1.weight"].shape[0]
    d_kv = state_dict["blocks.0.attn.q.weight"].shape[0] // num_heads
    return umt5_config(vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
                       num_heads=num_heads, num_buckets=num_buckets)


def load_umt5_encoder(checkpoint: str | Path, *, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A ``UMT5EncoderModel`` on CPU in ``dtype``, eval mode, from an official ``.pth`` or an HF folder."""
    from transformers import UMT5EncoderModel

    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"text encoder checkpoint not found: {checkpoint}")
    if checkpoint.is_dir():
        model = UMT5EncoderModel.from_pretrained(checkpoint, dtype=dtype)
    else:
        state = load_pth(checkpoint)
        if "token_embedding.weight" not in state:
            raise ValueError(f"{checkpoint} is not an official Wan T5 encoder checkpoint (no token_embedding.weight)")
        config = umt5_config_from_official(state)
        with torch.device("meta"):  # no random init of 5.7B parameters
            model = UMT5EncoderModel(config)
        hf_state = {k: v.to(dtype) for k, v in official_t5_to_hf(state).items()}
        model.load_state_dict(hf_state, strict=True, assign=True)
        model.encoder.embed_tokens.weight = model.shared.weight
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"{checkpoint}: parameters not loaded: {still_meta[:5]}")
    return model.to(dtype).eval().requires_grad_(False)


_ftfy_warned = False


def clean_prompt(text: str) -> str:
    """Official Wan prompt cleaning: ftfy.fix_text (when installed), HTML unescape twice, collapse whitespace."""
    global _ftfy_warned
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        if not _ftfy_warned:
            logger.warning("ftfy is not installed: prompts are not passed through ftfy.fix_text as official Wan does")
            _ftfy_warned = True
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """UMT5 encoder + tokenizer. ``encode(prompts) -> [B, text_len, dim]`` on ``self.device``.

    placement:
      "replicated": full weights on ``device`` on every rank.
      "fsdp": weights sharded over the default process group with FSDP2 ``fully_shard`` (one unit
              per UMT5 block, so only one block is ever gathered whole); ``encode`` is then
              collective: call it on every rank the same number of times (the prompts may differ).
      "cpu": weights and compute on CPU; the result is moved to ``device``.
    """

    def __init__(self, model: nn.Module, tokenizer, *, text_len: int = TEXT_LEN, device: str | torch.device = "cpu",
                 placement: str = "replicated", mesh=None):
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown text encoder placement {placement!r}; expected one of {PLACEMENTS}")
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.device = torch.device(device)
        self.placement = placement
        self.dtype = next(model.parameters()).dtype
        self.dim = model.config.d_model
        if placement == "cpu":
            self.compute_device = torch.device("cpu")
            self.model = model.to("cpu")
        elif placement == "replicated":
            self.compute_device = self.device
            self.model = model.to(self.device)
        else:
            self.compute_device = self.device
            self.model = _shard_fsdp(model, self.device, mesh)

    @classmethod
    def load(cls, checkpoint: str | Path, tokenizer: str | Path, *, dtype: torch.dtype = torch.bfloat16,
             device: str | torch.device = "cpu", placement: str = "replicated", text_len: int = TEXT_LEN,
             mesh=None) -> "TextEncoder":
        """Load from an official ``.pth`` or an HF folder, and a tokenizer folder; see the class doc.

        ``mesh``: for "fsdp", a 1-D ``DeviceMesh`` to shard over (default: the whole default group).
        """
        from transformers import AutoTokenizer

        if placement not in PLACEMENTS:
            raise ValueError(f"unknown text encoder placement {placement!r}; expected one of {PLACEMENTS}")
        tokenizer = Path(tokenizer)
        if not tokenizer.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {tokenizer}")
        tok = AutoTokenizer.from_pretrained(tokenizer)
        model = load_umt5_encoder(checkpoint, dtype=dtype)
        if len(tok) > model.config.vocab_size:
            raise ValueError(f"tokenizer {tokenizer} has {len(tok)} tokens, more than the encoder's vocabulary "
                             f"({model.config.vocab_size}): they do not belong together")
        return cls(model, tok, text_len=text_len, device=device, placement=placement, mesh=mesh)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) [B, L] on CPU, L = the longest prompt's token count (with the end token), <= text_len."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings")
        if not prompts:
            raise ValueError("prompts is empty")
        batch = self.tokenizer([clean_prompt(p) for p in prompts], padding="longest", max_length=self.text_len,
                               truncation=True, add_special_tokens=True, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Each prompt's token count before truncation (with the end token), as ``tokenize`` cleans it.
        ``encode`` reads at most ``text_len`` of them, as official Wan does."""
        batch = self.tokenizer([clean_prompt(p) for p in prompts], add_special_tokens=True, truncation=False,
                               verbose=False)  # no "longer than the maximum" warning: the caller says it
        return [len(ids) for ids in batch["input_ids"]]

    @torch.no_grad()
    def encode_with_lengths(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(context [B, text_len, dim], lengths [B])``: zeros from position ``lengths[b]`` on."""
        ids, mask = self.tokenize(prompts)
        hidden = self.model(input_ids=ids.to(self.compute_device),
                            attention_mask=mask.to(self.compute_device)).last_hidden_state
        lengths = mask.sum(dim=1)
        out = hidden.new_zeros(len(prompts), self.text_len, hidden.shape[-1])
        for b, n in enumerate(lengths.tolist()):
            out[b, :n] = hidden[b, :n]
        return out.to(self.device), lengths

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[B, text_len, dim] in the encoder's dtype on ``self.device``; zero past each prompt's real tokens."""
        return self.encode_with_lengths(prompts)[0]


def _shard_fsdp(model: nn.Module, device: torch.device, mesh=None) -> nn.Module:
    """Shard ``model`` over ``mesh`` (default: the whole default group) with FSDP2, one unit per block plus the root."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError('text encoder placement "fsdp" needs an initialized torch.distributed process group')
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if mesh is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.encoder.block:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
