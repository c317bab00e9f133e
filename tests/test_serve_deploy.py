"""End to end as an operator runs it: `ray start --head`, `serve deploy deploy/serve_config.yaml`, one
job over HTTP with the `wanserve` client (submit --wait, SSE progress, download), a playable MP4.

The Ray cluster is this test's own: its own temp dir and free ports, started with ``--block`` so
that stopping it means signalling the one process we started (never `ray stop`, which would kill
every Ray process on the machine, other tests' included).
"""
from __future__ import annotations

import threading

import httpx
import pytest
import yaml

from local_cluster import REPO_DIR, SERVE_CLI, LocalRayCluster, free_ports, http_up, run, wait_for

SERVE_CONFIG = REPO_DIR / "deploy" / "serve_config.yaml"

pytestmark = pytest.mark.slow


def test_serve_deploy_one_job_end_to_end(tmp_path):
    import av

    from service.cli import main as wanserve

    http_port, = free_ports(1)
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"].update(host="127.0.0.1", port=http_port)
    config["applications"][0]["args"]["data_dir"] = str(tmp_path / "data")
    config_path = tmp_path / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{http_port}"

    # ingress + queue (0 CPUs each) + engine placement group (1 + 2 gloo workers) + 1 spare
    cluster = LocalRayCluster(num_cpus=4)
    deployed = False
    try:
        try:
            wait_for(lambda: http_up(f"{cluster.dashboard_url}/api/version"), 120, "the Ray dashboard",
                     alive=cluster.check_alive)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n`ray start` log:\n{cluster.log_tail()}") from None
        run(SERVE_CLI + ["deploy", str(config_path), "--address", cluster.dashboard_url], cluster.env, 120)
        deployed = True

        try:
            wait_for(lambda: cluster.serve_ready(url), 300, "/readyz", interval_s=1.0, alive=cluster.check_alive)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nserve status: {cluster.serve_app('wanserve')}") from None

        out = tmp_path / "out.mp4"
        outcome: list[int] = []
        client = threading.Thread(target=lambda: outcome.append(wanserve(
            ["submit", "--url", url, "--prompt", "a red fox in the snow", "--seed", "7", "--wait", "--quiet",
             "-o", str(out), "--timeout", "30"])), daemon=True)
        client.start()
        client.join(timeout=300)  # bounded; the cluster's teardown below ends a stuck client's stream
        assert not client.is_alive(), f"the job did not end within 300 s: {httpx.get(f'{url}/jobs').text}"
        assert outcome == [0], "wanserve submit --wait did not end in success"

        jobs = httpx.get(f"{url}/jobs", timeout=10).json()["jobs"]
        assert len(jobs) == 1
        job = jobs[0]
        assert job["status"] == "succeeded", job
        assert job["request"]["prompt"] == "a red fox in the snow"
        assert job["result"]["size_bytes"] == out.stat().st_size

        with av.open(str(out)) as container:  # playable: it demuxes and decodes
            stream = container.streams.video[0]
            frames = [f for f in container.decode(stream)]
        assert len(frames) == job["result"]["num_frames"] > 0
        assert (frames[0].width, frames[0].height) == (job["result"]["width"], job["result"]["height"])
    finally:
        cluster.close(serve_deployed=deployed)
