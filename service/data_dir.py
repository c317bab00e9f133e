"""Is ``data_dir`` the same folder on every node?

The JobQueue keeps the job store under ``data_dir`` and makes each job's results folder there; the
engine replica's rank 0 writes the video into it on its own node, and the Ingress serves it from its
own. On more than one node that works only if ``data_dir`` is a volume they all share. A path that is
local on each node fails quietly and late: every job runs to the end and is then failed for "no
video". So the JobQueue marks its ``data_dir`` with a random id, and the other deployments compare
it with what they see under the same path before they take work (``data_dir_problem``).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Optional

STORE_ID_FILE = "store-id"


def ensure_store_id(data_dir: str | Path) -> str:
    """The id of this ``data_dir``, created on first use (atomically: two JobQueue replicas starting
    on one shared volume agree on it)."""
    path = Path(data_dir) / STORE_ID_FILE
    existing = read_store_id(data_dir)
    if existing:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{STORE_ID_FILE}.{uuid.uuid4().hex}")
    tmp.write_text(uuid.uuid4().hex + "\n")
    try:
        os.link(tmp, path)  # fails if another replica made it first: theirs stands
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links: a rename, which a racing replica may overwrite
        if not path.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return read_store_id(data_dir) or ""


def read_store_id(data_dir: str | Path) -> Optional[str]:
    """The id this node sees in ``data_dir``, or None if there is none."""
    try:
        return (Path(data_dir) / STORE_ID_FILE).read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def data_dir_problem(data_dir: str | Path, expected: str, who: str) -> Optional[str]:
    """Why ``who`` (a deployment on this node) cannot use ``data_dir`` with the JobQueue whose store id
    is ``expected``, or None."""
    seen = read_store_id(data_dir)
    if seen == expected:
        return None
    what = "no job store" if seen is None else "another job store"
    return (f"{who}: data_dir {data_dir} on this node ({os.uname().nodename}) is not the JobQueue's (it holds "
            f"{what}). data_dir must be one volume that every node mounts at the same path: the engine's node "
            "writes the videos and the Ingress's node serves them")
