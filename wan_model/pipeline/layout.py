"""How this rank takes part in a job: its sequence sharding, attention backend and CFG half."""
from __future__ import annotations

from dataclasses import dataclass

from wan_model.attention import AttentionBackend, LocalAttention
from wan_model.config import VariantSpec
from wan_model.sequence import SequenceSharding

from .denoise import CfgSplit


@dataclass
class Layout:
    ulysses: int
    ring: int
    cfg_parallel: int
    sharding: SequenceSharding
    attention: AttentionBackend
    cfg_split: CfgSplit
    state: object = None  # wan_model.parallel.ParallelState, when distributed

    @property
    def whole_world(self):
        """The ``ParallelConfig`` that steps with guidance 1 run under CFG-parallel, or None."""
        if self.cfg_split.whole_world is None:
            return None
        return self.cfg_split.whole_world[1].state.config

    @property
    def head_chunks(self) -> int:
        """Head groups whose Ulysses all-to-alls overlap attention (1: no overlap)."""
        return getattr(self.attention, "head_chunks", 1)

    def attention_name(self) -> str:
        ran = getattr(self.attention, "kernel_name", None)  # the kernel that ran last, once known
        if not ran and self.cfg_split.whole_world is not None:  # every step so far had guidance 1
            ran = getattr(self.cfg_split.whole_world[1], "kernel_name", None)
        if ran:
            return ran
        kernel = getattr(self.attention, "kernel", None)
        return kernel if isinstance(kernel, str) else getattr(self.attention, "name", type(self.attention).__name__)


def choose_degrees(config, variant: VariantSpec, world_size: int):
    """The ``ParallelConfig`` for ``world_size`` ranks: explicit degrees, or auto. A degree left out
    (None) beside one given is chosen as auto would, where it fits: CFG-parallel first.

    Auto: CFG-parallel on an even world (the two branches need no communication but one
    all-gather per step), then the largest Ulysses degree dividing the heads, the rest ring.
    With ``fsdp`` (the memory-saving mode) auto splits the sequence over every rank instead and runs
    the two CFG branches one after the other: CFG-parallel would double the tokens, and so the
    activations, each GPU holds (14B 720p on 4 GPUs under a 24 GiB cap: Ulysses 4 peaks at 18.8 GiB,
    CFG-parallel 2 x Ulysses 2 runs out of memory).
    """
    from wan_model.parallel import ParallelConfig, pick_parallel_degrees

    heads = variant.transformer.num_heads
    manual = config.ulysses is not None or config.ring is not None or config.cfg_parallel is not None
    if config.parallel == "auto" and not manual:
        cfg_parallel = world_size > 1 and world_size % 2 == 0 and not getattr(config, "fsdp", False)
        return pick_parallel_degrees(world_size, heads, cfg_parallel=cfg_parallel)
    if config.parallel not in ("auto", "manual"):
        raise ValueError(f"parallel must be 'auto' or 'manual', got {config.parallel!r}")
    cfg = 2 if config.cfg_parallel else 1
    if config.cfg_parallel is None:  # left to choose, beside a degree given: as auto would, where it fits
        cfg = 2 if _cfg_parallel_fits(config, world_size) else 1
    if world_size % cfg:
        raise ValueError(f"cfg_parallel needs an even number of ranks, got {world_size}")
    sp_world = world_size // cfg
    if config.ulysses is None and config.ring is None:
        picked = pick_parallel_degrees(world_size, heads, cfg_parallel=cfg == 2)
        ulysses, ring = picked.ulysses, picked.ring
    else:
        for name, given in (("ulysses", config.ulysses), ("ring", config.ring)):
            if given is not None and (given < 1 or sp_world % given):
                raise ValueError(f"{name}={given} does not divide the {sp_world} ranks of a sequence-parallel "
                                 f"group (world {world_size}, cfg_parallel {cfg})")
        ulysses = config.ulysses or sp_world // (config.ring or 1)
        ring = config.ring or sp_world // ulysses
    degrees = ParallelConfig(ulysses=ulysses, ring=ring, cfg_parallel=cfg)
    if degrees.world_size != world_size:
        raise ValueError(f"cfg {cfg} x ulysses {ulysses} x ring {ring} = {degrees.world_size} ranks, "
                         f"but the world has {world_size}")
    degrees.check_heads(heads)
    return degrees


def _cfg_parallel_fits(config, world_size: int) -> bool:
    """Whether CFG-parallel, which ``auto`` takes for an even world without ``fsdp``, leaves room for
    the Ulysses and Ring degrees given: each divides half the world, and both together fill it."""
    if world_size % 2 or getattr(config, "fsdp", False):
        return False
    half = world_size // 2
    given = [d for d in (config.ulysses, config.ring) if d is not None]
    if any(d < 1 or half % d for d in given):
        return False
    return len(given) < 2 or given[0] * given[1] == half


def setup_layout(config, variant: VariantSpec, world_size: int, distributed: bool) -> Layout:
    """Create the process groups (collective when distributed) and this rank's backends."""
    if world_size == 1:
        if (config.ulysses or 1) * (config.ring or 1) * (2 if config.cfg_parallel else 1) != 1:
            raise ValueError("ulysses/ring/cfg_parallel degrees above 1 need more than one rank")
        # One rank: "auto"/"sdpa" is plain SDPA (PyTorch picks flash/cuDNN/efficient itself); a named
        # kernel ("cudnn", ...) runs exactly that one or raises. The layout string says which.
        return Layout(1, 1, 1, SequenceSharding(), LocalAttention(kernel=config.attention), CfgSplit())
    if not distributed:
        raise RuntimeError(f"world size {world_size} needs an initialized process group")
    from wan_model.parallel import pick_parallel_degrees, setup_sequence_parallel

    degrees = choose_degrees(config, variant, world_size)
    kernel = "auto" if config.attention == "sdpa" else config.attention
    whole = None
    if degrees.cfg_parallel > 1:
        # Steps with guidance 1 (distilled models and LoRAs, an A14B expert without guidance) have one
        # branch to run: over every rank, not twice on half of them. Made first, so that yunchang's
        # global groups end up those of the main layout.
        whole_degrees = pick_parallel_degrees(world_size, variant.transformer.num_heads, cfg_parallel=False)
        whole = setup_sequence_parallel(whole_degrees)
    state = setup_sequence_parallel(degrees)
    # Head groups overlap the all-to-alls only in Ulysses-only layouts; elsewhere there is nothing to overlap.
    head_chunks = config.head_chunks if degrees.ulysses > 1 and degrees.ring == 1 else 1
    if head_chunks > 1:
        from wan_model.parallel.ulysses_overlap import check_head_chunks

        check_head_chunks(variant.transformer.num_heads, degrees.ulysses, head_chunks)
    cfg_split = CfgSplit()
    if whole is not None:
        cfg_split = CfgSplit(group=state.cfg_group, half=state.cfg_rank,
                             whole_world=(whole.sharding(), whole.attention(kernel=kernel)))
    return Layout(degrees.ulysses, degrees.ring, degrees.cfg_parallel, state.sharding(),
                  state.attention(kernel=kernel, head_chunks=head_chunks), cfg_split, state)
