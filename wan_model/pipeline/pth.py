"""Read the official Wan ``.pth`` checkpoints (T5, CLIP, VAE) as tensors, without running pickled code."""
from __future__ import annotations

from pathlib import Path

import torch


def load_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, on CPU. A file in torch's zip format (every ``torch.save`` since 1.6)
    is memory-mapped, so the host holds no second copy of multi-GB weights; one in the older format
    cannot be and is read whole."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _is_zip(path: Path) -> bool:
    """Whether the file starts as a zip archive does (torch's own test): ``zipfile.is_zipfile`` looks
    for a directory record anywhere near the end, which a legacy pickle's bytes can hold by chance."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"
