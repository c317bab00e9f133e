"""Reliability under faults, with real Ray Serve and the fast fake generator (tests/reliability_fakes.py):
a rank wedged inside a collective turns into an error within the process-group timeout while the
API keeps answering; a worker killed on both attempts fails the job with the reason; a whole-app
restart on the same data dir finishes queued jobs and re-queues or fails the running ones."""
from __future__ import annotations

import time

import httpx
import pytest

from reliability_helpers import TINY_JOB, busy_worker, job_rows, reliability_settings, replica_ids, report
from service.queue import JobQueue
from service_helpers import TOKEN, deploy, wait_for, wait_status

pytestmark = pytest.mark.slow

NCCL_TIMEOUT_S = 5.0  # the gloo process-group timeout of the engine's workers in these tests
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def app(serve_url, tmp_path_factory):
    from ray import serve

    settings = reliability_settings(tmp_path_factory.mktemp("reliability-faults"), app_name="wanserve-faults",
                                    nccl_timeout_s=NCCL_TIMEOUT_S, generator_options={"step_s": 0.05})
    deploy(settings, serve_url)
    client = httpx.Client(base_url=serve_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    yield settings, client, serve_url
    client.close()
    serve.delete(settings.app_name)


def submit(client: httpx.Client, prompt: str, **extra) -> str:
    r = client.post("/generate", json={"prompt": prompt, **{**TINY_JOB, **extra}})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_rank_hung_in_collective_fails_within_timeout_and_api_answers(app):
    settings, client, _ = app
    before = replica_ids(client)
    assert before
    t0 = time.monotonic()
    job_id = submit(client, "hang-rank-1 please", steps=6)
    latencies = []
    while True:
        assert time.monotonic() - t0 < 60, "the hung job did not turn into an error within 60 s"
        ts = time.monotonic()
        health = client.get("/healthz")
        job = client.get(f"/jobs/{job_id}")
        latencies.append(time.monotonic() - ts)
        assert health.status_code == 200 and job.status_code == 200
        if job.json()["status"] in TERMINAL:
            job = job.json()
            break
        time.sleep(0.2)
    failed_after = time.monotonic() - t0
    print(f"hang: failed after {failed_after:.1f} s")
    assert job["status"] == "failed", job
    assert "rank(s) [1]" in job["error"], job["error"]  # the wedged rank is named
    # Rank 0 timed out in its collective; rank 1 gets the grace on top, then the replica is given up.
    assert failed_after < NCCL_TIMEOUT_S + 5 + 20, failed_after
    replaced = wait_for(lambda: (ids := replica_ids(client)) and not ids & before and ids, 60,
                        "a new engine replica, and the broken one no longer counted")
    replaced_after = time.monotonic() - t0
    nxt = wait_status(client, submit(client, "after the hang"), TERMINAL, timeout_s=60)
    assert nxt["status"] == "succeeded", nxt
    report("hang", nccl_timeout_s=NCCL_TIMEOUT_S, job_failed_after_s=round(failed_after, 1),
           replica_replaced_after_s=round(replaced_after, 1), api_polls=len(latencies),
           api_max_latency_s=round(max(latencies), 3), new_replicas=len(replaced))


def test_worker_killed_on_both_attempts_fails_with_reason(app):
    """Extends test_service_faults' kill test (re-run once -> succeeded): killed again -> failed."""
    import ray

    settings, client, _ = app
    before = replica_ids(client)
    job_id = submit(client, "slow victim twice", steps=100)
    kills = []
    for attempt in (1, 2):
        wait_status(client, job_id, ("running",), timeout_s=90,
                    predicate=lambda j: j["attempts"] == attempt and j["progress"]["step"] >= 1)
        ray.kill(busy_worker(settings.app_name, job_id, rank=1))
        kills.append(time.monotonic())
    job = wait_status(client, job_id, TERMINAL, timeout_s=90)
    assert job["status"] == "failed" and job["attempts"] == 2, job
    assert "died" in job["error"] and "after 2 attempts" in job["error"], job["error"]
    failed_after = time.monotonic() - kills[-1]
    assert not [r for r in job_rows(settings) if r["status"] == "running"]
    nxt = wait_status(client, submit(client, "after two kills"), TERMINAL, timeout_s=90)
    assert nxt["status"] == "succeeded" and nxt["attempts"] == 1, nxt
    assert replica_ids(client) - before, "the killed replica was not replaced"
    report("worker_killed_twice", failed_after_second_kill_s=round(failed_after, 2),
           attempts=job["attempts"], error=job["error"])


def test_whole_app_restart_finishes_queued_and_recovers_running(app):
    """Delete the app with a job running (it drains: the job finishes first), add jobs a crashed app
    would leave (one running on its last attempt), start the app again on the same data dir."""
    from ray import serve

    settings, client, url = app
    live = submit(client, "slow running at shutdown", steps=6)
    queued = [submit(client, f"queued at shutdown {i}") for i in range(2)]
    wait_status(client, live, ("running",), timeout_s=60, predicate=lambda j: j["progress"]["step"] >= 1)
    t0 = time.monotonic()
    serve.delete(settings.app_name)
    store = JobQueue(settings.db_path, max_size=settings.queue_size, max_attempts=settings.max_attempts)
    # Its engine replica finished it before it stopped (the drain), and the JobQueue recorded it.
    assert store.get(live)["status"] == "succeeded" and store.get(live)["attempts"] == 1
    assert [store.get(i)["status"] for i in queued] == ["queued"] * 2
    request = {"prompt": "seeded", "negative_prompt": "", "seed": 1, **TINY_JOB}
    first_try, _ = store.submit(dict(request, prompt="running, first attempt"))
    last_try, _ = store.submit(dict(request, prompt="running, last attempt"))
    store.claim(store.mark_running(first_try["id"])["id"], 1)  # their engines had started them
    store.mark_running(last_try["id"])
    store.requeue(last_try["id"], "an earlier crash")
    store.claim(last_try["id"], store.mark_running(last_try["id"])["dispatch"])
    assert store.get(last_try["id"])["attempts"] == 2
    store.close()
    deploy(settings, url)
    ready_after = time.monotonic() - t0
    ids = [live, *queued, first_try["id"], last_try["id"]]
    jobs = {i: wait_status(client, i, TERMINAL, timeout_s=120) for i in ids}
    done_after = time.monotonic() - t0
    assert jobs[live]["status"] == "succeeded" and jobs[live]["attempts"] == 1, jobs[live]
    assert [jobs[i]["status"] for i in queued] == ["succeeded"] * 2
    assert jobs[first_try["id"]]["status"] == "succeeded" and jobs[first_try["id"]]["attempts"] == 2
    lost = jobs[last_try["id"]]
    assert lost["status"] == "failed" and "service stopped while the job was running" in lost["error"], lost
    assert "after 2 attempts" in lost["error"]
    assert not [r for r in job_rows(settings) if r["status"] in ("running", "queued")]
    report("restart", ready_after_s=round(ready_after, 1), all_done_after_s=round(done_after, 1),
           succeeded=sum(j["status"] == "succeeded" for j in jobs.values()), failed_with_reason=lost["error"])
