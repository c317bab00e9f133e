"""Ring attention step: keys/values travel around the ring group, partial outputs are merged
with their true log-sum-exp.

Each ring rank holds one contiguous span of ``span_len`` global positions (its queries and
its keys/values). In step ``s`` it receives the keys/values of ring rank ``ring_rank - s``
while it computes attention against the chunk it already has, so the transfer of the next
chunk overlaps the current chunk's compute.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .kernels import LseKernel


def merge_partial(
    out: torch.Tensor | None, lse: torch.Tensor | None, chunk_out: torch.Tensor, chunk_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets, in float32.

    With ``out_i = softmax(s_i) v_i`` and ``lse_i = logsumexp(s_i)`` over key set ``i``, attention
    over the union is ``sum_i exp(lse_i - lse) out_i`` with ``lse = logaddexp(lse_1, lse_2)``.
    Subtracting the merged LSE before ``exp`` keeps every weight in [0, 1].
    """
    chunk_out, chunk_lse = chunk_out.float(), chunk_lse.float()
    if out is None:
        return chunk_out, chunk_lse
    new_lse = torch.logaddexp(lse, chunk_lse)
    out = out * torch.exp(lse - new_lse).unsqueeze(-1) + chunk_out * torch.exp(chunk_lse - new_lse).unsqueeze(-1)
    return out, new_lse


def real_keys_in_span(span_index: int, span_len: int, valid_len: int) -> int:
    """How many keys of span ``span_index`` (global positions from ``span_index * span_len``) are not padding."""
    return min(max(valid_len - span_index * span_len, 0), span_len)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kernel: LseKernel,
    ring_group: dist.ProcessGroup,
    ring_rank: int,
    ring_world: int,
    valid_len: int,
) -> torch.Tensor:
    """Attention of this span's queries over every ring rank's keys, ``[B, L_span, H, D]`` layout.

    ``valid_len`` counts real tokens in the global sequence; the spans of the ring ranks are
    laid end to end, so span ``j`` covers global positions ``[j * L_span, (j + 1) * L_span)``.
    Padded keys are sliced off before the kernel, and a span that is all padding is skipped
    (its LSE would be -inf), so the unmasked fast kernels stay usable.
    """
    span_len = k.shape[1]
    ranks = dist.get_process_group_ranks(ring_group)
    send_to, recv_from = ranks[(ring_rank + 1) % ring_world], ranks[(ring_rank - 1) % ring_world]
    q_bhld = q.transpose(1, 2)
    kv = torch.stack([k, v]).contiguous()  # one buffer, one send per step
    out = lse = None
    for step in range(ring_world):
        pending = []
        if step + 1 < ring_world:
            incoming = torch.empty_like(kv)
            pending = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, kv, send_to, ring_group),
                dist.P2POp(dist.irecv, incoming, recv_from, ring_group),
            ])
        real = real_keys_in_span((ring_rank - step) % ring_world, span_len, valid_len)
        if real > 0:
            chunk_k = kv[0, :, :real].transpose(1, 2)
            chunk_v = kv[1, :, :real].transpose(1, 2)
            chunk_out, chunk_lse = kernel(q_bhld, chunk_k, chunk_v)
            out, lse = merge_partial(out, lse, chunk_out, chunk_lse)
        for request in pending:
            request.wait()
        if pending:
            kv = incoming
    if out is None:  # only when valid_len <= 0, which the caller rejects
        raise RuntimeError("ring attention saw no real keys")
    return out.to(q.dtype).transpose(1, 2)
