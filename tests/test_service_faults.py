"""Fault injection with the fake generator (tests/service_fakes.py: slow steps, real gloo
broadcast of the cancel flag): SSE progress step by step, cancelling queued and running jobs,
a full queue (429), a worker killed mid-job, a generator error, and an app restart that finishes
the jobs left in SQLite."""
from __future__ import annotations

import json

import httpx
import pytest

from service.queue import JobQueue
from service_helpers import TOKEN, deploy, make_settings, wait_status

pytestmark = pytest.mark.slow

STEP_S = 0.03  # the fake's step time; prompts with "slow" take 4x


@pytest.fixture(scope="module")
def app(serve_url, tmp_path_factory):
    from ray import serve

    settings = make_settings(tmp_path_factory.mktemp("wanserve-faults"), generator_options={"step_s": STEP_S})
    deploy(settings, serve_url)
    client = httpx.Client(base_url=serve_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    yield settings, client, serve_url
    client.close()
    serve.delete(settings.app_name)


def submit(client: httpx.Client, prompt: str, steps: int, **extra) -> str:
    r = client.post("/generate", json={"prompt": prompt, "steps": steps, **extra})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def running_at_step(client: httpx.Client, job_id: str, step: int, timeout_s: float = 60) -> dict:
    return wait_status(client, job_id, ("running",), timeout_s=timeout_s,
                       predicate=lambda j: j["progress"]["stage"] == "denoise" and j["progress"]["step"] >= step)


def test_sse_reports_each_step_until_the_end(app):
    _, client, _ = app
    job_id = submit(client, "slow sse", 8)
    events = []
    with client.stream("GET", f"/jobs/{job_id}/events", timeout=60) as response:
        assert response.status_code == 200
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
                if event == "end":
                    break
    steps = [d["progress"]["step"] for e, d in events if e == "progress" and d["progress"]["stage"] == "denoise"]
    assert len(steps) >= 3 and steps == sorted(steps) and len(set(steps)) == len(steps), steps
    assert any(d["eta_s"] is not None for _, d in events if d["status"] == "running")
    assert events[-1][0] == "end" and events[-1][1]["status"] == "succeeded"
    assert events[-1][1]["progress"]["step"] == events[-1][1]["progress"]["total_steps"] == 8


def test_cancel_queued_and_running(app):
    _, client, _ = app
    running = submit(client, "slow cancel me while running", 60)
    queued = submit(client, "cancel me while queued", 4)
    running_at_step(client, running, 2)
    r = client.delete(f"/jobs/{queued}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = client.delete(f"/jobs/{running}")
    assert r.status_code == 200 and r.json()["cancel_requested"]
    job = wait_status(client, running, ("cancelled", "succeeded", "failed"), timeout_s=30)
    assert job["status"] == "cancelled" and job["progress"]["step"] < 60
    assert client.get(f"/jobs/{running}/video").status_code == 404


def test_full_queue_gives_429_with_retry_after(app):
    settings, client, _ = app
    ids = [submit(client, "slow fill", 40) for _ in range(settings.queue_size)]
    before = client.get("/jobs").json()["total"]
    r = client.post("/generate", json={"prompt": "one too many", "steps": 2})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert client.get("/jobs").json()["total"] == before  # nothing half-written
    for job_id in ids:
        assert client.delete(f"/jobs/{job_id}").status_code == 200
    for job_id in ids:
        assert wait_status(client, job_id, ("cancelled", "succeeded"), timeout_s=30)["status"] == "cancelled"


def test_generator_error_fails_the_job_with_the_reason(app):
    _, client, _ = app
    job = wait_status(client, submit(client, "inject-failure please", 4), ("failed", "succeeded"), timeout_s=60)
    assert job["status"] == "failed" and "injected failure" in job["error"]
    # The replica restarts (the process group may be out of step after an error); the next job runs.
    ok = wait_status(client, submit(client, "the next one", 3), ("succeeded", "failed"), timeout_s=90)
    assert ok["status"] == "succeeded", ok


def test_worker_killed_mid_job_requeues_then_next_job_succeeds(app):
    import ray

    settings, client, _ = app
    job_id = submit(client, "slow victim", 50)
    job = running_at_step(client, job_id, 2)
    workers = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith(f"wanserve-worker:{settings.app_name}:") and a["name"].endswith(":1")]
    alive = []
    for a in workers:
        try:
            handle = ray.get_actor(a["name"], namespace=a["namespace"])
            if ray.get(handle.health.remote(), timeout=5)["busy_job"] == job_id:
                alive.append(handle)
        except Exception:  # noqa: BLE001 - a worker of an earlier, replaced replica
            pass
    assert len(alive) == 1, workers
    ray.kill(alive[0])
    # Re-queued once after the replica died, then run to the end on the replacement replica.
    job = wait_status(client, job_id, ("succeeded", "failed", "cancelled"), timeout_s=120)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    nxt = wait_status(client, submit(client, "after the kill", 3), ("succeeded", "failed"), timeout_s=90)
    assert nxt["status"] == "succeeded" and nxt["attempts"] == 1


def test_a_job_sent_to_the_engine_again_is_not_run_twice(app):
    """A JobQueue replica that restarted mid-job re-sends it: the engine replica that ran it returns
    that run's outcome instead of running it again (here 200 slow steps would take 24 s)."""
    import time

    from ray import serve

    settings, client, _ = app
    job_id = submit(client, "once only", 3, seed=12345)
    job = wait_status(client, job_id, ("succeeded", "failed"), timeout_s=90)
    assert job["status"] == "succeeded", job
    engine = serve.get_deployment_handle("EngineReplica", app_name=settings.app_name)
    again = {"id": job_id, "progress_interval_s": 0.0,
             "request": {"prompt": "slow once only", "output_dir": str(settings.results_dir / job_id),
                         "job_id": job_id, "seed": 1, "steps": 200}}
    t0 = time.monotonic()
    outcome = engine.run.remote(again).result(timeout_s=60)
    assert time.monotonic() - t0 < 10, "the job ran a second time"
    assert outcome["status"] == "succeeded" and outcome["repeated"] is True
    # The first run's result (its seed, its file), not a new run's (seed 1).
    assert outcome["result"]["seed"] == job["result"]["seed"]
    assert outcome["result"]["video_path"] == str(settings.results_dir / job_id / "video.mp4")


def test_restart_with_jobs_in_sqlite_completes_them(app):
    from ray import serve

    settings, client, url = app
    # The first job outlasts the engine's drain (5 s in these tests), so its engine replica is stopped
    # mid-job, and the JobQueue, which outlives the drain, re-queues it before it goes itself.
    ids = [submit(client, "slow survive a restart", 60)] + [submit(client, "slow queued", 8) for _ in range(2)]
    running_at_step(client, ids[0], 1)
    serve.delete(settings.app_name)
    q = JobQueue(settings.db_path, max_size=settings.queue_size)
    left = [(q.get(i)["status"], q.get(i)["attempts"]) for i in ids]
    q.close()
    assert left == [("queued", 1), ("queued", 0), ("queued", 0)], left
    deploy(settings, url)
    jobs = [wait_status(client, i, ("succeeded", "failed", "cancelled"), timeout_s=90) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, jobs
    assert jobs[0]["attempts"] == 2 and jobs[1]["attempts"] == 1
