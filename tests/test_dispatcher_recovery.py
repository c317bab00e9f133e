"""A JobQueue replica that starts while engine replicas still run jobs its predecessor dispatched.

``JobQueueService`` is built directly here, without Ray: a fake engine handle records what is sent
to it, and the engine reports and outcome pushes are the calls engine replicas make. The same
scenario with real Serve replicas (the JobQueue replica killed mid-job, two engine replicas) is in
``test_service_faults.py``.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from service.dispatcher import JobQueueService
from service.queue import JobQueue
from service_helpers import make_settings


class FakeEngine:
    """Stands in for the EngineReplica handle: ``run.remote(job)`` records the job and fails it."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.run = self

    def remote(self, job: dict):
        self.sent.append(job["id"])

        async def outcome() -> dict:
            return {"status": "failed", "error": "fake engine"}

        return outcome()


def service(tmp_path, engine_replicas: int = 2, left_running: int = 0) -> tuple[JobQueueService, FakeEngine, list[str]]:
    """A JobQueue replica starting on a store where a previous replica marked ``left_running`` jobs
    running and then died (the store closed); returns it, its fake engine, and those job ids."""
    settings = make_settings(tmp_path, engine_replicas=engine_replicas)
    q = JobQueue(settings.db_path, max_size=settings.queue_size, max_attempts=settings.max_attempts)
    ids = []
    for i in range(left_running):
        job, _ = q.submit({"prompt": f"p{i}", "seed": i})
        q.mark_running(job["id"])
        ids.append(job["id"])
    q.close()
    engine = FakeEngine()
    return JobQueueService(settings.to_args(), engine), engine, ids


def test_a_job_an_engine_still_runs_is_adopted_and_its_pushed_outcome_ends_it(tmp_path):
    svc, engine, (job_id,) = service(tmp_path, engine_replicas=2, left_running=1)

    async def scenario():
        assert job_id in svc.orphans
        await svc.report_engine("A", {"ready": True, "busy_job": job_id})
        await svc.report_engine("B", {"ready": True, "busy_job": None})
        svc._settle_orphans()
        assert svc.queue.get(job_id)["status"] == "running" and job_id in svc.adopted
        assert await svc.report_outcome(job_id, {"status": "failed", "error": "out of memory"}) is True
        return svc.queue.get(job_id)

    job = asyncio.run(scenario())
    assert job["status"] == "failed" and job["error"] == "out of memory" and job["attempts"] == 1
    assert engine.sent == []  # never sent out a second time


def test_orphans_no_engine_holds_are_requeued_once_every_engine_has_reported(tmp_path):
    svc, _, (held, free) = service(tmp_path, engine_replicas=2, left_running=2)

    async def scenario():
        await svc.report_engine("A", {"ready": True, "busy_job": held})
        svc._settle_orphans()
        assert svc.queue.get(free)["status"] == "running"  # B has not reported yet: it may hold it
        await svc.report_engine("B", {"ready": True, "busy_job": None})
        svc._settle_orphans()
        return svc.queue.get(held), svc.queue.get(free)

    held_job, free_job = asyncio.run(scenario())
    assert held_job["status"] == "running"
    assert free_job["status"] == "queued" and "service stopped while the job was running" in free_job["error"]


def test_orphans_are_requeued_when_the_engines_stay_silent_past_the_grace(tmp_path):
    svc, _, (job_id,) = service(tmp_path, engine_replicas=2, left_running=1)
    svc._settle_orphans()
    assert svc.queue.get(job_id)["status"] == "running"  # within the grace: wait for the engines
    svc.orphans[job_id] = time.monotonic() - 1.0  # the grace has run out
    svc._settle_orphans()
    assert svc.queue.get(job_id)["status"] == "queued" and not svc.orphans


def test_an_adopted_job_whose_engine_ends_it_without_an_outcome_is_requeued(tmp_path):
    svc, _, (job_id,) = service(tmp_path, engine_replicas=1, left_running=1)

    async def scenario():
        await svc.report_engine("A", {"ready": True, "busy_job": job_id})
        await svc.report_engine("A", {"ready": True, "busy_job": None})  # done, but no outcome came
        svc._settle_orphans()
        assert svc.queue.get(job_id)["status"] == "running"  # the push may still be on its way
        svc.adopted[job_id]["ended_at"] -= 3600
        svc._settle_orphans()
        return svc.queue.get(job_id)

    job = asyncio.run(scenario())
    assert job["status"] == "queued" and "without reporting its outcome" in job["error"]


def test_an_adopted_job_whose_engine_stops_reporting_is_requeued(tmp_path):
    svc, _, (job_id,) = service(tmp_path, engine_replicas=1, left_running=1)

    async def scenario():
        await svc.report_engine("A", {"ready": True, "busy_job": job_id})
        svc.engines["A"]["seen_at"] -= 3600  # replaced; its reports stopped
        svc._settle_orphans()
        return svc.queue.get(job_id)

    job = asyncio.run(scenario())
    assert job["status"] == "queued" and "stopped reporting" in job["error"]


def test_a_pushed_outcome_of_a_job_dispatched_here_is_left_to_the_call(tmp_path):
    svc, _, _ = service(tmp_path)
    job, _ = svc.queue.submit({"prompt": "p", "seed": 1})
    svc.queue.mark_running(job["id"])
    assert asyncio.run(svc.report_outcome(job["id"], {"status": "failed", "error": "x"})) is False
    assert svc.queue.get(job["id"])["status"] == "running"


def test_an_adopted_job_holds_its_engine_slot_until_its_outcome_arrives(tmp_path):
    """With one engine replica busy with an adopted job, a queued job is not dispatched (it would
    wait in Serve's memory, shown as running); it is once the adopted job's outcome is in."""
    svc, engine, (orphan,) = service(tmp_path, engine_replicas=1, left_running=1)

    async def wait_until(predicate, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            await asyncio.sleep(0.02)
        return False

    async def scenario():
        await svc.report_engine("A", {"ready": True, "busy_job": orphan})
        waiting = (await svc.submit({"prompt": "next", "seed": 2}))["job"]["id"]
        await asyncio.sleep(0.5)  # the dispatch loop runs meanwhile
        assert engine.sent == [] and svc.queue.get(waiting)["status"] == "queued"
        await svc.report_outcome(orphan, {"status": "cancelled"})
        assert await wait_until(lambda: engine.sent == [waiting])
        assert await wait_until(lambda: svc.queue.get(waiting)["status"] == "failed")
        svc._loop_task.cancel()
        return svc.queue.get(orphan)

    assert asyncio.run(scenario())["status"] == "cancelled"


@pytest.mark.parametrize("engine_replicas", [1, 2])
def test_a_fresh_start_has_no_orphans(tmp_path, engine_replicas):
    svc, _, _ = service(tmp_path, engine_replicas=engine_replicas)
    assert svc.orphans == {} and svc.adopted == {}
