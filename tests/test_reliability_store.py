"""The result store: a corrupt or missing result file is a clear 404/410 (never a 500); a full disk
while writing the MP4 (simulated: the sandbox cannot mount a small tmpfs, so the fake generator's
test hook makes the real writer raise ENOSPC after the first frame reached its temp file) fails the
job with the reason and leaves no partial file; results are written to a temp name and renamed."""
from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import httpx
import numpy as np
import pytest

from reliability_helpers import TINY_JOB, job_rows, reliability_settings, report
from service_helpers import TOKEN, deploy, wait_status

pytestmark = pytest.mark.slow

TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def app(serve_url, tmp_path_factory):
    from ray import serve

    settings = reliability_settings(tmp_path_factory.mktemp("reliability-store"), app_name="wanserve-store")
    deploy(settings, serve_url)
    client = httpx.Client(base_url=serve_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    yield settings, client
    client.close()
    serve.delete(settings.app_name)


def _done(client: httpx.Client, prompt: str, **extra) -> dict:
    r = client.post("/generate", json={"prompt": prompt, **{**TINY_JOB, **extra}})
    assert r.status_code == 202, r.text
    return wait_status(client, r.json()["id"], TERMINAL, timeout_s=90)


def test_corrupt_or_missing_results_are_404_or_410(app):
    settings, client = app
    jobs = [_done(client, f"store {i}", num_frames=5) for i in range(3)]
    assert all(j["status"] == "succeeded" for j in jobs)
    truncated, emptied, removed = (settings.results_dir / j["id"] for j in jobs)
    data = (truncated / "video.mp4").read_bytes()
    (truncated / "video.mp4").write_bytes(data[: len(data) // 2])
    (emptied / "video.mp4").write_bytes(b"")
    (emptied / "preview.png").unlink()
    for p in removed.iterdir():
        p.unlink()
    removed.rmdir()
    answers = {}
    for job, folder in zip(jobs, (truncated, emptied, removed)):
        r = client.get(f"/jobs/{job['id']}/video")
        answers[folder.name] = r.status_code
        assert r.status_code == 410 and ("corrupt" in r.json()["detail"] or "gone" in r.json()["detail"]), r.text
        assert client.get(f"/v1/videos/{job['id']}/content").status_code == 410
    assert client.get(f"/jobs/{jobs[1]['id']}/preview.png").status_code == 410
    assert client.get(f"/jobs/{jobs[2]['id']}/preview.png").status_code == 410
    assert client.get(f"/jobs/{jobs[0]['id']}").status_code == 200  # the record itself is fine
    assert client.get("/jobs/" + "f" * 32 + "/video").status_code == 404
    assert client.get("/jobs/not-a-job-id/video").status_code == 404


def test_full_disk_while_writing_fails_the_job_and_serves_nothing(app):
    settings, client = app
    job = _done(client, "disk-full please", num_frames=5)
    assert job["status"] == "failed" and "No space left on device" in job["error"], job
    folder = settings.results_dir / job["id"]
    assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())  # no partial or temp file
    r = client.get(f"/jobs/{job['id']}/video")
    assert r.status_code == 404 and "failed" in r.json()["detail"]
    row = [r for r in job_rows(settings) if r["id"] == job["id"]][0]
    assert row["result_path"] is None and row["result_bytes"] is None
    nxt = _done(client, "after the full disk")
    assert nxt["status"] == "succeeded", nxt
    report("disk_full", simulated="ENOSPC raised by the MP4 writer after frame 1 (test hook; no tmpfs mount here)",
           error=job["error"])


def test_results_are_written_to_a_temp_name_then_renamed(app, tmp_path):
    from wan_model.pipeline import video

    frames = np.zeros((5, 16, 16, 3), np.uint8)
    with mock.patch.object(video.os, "replace", wraps=os.replace) as replace:
        video.write_mp4(frames, str(tmp_path / "video.mp4"), 16)
        video.write_png(frames[0], str(tmp_path / "preview.png"))
    moves = [(Path(a).name, Path(b).name) for a, b in (c.args for c in replace.call_args_list)]
    assert [b for _, b in moves] == ["video.mp4", "preview.png"] and all(a.startswith(".tmp-") for a, _ in moves)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview.png", "video.mp4"]
    settings, client = app
    for row in job_rows(settings):
        if row["status"] == "succeeded":
            assert Path(row["result_path"]).name == "video.mp4"  # the service records only the final name
    leftovers = [p for p in settings.results_dir.rglob(".tmp-*")]
    assert not leftovers, leftovers
