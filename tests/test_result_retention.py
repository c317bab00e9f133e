"""Result retention: a finished job's files are deleted ``result_ttl_s`` after it ends, or at once on
``DELETE`` of the finished job, and its record says so. ``JobQueueService`` is built directly here,
without Ray (as in test_dispatcher_recovery.py); the HTTP side is in test_service.py."""
from __future__ import annotations

import asyncio
import time

import pytest

from service.dispatcher import JobQueueService
from service.views import job_view, openai_view
from service.metrics import render_metrics
from service.queue import JobQueue
from service_helpers import make_settings, write_old_store


def finished_job(svc: JobQueueService, status: str = "succeeded", age_s: float = 0.0) -> str:
    """A job that ended ``age_s`` ago, with its results folder written as the engine writes it."""
    job, _ = svc.queue.submit({"prompt": "p", "seed": 1})
    svc.queue.mark_running(job["id"])
    folder = svc.settings.results_dir / job["id"]
    folder.mkdir(parents=True)
    (folder / "video.mp4").write_bytes(b"v" * 100)
    (folder / "preview.png").write_bytes(b"p")
    if status == "succeeded":
        svc.queue.finish(job["id"], status, result={}, result_path=str(folder / "video.mp4"),
                         preview_path=str(folder / "preview.png"), result_bytes=100)
    else:  # a failed job whose folder the engine left behind (e.g. a crash before the discard)
        svc.queue.finish(job["id"], status, error="boom")
    svc.queue._db.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (time.time() - age_s, job["id"]))
    return job["id"]


def make_service(tmp_path, ttl: float) -> JobQueueService:
    return JobQueueService(make_settings(tmp_path, result_ttl_s=ttl).to_args(), engine=None)


def sweep(svc: JobQueueService) -> None:
    svc.retention.next_sweep = 0.0  # the sweep runs at most once a period; the tests do not wait for it
    asyncio.run(svc.retention.sweep())


def test_files_of_jobs_older_than_the_ttl_are_deleted_and_recorded(tmp_path):
    svc = make_service(tmp_path, ttl=3600)
    old = finished_job(svc, age_s=7200)
    recent = finished_job(svc, age_s=60)
    old_failed = finished_job(svc, status="failed", age_s=7200)
    assert svc.queue.results_bytes() == 200
    sweep(svc)
    results = svc.settings.results_dir
    assert not (results / old).exists() and not (results / old_failed).exists()
    assert (results / recent / "video.mp4").is_file()
    job = svc.queue.get(old)
    assert job["status"] == "succeeded" and job["files_deleted_at"] is not None
    assert "result_ttl_s=3600" in job["files_deleted_reason"]
    assert svc.queue.get(recent)["files_deleted_at"] is None
    assert svc.queue.results_bytes() == 100
    assert svc.queue.counters()["results_deleted"] == 1  # videos only: the failed job had none
    assert svc.queue.files_due(time.time()) == [svc.queue.get(recent)]  # nothing is deleted twice


def test_a_ttl_of_zero_keeps_every_file(tmp_path):
    svc = make_service(tmp_path, ttl=0)
    job_id = finished_job(svc, age_s=10 * 365 * 86400)
    sweep(svc)
    assert (svc.settings.results_dir / job_id / "video.mp4").is_file()
    assert svc.queue.get(job_id)["files_deleted_at"] is None


def test_the_sweep_runs_from_the_dispatch_loop(tmp_path):
    svc = make_service(tmp_path, ttl=1)
    job_id = finished_job(svc, age_s=5)

    async def scenario():
        svc._ensure_dispatcher()
        deadline = time.monotonic() + 10
        while svc.queue.get(job_id)["files_deleted_at"] is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        svc._loop_task.cancel()

    asyncio.run(scenario())
    assert svc.queue.get(job_id)["files_deleted_at"] is not None
    assert not (svc.settings.results_dir / job_id).exists()


def test_a_folder_that_cannot_be_deleted_is_retried_and_does_not_stop_the_others(tmp_path, monkeypatch,
                                                                                  serve_warnings):
    svc = make_service(tmp_path, ttl=60)
    stuck = finished_job(svc, age_s=600)
    other = finished_job(svc, age_s=300)
    remove = svc.retention.remove_dir

    def refuse(job_id: str) -> None:
        if job_id == stuck:
            raise PermissionError(13, "Permission denied", str(svc.settings.results_dir / job_id))
        remove(job_id)

    monkeypatch.setattr(svc.retention, "remove_dir", refuse)
    sweep(svc)
    assert svc.queue.get(stuck)["files_deleted_at"] is None  # not recorded: its files are still there
    assert any("cannot delete its results" in m and "Permission denied" in m for m in serve_warnings.messages)
    assert svc.queue.get(other)["files_deleted_at"] is not None
    monkeypatch.setattr(svc.retention, "remove_dir", remove)
    sweep(svc)  # too soon: a folder that failed waits twice the sweep period before its next try
    assert svc.queue.get(stuck)["files_deleted_at"] is None
    tries, retry_at = svc.retention.failures[stuck]
    assert tries == 1 and retry_at - time.monotonic() > svc.retention.sweep_period_s
    svc.retention.failures[stuck] = (tries, time.monotonic())  # its time has come
    sweep(svc)
    assert svc.queue.get(stuck)["files_deleted_at"] is not None
    assert not (svc.settings.results_dir / stuck).exists()
    assert stuck not in svc.retention.failures


def test_many_undeletable_folders_do_not_hold_back_the_newer_ones(tmp_path, monkeypatch, serve_warnings):
    import service.retention as retention

    monkeypatch.setattr(retention, "SWEEP_PAGE", 3)  # more stuck folders than one page of expired jobs
    svc = make_service(tmp_path, ttl=60)
    stuck = {finished_job(svc, age_s=900 - i) for i in range(7)}
    newer = [finished_job(svc, age_s=300 - i) for i in range(4)]
    remove = svc.retention.remove_dir

    def refuse(job_id: str) -> None:
        if job_id in stuck:
            raise PermissionError(13, "Permission denied", str(svc.settings.results_dir / job_id))
        remove(job_id)

    monkeypatch.setattr(svc.retention, "remove_dir", refuse)
    sweep(svc)
    assert all(svc.queue.get(j)["files_deleted_at"] is not None for j in newer)
    assert all(svc.queue.get(j)["files_deleted_at"] is None for j in stuck)
    assert set(svc.retention.failures) == stuck
    warned = len(serve_warnings.messages)
    sweep(svc)  # the stuck ones wait for their retry time: no new tries, no new warnings
    assert len(serve_warnings.messages) == warned


def test_delete_files_on_request_only_for_a_finished_job(tmp_path):
    svc = make_service(tmp_path, ttl=0)
    done = finished_job(svc)
    job = asyncio.run(svc.delete_files(done))
    assert job["files_deleted_reason"] == "deleted by request"
    assert not (svc.settings.results_dir / done).exists()
    assert asyncio.run(svc.delete_files(done))["files_deleted_at"] == job["files_deleted_at"]  # idempotent
    queued, _ = svc.queue.submit({"prompt": "q", "seed": 2})
    with pytest.raises(ValueError, match="is queued: only a finished job's files can be deleted"):
        asyncio.run(svc.delete_files(queued["id"]))
    with pytest.raises(ValueError, match="only a finished job"):
        svc.queue.mark_files_deleted(queued["id"], "x")


def test_views_show_when_files_expire_and_that_they_are_gone(tmp_path):
    svc = make_service(tmp_path, ttl=86400)
    job_id = finished_job(svc, age_s=100)
    job = svc.queue.get(job_id)
    view = job_view(job, 86400)
    assert view["result"]["expires_at"] == pytest.approx(job["finished_at"] + 86400)
    assert view["result"]["video_url"] == f"/jobs/{job_id}/video"
    assert job_view(job, 0)["result"]["expires_at"] is None
    assert openai_view(job, svc.settings)["expires_at"] == int(job["finished_at"] + 86400)
    gone = asyncio.run(svc.delete_files(job_id))
    view = job_view(gone, 86400)["result"]
    assert view["video_url"] is None and view["preview_url"] is None and view["expires_at"] is None
    assert view["deleted_reason"] == "deleted by request" and view["deleted_at"] == gone["files_deleted_at"]


def test_metrics_report_kept_bytes_and_deleted_videos(tmp_path):
    svc = make_service(tmp_path, ttl=60)
    finished_job(svc, age_s=600)
    finished_job(svc, age_s=1)
    sweep(svc)
    text = render_metrics(asyncio.run(svc.state()))
    assert "wanserve_results_bytes 100\n" in text
    assert "wanserve_results_deleted_total 1\n" in text


def test_an_older_database_gains_the_retention_columns(tmp_path):
    db = tmp_path / "jobs.sqlite3"
    write_old_store(db)  # as releases before retention wrote it
    queue = JobQueue(db)
    assert queue.get("a1")["files_deleted_at"] is None and queue.results_bytes() == 42
    assert [j["id"] for j in queue.files_due(time.time())] == ["a1"]
    assert queue.mark_files_deleted("a1", "expired")["files_deleted_reason"] == "expired"
    indexes = {r[1] for r in queue._db.execute("PRAGMA index_list(jobs)")}
    assert "jobs_files" in indexes


def test_the_input_image_leaves_the_record_with_the_files(tmp_path):
    import base64
    import hashlib

    svc = make_service(tmp_path, ttl=0)
    image = base64.b64encode(b"\x89PNG" + bytes(range(256)) * 40).decode()
    job, _ = svc.queue.submit({"prompt": "from an image", "seed": 1, "image": image})
    svc.queue.mark_running(job["id"])
    svc.queue.finish(job["id"], "succeeded", result={})
    assert job_view(svc.queue.get(job["id"]), 0)["request"]["image"] == f"<{len(image)} base64 characters>"
    gone = asyncio.run(svc.delete_files(job["id"]))
    assert "image" not in gone["request"]
    assert gone["request"]["image_deleted"] == {"base64_chars": len(image),
                                                "sha256": hashlib.sha256(image.encode()).hexdigest()}
    (stored,) = svc.queue._db.execute("SELECT request FROM jobs WHERE id = ?", (job["id"],)).fetchone()
    assert image not in stored
    shown = job_view(gone, 0)["request"]
    assert shown["image"] == f"<{len(image)} base64 characters, deleted with the results>"
    assert "image_deleted" not in shown
