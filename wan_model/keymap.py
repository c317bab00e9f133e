"""Parameter names: official Wan (``wan/modules/model.py``) <-> diffusers ``WanTransformer3DModel``.

The mapping is between *module paths* (``blocks.3.self_attn.q`` <-> ``blocks.3.attn1.to_q``), so it
serves both state-dict keys (module path + ``.weight``) and LoRA targets. Note the one trap: the
affine cross-attention norm is ``norm3`` in official Wan and ``norm2`` in diffusers (whose ``norm3``
is the FFN norm, which has no parameters).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")

# Official module path -> diffusers module path, outside the blocks.
_TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}

# Inside ``blocks.N.``.
_IN_BLOCK = {
    "modulation": "scale_shift_table",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
}

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Prefixes that some checkpoints put in front of the transformer's own names.
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")


def _rename(name: str, top: Mapping[str, str], in_block: Mapping[str, str]) -> str | None:
    """Rename the longest matching module-path prefix of ``name``; None when nothing matches."""
    match = _BLOCK.match(name)
    table, head, rest = (in_block, f"blocks.{match[1]}.", match[2]) if match else (top, "", name)
    best = None
    for src in table:
        if (rest == src or rest.startswith(src + ".")) and (best is None or len(src) > len(best)):
            best = src
    if best is None:
        return None
    return head + table[best] + rest[len(best):]


_TOP_INV = {v: k for k, v in _TOP_LEVEL.items()}
_IN_BLOCK_INV = {v: k for k, v in _IN_BLOCK.items()}


def official_to_diffusers_name(name: str) -> str | None:
    """Diffusers name of an official key or module path (None if it is not a Wan transformer name)."""
    return _rename(name, _TOP_LEVEL, _IN_BLOCK)


def diffusers_to_official_name(name: str) -> str | None:
    """Official name of a diffusers key or module path (None if it is not a Wan transformer name)."""
    return _rename(name, _TOP_INV, _IN_BLOCK_INV)


def strip_prefix(name: str) -> str:
    """Drop a known wrapper prefix (``model.diffusion_model.``, ``diffusion_model.``, ``transformer.``)."""
    for prefix in KNOWN_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def detect_layout(keys: Iterable[str]) -> str:
    """``"official"`` or ``"diffusers"`` from (prefix-stripped) keys; raises if neither is recognisable."""
    keys = list(keys)
    official = any(k.startswith(("head.head", "time_projection.", "text_embedding.")) or ".self_attn." in k for k in keys)
    diffusers = any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in keys)
    if official and diffusers:
        raise ValueError("the checkpoint mixes official Wan and diffusers parameter names")
    if official:
        return "official"
    if diffusers:
        return "diffusers"
    raise ValueError(f"not a Wan transformer checkpoint: unrecognised keys such as {keys[:5]}")


def _convert(state_dict: Mapping[str, T], rename) -> dict[str, T]:
    out: dict[str, T] = {}
    for key, value in state_dict.items():
        new = rename(key)
        out[new if new is not None else key] = value  # unknown keys pass through for the caller to report
    return out


def official_to_diffusers(state_dict: Mapping[str, T]) -> dict[str, T]:
    """Rename an official-layout state dict to diffusers names (unknown keys kept as they are)."""
    return _convert(state_dict, official_to_diffusers_name)


def diffusers_to_official(state_dict: Mapping[str, T]) -> dict[str, T]:
    """Rename a diffusers-layout state dict to official names (unknown keys kept as they are)."""
    return _convert(state_dict, diffusers_to_official_name)
