"""Checks on result files before a job is marked succeeded (no decoding, no extra dependency)."""
from __future__ import annotations

import os
import struct
from typing import Optional

REQUIRED_BOXES = ("ftyp", "moov", "mdat")


def mp4_problem(path: str) -> Optional[str]:
    """Why the MP4 at ``path`` is not a complete file, or ``None``.

    A writer stopped part-way (a full disk: ffmpeg reports "Error writing trailer" but imageio does
    not raise) leaves a file whose top-level boxes do not tile it or that lacks ``moov``; such a
    file must never be recorded as a job's result.
    """
    try:
        size = os.path.getsize(path)
        seen = []
        with open(path, "rb") as f:
            offset = 0
            while offset < size:
                f.seek(offset)
                header = f.read(8)
                if len(header) < 8:
                    return f"{size - offset} stray bytes after the last box at offset {offset}"
                box_size, kind = struct.unpack(">I4s", header)
                if box_size == 1:  # 64-bit size follows
                    large = f.read(8)
                    if len(large) < 8:
                        return f"box {kind!r} at offset {offset} is cut short"
                    (box_size,) = struct.unpack(">Q", large)
                elif box_size == 0:  # the box runs to the end of the file
                    box_size = size - offset
                if box_size < 8 or offset + box_size > size:
                    return (f"box {kind.decode('latin-1')!r} at offset {offset} needs {box_size} bytes but the "
                            f"file ends at {size} (the write stopped part-way, e.g. a full disk)")
                seen.append(kind.decode("latin-1"))
                offset += box_size
    except OSError as exc:
        return f"cannot read it: {exc}"
    missing = [b for b in REQUIRED_BOXES if b not in seen]
    if missing:
        return f"no {', '.join(missing)} box (boxes: {', '.join(seen) or 'none'})"
    return None
