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

Collectives (``COMM_OVERLAP``): inside a compiled block the Ulysses all-to-alls are graph nodes,
and Inductor may wait for one right after issuing it (it does for the output all-to-all), so the GPU
idles through the transfer. Its ``raise_comms`` pass issues each collective as soon as its input
exists and ``sink_waits`` waits only where the result is used: q's and k's transfers run during v's
projection (see ``wan_model.parallel.ulysses_ring``), the output's during the cross-attention's
projections of the text context. Only the order of kernels changes, not what they compute.

Cache (``use_cache_dir``): Inductor keeps what it compiled (FX graphs, AOT graphs, Triton kernels)
on disk, keyed by the graph, the GPU and the torch/Triton versions. A new process that compiles the
same block finds it there and skips the lowering and the kernel builds. By default that folder is
per machine and temporary (``/tmp/torchinductor_<user>``), so a replacement replica on another node,
or in a fresh container, compiles again; a folder on a persistent volume keeps the artifacts for
every later process. ``compile_stats`` says how many graphs came from the cache.
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Any, Optional

import torch.nn as nn

# Inductor options every compiled block gets (merged with the options of ``mode``).
COMM_OVERLAP: dict[str, Any] = {
    "reorder_for_compute_comm_overlap": True,
    "reorder_for_compute_comm_overlap_passes": ["sink_waits", "raise_comms"],
}

__all__ = ["compile_blocks", "blocks_compiled", "use_cache_dir", "compile_stats"]


def compile_blocks(model: nn.Module, mode: Optional[str] = None, dynamic: Optional[bool] = None) -> nn.Module:
    """``torch.compile`` every block of ``model.blocks`` in place; returns ``model``.

    ``mode`` is ``torch.compile``'s (None = default, "max-autotune-no-cudagraphs", ...). ``dynamic``
    too: None = automatic (see the module doc), False = one graph per shape, True = symbolic from the
    start. Calling it twice is harmless (a compiled block is left as it is). Every block also gets
    the ``COMM_OVERLAP`` Inductor options (see the module doc).
    """
    import torch._inductor

    options = dict(torch._inductor.list_mode_options(mode) if mode else {})
    options.update(COMM_OVERLAP)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"compile_blocks needs a model with a non-empty ModuleList `blocks`, got {type(model).__name__}")
    for block in blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            # torch.compile takes mode or options, not both: the mode's own options are merged above.
            block.compile(dynamic=dynamic, options=options)
    return model


def blocks_compiled(model: nn.Module) -> bool:
    """Whether every block of ``model`` goes through ``torch.compile``."""
    blocks = getattr(model, "blocks", ())
    return len(blocks) > 0 and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)


def use_cache_dir(path: str) -> str:
    """Keep this process's compiled artifacts in ``path`` (created if missing); returns it, absolute.

    Call it before the first compilation (Triton's own cache folder is fixed by then). Raises
    ``ValueError`` naming the folder when it cannot be created or written.
    """
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ValueError(f"compile cache folder {path!r} cannot be written: {exc}") from None
    # Inductor reads this on every cache access (torch._inductor.runtime.cache_dir_utils.cache_dir),
    # and puts Triton's kernels under it unless TRITON_CACHE_DIR says otherwise.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


def compile_stats() -> dict[str, int]:
    """Graphs compiled in this process so far (``graphs``: Dynamo's count), and how many of them
    Inductor loaded from its on-disk cache instead of compiling (``from_cache``)."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:  # Dynamo never loaded: nothing compiled (and health checks stay free of its import)
        return {"graphs": 0, "from_cache": 0}
    counters = utils.counters
    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "from_cache": int(counters["inductor"]["fxgraph_cache_hit"])}
