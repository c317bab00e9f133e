"""FSDP2 for inference: shard each transformer block's weights over the ranks, gather them per block.

Every rank holds ``1/world`` of each block's parameters; before a block runs, its full weights
are all-gathered (and the next block's gather is started early: forward prefetch), and freed
after it. Sequence parallelism is untouched: FSDP only changes where weights live, so the
results equal the unsharded run. All ranks must run the same blocks in the same order, which
the SPMD denoising loop guarantees (the same number of model calls on every rank per step).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def shard_transformer(model: nn.Module, device: torch.device, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to every block of ``model`` and then to the model itself (in place).

    ``group``: the ranks to shard over (default: the whole world). The model must already be on
    ``device`` in its inference dtype, or still on ``meta`` (``load_transformer(shard=...)`` then fills
    each rank's shards from the checkpoint).
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise RuntimeError("FSDP needs an initialized process group")
    group = group if group is not None else dist.group.WORLD
    mesh = DeviceMesh.from_group(group, device_type=device.type)
    blocks = list(model.blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    # The root unit holds the embeddings and the head (small), gathered once per forward.
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    # Start gathering the next block's weights while this one computes.
    for block, following in zip(blocks, blocks[1:]):
        block.set_modules_to_forward_prefetch([following])
    model.requires_grad_(False)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` has been applied to ``model`` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank actually holds (its shards, under FSDP)."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total
