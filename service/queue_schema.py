"""The job store's SQLite schema, and the migrations that bring a store written by an older release
up to it (columns are only ever added, so an older release's rows stay readable)."""
from __future__ import annotations

import hashlib
import json
import sqlite3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    request TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    stage TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    step_s REAL,
    eta_s REAL,
    error TEXT,
    result_path TEXT,
    preview_path TEXT,
    result_bytes INTEGER,
    result TEXT,
    owner TEXT,
    request_fingerprint TEXT,
    files_deleted_at REAL,
    files_deleted_reason TEXT,
    webhook_url TEXT,
    webhook_status TEXT,
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    webhook_next_at REAL,
    webhook_error TEXT,
    webhook_delivered_at REAL,
    image TEXT,
    uncounted INTEGER NOT NULL DEFAULT 0,
    claimed_at REAL,
    dispatched_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, priority, seq);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS store_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dispatch_lease (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""

# Columns added since the first release, in order: (the column that marks the step, its columns).
_ADDED_COLUMNS = (
    ("owner", ("owner TEXT",)),  # per-client tokens
    ("request_fingerprint", ("request_fingerprint TEXT",)),  # idempotency keys checked against their request
    ("files_deleted_at", ("files_deleted_at REAL", "files_deleted_reason TEXT")),  # result retention
    ("webhook_url", ("webhook_url TEXT", "webhook_status TEXT", "webhook_attempts INTEGER NOT NULL DEFAULT 0",
                     "webhook_next_at REAL", "webhook_error TEXT", "webhook_delivered_at REAL")),  # webhooks
    ("image", ("image TEXT",)),  # the input image out of the request, so that reads of a job stay small
    # dispatches not counted as attempts (a dispatch number is never reused), and the engine's claim
    ("uncounted", ("uncounted INTEGER NOT NULL DEFAULT 0", "claimed_at REAL")),
    # when this release dispatched it: a running job whose started_at is another (an older release's
    # dispatch, or its claim) is taken as started, whatever claimed_at says
    ("dispatched_at", ("dispatched_at REAL",)),
)


def image_info(image: str) -> dict:
    """What the request keeps of an input image stored in the ``image`` column (its base64 text)."""
    return {"base64_chars": len(image), "sha256": hashlib.sha256(image.encode()).hexdigest()}


def move_images_out(db: sqlite3.Connection) -> None:
    """Rows of an older release hold the input image in their request: move it to the ``image`` column."""
    rows = db.execute("SELECT id, request FROM jobs WHERE image IS NULL AND request LIKE '%\"image\": \"%'").fetchall()
    for job_id, payload in rows:
        request = json.loads(payload)
        image = request.pop("image", None)
        if isinstance(image, str) and image:
            request["image_info"] = image_info(image)
            db.execute("UPDATE jobs SET image = ?, request = ? WHERE id = ?", (image, json.dumps(request), job_id))


def create_or_migrate(db: sqlite3.Connection) -> None:
    """Create the tables, or add to an older store what it lacks. ``db`` is in autocommit mode
    (``isolation_level=None``): the migration is one transaction (SQLite's DDL is transactional), so
    two replicas that open an older store at once neither add a column twice nor see half of it."""
    db.executescript(_SCHEMA)
    db.execute("BEGIN IMMEDIATE")
    try:
        columns = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}  # read under the write lock
        for marker, added in _ADDED_COLUMNS:
            if marker not in columns:
                for column in added:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column}")
                if marker == "image":
                    move_images_out(db)
                if marker == "uncounted":  # an older release's running job: take it as started by an engine
                    db.execute("UPDATE jobs SET claimed_at = started_at WHERE status = 'running'")
        # After the migration: the indexes name columns an older table gains only above.
        db.execute("CREATE INDEX IF NOT EXISTS jobs_files ON jobs (files_deleted_at, finished_at)")
        db.execute("CREATE INDEX IF NOT EXISTS jobs_webhooks ON jobs (webhook_status, webhook_next_at)")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
