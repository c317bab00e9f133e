"""The JobQueue's bookkeeping of one dispatch, without Ray: ``JobQueueService`` with a scripted
engine handle. A job sent back by a broken replica is dispatched again without losing track of it,
and the time limit of a dispatch counts from when an engine claimed it, not from when it was sent
(it may wait in Serve's queue behind another job for most of an hour)."""
from __future__ import annotations

import asyncio
import time

import pytest

from service import dispatcher as dispatcher_module
from service.dispatcher import JobQueueService
from service_helpers import make_settings


class ScriptedEngine:
    """``engine.run.remote(job)``: each call runs the next script, ``async (svc, job) -> outcome``."""

    def __init__(self, *scripts):
        self.scripts = list(scripts)
        self.calls: list[int] = []  # the attempt of each call
        self.cancelled = 0
        self.svc: JobQueueService | None = None
        self.run = self

    def remote(self, job: dict):
        self.calls.append(job["attempt"])
        script = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]

        async def call():
            try:
                return await script(self.svc, job)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise

        return call()


async def unavailable(svc, job):
    return {"status": "unavailable", "error": "this replica is broken"}


async def runs_forever(svc, job):
    assert await svc.claim(job["id"], job["attempt"], "B")
    await asyncio.sleep(3600)


def start(tmp_path, engine: ScriptedEngine, **settings) -> JobQueueService:
    svc = JobQueueService(make_settings(tmp_path, **settings).to_args(), engine)
    engine.svc = svc
    return svc


async def until(condition, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_a_job_a_broken_replica_sends_back_is_still_tracked_when_dispatched_again(tmp_path):
    engine = ScriptedEngine(unavailable, runs_forever)
    svc = start(tmp_path, engine, engine_replicas=2)

    async def scenario():
        svc._ensure_dispatcher()
        job_id = (await svc.submit({"prompt": "x", "seed": 1}))["job"]["id"]
        await until(lambda: len(engine.calls) == 2)
        await asyncio.sleep(1.5)  # past the first dispatch's back-off and its clean-up
        job = svc.queue.get(job_id)
        return job, job_id in svc.inflight, len(engine.calls)

    job, tracked, calls = asyncio.run(scenario())
    assert job["status"] == "running" and tracked  # the second dispatch is still counted as in flight
    assert calls == 2  # and the job was not sent a third time meanwhile
    assert job["attempts"] == 1  # "unavailable" does not count as an attempt
    assert engine.calls == [1, 2]  # but each dispatch has its own number


@pytest.fixture()
def short_limits(monkeypatch):
    monkeypatch.setattr(dispatcher_module, "DISPATCH_MARGIN_S", 0.3)
    # waiting for an engine: 1.0 + 1.0 + 0.3 = 2.3 s; running once claimed: 1.0 + 0.2 + 0.3 = 1.5 s
    return dict(job_timeout_s=1.0, worker_init_timeout_s=1.0, nccl_timeout_s=0.2, engine_replicas=1)


def test_the_limit_counts_from_the_claim_so_a_job_that_waited_in_line_is_not_cut_off(tmp_path, short_limits):
    async def waits_then_runs(svc, job):
        await asyncio.sleep(2.0)  # behind another job in Serve's queue (under the 2.3 s wait limit)
        assert await svc.claim(job["id"], job["attempt"], "A")
        await asyncio.sleep(1.0)  # runs (under 1.5 s), though 3 s after the dispatch
        return {"status": "failed", "error": "scripted outcome"}

    engine = ScriptedEngine(waits_then_runs)
    svc = start(tmp_path, engine, **short_limits)

    async def scenario():
        svc._ensure_dispatcher()
        job_id = (await svc.submit({"prompt": "x", "seed": 1}))["job"]["id"]
        await until(lambda: svc.queue.get(job_id)["status"] != "running" and job_id not in svc.inflight
                    and engine.calls)
        return svc.queue.get(job_id)

    job = asyncio.run(scenario())
    assert job["status"] == "failed" and job["error"] == "scripted outcome" and job["attempts"] == 1
    assert engine.cancelled == 0


def test_a_claim_that_reached_another_jobqueue_replica_puts_the_dispatch_under_the_running_limit(tmp_path,
                                                                                                 short_limits):
    """Serve may route an engine's claim to another JobQueue replica (a redeploy): the store holds it,
    and the dispatch is not given up as never started when the waiting limit passes."""
    async def claimed_elsewhere(svc, job):
        await asyncio.sleep(1.5)
        assert svc.queue.claim(job["id"], job["attempt"]) is not None  # granted by the other replica
        await asyncio.sleep(3600)

    engine = ScriptedEngine(claimed_elsewhere)
    svc = start(tmp_path, engine, max_attempts=1, **short_limits)

    async def scenario():
        svc._ensure_dispatcher()
        job_id = (await svc.submit({"prompt": "x", "seed": 1}))["job"]["id"]
        started = time.monotonic()
        await until(lambda: svc.queue.get(job_id)["status"] == "failed")
        return svc.queue.get(job_id), time.monotonic() - started

    job, took = asyncio.run(scenario())
    assert "did not finish the job within 2 s of starting it" in job["error"], job["error"]
    assert 2.8 < took < 6.0  # claimed at 1.5 s, then the 1.5 s running limit (not the 2.3 s waiting one)


@pytest.mark.parametrize("claims, message", [
    (True, "did not finish the job within 2 s of starting it"),
    (False, "no engine replica started the job within 2 s"),
])
def test_a_dispatch_past_its_limit_is_given_up_and_the_engine_call_cancelled(tmp_path, short_limits, claims, message):
    async def hangs(svc, job):
        if claims:
            assert await svc.claim(job["id"], job["attempt"], "A")
        await asyncio.sleep(3600)

    engine = ScriptedEngine(hangs)
    svc = start(tmp_path, engine, max_attempts=1, **short_limits)  # one attempt: the record shows the timeout

    async def scenario():
        svc._ensure_dispatcher()
        job_id = (await svc.submit({"prompt": "x", "seed": 1}))["job"]["id"]
        started = time.monotonic()
        await until(lambda: svc.queue.get(job_id)["status"] == "failed")
        took = time.monotonic() - started
        await until(lambda: engine.cancelled == 1 and job_id not in svc.inflight)
        return svc.queue.get(job_id), took

    job, took = asyncio.run(scenario())
    assert (1.4 if claims else 2.2) < took < 6.0
    assert message in job["error"] and job["attempts"] == 1 and engine.calls == [1]
