"""The job store's SQLite journal: WAL on a local filesystem, the rollback journal on one that other
hosts mount (WAL's shared-memory index is per host). The filesystem comes from mountinfo text here,
so NFS and friends are tried without mounting them; the rollback journal itself is exercised by two
processes writing one store at once."""
from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3

import pytest

from service.dispatcher import JobQueueService
from service.metrics import render_metrics
from service.queue import JobQueue
from service.store_journal import choose_journal, mount_of, parse_mountinfo
from service_helpers import FakeEngine, make_settings

MOUNTINFO = "\n".join([
    "22 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u",
    "23 22 0:22 / /proc rw,relatime - proc proc rw",
    "30 22 0:40 / /data rw,relatime - nfs4 fs-1.efs.example.com:/ rw,vers=4.1,hard,local_lock=none",
    "31 22 0:41 / /data/scratch rw,relatime - ext4 /dev/nvme1n1 rw",
    "32 22 0:42 / /mnt/my\\040bucket rw,nosuid - fuse.gcsfuse bucket rw,user_id=0",
    "33 22 0:43 / /srv rw - fuse.fuse-overlayfs fuse-overlayfs rw",
    "34 22 0:44 / /cephfs rw - ceph 10.0.0.1:6789:/ rw,name=admin",
    "35 22 0:45 / /old rw - nfs server:/export rw,vers=3,nolock",
])


def test_mountinfo_is_parsed_with_escaped_paths():
    mounts = {m.point: m for m in parse_mountinfo(MOUNTINFO + "\nnot a mount line")}
    assert len(mounts) == 8
    assert mounts["/data"].fstype == "nfs4" and "local_lock=none" in mounts["/data"].options
    assert mounts["/mnt/my bucket"].fstype == "fuse.gcsfuse"


@pytest.mark.parametrize("path, point, journal", [
    ("/data/wanserve", "/data", "delete"),
    ("/data", "/data", "delete"),
    ("/data/scratch/wanserve", "/data/scratch", "wal"),  # a local disk mounted inside the share
    ("/data2/wanserve", "/", "wal"),  # /data is not a prefix of /data2
    ("/home/me/wanserve-data", "/", "wal"),
    ("/mnt/my bucket/x", "/mnt/my bucket", "delete"),  # FUSE of an object store
    ("/srv/x", "/srv", "wal"),  # a rootless container's root
    ("/cephfs/x", "/cephfs", "delete"),
])
def test_auto_takes_the_rollback_journal_where_other_hosts_mount_the_volume(path, point, journal):
    assert mount_of(path, MOUNTINFO).point == point
    chosen, why = choose_journal("auto", path, MOUNTINFO)
    assert chosen == journal and point in why


def test_an_explicit_journal_is_kept_and_risky_mounts_are_named(serve_warnings):
    assert choose_journal("wal", "/data/x", MOUNTINFO)[0] == "wal"
    assert choose_journal("delete", "/home/x", MOUNTINFO)[0] == "delete"
    assert choose_journal("auto", "/old/x", MOUNTINFO)[0] == "delete"
    text = serve_warnings.text
    assert "could corrupt the store" in text  # WAL forced on NFS
    assert "host-local locks" in text and "nolock" in text  # NFS without working locks


def test_this_machine_s_mounts_can_be_read(tmp_path):
    mount = mount_of(tmp_path)
    assert mount is not None and str(tmp_path).startswith(mount.point.rstrip("/") or "/")


def test_a_store_in_the_rollback_journal_works_and_keeps_no_wal(tmp_path):
    queue = JobQueue(tmp_path / "jobs.sqlite3", journal="delete")
    assert queue.journal_mode == "delete"
    job, created = queue.submit({"prompt": "a cat", "seed": 1})
    assert created and queue.next_queued()["id"] == job["id"]
    queue.mark_running(job["id"])
    queue.finish(job["id"], "succeeded", result={"width": 64}, result_bytes=1)
    assert queue.acquire_lease("a", 10)[0] and not queue.acquire_lease("b", 10)[0]
    assert not (tmp_path / "jobs.sqlite3-wal").exists()
    queue.close()
    again = JobQueue(tmp_path / "jobs.sqlite3", journal="delete")
    assert again.get(job["id"])["status"] == "succeeded"
    assert again._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: a 202 is on disk


def test_a_wal_store_open_elsewhere_stays_wal_until_it_is_free(tmp_path, serve_warnings):
    path = tmp_path / "jobs.sqlite3"
    older = JobQueue(path)  # an older JobQueue replica, in WAL, still running
    newer = JobQueue(path, journal="delete")
    assert newer.journal_mode == "wal" and "journal stays wal" in serve_warnings.text
    job, _ = newer.submit({"prompt": "still works", "seed": 1})
    assert older.get(job["id"])["status"] == "queued"
    older.close()
    newer.close()
    assert JobQueue(path, journal="delete").journal_mode == "delete"


def _writer(path: str, name: str, count: int, out: "multiprocessing.Queue") -> None:
    queue = JobQueue(path, journal="delete", max_size=1000)
    ids, leases = [], 0
    for i in range(count):
        ids.append(queue.submit({"prompt": f"{name} {i}", "seed": i})[0]["id"])
        leases += queue.acquire_lease(name, 0.01)[0]
    out.put((name, ids, leases, queue.journal_mode))


def test_two_processes_share_a_store_in_the_rollback_journal(tmp_path):
    """The situation of a KubeRay upgrade, on one host: two JobQueue replicas write one store."""
    path = str(tmp_path / "jobs.sqlite3")
    JobQueue(path, journal="delete").close()
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    procs = [context.Process(target=_writer, args=(path, name, 40, out)) for name in ("old", "new")]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    ids = [job_id for _, got, _, _ in results for job_id in got]
    assert {mode for *_, mode in results} == {"delete"} and len(set(ids)) == 80
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 80
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_the_job_queue_replica_opens_the_store_in_the_configured_journal(tmp_path):
    settings = make_settings(tmp_path, store_journal="delete")
    svc = JobQueueService(settings.to_args(), FakeEngine())
    assert svc.queue.journal_mode == "delete"
    state = asyncio.run(svc.state())
    assert 'wanserve_store_info{journal="delete"} 1' in render_metrics(state)
