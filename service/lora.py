"""LoRA names from the API -> files in the configured LoRA folder (never outside it)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

LORA_SUFFIXES = ("", ".safetensors")
MAX_NAME_CHARS = 200  # file names are at most 255 bytes on common filesystems, suffix included


def check_lora_name(name: str) -> Optional[str]:
    """Why ``name`` is not an acceptable LoRA name (a plain file or folder name), or ``None``."""
    if not name or not name.strip():
        return "LoRA name is empty"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_CHARS:
        return f"LoRA name is longer than {MAX_NAME_CHARS} bytes"
    if "/" in name or "\\" in name or ".." in name or name.startswith(("~", ".")) or "\x00" in name:
        return f"LoRA name {name!r} must be a plain name in the LoRA folder (no '/', '\\', '..', or leading '.')"
    if Path(name).is_absolute():
        return f"LoRA name {name!r} must not be an absolute path"
    return None


def resolve_lora(lora_dir: Optional[str], name: str) -> Path:
    """``<lora_dir>/<name>`` or ``<lora_dir>/<name>.safetensors`` (file, or folder for A14B experts)."""
    if not lora_dir:
        raise ValueError("LoRA is not enabled on this server (no lora_dir configured)")
    problem = check_lora_name(name)
    if problem:
        raise ValueError(problem)
    root = Path(lora_dir).resolve()
    for suffix in LORA_SUFFIXES:
        candidate = (root / f"{name}{suffix}").resolve()
        if candidate.parent == root and candidate.exists():
            return candidate
    available = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    raise ValueError(f"unknown LoRA {name!r}; available: {', '.join(available) or 'none'}")
