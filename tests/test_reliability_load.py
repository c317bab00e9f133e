"""Load: 200 POST /generate from 20 concurrent clients against a queue bound of 8, with real Ray
Serve and the fast fake generator writing real MP4s (tests/reliability_fakes.py). Nothing is lost:
every call is 202 or 429 (with Retry-After), every accepted job succeeds with a playable MP4, the
SQLite job table has no duplicate or orphan, and /metrics agrees with the table."""
from __future__ import annotations

import io
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from reliability_helpers import TINY_JOB, job_rows, metric, reliability_settings, report
from service_helpers import TOKEN, deploy, wait_for, wait_status

pytestmark = pytest.mark.slow

CALLS, CLIENTS, QUEUE_BOUND = 200, 20, 8
BACKOFF_S = 0.5
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def app(serve_url, tmp_path_factory):
    from ray import serve

    settings = reliability_settings(tmp_path_factory.mktemp("reliability-load"), app_name="wanserve-load",
                                    queue_size=QUEUE_BOUND)
    deploy(settings, serve_url)
    client = httpx.Client(base_url=serve_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    yield settings, client, serve_url
    client.close()
    serve.delete(settings.app_name)


def test_200_calls_from_20_clients_lose_nothing(app):
    import av

    settings, client, url = app
    answers: list[tuple[int, dict, dict]] = []
    lock = threading.Lock()
    stop_sampling = threading.Event()
    samples: list[tuple[float, float]] = []

    def one_client(n_calls: int, index: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
            for i in range(n_calls):
                r = c.post("/generate", json={"prompt": f"load client {index} call {i}", **TINY_JOB})
                body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                with lock:
                    answers.append((r.status_code, dict(r.headers), body))
                if r.status_code == 429:
                    time.sleep(BACKOFF_S)  # a polite client waits a little (less than Retry-After) and goes on

    def sample_metrics() -> None:
        while not stop_sampling.is_set():
            text = client.get("/metrics").text
            samples.append((metric(text, "wanserve_queue_depth"),
                            metric(text, 'wanserve_jobs{status="running"}')))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample_metrics)
    sampler.start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one_client, [CALLS // CLIENTS] * CLIENTS, range(CLIENTS)))
    submit_s = time.monotonic() - t0
    accepted = [body["id"] for status, _, body in answers if status == 202]
    statuses = Counter(status for status, _, _ in answers)
    assert len(answers) == CALLS and set(statuses) <= {202, 429}, statuses
    for status, headers, body in answers:
        if status == 429:
            assert int(headers["retry-after"]) >= 1 and "full" in body["detail"], (headers, body)
    assert len(set(accepted)) == len(accepted) >= QUEUE_BOUND

    jobs = {job_id: wait_status(client, job_id, TERMINAL, timeout_s=120) for job_id in accepted}
    drain_s = time.monotonic() - t0
    stop_sampling.set()
    sampler.join(timeout=10)
    assert all(j["status"] == "succeeded" and j["attempts"] == 1 for j in jobs.values()), \
        Counter(j["status"] for j in jobs.values())
    assert samples and all(q + r <= QUEUE_BOUND for q, r in samples), max(samples)

    for job_id in accepted:  # every MP4 plays: one 16x16 frame
        video = client.get(f"/jobs/{job_id}/video")
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        with av.open(io.BytesIO(video.content)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 1 and frames[0].shape == (16, 16, 3)

    rows = job_rows(settings)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate job ids in the table"
    assert set(ids) == set(accepted), "a record without a 202, or a 202 without a record"
    assert all(r["status"] == "succeeded" and r["finished_at"] for r in rows)
    results = settings.results_dir
    files = [p for p in results.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith(".tmp-")], "temp files left behind"
    assert {p.parent.name for p in files if p.name == "video.mp4"} == set(accepted)
    assert {p.name for p in files} <= {"video.mp4", "preview.png"}

    text = client.get("/metrics").text
    table = Counter(r["status"] for r in rows)
    for status in TERMINAL + ("queued", "running"):
        assert metric(text, f'wanserve_jobs{{status="{status}"}}') == table.get(status, 0), status
    assert metric(text, "wanserve_queue_depth") == 0 == table.get("queued", 0)
    report("load", calls=CALLS, backoff_after_429_s=BACKOFF_S, clients=CLIENTS, queue_bound=QUEUE_BOUND,
           accepted=len(accepted),
           rejected_429=statuses[429], other=CALLS - len(accepted) - statuses[429], submit_s=round(submit_s, 1),
           drain_s=round(drain_s, 1), jobs_per_s=round(len(accepted) / drain_s, 2),
           max_queued_plus_running_seen=max(q + r for q, r in samples), metric_samples=len(samples))


def test_queue_depth_metric_matches_the_table_while_busy(app):
    settings, client, _ = app
    slow = client.post("/generate", json={"prompt": "slow holder", **TINY_JOB, "steps": 40}).json()["id"]
    wait_status(client, slow, ("running",), timeout_s=30)
    waiting = [client.post("/generate", json={"prompt": f"waiting {i}", **TINY_JOB}).json()["id"] for i in range(3)]
    text = client.get("/metrics").text
    table = Counter(r["status"] for r in job_rows(settings))
    assert metric(text, "wanserve_queue_depth") == table["queued"] == 3
    assert metric(text, 'wanserve_jobs{status="running"}') == table["running"] == 1
    for job_id in [slow, *waiting]:
        assert client.delete(f"/jobs/{job_id}").status_code == 200
    wait_for(lambda: not [r for r in job_rows(settings) if r["status"] in ("queued", "running")], 30,
             "the cancelled jobs to leave the queue")
