"""A zero-argument function's result, computed once.

The attention-kernel checks (is FA3/FA4 importable?) run on every attention call, inside compiled
blocks. ``functools.lru_cache`` makes torch.compile warn and trace around its wrapper; this plain
closure traces as what it is: a read of a remembered value.
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

T = TypeVar("T")


def computed_once(fn: Callable[[], T]) -> Callable[[], T]:
    """``fn()`` on the first call, the same value after; ``.cache_clear()`` forgets it (tests)."""
    memo: list = []

    @functools.wraps(fn)
    def once() -> T:
        if not memo:
            memo.append(fn())
        return memo[0]

    once.cache_clear = memo.clear  # type: ignore[attr-defined]
    return once
