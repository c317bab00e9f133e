"""What an engine's outcome of a run does to the job's record (the JobQueue deployment's part)."""
from __future__ import annotations

import os
from typing import Any, Optional

from service.queue import FAILED, RUNNING, JobQueue
from service.retention import ResultRetention
from wan_model.pipeline.video import mp4_problem


def record_outcome(queue: JobQueue, retention: ResultRetention, job_id: str, outcome: dict[str, Any],
                   attempt: Optional[int] = None) -> None:
    """Apply an engine's outcome of a run to the job's record: finished (a video is checked first),
    or re-queued (crashed, unavailable). ``attempt``: the dispatch the outcome answers. When the job
    has been dispatched again since (a JobQueue that lost its lease while its call was out), the
    outcome changes nothing: neither the record (``finish`` and ``requeue`` check the attempt in their
    transaction) nor the folder the current run writes to."""
    status = outcome["status"]
    if status == "succeeded":
        result = outcome.get("result") or {}
        video = result.get("video_path")
        size = os.path.getsize(video) if video and os.path.exists(video) else None
        if size is None:
            queue.finish(job_id, FAILED, error=f"the generator reported success but wrote no video ({video})",
                         attempt=attempt)
            return
        problem = mp4_problem(video)
        if problem:
            _discard_if_running(queue, retention, job_id, attempt)
            queue.finish(job_id, FAILED, error=f"the generator wrote an incomplete video: {problem}", attempt=attempt)
            return
        queue.finish(job_id, "succeeded", result=result, result_path=video,
                     preview_path=result.get("preview_path"), result_bytes=size, attempt=attempt)
    elif status == "cancelled":
        _discard_if_running(queue, retention, job_id, attempt)
        queue.finish(job_id, "cancelled", error="cancelled while running", attempt=attempt)
    elif status == "failed":
        # e.g. an MP4 renamed into place before the preview hit a full disk
        _discard_if_running(queue, retention, job_id, attempt)
        queue.finish(job_id, FAILED, error=outcome.get("error") or "failed", attempt=attempt)
    elif status == "crashed":
        queue.requeue(job_id, outcome.get("error") or "worker died", attempt=attempt)
    elif status == "unavailable":
        queue.requeue(job_id, outcome.get("error") or "engine unavailable", count_attempt=False, attempt=attempt)
    else:
        queue.finish(job_id, FAILED, error=f"unknown engine outcome {status!r}", attempt=attempt)


def _discard_if_running(queue: JobQueue, retention: ResultRetention, job_id: str,
                        attempt: Optional[int]) -> None:
    """Remove what a failed run left in the job's results folder, unless the outcome is stale: the
    job has ended already (the folder may hold the video that succeeded) or was dispatched again
    (the folder is the later run's)."""
    job = queue.get(job_id)
    if job is not None and job["status"] == RUNNING and (attempt is None or job["dispatch"] == attempt):
        retention.discard(job_id)
