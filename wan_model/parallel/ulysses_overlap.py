"""Ulysses attention with its all-to-alls overlapped with attention, chunk by chunk of heads.

Plain Ulysses runs: all-to-all (q, k, v) -> attention -> all-to-all (out), each waiting for the
last, so the network time adds to the step. Attention is independent per head, so the heads are
split into ``chunks`` groups: every group's q/k/v all-to-all is queued at once (NCCL runs them
one after another on its own stream), attention of group ``c`` starts as soon as its own
transfer has landed, and the output all-to-all of group ``c`` runs while group ``c + 1`` is
computed. Only the first transfer and the last output transfer stay exposed.

Each all-to-all is one ``all_to_all_single`` on a buffer laid out ``[ulysses, ...]`` so that slice
``j`` goes to (or came from) rank ``j``: rank ``r`` gets heads ``[r * h, (r + 1) * h)`` of every
group (``h`` = group heads / ulysses) and the whole span of the Ulysses group's tokens.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

# (q, k, v) [B, L_span, h, D] -> out [B, L_span, h, D]; q/k/v hold the whole span of this group.
SpanAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_head_chunks(num_heads: int, ulysses: int, chunks: int) -> None:
    """Raise ``ValueError`` unless ``chunks`` groups of heads each split evenly over ``ulysses`` ranks."""
    if chunks < 1 or num_heads % chunks or (num_heads // chunks) % ulysses:
        valid = [c for c in range(1, num_heads + 1) if num_heads % c == 0 and (num_heads // c) % ulysses == 0]
        raise ValueError(f"head_chunks={chunks} does not split {num_heads} heads into groups divisible by "
                         f"ulysses={ulysses}; valid values: {valid}")


@torch.compiler.disable  # async collectives and their waits run eagerly; the block around them stays compiled
def overlapped_ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attend: SpanAttention,
    *,
    group: dist.ProcessGroup,
    ulysses: int,
    chunks: int,
) -> torch.Tensor:
    """``[B, L_local, H, D]`` q/k/v of this rank's tokens -> attention output, same layout."""
    batch, local_len, heads, head_dim = q.shape
    check_head_chunks(heads, ulysses, chunks)
    group_heads = heads // chunks
    per_rank = group_heads // ulysses

    incoming = []
    for c in range(chunks):
        heads_c = slice(c * group_heads, (c + 1) * group_heads)
        # [3, B, L_local, U, h, D] -> [U, 3, B, L_local, h, D]: slice j (heads of rank j) goes to rank j.
        send = torch.stack([x[:, :, heads_c] for x in (q, k, v)]).unflatten(3, (ulysses, per_rank))
        send = send.permute(3, 0, 1, 2, 4, 5).contiguous()
        recv = torch.empty_like(send)
        incoming.append((dist.all_to_all_single(recv, send, group=group, async_op=True), recv))

    outgoing = []
    for work, recv in incoming:
        work.wait()
        # [U (source rank = token span), 3, B, L_local, h, D] -> q/k/v [B, U * L_local, h, D]
        qkv = recv.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)
        out = attend(qkv[0], qkv[1], qkv[2])
        # [B, U * L_local, h, D] -> [U (destination rank = token span), B, L_local, h, D]
        send = out.unflatten(1, (ulysses, local_len)).transpose(0, 1).contiguous()
        recv_out = torch.empty_like(send)
        outgoing.append((dist.all_to_all_single(recv_out, send, group=group, async_op=True), recv_out))

    pieces = []
    for work, recv_out in outgoing:
        work.wait()
        # [U (source rank = head slice), B, L_local, h, D] -> [B, L_local, U * h, D]
        pieces.append(recv_out.permute(1, 2, 0, 3, 4).flatten(2, 3))
    return torch.cat(pieces, dim=2) if chunks > 1 else pieces[0]
