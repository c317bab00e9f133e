"""Helpers for the service tests: fast test settings, deploying the app, bounded waits."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import httpx

from service.config import ServiceSettings

TOKEN = "test-token-123"
FAKE_FACTORY = "service_fakes:build_fake_generator"


class FakeEngine:
    """Records the jobs sent to it and fails them (stands in for the EngineReplica handle,
    ``engine.run.remote(job)``, where the outcome does not matter)."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.run = self

    def remote(self, job: dict):
        self.sent.append(job["id"])

        async def outcome() -> dict:
            return {"status": "failed", "error": "fake engine"}

        return outcome()


def make_settings(data_dir: Path, **overrides: Any) -> ServiceSettings:
    """Short periods and timeouts so that failures show within seconds on 2 cores."""
    fields: dict[str, Any] = dict(
        app_name="wanserve-test", data_dir=str(data_dir), generator_factory=FAKE_FACTORY,
        generator_options={"step_s": 0.03}, cpu_workers=2, queue_size=6, auth_token=TOKEN,
        health_check_period_s=1.0, health_timeout_s=5.0, nccl_timeout_s=15.0, progress_interval_s=0.0,
        worker_init_timeout_s=120.0, job_timeout_s=120.0, max_body_bytes=64 * 1024,
        drain_timeout_s=5.0,  # a deleted test app stops within seconds (test_service_drain.py drains)
    )
    fields.update(overrides)
    return ServiceSettings(**fields)


# The job table as the tenth release wrote it (before result retention and webhooks).
TENTH_RELEASE_JOBS = (
    "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
    "status TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, request TEXT NOT NULL, "
    "idempotency_key TEXT UNIQUE, created_at REAL NOT NULL, started_at REAL, finished_at REAL, "
    "updated_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL "
    "DEFAULT 0, stage TEXT, step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER NOT NULL DEFAULT 0, "
    "step_s REAL, eta_s REAL, error TEXT, result_path TEXT, preview_path TEXT, result_bytes INTEGER, "
    "result TEXT, owner TEXT, request_fingerprint TEXT{extra})")


def write_old_store(db: Path, extra_columns: str = "") -> None:
    """A store an older release wrote: ``TENTH_RELEASE_JOBS`` (+ ``extra_columns``, e.g. ", x REAL")
    holding one succeeded job ``a1`` of 42 bytes."""
    import sqlite3

    conn = sqlite3.connect(db)
    conn.execute(TENTH_RELEASE_JOBS.format(extra=extra_columns))
    conn.execute("INSERT INTO jobs (id, status, request, created_at, finished_at, updated_at, result_bytes) "
                 "VALUES ('a1', 'succeeded', '{}', 1.0, 2.0, 2.0, 42)")
    conn.commit()
    conn.close()


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


def deploy(settings: ServiceSettings, url: str, timeout_s: float = 90.0, route_prefix: str = "/") -> None:
    from ray import serve

    from service.app import build_app

    serve.run(build_app(settings), name=settings.app_name, route_prefix=route_prefix, blocking=False)

    def ready() -> bool:
        try:
            return httpx.get(f"{url}{route_prefix.rstrip('/')}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout_s, "the service to be ready", interval_s=0.5)


def wait_status(client: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout_s: float = 60.0,
                predicate: Callable[[dict], bool] = lambda job: True) -> dict:
    def check():
        job = client.get(f"/jobs/{job_id}").json()
        return job if job["status"] in statuses and predicate(job) else None

    return wait_for(check, timeout_s, f"job {job_id} to be {'/'.join(statuses)}")
