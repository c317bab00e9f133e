"""Regional ``torch.compile``: each transformer block compiled on its own, in place.

Compiling block by block (as diffusers' ``compile_repeated_blocks``) rather than the whole model
keeps compile time short (the blocks share one code object, so one graph serves all of them),
keeps the sequence-parallel collectives in the attention backend out of any single huge graph
(dynamo may graph-break around them; the blocks still run) and leaves the embeddings, the head
and the sharding/gather in eager. ``nn.Module.compile`` wraps the call, not the module: the
parameters and the state-dict names stay exactly as they were (LoRA merge, FSDP, loading still work).

On GPU this pays roughly 10-20% per forward after a warm-up of one or two calls; on the CPU it is
for tests only.

Shapes (``dynamic``): a service sees many video sizes, i.e. many token counts. With one graph per
shape (``dynamic=False``) every new size recompiles, and past Dynamo's ``recompile_limit`` (8 per code
object, and all blocks share one) it silently runs every further new size eagerly. The default
(``dynamic=None``, Dynamo's automatic dynamic shapes) compiles the first size specialised to it, and
the first different size once more with the sizes that changed symbolic; that graph then serves every
later size, so no further compile and no limit.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

__all__ = ["compile_blocks", "blocks_compiled"]


def compile_blocks(model: nn.Module, mode: Optional[str] = None, dynamic: Optional[bool] = None) -> nn.Module:
    """``torch.compile`` every block of ``model.blocks`` in place; returns ``model``.

    ``mode`` is ``torch.compile``'s (None = default, "max-autotune-no-cudagraphs", ...). ``dynamic``
    too: None = automatic (see the module doc), False = one graph per shape, True = symbolic from the
    start. Calling it twice is harmless (a compiled block is left as it is).
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"compile_blocks needs a model with a non-empty ModuleList `blocks`, got {type(model).__name__}")
    for block in blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(dynamic=dynamic, mode=mode)
    return model


def blocks_compiled(model: nn.Module) -> bool:
    """Whether every block of ``model`` goes through ``torch.compile``."""
    blocks = getattr(model, "blocks", ())
    return len(blocks) > 0 and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
