"""An app with two engine replicas (one gloo worker each) and a warm-up job.

- The JobQueue replica dies mid-job while its engine replica goes on: the job runs once. With two
  engine replicas, a job sent out again would find an idle replica and really run twice. The new
  JobQueue replica must adopt the running job from the engine's report and take its outcome from
  the engine's push.
- Each engine replica runs the configured warm-up job before it reports ready, and the warm-up
  leaves no job record and no files. Its workers keep compiled code in the data_dir's cache folder.
"""
from __future__ import annotations

import time

import httpx
import pytest

from service_helpers import TOKEN, deploy, make_settings, wait_for

pytestmark = pytest.mark.slow

TERMINAL = ("succeeded", "failed", "cancelled")
WARMUP = {"width": 16, "height": 16, "num_frames": 1, "steps": 3}


@pytest.fixture(scope="module")
def app(serve_url, tmp_path_factory):
    from ray import serve

    settings = make_settings(tmp_path_factory.mktemp("wanserve-queue-restart"), app_name="wanserve-qrestart",
                             engine_replicas=2, cpu_workers=1, generator_options={"step_s": 0.03},
                             warmup=[WARMUP])
    deploy(settings, serve_url)
    client = httpx.Client(base_url=serve_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    yield settings, client
    client.close()
    serve.delete(settings.app_name)


def job_state(client: httpx.Client, job_id: str):
    """The job, or None while the API cannot answer (its JobQueue replica is being replaced)."""
    try:
        r = client.get(f"/jobs/{job_id}")
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


def queue_replica(app_name: str):
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::") and f"{app_name}#JobQueue#" in a["name"]]
    assert len(names) == 1, names
    return ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])


def test_a_job_running_when_the_jobqueue_replica_dies_is_adopted_and_runs_once(app):
    import ray

    settings, client = app
    r = client.post("/generate", json={"prompt": "slow adopted after a queue restart", "steps": 80})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    wait_for(lambda: (j := job_state(client, job_id)) and j["status"] == "running" and j["progress"]["step"] >= 2,
             60, "the job to be running")
    old = queue_replica(settings.app_name)
    ray.kill(old, no_restart=True)
    t0 = time.monotonic()
    wait_for(lambda: (j := job_state(client, job_id)) and j["status"] == "running", 60,
             "the replacement JobQueue replica to answer")
    job = wait_for(lambda: (j := job_state(client, job_id)) and j["status"] in TERMINAL and j, 90,
                   "the job to end")
    # Run once, on the engine that had it: not re-queued (a second attempt would have run on the
    # other, idle engine replica), and its outcome reached the new JobQueue replica.
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    assert job["progress"]["step"] == 80 or job["result"]
    assert time.monotonic() - t0 < 60
    nxt = client.post("/generate", json={"prompt": "after the queue restart", "steps": 2})
    assert nxt.status_code == 202, nxt.text
    done = wait_for(lambda: (j := job_state(client, nxt.json()["id"])) and j["status"] in TERMINAL and j, 60,
                    "the next job to end")
    assert done["status"] == "succeeded" and done["attempts"] == 1


def test_every_engine_replica_ran_the_warmup_before_it_reported_ready(app):
    from reliability_helpers import job_rows

    settings, client = app
    # The workers' part of a replica's report comes with its first health check.
    replicas = wait_for(lambda: (r := client.get("/models").json()["models"][0]["replicas"])
                        and all(x["workers"] for x in r) and r, 30, "the replicas' health reports")
    assert len(replicas) == 2, replicas
    for replica in replicas:
        assert replica["ready"] is True
        (done,) = replica["warmup"]
        assert {k: done[k] for k in WARMUP} == WARMUP and done["seconds"] > 0, replica
        # The fake generator compiles nothing; the counts are there for compiled ones.
        assert (done["compiled_graphs"], done["from_cache"]) == (0, 0), replica
        # Every worker process keeps torch.compile's artifacts in the data_dir's cache folder.
        cache = str(settings.resolved_compile_cache_dir)
        assert replica["compile_cache_dir"] == cache, replica
        assert [w["compile_cache_dir"] for w in replica["workers"]] == [cache] * settings.cpu_workers, replica
    # Not a job: nothing in the job table, nothing in the results folder.
    assert not [r for r in job_rows(settings) if "warm-up" in r["request"]]
    assert all(not p.name.startswith("warmup") for p in settings.results_dir.iterdir())
