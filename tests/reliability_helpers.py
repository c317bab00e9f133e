"""Helpers for the reliability suite (tests/test_reliability_*.py): the fast fault-injecting fake
generator's settings, finding a job's worker actors, reading the job table, and figures."""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import httpx

from service.config import ServiceSettings
from service_helpers import make_settings

RELIABILITY_FACTORY = "reliability_fakes:build_reliability_generator"
TINY_JOB = {"width": 16, "height": 16, "num_frames": 1, "steps": 1}  # the smallest real MP4 job
FIGURES_FILE = os.environ.get("WANSERVE_RELIABILITY_FIGURES")  # optional: append figures as JSON lines


def reliability_settings(data_dir: Path, **overrides: Any) -> ServiceSettings:
    fields: dict[str, Any] = dict(generator_factory=RELIABILITY_FACTORY, generator_options={"step_s": 0.005},
                                  progress_interval_s=0.2, queue_size=8)
    fields.update(overrides)
    return make_settings(data_dir, **fields)


def report(name: str, **figures: Any) -> None:
    """Print figures for the README's reliability section (``pytest -s``), and append them to a file."""
    line = json.dumps({"test": name, **figures}, sort_keys=True)
    print(f"\nRELIABILITY {line}")
    if FIGURES_FILE:
        with open(FIGURES_FILE, "a") as f:
            f.write(line + "\n")


def job_rows(settings: ServiceSettings) -> list[dict[str, Any]]:
    """Every row of the job table, read straight from SQLite (read-only)."""
    db = sqlite3.connect(f"file:{settings.db_path}?mode=ro", uri=True, timeout=30)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM jobs ORDER BY seq")]
    finally:
        db.close()


def busy_worker(app_name: str, job_id: str, rank: int):
    """The live worker actor of ``rank`` that is running ``job_id`` (exactly one), for ``ray.kill``."""
    import ray

    found = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if not (a["name"].startswith(f"wanserve-worker:{app_name}:") and a["name"].endswith(f":{rank}")):
            continue
        try:
            handle = ray.get_actor(a["name"], namespace=a["namespace"])
            if ray.get(handle.health.remote(), timeout=5)["busy_job"] == job_id:
                found.append(handle)
        except Exception:  # noqa: BLE001 - a worker of a replaced replica
            pass
    assert len(found) == 1, f"expected one rank-{rank} worker busy with {job_id}, found {len(found)}"
    return found[0]


def replica_ids(client: httpx.Client) -> set[str]:
    return {r["replica"] for r in client.get("/models").json()["models"][0]["replicas"]
            if r.get("ready") and not r.get("broken")}


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.split(" ")[0] == name:  # name with its labels, e.g. 'wanserve_jobs{status="queued"}'
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name!r} in:\n{text}")
