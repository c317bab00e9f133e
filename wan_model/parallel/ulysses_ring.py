"""USP attention: Ulysses all-to-all inside the ulysses group, ring attention across ring groups."""
from __future__ import annotations

import torch
from yunchang.comm.all_to_all import SeqAllToAll4D

from .groups import ParallelState
from .kernels import KERNEL_NAMES, LseKernel, fast_kernel, get_lse_kernel, plain_attention, resolve_kernel_name
from .ring import ring_attention
from .ulysses_overlap import overlapped_ulysses_attention


class UlyssesRingAttention:
    """``AttentionBackend`` for sequence parallelism (USP: Ulysses x Ring).

    Input and output: this SP rank's chunk ``[B, L_local, H, D]`` of a sequence padded to
    ``L_local * sp_world`` tokens, of which the first ``valid_len`` are real.

    1. Ulysses all-to-all (yunchang ``SeqAllToAll4D``), one per tensor, q then k then v: scatter
       heads, gather the sequence of the ulysses group -> ``[B, ulysses * L_local, H / ulysses, D]``.
       Because the SP chunks of one ulysses group are consecutive, this is the contiguous span of
       global positions starting at ``ring_rank * ulysses * L_local``. Three transfers rather than
       one of the stacked q/k/v: inside a compiled block, Inductor's comm passes
       (``wan_model.compile``) issue q's and k's while v's projection is still computing, and no
       stacked copy is made (bench/RESULTS.md, ninth session: 0.3-0.4% off a 14B forward).
    2. Ring degree 1: plain attention over that (whole) sequence, padding keys dropped.
       Ring degree > 1: ring attention over the ring group, merged with the true LSE.
    3. The reverse all-to-all (yunchang ``SeqAllToAll4D``).

    ``head_chunks`` > 1 (ring degree 1 only): the heads go in that many groups whose all-to-alls
    overlap the attention of the others (``ulysses_overlap``); the result is the same.

    ``kernel`` picks the attention kernel by name (``auto``, ``cudnn``, ``fa3``, ``fa3_fp8``,
    ``fa4``, ``flash``, ``efficient``, ``cpu``, ``math``; ``auto`` = FlashAttention-3 or -4 for
    bf16/fp16 on CUDA where installed and able to run (``kernels.fast_kernel``), else cuDNN
    (plain SDPA when the ring degree is 1), ``efficient`` for fp32 on CUDA, ``cpu`` on CPU) or is a callable
    ``(q, k, v) -> (out, lse)`` in ``[B, H, L, D]`` layout. ``kernel_name`` says which kernel
    ran in the last call; a named kernel that cannot run raises, it is never swapped.
    """

    def __init__(self, state: ParallelState, kernel: str | LseKernel = "auto", head_chunks: int = 1) -> None:
        if isinstance(kernel, str) and kernel not in KERNEL_NAMES:
            raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {', '.join(KERNEL_NAMES)}")
        if not isinstance(head_chunks, int) or head_chunks < 1:
            raise ValueError(f"head_chunks must be an integer >= 1, got {head_chunks!r}")
        self.state = state
        self.kernel = kernel
        self.head_chunks = head_chunks
        self.kernel_name: str | None = None

    def _kernel_for(self, q: torch.Tensor) -> tuple[str, LseKernel | None]:
        if callable(self.kernel):
            return getattr(self.kernel, "__name__", "custom"), self.kernel
        if self.state.ring == 1 and self.kernel == "auto":
            # No LSE needed here: a fast kernel when one runs, else PyTorch's own SDPA dispatch.
            name = fast_kernel(q.device, q.dtype, q.shape[-1])
            return (name, get_lse_kernel(name)) if name else ("sdpa", None)
        name = resolve_kernel_name(self.kernel, q.device, q.dtype, q.shape[-1])
        return name, get_lse_kernel(name)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, valid_len: int | None = None
    ) -> torch.Tensor:
        state = self.state
        if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
            raise ValueError(f"q, k, v must have one shape [B, L_local, H, D]; got {q.shape}, {k.shape}, {v.shape}")
        state.config.check_heads(q.shape[2])
        padded_len = q.shape[1] * state.sp_world
        if valid_len is None:
            valid_len = padded_len
        if not 1 <= valid_len <= padded_len:
            raise ValueError(f"valid_len must be in [1, {padded_len}] (padded global length), got {valid_len}")
        name, kernel = self._kernel_for(q)

        def whole_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            """This rank holds the whole sequence (for its heads): padding is the tail, drop it."""
            k, v = k[:, :valid_len], v[:, :valid_len]
            q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))
            out = kernel(q_, k_, v_)[0] if callable(self.kernel) else plain_attention(name, q_, k_, v_)
            return out.transpose(1, 2)

        if state.ulysses > 1 and state.ring == 1 and self.head_chunks > 1:
            out = overlapped_ulysses_attention(q, k, v, whole_sequence, group=state.ulysses_group,
                                               ulysses=state.ulysses, chunks=self.head_chunks)
            self.kernel_name = name
            return out

        if state.ulysses > 1:
            # [B, L_local, H, D] -> [B, L_span, H/U, D] each; v last, as its projection is the
            # compute the q and k transfers can run behind.
            q = SeqAllToAll4D.apply(state.ulysses_group, q, 2, 1)
            k = SeqAllToAll4D.apply(state.ulysses_group, k, 2, 1)
            v = SeqAllToAll4D.apply(state.ulysses_group, v, 2, 1)
        if state.ring == 1:
            out = whole_sequence(q, k, v)
        else:
            out = ring_attention(
                q, k, v, kernel=kernel, ring_group=state.ring_group, ring_rank=state.ring_rank,
                ring_world=state.ring, valid_len=valid_len,
            )
        if state.ulysses > 1:
            out = SeqAllToAll4D.apply(state.ulysses_group, out.contiguous(), 1, 2)
        self.kernel_name = name
        return out

    def __repr__(self) -> str:
        return (f"UlyssesRingAttention(ulysses={self.state.ulysses}, ring={self.state.ring}, "
                f"kernel={self.kernel!r}, head_chunks={self.head_chunks})")
