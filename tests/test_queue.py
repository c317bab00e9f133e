"""JobQueue without Ray: FIFO, bound, idempotency, state transitions, requeue-once, restart recovery."""
from __future__ import annotations

import base64
import json
import sqlite3
import threading

import pytest

from service.queue import (CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, ClientQueueFull, IdempotencyKeyReused,
                           JobNotFound, JobQueue, QueueFull, request_fingerprint)


@pytest.fixture()
def queue(tmp_path):
    q = JobQueue(tmp_path / "jobs.sqlite3", max_size=4, max_attempts=2)
    yield q
    q.close()


def submit(q: JobQueue, prompt: str, **kw) -> dict:
    job, created = q.submit({"prompt": prompt}, **kw)
    assert created
    return job


def test_ids_are_128_bit_random_hex(queue):
    ids = {submit(queue, f"p{i}")["id"] for i in range(3)}
    assert len(ids) == 3
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_fifo_with_priority_and_positions(queue):
    a, b = submit(queue, "a"), submit(queue, "b")
    c = submit(queue, "c", priority=5)
    assert [queue.get(j["id"])["queue_position"] for j in (c, a, b)] == [0, 1, 2]
    order = []
    while (job := queue.next_queued()) is not None:
        order.append(job["request"]["prompt"])
        assert queue.mark_running(job["id"])["status"] == RUNNING
        queue.finish(job["id"], SUCCEEDED, result={"timings": {"step_s": [0.5, 0.25]}}, result_bytes=10)
    assert order == ["c", "a", "b"]
    counters = queue.counters()
    assert counters["steps"] == 6 and counters["step_seconds"] == pytest.approx(2.25)
    assert counters["jobs_finished"] == 3


def test_bound_raises_queue_full_and_writes_nothing(queue):
    jobs = [submit(queue, f"p{i}") for i in range(4)]
    with pytest.raises(QueueFull) as info:
        queue.submit({"prompt": "one too many"})
    assert info.value.retry_after_s >= 1
    assert queue.list()[1] == 4
    # A finished job frees its slot (the bound counts queued + running only).
    queue.mark_running(jobs[0]["id"])
    queue.finish(jobs[0]["id"], SUCCEEDED)
    submit(queue, "fits now")
    assert queue.counts()[QUEUED] == 4


def test_idempotency_key_returns_the_same_job(queue):
    first = submit(queue, "a", idempotency_key="key-1")
    again, created = queue.submit({"prompt": "a"}, idempotency_key="key-1")
    assert not created and again["id"] == first["id"]
    other = submit(queue, "a", idempotency_key="key-2")
    assert other["id"] != first["id"]
    # Even with the queue full, a retried POST gets its job back rather than a 429.
    submit(queue, "x"), submit(queue, "y")
    assert queue.submit({"prompt": "a"}, idempotency_key="key-1")[0]["id"] == first["id"]


def test_idempotency_key_reused_with_a_different_request_is_refused(queue):
    first = submit(queue, "a", idempotency_key="key-1")
    again, created = queue.submit({"prompt": "a"}, idempotency_key="key-1")
    assert not created and again["id"] == first["id"]
    with pytest.raises(IdempotencyKeyReused, match="Idempotency-Key 'key-1' was already used with a different"):
        queue.submit({"prompt": "b"}, idempotency_key="key-1")
    assert queue.list()[1] == 1  # nothing written
    # Keys are per owner: each client may use the same key for its own request.
    alice = submit(queue, "a", idempotency_key="key-1", owner="alice")
    bob = submit(queue, "b", idempotency_key="key-1", owner="bob")
    assert len({first["id"], alice["id"], bob["id"]}) == 3
    assert queue.submit({"prompt": "b"}, idempotency_key="key-1", owner="bob")[0]["id"] == bob["id"]
    with pytest.raises(IdempotencyKeyReused):
        queue.submit({"prompt": "b"}, idempotency_key="key-1", owner="alice")
    # An explicit fingerprint (the ingress hashes the request before a random seed is filled in) decides.
    fp = request_fingerprint({"prompt": "c", "seed": None})
    seeded = submit(queue, "c", idempotency_key="key-2", fingerprint=fp)
    assert queue.submit({"prompt": "c", "seed": 123}, idempotency_key="key-2", fingerprint=fp)[0]["id"] == seeded["id"]


def test_request_fingerprint_is_canonical_and_hashes_image_bytes():
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
    a = {"prompt": "p", "steps": 2, "image": base64.b64encode(png).decode()}
    assert request_fingerprint(a) == request_fingerprint(dict(reversed(list(a.items()))))
    assert request_fingerprint(a) != request_fingerprint(dict(a, steps=3))
    other = base64.b64encode(png[:-1] + b"\x00").decode()
    assert request_fingerprint(a) != request_fingerprint(dict(a, image=other))
    assert len(request_fingerprint(a)) == 64


def test_older_database_gains_the_fingerprint_column_and_keeps_its_keys(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)  # the table as written before owners and fingerprints existed
    db.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
               "status TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, request TEXT NOT NULL, "
               "idempotency_key TEXT UNIQUE, created_at REAL NOT NULL, started_at REAL, finished_at REAL, "
               "updated_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, "
               "cancel_requested INTEGER NOT NULL DEFAULT 0, stage TEXT, step INTEGER NOT NULL DEFAULT 0, "
               "total_steps INTEGER NOT NULL DEFAULT 0, step_s REAL, eta_s REAL, error TEXT, result_path TEXT, "
               "preview_path TEXT, result_bytes INTEGER, result TEXT)")
    db.execute("INSERT INTO jobs (id, status, request, idempotency_key, created_at, updated_at) "
               "VALUES ('old', 'queued', '{\"prompt\": \"a\"}', 'legacy', 1.0, 1.0)")
    db.commit()
    db.close()
    q = JobQueue(path, max_size=4)
    try:
        # No stored fingerprint: today's behaviour, the key returns its job whatever the request.
        job, created = q.submit({"prompt": "something else"}, idempotency_key="legacy")
        assert not created and job["id"] == "old"
        new = submit(q, "n", idempotency_key="fresh")
        with pytest.raises(IdempotencyKeyReused):
            q.submit({"prompt": "not n"}, idempotency_key="fresh")
        assert q.submit({"prompt": "n"}, idempotency_key="fresh")[0]["id"] == new["id"]
    finally:
        q.close()


def test_state_transitions_and_progress(queue):
    job = submit(queue, "a")
    assert queue.mark_running(job["id"])["attempts"] == 1
    assert queue.mark_running(job["id"]) is None  # not queued any more
    assert queue.report_progress(job["id"], stage="denoise", step=2, total_steps=10, step_s=0.5) is False
    running = queue.get(job["id"])
    assert (running["stage"], running["step"], running["total_steps"]) == ("denoise", 2, 10)
    assert running["eta_s"] == pytest.approx(4.0)
    done = queue.finish(job["id"], SUCCEEDED, result={"seed": 3}, result_path="/x/video.mp4", result_bytes=99)
    assert done["status"] == SUCCEEDED and done["result"] == {"seed": 3} and done["finished_at"] >= done["started_at"]
    # Terminal states stay terminal.
    assert queue.finish(job["id"], FAILED, error="late")["status"] == SUCCEEDED
    assert queue.cancel(job["id"])["status"] == SUCCEEDED
    with pytest.raises(ValueError):
        queue.finish(job["id"], RUNNING)
    with pytest.raises(JobNotFound):
        queue.cancel("0" * 32)


def test_cancel_queued_at_once_running_by_flag(queue):
    queued, running = submit(queue, "q"), submit(queue, "r")
    queue.mark_running(running["id"])
    assert queue.cancel(queued["id"])["status"] == CANCELLED
    flagged = queue.cancel(running["id"])
    assert flagged["status"] == RUNNING and flagged["cancel_requested"]
    assert queue.report_progress(running["id"], stage="denoise", step=1, total_steps=4) is True
    assert queue.finish(running["id"], CANCELLED)["status"] == CANCELLED
    assert queue.next_queued() is None


def test_requeue_once_then_fail_with_reason(queue):
    job = submit(queue, "a")
    later = submit(queue, "b")
    queue.mark_running(job["id"])
    again = queue.requeue(job["id"], "worker rank 1 died")
    assert again["status"] == QUEUED and "worker rank 1 died" in again["error"]
    assert queue.next_queued()["id"] == job["id"]  # keeps its place ahead of later jobs
    queue.mark_running(job["id"])
    failed = queue.requeue(job["id"], "worker rank 0 died")
    assert failed["status"] == FAILED and "worker rank 0 died" in failed["error"] and failed["attempts"] == 2
    # A replica that was unavailable does not use up an attempt.
    queue.mark_running(later["id"])
    assert queue.requeue(later["id"], "replica restarting", count_attempt=False)["attempts"] == 0


def test_restart_recovers_running_jobs(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    q = JobQueue(path, max_size=4)
    once, twice, waiting = submit(q, "once"), submit(q, "twice"), submit(q, "waiting")
    q.mark_running(twice["id"]), q.requeue(twice["id"], "crash"), q.mark_running(twice["id"])
    q.mark_running(once["id"])
    q.close()  # the service stops with two jobs "running"
    q2 = JobQueue(path, max_size=4)
    # What a new JobQueue replica does with the ones no engine replica still runs (service.dispatcher).
    assert q2.running_ids() == [once["id"], twice["id"]]
    recovered = {i: q2.requeue(i, "the service stopped while the job was running") for i in q2.running_ids()}
    assert recovered[once["id"]]["status"] == QUEUED
    assert recovered[twice["id"]]["status"] == FAILED and "stopped" in recovered[twice["id"]]["error"]
    assert q2.get(waiting["id"])["status"] == QUEUED
    assert q2.counts()[RUNNING] == 0
    q2.close()


def test_concurrent_submits_respect_the_bound(queue):
    results: list = []

    def worker(i: int) -> None:
        try:
            results.append(queue.submit({"prompt": str(i)})[0]["id"])
        except QueueFull:
            results.append(None)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sum(r is not None for r in results) == 4 and queue.list()[1] == 4


def test_list_filters_and_pages(queue):
    ids = [submit(queue, f"p{i}")["id"] for i in range(3)]
    queue.cancel(ids[1])
    page, total = queue.list(limit=2)
    assert total == 3 and [j["id"] for j in page] == [ids[2], ids[1]]
    cancelled, n = queue.list(status=CANCELLED)
    assert n == 1 and cancelled[0]["id"] == ids[1]
    with pytest.raises(ValueError):
        queue.list(status="bogus")


def test_the_input_image_is_kept_out_of_every_read_but_its_own(queue):
    """A job is read several times a second (views, event streams, lists): an image of megabytes in each
    read blocked the JobQueue. Only ``image()`` (the dispatch) reads it."""
    import hashlib

    image = base64.b64encode(bytes(range(256)) * 4000).decode()  # 1.4 MB of base64
    job, _ = queue.submit({"prompt": "from an image", "seed": 1, "image": image}, idempotency_key="k")
    info = {"base64_chars": len(image), "sha256": hashlib.sha256(image.encode()).hexdigest()}
    again, created = queue.submit({"prompt": "from an image", "seed": 1, "image": image}, idempotency_key="k")
    (listed,), _ = queue.list()
    for read in (job, queue.get(job["id"]), listed, again):
        assert read["request"] == {"prompt": "from an image", "seed": 1, "image_info": info} and "image" not in read
    assert not created and queue.image(job["id"]) == image
    assert queue.image(submit(queue, "no image")["id"]) is None
    with pytest.raises(JobNotFound):
        queue.image("missing")


def test_an_older_store_has_its_images_moved_out_of_the_requests(tmp_path):
    from service_helpers import write_old_store

    db = tmp_path / "jobs.sqlite3"
    write_old_store(db, ", files_deleted_at REAL, files_deleted_reason TEXT, webhook_url TEXT, webhook_status TEXT, "
                        "webhook_attempts INTEGER NOT NULL DEFAULT 0, webhook_next_at REAL, webhook_error TEXT, "
                        "webhook_delivered_at REAL")  # as the fourteenth release wrote it
    image = base64.b64encode(b"\x89PNG" + bytes(100)).decode()
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO jobs (id, status, request, created_at, updated_at) VALUES ('i1', 'queued', ?, 1, 1)",
                     (json.dumps({"prompt": "p", "image": image}),))
    q = JobQueue(db)
    try:
        assert q.get("i1")["request"]["image_info"]["base64_chars"] == len(image) and q.image("i1") == image
        assert q.get("a1")["request"] == {} and q.image("a1") is None
        (stored,) = q._db.execute("SELECT request FROM jobs WHERE id = 'i1'").fetchone()
        assert image not in stored
    finally:
        q.close()


def test_an_older_stores_running_job_keeps_its_dispatch_number_and_counts_as_started(tmp_path):
    """A store the sixteenth release wrote, with a job its engine runs: the engine's claim of that
    dispatch still holds, and, were the job orphaned, its attempt would count (it may have run)."""
    from service_helpers import write_old_store

    db = tmp_path / "jobs.sqlite3"
    write_old_store(db, ", files_deleted_at REAL, files_deleted_reason TEXT, webhook_url TEXT, webhook_status TEXT, "
                        "webhook_attempts INTEGER NOT NULL DEFAULT 0, webhook_next_at REAL, webhook_error TEXT, "
                        "webhook_delivered_at REAL, image TEXT")
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO jobs (id, status, request, created_at, started_at, updated_at, attempts) "
                     "VALUES ('r1', 'running', '{\"prompt\": \"p\"}', 1, 5, 5, 1)")
    q = JobQueue(db)
    try:
        job = q.get("r1")
        assert (job["attempts"], job["dispatch"], job["claimed_at"]) == (1, 1, 5.0)
        assert q.get("a1")["claimed_at"] is None  # only running jobs
        assert q.claim("r1", 1)["status"] == "running"
    finally:
        q.close()


def test_an_uncounted_requeue_keeps_the_dispatch_number_so_the_next_dispatch_has_a_new_one(tmp_path):
    q = JobQueue(tmp_path / "jobs.sqlite3", max_attempts=2)
    try:
        job_id = q.submit({"prompt": "p"})[0]["id"]
        for expected_dispatch in (1, 2, 3):  # never claimed, never counted: it never runs out of attempts
            job = q.mark_running(job_id)
            assert (job["attempts"], job["dispatch"], job["claimed_at"]) == (1, expected_dispatch, None)
            assert q.requeue(job_id, "not started", count_attempt=False, attempt=expected_dispatch)["status"] == "queued"
            assert q.claim(job_id, expected_dispatch) is None
        job = q.mark_running(job_id)
        assert q.claim(job_id, 3) is None and q.claim(job_id, 4)["claimed_at"] is not None
        assert q.requeue(job_id, "engine died", attempt=4)["attempts"] == 1  # counted: 1 of 2
        assert q.mark_running(job_id)["dispatch"] == 5
    finally:
        q.close()


def test_an_orphan_is_uncounted_only_when_this_release_dispatched_it_and_no_engine_claimed_it(tmp_path):
    """An older release sharing the store (a KubeRay upgrade) writes neither dispatched_at nor
    claimed_at: its dispatches and its engines' claims must count, or attempts would drop back to a
    number its engines still hold and a stale claim of theirs would be granted."""
    q = JobQueue(tmp_path / "jobs.sqlite3", max_attempts=3)
    try:
        ids = [q.submit({"prompt": f"p{i}"})[0]["id"] for i in range(4)]
        for job_id in ids:
            q.mark_running(job_id)
        q.claim(ids[1], 1)  # this release's engine started it
        # An older release dispatched ids[2] (its mark_running sets started_at only), and an older
        # engine claimed this release's dispatch of ids[3] (its claim moves started_at only).
        q._db.execute("UPDATE jobs SET started_at = started_at + 1, dispatched_at = NULL WHERE id = ?", (ids[2],))
        q._db.execute("UPDATE jobs SET started_at = started_at + 1 WHERE id = ?", (ids[3],))
        q._db.commit()
        jobs = [q.requeue_orphan(job_id) for job_id in ids]
        assert [(j["status"], j["attempts"], j["dispatch"]) for j in jobs] == [
            ("queued", 0, 1), ("queued", 1, 1), ("queued", 1, 1), ("queued", 1, 1)]
        assert "before an engine replica started the job" in jobs[0]["error"]
        assert all("while the job was running" in j["error"] for j in jobs[1:])
        assert q.requeue_orphan(ids[0])["status"] == "queued"  # not running: left as it is
        assert q.get(ids[0])["attempts"] == 0
    finally:
        q.close()


def test_a_client_holds_at_most_its_share_of_active_jobs(tmp_path):
    q = JobQueue(tmp_path / "jobs.sqlite3", max_size=10, max_per_owner=2)
    a1, _ = q.submit({"prompt": "a1"}, owner="alice")
    q.submit({"prompt": "a2"}, owner="alice", idempotency_key="k")
    with pytest.raises(ClientQueueFull, match="client 'alice' has 2 queued or running jobs") as caught:
        q.submit({"prompt": "a3"}, owner="alice")
    assert isinstance(caught.value, QueueFull) and caught.value.retry_after_s >= 1
    assert q.submit({"prompt": "a2"}, owner="alice", idempotency_key="k")[1] is False  # a retry is no new job
    q.submit({"prompt": "b1"}, owner="bob")  # another client is not bound by alice's jobs
    q.submit({"prompt": "op"}, owner=None)  # nor is the operator
    q.mark_running(a1["id"])
    q.finish(a1["id"], "succeeded")
    assert q.submit({"prompt": "a3"}, owner="alice")[1] is True  # a finished job frees a place
    assert q.counts()["queued"] == 4


def test_progress_of_a_run_the_job_no_longer_counts_on_is_ignored_and_stopped(queue):
    """A run goes on after the JobQueue gave up on it (its replica broke, its call timed out): its
    reports must not show as the job's progress, and its answer tells it to stop."""
    job, _ = queue.submit({"prompt": "x"})
    queue.mark_running(job["id"])  # attempt 1
    assert queue.report_progress(job["id"], stage="denoise", step=3, total_steps=10, attempt=1) is False
    queue.requeue(job["id"], "worker died")
    before = queue.get(job["id"])
    assert queue.report_progress(job["id"], stage="denoise", step=4, total_steps=10, attempt=1) is True
    assert queue.get(job["id"]) == before  # not recorded while queued
    queue.mark_running(job["id"])  # attempt 2
    assert queue.report_progress(job["id"], stage="denoise", step=9, total_steps=10, attempt=1) is True
    assert queue.get(job["id"])["step"] == 0
    assert queue.report_progress(job["id"], stage="denoise", step=2, total_steps=10, attempt=2) is False
    assert queue.report_progress(job["id"], stage="denoise", step=5, total_steps=10) is False  # no attempt: as before
    assert queue.get(job["id"])["step"] == 5


def test_a_claim_starts_the_run_clock_and_a_cancel_asked_before_it_ends_the_job(queue):
    waiting, cancelled = submit(queue, "waits in Serve's queue"), submit(queue, "cancelled before it starts")
    dispatched_at = queue.mark_running(waiting["id"])["started_at"]
    queue.mark_running(cancelled["id"])
    assert queue.claim(waiting["id"], attempt=2) is None  # not the current dispatch
    claimed = queue.claim(waiting["id"], attempt=1)
    assert claimed["status"] == RUNNING and claimed["started_at"] >= dispatched_at
    queue.cancel(cancelled["id"])
    assert queue.get(cancelled["id"])["status"] == RUNNING  # the flag waits for the engine...
    ended = queue.claim(cancelled["id"], attempt=1)  # ...which asks before it starts
    assert ended["status"] == CANCELLED and ended["error"] == "cancelled before it started"
    assert queue.claim(cancelled["id"], attempt=1) is None
    queue.requeue(cancelled["id"], "the engine did not start it", count_attempt=False, attempt=1)
    assert queue.get(cancelled["id"])["status"] == CANCELLED


def test_replicas_that_open_an_older_store_at_once_migrate_it_once(tmp_path):
    """Serve may start two JobQueue replicas (a KubeRay upgrade: two clusters) on one older store:
    its migration is one transaction, so neither adds a column the other added."""
    import threading

    from service_helpers import write_old_store

    db = tmp_path / "jobs.sqlite3"
    write_old_store(db)
    start, errors, queues = threading.Barrier(4), [], []

    def open_store():
        start.wait(timeout=10)
        try:
            queues.append(JobQueue(db))
        except Exception as exc:  # noqa: BLE001 - what the test looks for
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert errors == [] and len(queues) == 4
        assert all(q.get("a1")["dispatch"] == 0 and q.get("a1")["result_bytes"] == 42 for q in queues)
    finally:
        for q in queues:
            q.close()
