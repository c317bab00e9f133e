"""``wanserve drain-node``, the preStop hook of KubeRay's GPU worker pods, on a two-node Ray cluster
of our own (a head with no room for the engine, and a worker node that holds it, as a GPU pod does).
The node is drained while a job runs on it: Serve stops the engine replica gracefully, the job
finishes on its first attempt, and the hook returns once no replica or worker is left on the node.
Without the hook, deleting the pod would kill the job and run it again from the start."""
from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
import yaml

from local_cluster import REPO_DIR, SERVE_CLI, LocalRayCluster, free_ports, http_up, run, wait_for

pytestmark = pytest.mark.slow

STEP_S, STEPS = 0.15, 40  # a 6 s job on the fake generator (2-3 times that on a busy 2-core machine)
# Serve stops a draining replica DEADLINE_S - DRAIN_TIMEOUT_S after the drain starts (when it cannot
# start a replacement sooner), while the job still runs; the graceful stop then waits for it.
DRAIN_TIMEOUT_S, DEADLINE_S = 60, 63


def test_draining_a_node_lets_its_running_job_finish(tmp_path):
    http_port, = free_ports(1)
    config = yaml.safe_load((REPO_DIR / "deploy" / "serve_config.yaml").read_text())
    config["proxy_location"] = "HeadOnly"  # two raylets on one machine cannot both bind the HTTP port
    config["http_options"].update(host="127.0.0.1", port=http_port)
    config["applications"][0]["args"].update(
        data_dir=str(tmp_path / "data"), generator_factory="service_fakes:build_fake_generator",
        generator_options={"step_s": STEP_S}, drain_timeout_s=DRAIN_TIMEOUT_S, health_check_period_s=2)
    config_path = tmp_path / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{http_port}"

    cluster = LocalRayCluster(num_cpus=1)  # the head: no room for the engine's 3-CPU placement group
    deployed = False
    try:
        wait_for(lambda: http_up(f"{cluster.dashboard_url}/api/version"), 120, "the Ray dashboard",
                 alive=cluster.check_alive)
        cluster.add_worker_node(num_cpus=4)  # the "GPU pod"
        run(SERVE_CLI + ["deploy", str(config_path), "--address", cluster.dashboard_url], cluster.env, 120)
        deployed = True
        wait_for(lambda: cluster.serve_ready(url), 300, "/readyz", interval_s=1.0, alive=cluster.check_alive)

        r = httpx.post(f"{url}/generate", json={"prompt": "a slow one", "width": 16, "height": 16, "num_frames": 1,
                                                "steps": STEPS}, timeout=30)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        wait_for(lambda: httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()["progress"]["step"] >= 2, 60,
                 "the job to be under way", interval_s=0.2)
        [replica] = httpx.get(f"{url}/models", timeout=10).json()["models"][0]["replicas"]
        node_ids = {w["node_id"] for w in replica["workers"]}
        assert len(node_ids) == 1, replica["workers"]
        node_id = node_ids.pop()

        started = time.monotonic()
        hook = subprocess.run([sys.executable, "-m", "service.cli", "drain-node", "--address", cluster.gcs_address,
                               "--node-id", node_id, "--deadline-s", str(DEADLINE_S)],
                              env=cluster.env, cwd=REPO_DIR, capture_output=True, text=True, timeout=180)
        took = time.monotonic() - started
        assert hook.returncode == 0, f"drain-node failed:\n{hook.stdout}\n{hook.stderr}"
        assert "is draining" in hook.stdout and "no Serve replica or worker left" in hook.stdout, hook.stdout
        assert took < DEADLINE_S + 30, took

        job = httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()
        assert job["status"] == "succeeded" and job["attempts"] == 1, job  # finished where it ran, not re-run
        assert job["progress"]["step"] == STEPS
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nserve status: {cluster.serve_app('wanserve').get('deployments')}") from None
    finally:
        cluster.close(serve_deployed=deployed)


def test_the_hook_waits_for_serve_replicas_and_workers_only():
    from service.node_drain import actors_to_wait_for, wait_until_gone

    rows = [{"class_name": "ServeReplica:wanserve:EngineReplica", "name": "SERVE_REPLICA::wanserve#EngineReplica#a"},
            {"class_name": "GenerationWorker", "name": "wanserve-worker:wanserve:a:0"},
            {"class_name": "ProxyActor", "name": "SERVE_PROXY_ACTOR-x"},  # Serve drains its proxy itself
            {"class_name": "SomethingElse", "name": None}]
    assert actors_to_wait_for(rows) == ["SERVE_REPLICA::wanserve#EngineReplica#a", "wanserve-worker:wanserve:a:0"]
    said: list[str] = []
    answers = iter([["a", "b"], ["a", "b"], ["b"], []])
    assert wait_until_gone(lambda: next(answers), time.monotonic() + 5, 0.0, said.append) is True
    assert len(said) == 2  # one line per change, not per poll
    assert wait_until_gone(lambda: ["stuck"], time.monotonic() + 0.05, 0.01, said.append) is False


def test_the_hook_gives_up_when_the_cluster_cannot_be_reached():
    """A deleted RayCluster takes its head down within seconds: the hook must not hold the pod (and
    its GPUs) until the deadline; a passing hiccup is asked again."""
    from service.node_drain import ClusterUnreachable, LiveActors, wait_until_gone

    said: list[str] = []

    def head_gone() -> list[str]:
        raise ConnectionError("GCS unavailable")

    started = time.monotonic()
    with pytest.raises(ClusterUnreachable, match="could not be read"):
        wait_until_gone(LiveActors(head_gone, said.append, unreachable_s=0.2), started + 30, 0.01, said.append)
    assert time.monotonic() - started < 5
    answers = iter([ConnectionError("hiccup"), ["a"], ConnectionError("hiccup"), []])

    def flaky() -> list[str]:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    # Failures with a success between them are hiccups, each within unreachable_s of its own start.
    assert wait_until_gone(LiveActors(flaky, said.append, unreachable_s=0.05), time.monotonic() + 5, 0.04,
                           said.append) is True
