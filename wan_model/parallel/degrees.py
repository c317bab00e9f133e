"""How many ranks go to CFG, Ulysses and Ring parallelism, and which splits are legal."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of the three kinds of parallelism; the world size is their product.

    ``cfg_parallel`` = 2 runs the conditional and unconditional passes on two halves of the
    world; within each half ``ulysses * ring`` ranks split the token sequence (USP).
    """

    ulysses: int = 1
    ring: int = 1
    cfg_parallel: int = 1

    def __post_init__(self) -> None:
        for name in ("ulysses", "ring", "cfg_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelConfig.{name} must be a positive integer, got {value!r}")
        if self.cfg_parallel not in (1, 2):
            raise ValueError(f"ParallelConfig.cfg_parallel must be 1 or 2 (two CFG branches), got {self.cfg_parallel}")

    @property
    def sp_world(self) -> int:
        """Ranks that split one sequence (one CFG branch)."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.cfg_parallel * self.ulysses * self.ring

    def check_heads(self, num_heads: int) -> None:
        """Raise if the Ulysses degree cannot scatter ``num_heads`` attention heads evenly."""
        if num_heads % self.ulysses:
            working = valid_ulysses_degrees(self.sp_world, num_heads)
            raise ValueError(
                f"ulysses degree {self.ulysses} does not divide the {num_heads} attention heads; "
                f"ulysses degrees that divide both the heads and the sequence-parallel world "
                f"{self.sp_world}: {', '.join(map(str, working))} (the rest of the world goes to ring)"
            )


def valid_ulysses_degrees(sp_world: int, num_heads: int) -> list[int]:
    """Ulysses degrees that divide both the sequence-parallel world and the head count."""
    return [d for d in range(1, sp_world + 1) if sp_world % d == 0 and num_heads % d == 0]


def pick_parallel_degrees(world_size: int, num_heads: int, cfg_parallel: bool = False) -> ParallelConfig:
    """The split of ``world_size`` ranks with the largest legal Ulysses degree, the rest ring.

    Ulysses (all-to-all) moves less data than ring for the same degree, but it can only go as
    far as the head count allows; e.g. 12 heads on 8 GPUs -> ulysses 4 x ring 2.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    cfg = 2 if cfg_parallel else 1
    if world_size % cfg:
        raise ValueError(f"CFG-parallel needs an even world size, got {world_size}")
    sp_world = world_size // cfg
    ulysses = max(valid_ulysses_degrees(sp_world, num_heads))
    return ParallelConfig(ulysses=ulysses, ring=sp_world // ulysses, cfg_parallel=cfg)
