"""Result retention: a finished job's video and preview are deleted ``result_ttl_s`` after it ends
(or on request); its record stays and says when and why (``JobQueue.mark_files_deleted``)."""
from __future__ import annotations

import asyncio
import logging
import shutil
import time
from typing import Any

from service.config import ServiceSettings
from service.logs import job_log
from service.queue import JobQueue

logger = logging.getLogger("ray.serve")

SWEEP_MAX_S = 60.0  # the longest between two looks for expired files
SWEEP_PAGE = 100  # expired jobs read at a time
SWEEP_BUDGET_S = 1.0  # the sweep runs in the dispatch loop: a backlog is deleted a second at a time
RETRY_MAX_S = 3600.0  # the longest a folder that could not be deleted waits for its next try


class ResultRetention:
    """Deletes results folders under ``settings.results_dir``; run by the JobQueue that dispatches."""

    def __init__(self, queue: JobQueue, settings: ServiceSettings):
        self.queue = queue
        self.settings = settings
        self.next_sweep = 0.0  # monotonic time of the next sweep
        self.failures: dict[str, tuple[int, float]] = {}  # job id -> (failed tries, monotonic time of the next)

    @property
    def sweep_period_s(self) -> float:
        """Files outlive ``result_ttl_s`` by at most this much."""
        return min(SWEEP_MAX_S, max(1.0, self.settings.result_ttl_s / 10))

    async def sweep(self) -> None:
        """Delete the files of jobs that finished more than ``result_ttl_s`` ago (0: keep them)."""
        ttl = self.settings.result_ttl_s
        now = time.monotonic()
        if not ttl or now < self.next_sweep:
            return
        self.next_sweep = now + self.sweep_period_s
        reason = f"expired: kept for result_ttl_s={ttl:g} s after the job finished"
        # Every expired job is looked at, page by page: folders that cannot be deleted (a volume's
        # permissions) must not hold back the newer ones behind them. They are tried again later,
        # each time twice as late (up to RETRY_MAX_S).
        after, started = None, time.monotonic()
        while True:
            if time.monotonic() - started > SWEEP_BUDGET_S:
                self.next_sweep = 0.0  # a backlog: go on at the dispatch loop's next turn
                return
            page = self.queue.files_due(time.time() - ttl, limit=SWEEP_PAGE, after=after)
            for job in page:
                failure = self.failures.get(job["id"])
                if failure is not None and time.monotonic() < failure[1]:
                    continue
                try:
                    await self.delete(job, reason)
                except OSError:  # logged
                    count = failure[0] + 1 if failure is not None else 1
                    wait_s = min(RETRY_MAX_S, self.sweep_period_s * 2 ** count)
                    self.failures[job["id"]] = (count, time.monotonic() + wait_s)
            if len(page) < SWEEP_PAGE:
                break
            after = (page[-1]["finished_at"], page[-1]["id"])

    async def delete(self, job: dict[str, Any], reason: str) -> dict[str, Any]:
        """Delete a finished job's results folder, then record it. A folder that cannot be deleted is
        left unrecorded, so that the next sweep tries again, and the error is logged."""
        try:
            await asyncio.to_thread(self.remove_dir, job["id"])
        except OSError as exc:
            job_log(logger, job["id"]).warning("cannot delete its results (%s); will try again", exc)
            raise
        self.failures.pop(job["id"], None)
        done = self.queue.mark_files_deleted(job["id"], reason)
        if job["status"] == "succeeded":
            job_log(logger, job["id"]).info("video and preview deleted: %s", reason, extra={"reason": reason})
        return done

    def remove_dir(self, job_id: str) -> None:
        folder = self.settings.results_dir / job_id
        if folder.exists():
            shutil.rmtree(folder)

    def discard(self, job_id: str) -> None:
        """Remove what a job that did not succeed left in its results folder: only succeeded jobs have files."""
        shutil.rmtree(self.settings.results_dir / job_id, ignore_errors=True)
