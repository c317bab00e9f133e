"""Which SQLite journal the job store uses, from the filesystem ``data_dir`` is on.

WAL keeps its index in shared memory (the ``-shm`` file, mapped by every connection), so every
process that opens the database must be on one host. On a volume several hosts mount (NFS, EFS,
CephFS, SMB: the ReadWriteMany volume of ``k8s/``), two JobQueue replicas on two pods can have the
store open at once (a KubeRay upgrade), and in WAL each would read through its own stale index:
the database can be corrupted. The rollback journal (``delete``) relies only on file locks, which
these filesystems carry between hosts. So ``store_journal: auto`` takes WAL on local filesystems
and the rollback journal on network ones.
"""
from __future__ import annotations

import logging
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

logger = logging.getLogger("ray.serve")

# Kernel filesystem types whose files other hosts can open too.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "9p", "afs",
    "beegfs", "ocfs2", "gfs2", "virtiofs", "orangefs", "pvfs2", "davfs",
})
# FUSE filesystems that are local (rootless container roots); any other fuse.* is taken as shared
# (gcsfuse, s3fs, juicefs, sshfs, ceph-fuse, ...).
LOCAL_FUSE = frozenset({"fuse.fuse-overlayfs", "fuseblk"})


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    options: str  # the mount's and the filesystem's options, comma-separated

    @property
    def shared(self) -> bool:
        """Whether other hosts may open files on it."""
        if self.fstype in LOCAL_FUSE:
            return False
        return self.fstype in NETWORK_FILESYSTEMS or self.fstype.startswith("fuse.")

    @property
    def local_locks(self) -> bool:
        """NFS mounted with locks kept on this host only (``nolock``, ``local_lock=all|posix``)."""
        opts = set(self.options.split(","))
        return "nolock" in opts or "local_lock=all" in opts or "local_lock=posix" in opts


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as octal escapes (\040 ...)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of ``/proc/self/mountinfo`` text (the format of proc(5))."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or len(tail) < 2:
            continue
        options = fields[5] + ("," + tail[2] if len(tail) > 2 else "")
        mounts.append(Mount(point=_unescape(fields[4]), fstype=tail[0], options=options))
    return mounts


def mount_of(path: Path, mountinfo: Optional[str] = None) -> Optional[Mount]:
    """The mount ``path`` lives on (the last-mounted of the longest matching mount points), or None
    where mounts cannot be read (not Linux)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best: Optional[Mount] = None
    for mount in parse_mountinfo(mountinfo):
        point = mount.point.rstrip("/") or "/"
        inside = target == point or target.startswith(point + "/") or point == "/"
        if inside and (best is None or len(point) >= len(best.point.rstrip("/") or "/")):
            best = mount
    return best


def choose_journal(setting: str, data_dir: Path, mountinfo: Optional[str] = None) -> tuple[str, str]:
    """``(journal mode, why)`` for the store under ``data_dir``: ``setting`` is ``auto``, ``wal`` or
    ``delete``."""
    mount = mount_of(data_dir, mountinfo)
    where = f"{mount.fstype} at {mount.point}" if mount else "an unknown filesystem"
    if mount is not None and mount.shared and mount.local_locks:
        logger.warning("data_dir %s is on %s mounted with host-local locks (%s): two JobQueue replicas on "
                       "two hosts would not see each other's locks; mount it with working locks",
                       data_dir, where, mount.options)
    if setting != "auto":
        if setting == "wal" and mount is not None and mount.shared:
            logger.warning("store_journal is wal on %s, which other hosts mount: a second JobQueue replica "
                           "on another host could corrupt the store", where)
        return setting, f"store_journal: {setting} ({where})"
    if mount is not None and mount.shared:
        return "delete", f"auto: {where} is shared between hosts, so the rollback journal"
    return "wal", f"auto: {where} is local"


def set_journal(db: sqlite3.Connection, journal: str, db_path: Path) -> str:
    """Put the store in ``journal`` mode (``wal`` or ``delete``); returns the mode in use. Leaving WAL
    needs the store to itself: another process (an older JobQueue replica) may still have it open.
    Then it stays as it is, said loudly, and switches at a later start."""
    if journal not in ("wal", "delete"):
        raise ValueError(f"journal must be 'wal' or 'delete', got {journal!r}")
    current = db.execute("PRAGMA journal_mode").fetchone()[0].lower()
    if current == journal:
        return current
    busy_ms = db.execute("PRAGMA busy_timeout").fetchone()[0]
    db.execute("PRAGMA busy_timeout=2000")
    try:
        mode = db.execute(f"PRAGMA journal_mode={journal.upper()}").fetchone()[0].lower()
        reason = "SQLite kept it"
    except sqlite3.OperationalError as exc:
        mode, reason = current, str(exc)
    finally:
        db.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
    if mode != journal:
        logger.warning("job store %s: the journal stays %s, not %s (%s: another process has it open); "
                       "it switches when the store is opened with no other process on it",
                       db_path, mode, journal, reason)
    return mode
