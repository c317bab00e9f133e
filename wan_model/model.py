"""The Wan diffusion transformer (Wan2.1 T2V/I2V, Wan2.2 A14B experts and TI2V-5B), one device's view.

Faithful to official ``wan/modules/model.py``: same modules, same parameter names, same maths.
Two differences of form, none of result:

* Sequence parallelism is a seam, not a rewrite: ``forward`` cuts the token sequence with
  ``self.sharding`` and every self-attention goes through ``self.attention`` (see
  ``wan_model.attention`` / ``wan_model.sequence``); the defaults are one rank and SDPA.
* Instead of ``torch.amp.autocast`` regions, the parts official Wan runs in float32 (norms, time
  embedding, modulation, residual adds, output head) upcast explicitly, so the module works the same
  with fp32, bf16 or fp16 parameters. The residual stream is kept in float32.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionBackend, LocalAttention
from .config import WanConfig
from .rope import apply_rope, rope_frequencies
from .sequence import SequenceSharding
from .step_cache import CacheSlot

__all__ = ["WanModel", "WanRMSNorm", "WanLayerNorm", "sinusoidal_embedding_1d"]


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """[N, dim] timestep embedding, cos half first (official Wan); computed in float64."""
    if dim % 2:
        raise ValueError(f"freq_dim must be even, got {dim}")
    half = dim // 2
    position = position.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=position.device) / half)
    sinusoid = torch.outer(position, freqs)
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


def fp32_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` computed in float32 whatever the parameter dtype (official runs these under fp32 autocast)."""
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x.float(), layer.weight.float(), bias)


class WanRMSNorm(nn.Module):
    """RMS norm over the last dim; statistics in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight.type_as(x)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (affine optional); returns the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class WanSelfAttention(nn.Module):
    """Self-attention over the video tokens, with QK RMS-norm and 3-D RoPE; the kernel is the model's backend."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        # Norms span all heads (before the head split), as in official Wan.
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(
        self, x: torch.Tensor, freqs: torch.Tensor, attention: AttentionBackend, valid_len: int
    ) -> torch.Tensor:
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        out = attention(apply_rope(q, freqs), apply_rope(k, freqs), v, valid_len=valid_len)
        return self.o(out.flatten(2))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain attention, [B, L, H, D] layout; cross-attention is local to each rank (context is not sharded)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


class WanCrossAttention(WanSelfAttention):
    """Attention from the video tokens to the text context; with ``image_branch``, also to the CLIP image tokens.

    Same projections and QK norms as self-attention (official Wan subclasses it too); no RoPE.
    The image branch (Wan2.1 I2V, official ``WanI2VCrossAttention``) has its own keys/values and
    adds its attention output to the text one before the output projection.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6, image_branch: bool = False):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.image_branch = image_branch
        if image_branch:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_img: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape[0], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, -1, n, d)
        k = self.norm_k(self.k(context)).view(b, -1, n, d)
        v = self.v(context).view(b, -1, n, d)
        out = _attend(q, k, v)
        if self.image_branch:
            if context_img is None:
                raise ValueError("this model has the image branch: cross-attention needs the CLIP image context")
            k_img = self.norm_k_img(self.k_img(context_img)).view(b, -1, n, d)
            v_img = self.v_img(context_img).view(b, -1, n, d)
            out = out + _attend(q, k_img, v_img)
        return self.o(out)


class WanAttentionBlock(nn.Module):
    """One transformer block: modulated self-attention, cross-attention, modulated FFN."""

    def __init__(self, config: WanConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, config.num_heads, config.qk_norm, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, config.num_heads, config.qk_norm, eps, config.has_image_branch)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim))
        # Per-block offsets added to the shared time projection: shift, scale, gate for self-attn then FFN.
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        freqs: torch.Tensor,
        context: torch.Tensor,
        context_img: torch.Tensor | None,
        attention: AttentionBackend,
        valid_len: int,
    ) -> torch.Tensor:
        """x: [B, L_local, dim] float32; e: [B, 1 or L_local, 6, dim] float32 time projection."""
        q_proj = self.self_attn.q  # nn.Linear, or an Fp8Linear (wan_model.fp8) that computes in its out_dtype
        dtype = q_proj.out_dtype if hasattr(q_proj, "out_dtype") else q_proj.weight.dtype
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (
            (self.modulation.float().unsqueeze(0) + e).unbind(dim=2)
        )
        y = self.self_attn((self.norm1(x) * (1 + scale_sa) + shift_sa).to(dtype), freqs, attention, valid_len)
        x = x + y.float() * gate_sa
        x = x + self.cross_attn(self.norm3(x).to(dtype), context, context_img).float()
        y = self.ffn((self.norm2(x) * (1 + scale_ff) + shift_ff).to(dtype))
        return x + y.float() * gate_ff


class Head(nn.Module):
    """Output head: modulated LayerNorm then a Linear to ``out_dim * prod(patch)`` channels per token."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float = 1e-6):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x: [B, L_local, dim]; e: [B, 1 or L_local, dim] time embedding (before the projection)."""
        shift, scale = (self.modulation.float().unsqueeze(0) + e.unsqueeze(2)).unbind(dim=2)
        return fp32_linear(self.head, self.norm(x) * (1 + scale) + shift)


class MLPProj(nn.Module):
    """CLIP image features -> context tokens (Wan2.1 I2V ``img_emb``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # nn.LayerNorm defaults (eps 1e-5, affine), as in official; computed in fp32.
        self.proj = nn.Sequential(
            WanLayerNorm(in_dim, eps=1e-5, elementwise_affine=True),
            nn.Linear(in_dim, in_dim),
            nn.GELU(),
            nn.Linear(in_dim, out_dim),
            WanLayerNorm(out_dim, eps=1e-5, elementwise_affine=True),
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.proj(image_embeds)


class WanModel(nn.Module):
    """The Wan diffusion transformer. See ``docs/DESIGN.md`` for the forward contract."""

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        if dim % config.num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {config.num_heads}")
        self.patch_size = tuple(config.patch_size)
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([WanAttentionBlock(config) for _ in range(config.num_layers)])
        self.head = Head(dim, config.out_dim, self.patch_size, config.eps)
        if config.has_image_branch:
            self.img_emb = MLPProj(config.image_dim, dim)
        self.sharding: SequenceSharding = SequenceSharding()
        self.attention: AttentionBackend = LocalAttention()
        self.checkpoint_source = None  # set by wan_model.loader.load_transformer (lets LoRA unmerge re-read weights)
        self.init_weights()

    def set_parallel(self, sharding: SequenceSharding, attention: AttentionBackend) -> None:
        """Swap how tokens are split across ranks and which kernel runs self-attention."""
        self.sharding = sharding
        self.attention = attention

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official Wan initialisation (xavier linears, small-normal embeddings, zero output head)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for layer in (*self.text_embedding, *self.time_embedding):
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    # --- forward --------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        cache: CacheSlot | None = None,
    ) -> torch.Tensor:
        """Predict the flow for latents ``x`` [B, C, F, H, W] at ``timestep``; returns [B, out_dim, F, H, W] float32.

        ``timestep`` is [B] or per token [B, L] (L = F*(H/2)*(W/2), TI2V-5B); ``context`` is [B, Lc, text_dim]
        with Lc <= text_len; ``clip_fea`` [B, 257, image_dim] for the image branch; ``y`` is concatenated
        to ``x`` on channels. ``cache``: this branch's slot of a ``wan_model.step_cache.StepCache``
        (lossy step skipping: the blocks may be replaced by the last computed residual).
        """
        cfg = self.config
        dtype = self.patch_embedding.weight.dtype
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        self._check_inputs(x, context, clip_fea)
        batch = x.shape[0]

        # Patchify: [B, C, F, H, W] -> tokens [B, L, dim]; the residual stream is float32.
        tokens = self.patch_embedding(x.to(dtype))
        grid = tuple(tokens.shape[2:])
        length = math.prod(grid)
        tokens = tokens.flatten(2).transpose(1, 2).float()

        # This rank's tokens, and RoPE for exactly those positions.
        sharding = self.sharding
        # Contiguous, as every later block's input is: compiled blocks guard on strides, and a first
        # block fed the transposed (or sliced) layout would compile a second graph for the others.
        tokens = sharding.shard(tokens, dim=1).contiguous()
        start, end = sharding.local_range(length)
        freqs = torch.view_as_real(rope_frequencies(cfg.head_dim, grid, start, end, device=tokens.device))

        # Time: one t per sample -> [B, 1, dim]; per token -> this rank's [B, L_local, dim].
        step_timestep = timestep.reshape(batch, -1).amax(dim=1) if timestep.dim() == 2 else None
        timestep = self._timestep_per_token(timestep, batch, length)
        e, e0 = self._time_embed(timestep)

        # Context: text padded with zeros to text_len (official), then embedded; image tokens separately.
        if context.shape[1] < cfg.text_len:
            context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        context = self.text_embedding(context.to(dtype))
        context_img = self.img_emb(clip_fea.to(dtype)) if clip_fea is not None else None

        if cache is not None and cache.reuse(e0 if step_timestep is None else self._time_embed(step_timestep[:, None])[1]):
            tokens = cache.add_residual(tokens)
        else:
            before = tokens
            for block in self.blocks:
                tokens = block(tokens, e0, freqs, context, context_img, self.attention, length)
            if cache is not None:
                cache.store(before, tokens)

        out = self.head(tokens, e)
        out = sharding.gather(out, length, dim=1)
        return self.unpatchify(out, grid)

    def _time_embed(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] timesteps -> embedding ``e`` [B, T, dim] and block modulation ``e0`` [B, T, 6, dim], float32."""
        e = fp32_linear(
            self.time_embedding[2],
            F.silu(fp32_linear(self.time_embedding[0], sinusoidal_embedding_1d(self.config.freq_dim, timestep.flatten()))),
        ).unflatten(0, timestep.shape)
        return e, fp32_linear(self.time_projection[1], F.silu(e)).unflatten(-1, (6, self.config.dim))

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor | None) -> None:
        cfg = self.config
        if x.dim() != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(
                f"expected latents [B, {cfg.in_dim}, F, H, W] (after concatenating y), got {tuple(x.shape)}"
            )
        for size, patch, name in zip(x.shape[2:], self.patch_size, ("frames", "height", "width")):
            if size % patch:
                raise ValueError(f"latent {name} {size} is not a multiple of the patch size {patch}")
        if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.text_dim:
            raise ValueError(f"expected context [{x.shape[0]}, Lc, {cfg.text_dim}], got {tuple(context.shape)}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens, more than text_len {cfg.text_len}")
        if cfg.has_image_branch:
            if clip_fea is None:
                raise ValueError("this model has the CLIP image branch: clip_fea is required")
            if clip_fea.dim() != 3 or clip_fea.shape[2] != cfg.image_dim:
                raise ValueError(f"expected clip_fea [B, 257, {cfg.image_dim}], got {tuple(clip_fea.shape)}")
        elif clip_fea is not None:
            raise ValueError("clip_fea was given but this model has no image branch (config.image_dim is None)")

    def _timestep_per_token(self, timestep: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """[B] -> [B, 1]; [B, L] -> this rank's [B, L_local] (padding gets t=0, its output is discarded)."""
        if timestep.dim() == 0:
            timestep = timestep.expand(batch)
        if timestep.dim() == 1:
            if timestep.shape[0] != batch:
                raise ValueError(f"timestep has {timestep.shape[0]} entries for a batch of {batch}")
            return timestep[:, None]
        if timestep.dim() == 2 and timestep.shape == (batch, length):
            return self.sharding.shard(timestep, dim=1)
        raise ValueError(f"timestep must be [B] or per token [B, L] = [{batch}, {length}], got {tuple(timestep.shape)}")

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, prod(patch)*out_dim] -> [B, out_dim, F, H, W] (channels are the fastest-varying, as official)."""
        f, h, w = grid
        pt, ph, pw = self.patch_size
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, self.config.out_dim)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(x.shape[0], self.config.out_dim, f * pt, h * ph, w * pw)
