"""Serve stops the app while a job runs (as a redeploy, a downscale or `serve shutdown` stop
replicas): the engine replica finishes the job first (``drain_timeout_s``), the JobQueue replica
records its outcome before it goes, and the job has run once."""
from __future__ import annotations

import time

import httpx
import pytest

from service.queue import JobQueue
from service_helpers import TOKEN, deploy, make_settings, wait_for

pytestmark = pytest.mark.slow


def test_a_running_job_finishes_before_its_replica_stops(serve_url, tmp_path):
    from ray import serve

    settings = make_settings(tmp_path, app_name="wanserve-drain", drain_timeout_s=60.0,
                             generator_options={"step_s": 0.05})
    deploy(settings, serve_url)
    with httpx.Client(base_url=serve_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as client:
        job_id = client.post("/generate", json={"prompt": "finish me first", "steps": 80}).json()["id"]
        wait_for(lambda: (j := client.get(f"/jobs/{job_id}").json())["status"] == "running"
                 and j["progress"]["step"] >= 2, 60, "the job to be running")
    started = time.monotonic()
    serve.delete(settings.app_name)  # blocks until every replica has stopped
    took = time.monotonic() - started
    queue = JobQueue(settings.db_path)
    job = queue.get(job_id)
    lease = queue._db.execute("SELECT holder FROM dispatch_lease").fetchall()
    queue.close()
    assert lease == []  # handed on at shutdown: a successor dispatches at once
    # Not stopped mid-job and re-queued (the 5 s drain of the other test apps does that): finished,
    # recorded, with its video, on its first attempt.
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    assert job["step"] == job["total_steps"] == 80  # though progress reports failed while the JobQueue drained
    assert job["result_bytes"] and (settings.results_dir / job_id / "video.mp4").stat().st_size == job["result_bytes"]
    assert took < 60, took
