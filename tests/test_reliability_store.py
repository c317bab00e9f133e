"""The result store: a corrupt or missing result file is a clear 404/410 (never a 500); a full disk
while writing the MP4 fails the job with the reason and leaves no partial file, shown three ways: a
real 1 MiB tmpfs mounted over the results folder (where ``mount`` is allowed), a test hook making the
real writer raise ENOSPC, and a test hook leaving the truncated file ffmpeg leaves on a full disk
without raising; results are written to a temp name and renamed."""
from __future__ import annotations

import os
import subprocess
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
    report("disk_full", simulated="ENOSPC raised by the MP4 writer after frame 1 (test hook)",
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


def _fill_leaving(folder: Path, free_bytes: int) -> None:
    filler = folder / "filler"
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 65536)
    except OSError:
        pass
    os.truncate(filler, max(0, filler.stat().st_size - free_bytes))


@pytest.fixture
def full_tmpfs(tmp_path):
    """A 1 MiB tmpfs with 16 KiB left, or a skip where this machine does not allow ``mount``."""
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmp_path)], capture_output=True,
                           text=True, timeout=10)
    if mount.returncode != 0:
        pytest.skip(f"mount not allowed here ({mount.stderr.strip()}): the ENOSPC test hooks cover this")
    try:
        _fill_leaving(tmp_path, 16 * 1024)
        yield tmp_path
    finally:
        subprocess.run(["umount", str(tmp_path)], timeout=30, check=True)


def test_writer_on_a_really_full_disk_leaves_a_file_the_service_rejects(full_tmpfs):
    """ffmpeg under imageio reports "No space left" on stderr but close() does not raise: the file is
    renamed into place, truncated. The service's check (wan_model.pipeline.video.mp4_problem) catches it."""
    from wan_model.pipeline.video import mp4_problem
    from wan_model.pipeline.video import write_mp4

    frames = np.random.default_rng(0).integers(0, 256, (17, 64, 64, 3), dtype=np.uint8)
    path = full_tmpfs / "video.mp4"
    try:
        write_mp4(frames, str(path), 16)
    except OSError as exc:  # a writer that does notice: fine too, as long as nothing partial is left
        assert "space" in str(exc).lower() and not path.exists()
        return
    problem = mp4_problem(str(path))
    assert problem, "a truncated MP4 passed the check"
    report("really_full_disk", writer="imageio/ffmpeg did not raise", file_bytes=path.stat().st_size,
           caught_by="wan_model.pipeline.video.mp4_problem", problem=problem)


def test_silently_truncated_video_fails_the_job(app):
    settings, client = app
    job = _done(client, "silent-truncate please", num_frames=17, width=64, height=64)
    assert job["status"] == "failed" and "incomplete video" in job["error"], job
    assert client.get(f"/jobs/{job['id']}/video").status_code == 404
    assert not list((settings.results_dir / job["id"]).glob("*.mp4"))


def test_full_tmpfs_under_the_results_fails_the_job(app):
    settings, client = app
    results = settings.results_dir
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(results)], capture_output=True,
                           text=True, timeout=10)
    if mount.returncode != 0:
        pytest.skip(f"mount not allowed here ({mount.stderr.strip()}): the ENOSPC test hooks cover this")
    try:
        _fill_leaving(results, 16 * 1024)
        job = _done(client, "onto a full disk", num_frames=17, width=64, height=64)
        assert job["status"] == "failed", job
        assert "No space left" in job["error"] or "incomplete video" in job["error"], job["error"]
        assert client.get(f"/jobs/{job['id']}/video").status_code == 404
        folder = results / job["id"]
        assert not folder.exists() or not list(folder.iterdir()), list(folder.iterdir())  # nothing partial left
        report("tmpfs_full_disk", tmpfs="1 MiB, 16 KiB free", error=job["error"])
    finally:
        subprocess.run(["umount", str(results)], timeout=30, check=True)
    assert _done(client, "after the tmpfs")["status"] == "succeeded"
