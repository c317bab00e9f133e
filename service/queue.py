"""``JobQueue``: the durable record of every job, in SQLite (WAL). No Ray here.

Life of a job: ``queued -> running -> succeeded | failed | cancelled``. The queue is bounded
(queued + running); a full queue raises ``QueueFull`` before anything is written. Jobs leave in
FIFO order within a priority (higher priority first). A job whose replica died goes back to the
queue once (``max_attempts`` = 2 runs in all), then fails with the reason. After a restart, the
dispatcher re-queues the ``running`` jobs that no engine replica still runs (``running_ids``, then
``requeue``). An idempotency key remembers a fingerprint of its request: a retry of the same request
returns the same job; the key reused with a different request raises ``IdempotencyKeyReused``.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Optional

from service.queue_schema import create_or_migrate, image_info, move_images_out
from service.store_journal import set_journal

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
STATUSES = ACTIVE + TERMINAL
WEBHOOK_PENDING, WEBHOOK_DELIVERED, WEBHOOK_FAILED = "pending", "delivered", "failed"
_FINISHED_SQL = f"status IN ({', '.join('?' * len(TERMINAL))})"  # binds *TERMINAL

class QueueFull(RuntimeError):
    """The queue holds ``limit`` active jobs; retry after ``retry_after_s`` seconds."""

    def __init__(self, limit: int, retry_after_s: int, message: Optional[str] = None):
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(message or f"job queue is full ({limit} queued or running jobs); "
                                    f"retry after {retry_after_s} s")


class ClientQueueFull(QueueFull):
    """One client holds its ``limit`` of active jobs (``max_jobs_per_client``); others can still submit."""

    def __init__(self, owner: str, limit: int, retry_after_s: int):
        self.owner = owner
        super().__init__(limit, retry_after_s, f"client {owner!r} has {limit} queued or running jobs, its limit "
                                               f"(max_jobs_per_client); retry after {retry_after_s} s")


class StoreOfAnotherApp(RuntimeError):
    """The store already holds another Serve application's jobs: two apps on one ``data_dir`` would
    run each other's jobs on the wrong model."""


class JobNotFound(KeyError):
    pass


class IdempotencyKeyReused(ValueError):
    """The idempotency key already belongs to a job submitted with a different request."""

    def __init__(self, key: str, job_id: str):
        self.key = key
        self.job_id = job_id
        super().__init__(f"Idempotency-Key {key!r} was already used with a different request; "
                         f"send a new key for a new request")


def request_fingerprint(request: dict[str, Any]) -> str:
    """SHA-256 of the request as sorted-key JSON, an ``image`` replaced by the SHA-256 of its bytes.

    Hash the request as the client sent it (before a random seed is filled in), so a retry matches."""
    canonical = dict(request)
    image = canonical.get("image")
    if isinstance(image, str):
        try:  # the decoded bytes, so one image sent as JSON base64 or as an upload hashes the same
            image_bytes = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            image_bytes = image.encode()
        canonical["image"] = "sha256:" + hashlib.sha256(image_bytes).hexdigest()
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def new_job_id() -> str:
    """128 random bits, hex."""
    return secrets.token_hex(16)


def _dispatch(row: sqlite3.Row) -> int:
    """The number of the job's latest dispatch: its attempts and the dispatches not counted as one."""
    return row["attempts"] + row["uncounted"]


class JobQueue:
    def __init__(self, db_path: str | Path, *, max_size: int = 64, max_attempts: int = 2,
                 max_per_owner: Optional[int] = None, journal: str = "wal"):
        """``journal``: ``wal``, or ``delete`` (the rollback journal) for a store that several hosts
        open (service/store_journal.py); ``journal_mode`` is the one in use."""
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        if max_per_owner is not None and max_per_owner < 1:
            raise ValueError(f"max_per_owner must be >= 1 or None, got {max_per_owner}")
        self.max_per_owner = max_per_owner
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.max_size = max_size
        self.max_attempts = max_attempts
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.db_path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self.journal_mode = set_journal(self._db, journal, self.db_path)
        # FULL: a commit is on disk before its caller answers (a 202 means the job is stored). Jobs
        # are written a few times a second at most, so the fsyncs cost nothing that matters.
        self._db.execute("PRAGMA synchronous=FULL")
        create_or_migrate(self._db)
        # Every column but the input image: a job is read many times a second (views, event streams,
        # lists), its image only when it is dispatched (``image``).
        self._columns = ", ".join(r[1] for r in self._db.execute("PRAGMA table_info(jobs)") if r[1] != "image")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ helpers

    def _tx(self) -> "_Transaction":
        return _Transaction(self)

    def _row(self, job_id: str) -> Optional[sqlite3.Row]:
        return self._db.execute(f"SELECT {self._columns} FROM jobs WHERE id = ?", (job_id,)).fetchone()

    def _require(self, job_id: str) -> sqlite3.Row:
        row = self._row(job_id)
        if row is None:
            raise JobNotFound(job_id)
        return row

    def _position(self, row: sqlite3.Row) -> Optional[int]:
        if row["status"] != QUEUED:
            return None
        (ahead,) = self._db.execute(
            "SELECT COUNT(*) FROM jobs WHERE status = ? AND (priority > ? OR (priority = ? AND seq < ?))",
            (QUEUED, row["priority"], row["priority"], row["seq"]),
        ).fetchone()
        return ahead

    def _to_dict(self, row: sqlite3.Row) -> dict[str, Any]:
        job = {k: row[k] for k in row.keys() if k not in ("request", "result", "cancel_requested", "seq",
                                                                "request_fingerprint")}
        job["request"] = json.loads(row["request"])
        job["result"] = json.loads(row["result"]) if row["result"] else None
        job["cancel_requested"] = bool(row["cancel_requested"])
        job["queue_position"] = self._position(row)
        job["dispatch"] = _dispatch(row)
        return job

    def _add_counter(self, name: str, value: float) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
            (name, value, value),
        )

    # ------------------------------------------------------------------ submit / read

    def submit(self, request: dict[str, Any], *, idempotency_key: Optional[str] = None,
               priority: int = 0, owner: Optional[str] = None, fingerprint: Optional[str] = None,
               webhook_url: Optional[str] = None, image_in_request: bool = False) -> tuple[dict[str, Any], bool]:
        """Add a job; returns ``(job, created)``. A known idempotency key returns its job unchanged.

        ``owner``: the client that submitted it (per-client tokens); keys are per owner.
        ``fingerprint``: ``request_fingerprint`` of the request as sent (default: of ``request``);
        a known key with a different fingerprint raises ``IdempotencyKeyReused`` and writes nothing.
        A job stored without a fingerprint (an older database) matches any request, as before.
        ``webhook_url``: where to send the job's outcome when it finishes (``webhooks_due``).
        ``image_in_request``: keep an input image in the request, where releases before the fifteenth
        read it, rather than in its own column (``move_images_out`` moves it later)."""
        given_key = idempotency_key
        if idempotency_key and owner is not None:
            idempotency_key = f"{owner}\x1f{idempotency_key}"
        stored = dict(request)
        image = None if image_in_request else (stored.pop("image", None) or None)
        if image is not None:
            stored["image_info"] = image_info(image)
        payload = json.dumps(stored)
        if idempotency_key and fingerprint is None:
            fingerprint = request_fingerprint(request)
        with self._tx():
            if idempotency_key:
                row = self._db.execute(f"SELECT {self._columns} FROM jobs WHERE idempotency_key = ?",
                                       (idempotency_key,)).fetchone()
                if row is not None:
                    if row["request_fingerprint"] is not None and row["request_fingerprint"] != fingerprint:
                        raise IdempotencyKeyReused(given_key, row["id"])
                    return self._to_dict(row), False
            (active,) = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", ACTIVE).fetchone()
            if active >= self.max_size:
                raise QueueFull(self.max_size, self.retry_after_s(active))
            if owner is not None and self.max_per_owner is not None:
                (mine,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN (?, ?)",
                                           (owner, *ACTIVE)).fetchone()
                if mine >= self.max_per_owner:
                    raise ClientQueueFull(owner, self.max_per_owner, self.retry_after_s(mine))
            now = time.time()
            job_id = new_job_id()
            self._db.execute(
                "INSERT INTO jobs (id, status, priority, request, idempotency_key, created_at, updated_at, owner, "
                "request_fingerprint, webhook_url, webhook_status, image) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, QUEUED, priority, payload, idempotency_key, now, now, owner,
                 fingerprint if idempotency_key else None, webhook_url, WEBHOOK_PENDING if webhook_url else None,
                 image),
            )
            return self._to_dict(self._require(job_id)), True

    def retry_after_s(self, active: Optional[int] = None) -> int:
        """A guess of when a slot frees up: the mean job time, or 5 s before any job finished."""
        counters = self.counters()
        done = counters.get("jobs_finished", 0.0)
        mean = counters.get("job_seconds", 0.0) / done if done else 5.0
        return max(1, int(round(mean)))

    def get(self, job_id: str) -> Optional[dict[str, Any]]:
        with self._lock:
            row = self._row(job_id)
            return None if row is None else self._to_dict(row)

    def move_images_out(self) -> None:
        """Move input images kept in requests (``submit(image_in_request=True)``, older releases) to
        their own column."""
        with self._tx():
            move_images_out(self._db)

    def image(self, job_id: str) -> Optional[str]:
        """The job's input image (base64), or None: it has none, or it was deleted with the results."""
        with self._lock:
            row = self._db.execute("SELECT image, request FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        if row["image"] is not None:
            return row["image"]
        legacy = json.loads(row["request"]).get("image")  # a row an older release wrote since the migration
        return legacy if isinstance(legacy, str) and legacy else None

    def list(self, *, status: Optional[str] = None, limit: int = 50, offset: int = 0,
             owner: Optional[str] = None) -> tuple[list[dict], int]:
        """Jobs newest first, optionally of one status and one owner; returns ``(page, total)``."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; one of {', '.join(STATUSES)}")
        conditions = [(c, v) for c, v in (("status = ?", status), ("owner = ?", owner)) if v is not None]
        where = ("WHERE " + " AND ".join(c for c, _ in conditions)) if conditions else ""
        params = tuple(v for _, v in conditions)
        with self._lock:
            (total,) = self._db.execute(f"SELECT COUNT(*) FROM jobs {where}", params).fetchone()
            rows = self._db.execute(
                f"SELECT {self._columns} FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?", (*params, limit, offset)
            ).fetchall()
            return [self._to_dict(r) for r in rows], total

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        counts = {s: 0 for s in STATUSES}
        counts.update({status: n for status, n in rows})
        return counts

    def results_bytes(self) -> int:
        """Bytes of the videos still kept: succeeded jobs whose files are not deleted."""
        with self._lock:
            (total,) = self._db.execute("SELECT COALESCE(SUM(result_bytes), 0) FROM jobs WHERE status = ? "
                                        "AND files_deleted_at IS NULL", (SUCCEEDED,)).fetchone()
            return int(total)

    def counters(self) -> dict[str, float]:
        with self._lock:
            return {name: value for name, value in self._db.execute("SELECT name, value FROM counters")}

    # ------------------------------------------------------------------ the engine's side

    def next_queued(self) -> Optional[dict[str, Any]]:
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._columns} FROM jobs WHERE status = ? ORDER BY priority DESC, seq ASC LIMIT 1", (QUEUED,)
            ).fetchone()
            return None if row is None else self._to_dict(row)

    def mark_running(self, job_id: str) -> Optional[dict[str, Any]]:
        """queued -> running (one more attempt, and a new ``dispatch`` number: ``attempts`` plus the
        dispatches that were not counted, so no number is ever given twice); ``None`` when the job is
        no longer queued."""
        with self._tx():
            now = time.time()
            cur = self._db.execute(
                "UPDATE jobs SET status = ?, attempts = attempts + 1, started_at = ?, dispatched_at = ?, "
                "updated_at = ?, claimed_at = NULL, stage = NULL, step = 0, total_steps = 0, eta_s = NULL "
                "WHERE id = ? AND status = ?",
                (RUNNING, now, now, now, job_id, QUEUED),
            )
            return self._to_dict(self._require(job_id)) if cur.rowcount else None

    def claim(self, job_id: str, attempt: int) -> Optional[dict[str, Any]]:
        """An engine starts dispatch ``attempt`` (the job's ``dispatch`` number): the job's run time counts from here (not from the
        dispatch, which may have waited in Serve's queue). ``None`` when that dispatch is no longer
        current. A cancel asked for while the dispatch waited ends the job here: the result is the
        cancelled record, and the engine is not to start it."""
        with self._tx():
            row = self._row(job_id)
            if row is None or row["status"] != RUNNING or _dispatch(row) != attempt:
                return None
            now = time.time()
            if row["cancel_requested"]:
                self._db.execute(
                    "UPDATE jobs SET status = ?, finished_at = ?, updated_at = ?, error = ?, eta_s = NULL "
                    "WHERE id = ?", (CANCELLED, now, now, "cancelled before it started", job_id))
            else:
                self._db.execute("UPDATE jobs SET started_at = ?, claimed_at = ?, updated_at = ? WHERE id = ?",
                                 (now, now, now, job_id))
            return self._to_dict(self._require(job_id))

    def report_progress(self, job_id: str, *, stage: str, step: int = 0, total_steps: int = 0,
                        elapsed_s: float = 0.0, step_s: Optional[float] = None,
                        attempt: Optional[int] = None) -> bool:
        """Record progress of a running job; returns whether the run should stop: its cancellation
        was requested, or the run is one the job no longer counts on (the job was re-queued, or this
        is an earlier ``attempt`` than the job's current one), whose progress is not recorded."""
        with self._tx():
            row = self._row(job_id)
            if row is None:
                return True
            if row["status"] == QUEUED or (row["status"] == RUNNING and attempt is not None
                                           and _dispatch(row) != attempt):
                return True
            if row["status"] != RUNNING:
                return row["status"] == CANCELLED
            eta = (total_steps - step) * step_s if step_s is not None and total_steps else row["eta_s"]
            self._db.execute(
                "UPDATE jobs SET stage = ?, step = ?, total_steps = ?, step_s = COALESCE(?, step_s), eta_s = ?, "
                "updated_at = ? WHERE id = ?",
                (stage, step, total_steps, step_s, eta, time.time(), job_id),
            )
            return bool(row["cancel_requested"])

    def finish(self, job_id: str, status: str, *, result: Optional[dict[str, Any]] = None,
               error: Optional[str] = None, result_path: Optional[str] = None,
               preview_path: Optional[str] = None, result_bytes: Optional[int] = None,
               attempt: Optional[int] = None) -> dict[str, Any]:
        """running -> succeeded | failed | cancelled. A job already terminal is left as it is, and so
        is one whose current dispatch is not ``attempt`` (when given): the outcome is an earlier run's."""
        if status not in TERMINAL:
            raise ValueError(f"finish() needs a terminal status, got {status!r}")
        with self._tx():
            row = self._require(job_id)
            if row["status"] in TERMINAL or (attempt is not None and _dispatch(row) != attempt):
                return self._to_dict(row)
            now = time.time()
            self._db.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, updated_at = ?, error = ?, result = ?, "
                "result_path = ?, preview_path = ?, result_bytes = ?, eta_s = NULL WHERE id = ?",
                (status, now, now, error, json.dumps(result) if result is not None else None,
                 result_path, preview_path, result_bytes, job_id),
            )
            if status == SUCCEEDED:  # its last progress reports may not have arrived (a draining JobQueue)
                self._db.execute("UPDATE jobs SET step = total_steps WHERE id = ?", (job_id,))
            if status == SUCCEEDED and row["started_at"]:
                self._add_counter("jobs_finished", 1)
                self._add_counter("job_seconds", now - row["started_at"])
                steps = (result or {}).get("timings", {}).get("step_s") or []
                self._add_counter("steps", len(steps))
                self._add_counter("step_seconds", float(sum(steps)))
            return self._to_dict(self._require(job_id))

    def cancel(self, job_id: str) -> dict[str, Any]:
        """queued -> cancelled at once; running -> flag (the engine stops between steps)."""
        with self._tx():
            row = self._require(job_id)
            now = time.time()
            if row["status"] == QUEUED:
                self._db.execute(
                    "UPDATE jobs SET status = ?, finished_at = ?, updated_at = ?, error = ? WHERE id = ?",
                    (CANCELLED, now, now, "cancelled while queued", job_id))
            elif row["status"] == RUNNING:
                self._db.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?", (now, job_id))
            return self._to_dict(self._require(job_id))

    def requeue(self, job_id: str, reason: str, *, count_attempt: bool = True,
                attempt: Optional[int] = None, only_if_unclaimed: bool = False) -> dict[str, Any]:
        """A running job whose replica failed goes back to the queue, or fails once out of attempts.

        ``count_attempt=False`` when the job never started (the replica was unavailable).
        ``attempt``: only if that dispatch is still the job's current one (else nothing changes).
        ``only_if_unclaimed``: only if no engine has claimed the dispatch (else nothing changes).
        """
        with self._tx():
            row = self._require(job_id)
            if row["status"] != RUNNING or (attempt is not None and _dispatch(row) != attempt):
                return self._to_dict(row)
            if only_if_unclaimed and row["claimed_at"] is not None:
                return self._to_dict(row)
            return self._requeue_running(row, reason, count_attempt)

    def _requeue_running(self, row: sqlite3.Row, reason: str, count_attempt: bool) -> dict[str, Any]:
        """requeue's change of a running ``row``, inside the caller's transaction."""
        job_id, now = row["id"], time.time()
        attempts = row["attempts"] if count_attempt else max(0, row["attempts"] - 1)
        # The dispatch number stays: an uncounted dispatch still waiting somewhere can never claim
        # the job's next dispatch.
        uncounted = row["uncounted"] + row["attempts"] - attempts
        if row["cancel_requested"]:
            self._db.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, updated_at = ?, error = ? WHERE id = ?",
                (CANCELLED, now, now, f"cancelled; the run ended with: {reason}", job_id))
        elif attempts >= self.max_attempts:
            self._db.execute(
                "UPDATE jobs SET status = ?, attempts = ?, uncounted = ?, finished_at = ?, updated_at = ?, "
                "error = ? WHERE id = ?",
                (FAILED, attempts, uncounted, now, now, f"{reason} (after {attempts} attempts)", job_id))
        else:
            self._db.execute(
                "UPDATE jobs SET status = ?, attempts = ?, uncounted = ?, updated_at = ?, error = ?, "
                "stage = NULL, step = 0, eta_s = NULL WHERE id = ?",
                (QUEUED, attempts, uncounted, now, f"re-queued: {reason}", job_id))
        return self._to_dict(self._require(job_id))

    def requeue_orphan(self, job_id: str) -> dict[str, Any]:
        """A running job no engine holds after a restart goes back to the queue. Counted as an attempt
        unless this release dispatched it and no engine ever claimed that dispatch (it waited in
        Serve's queue when the service stopped): an older release sharing the store stamps neither
        ``dispatched_at`` nor ``claimed_at``, so its dispatches count. Decided in the transaction
        that re-queues it."""
        with self._tx():
            row = self._require(job_id)
            if row["status"] != RUNNING:
                return self._to_dict(row)
            unstarted = (row["claimed_at"] is None and row["dispatched_at"] is not None
                         and row["dispatched_at"] == row["started_at"])
            reason = ("the service stopped before an engine replica started the job" if unstarted else
                      "the service stopped while the job was running, and no engine replica was running it "
                      "when the JobQueue restarted")
            return self._requeue_running(row, reason, count_attempt=not unstarted)

    def files_due(self, finished_before: float, limit: int = 100,
                  after: Optional[tuple[float, str]] = None) -> list[dict[str, Any]]:
        """Finished jobs (any terminal status) that ended before ``finished_before`` and whose files
        have not been deleted yet, oldest first (by ``finished_at``, then id): what the result
        retention deletes next. ``after``: the (finished_at, id) of the last job of the previous page."""
        cursor_sql, cursor = ("AND (finished_at, id) > (?, ?) ", after) if after is not None else ("", ())
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._columns} FROM jobs WHERE files_deleted_at IS NULL AND finished_at < ? "
                f"AND {_FINISHED_SQL} {cursor_sql}ORDER BY finished_at, id LIMIT ?",
                (finished_before, *TERMINAL, *cursor, limit)).fetchall()
            return [self._to_dict(r) for r in rows]

    def mark_files_deleted(self, job_id: str, reason: str) -> dict[str, Any]:
        """Record that a finished job's video and preview are gone, and why, and drop its input image
        from the record. A job that has not finished is refused (``ValueError``): its files are
        still being written, and a re-run needs the image."""
        with self._tx():
            row = self._require(job_id)
            if row["status"] not in TERMINAL:
                raise ValueError(f"job {job_id} is {row['status']}: only a finished job's files can be deleted")
            if row["files_deleted_at"] is None:
                now = time.time()
                # The input image of an image-to-video job (up to max_body_bytes of base64) goes with the
                # files: the record keeps its size and hash, which are all a finished job needs.
                request = json.loads(row["request"])
                if request.get("image"):  # a row an older release wrote
                    request["image_info"] = image_info(request.pop("image"))
                if "image_info" in request:
                    request["image_deleted"] = request.pop("image_info")
                self._db.execute("UPDATE jobs SET files_deleted_at = ?, files_deleted_reason = ?, updated_at = ?, "
                                 "request = ?, image = NULL WHERE id = ?",
                                 (now, reason, now, json.dumps(request), job_id))
                if row["status"] == SUCCEEDED:
                    self._add_counter("results_deleted", 1)
            return self._to_dict(self._require(job_id))

    # ------------------------------------------------------------------ webhooks (the job row is the outbox)

    def webhooks_due(self, now: float, limit: int = 20) -> list[dict[str, Any]]:
        """Finished jobs whose webhook is still to be sent and due now, in the order they finished.
        The row is the outbox: a job becomes due in the same write that finishes it, so no outcome
        can finish without its webhook being owed."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._columns} FROM jobs WHERE webhook_status = ? AND COALESCE(webhook_next_at, 0) <= ? "
                f"AND {_FINISHED_SQL} ORDER BY finished_at LIMIT ?",
                (WEBHOOK_PENDING, now, *TERMINAL, limit)).fetchall()
            return [self._to_dict(r) for r in rows]

    def start_webhook(self, job_id: str, hold_s: float) -> Optional[dict[str, Any]]:
        """Count one delivery attempt and hold the webhook for ``hold_s`` seconds, so that no other
        sender (a successor holding the lease) takes it while this one is sending. ``None`` if it is
        no longer due."""
        with self._tx():
            now = time.time()
            cur = self._db.execute(
                "UPDATE jobs SET webhook_attempts = webhook_attempts + 1, webhook_next_at = ? "
                "WHERE id = ? AND webhook_status = ? AND COALESCE(webhook_next_at, 0) <= ?",
                (now + hold_s, job_id, WEBHOOK_PENDING, now))
            return self._to_dict(self._require(job_id)) if cur.rowcount else None

    def record_webhook(self, job_id: str, *, error: Optional[str], retry_at: Optional[float]) -> dict[str, Any]:
        """The outcome of one attempt: ``error`` None means delivered; otherwise it is tried again at
        ``retry_at``, or with ``retry_at`` None it has failed for good."""
        with self._tx():
            now = time.time()
            if error is None:
                self._db.execute("UPDATE jobs SET webhook_status = ?, webhook_delivered_at = ?, webhook_error = NULL, "
                                 "webhook_next_at = NULL WHERE id = ?", (WEBHOOK_DELIVERED, now, job_id))
                self._add_counter("webhooks_delivered", 1)
            elif retry_at is None:
                self._db.execute("UPDATE jobs SET webhook_status = ?, webhook_error = ?, webhook_next_at = NULL "
                                 "WHERE id = ?", (WEBHOOK_FAILED, error, job_id))
                self._add_counter("webhooks_failed", 1)
            else:
                self._db.execute("UPDATE jobs SET webhook_error = ?, webhook_next_at = ? WHERE id = ?",
                                 (error, retry_at, job_id))
            return self._to_dict(self._require(job_id))

    def webhooks_pending(self) -> int:
        """Webhooks of finished jobs not yet delivered (nor given up)."""
        with self._lock:
            (n,) = self._db.execute(f"SELECT COUNT(*) FROM jobs WHERE webhook_status = ? AND {_FINISHED_SQL}",
                                    (WEBHOOK_PENDING, *TERMINAL)).fetchone()
            return n

    # ------------------------------------------------------------------ whose store this is

    def claim_for_app(self, app_name: str) -> None:
        """Record that this store holds Serve application ``app_name``'s jobs (at first use), or raise
        ``StoreOfAnotherApp`` if it holds another's. The JobQueue that holds the dispatch lease
        dispatches every job in the store, so a second app (another model) on the same ``data_dir``
        would see its jobs run on the first app's model."""
        with self._tx():
            row = self._db.execute("SELECT value FROM store_info WHERE key = 'app_name'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO store_info (key, value) VALUES ('app_name', ?)", (app_name,))
            elif row["value"] != app_name:
                raise StoreOfAnotherApp(
                    f"{self.db_path} holds the jobs of Serve application {row['value']!r}, not {app_name!r}: "
                    f"give each application its own data_dir. If they are this application's jobs (it was "
                    f"renamed, or the twelfth release recorded 'wanserve' for an application deployed under "
                    f"another name), stop the old one and run: sqlite3 {self.db_path} \"UPDATE store_info "
                    f"SET value = '{app_name}' WHERE key = 'app_name'\"")

    # ------------------------------------------------------------------ the dispatch lease

    def acquire_lease(self, holder: str, lease_s: float) -> tuple[bool, Optional[str], float]:
        """Take or renew the one lease to dispatch from this store, for ``lease_s`` seconds (wall clock).

        Two JobQueue replicas can share a store for a while: a KubeRay upgrade runs the new cluster
        beside the old one on the same volume, and Serve may start a JobQueue replica before the one
        it replaces is gone. Only the holder dispatches jobs and re-queues those it finds running.
        Returns ``(held, holder now, expires_at)``."""
        with self._tx():
            now = time.time()
            row = self._db.execute("SELECT holder, expires_at FROM dispatch_lease WHERE id = 1").fetchone()
            if row is not None and row["holder"] != holder and row["expires_at"] > now:
                return False, row["holder"], row["expires_at"]
            self._db.execute("INSERT INTO dispatch_lease (id, holder, expires_at) VALUES (1, ?, ?) "
                             "ON CONFLICT(id) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at",
                             (holder, now + lease_s))
            return True, holder, now + lease_s

    def lease_held_by_another(self, holder: str) -> bool:
        """Whether a replica other than ``holder`` holds the dispatch lease now."""
        with self._lock:
            row = self._db.execute("SELECT holder, expires_at FROM dispatch_lease WHERE id = 1").fetchone()
        return row is not None and row["holder"] != holder and row["expires_at"] > time.time()

    def release_lease(self, holder: str) -> None:
        """Give the lease up (at shutdown), so that a successor need not wait for it to expire."""
        with self._tx():
            self._db.execute("DELETE FROM dispatch_lease WHERE id = 1 AND holder = ?", (holder,))

    def running_ids(self) -> list[str]:
        """Ids of the jobs now ``running`` (at start: the ones a previous JobQueue replica dispatched)."""
        with self._lock:
            return [r["id"] for r in self._db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY seq", (RUNNING,))]


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` under the queue's lock: all of a change, or none of it."""

    def __init__(self, queue: JobQueue):
        self.queue = queue

    def __enter__(self) -> None:
        self.queue._lock.acquire()
        self.queue._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.queue._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.queue._lock.release()
