"""The dispatch lease: two JobQueue replicas on one store (a KubeRay upgrade runs a new cluster beside
the old one on the same volume; Serve may start a JobQueue replica before the old one is gone).
Only the lease holder dispatches and re-queues; the other stands by and takes over when the lease
is released or lapses. ``JobQueueService`` is built directly, without Ray."""
from __future__ import annotations

import asyncio
import json
import time

from service.dispatcher import JobQueueService
from service.outcomes import record_outcome
from service.queue import JobQueue
from service_helpers import FakeEngine, make_settings


def replica(settings, lease_s: float = 0.6) -> tuple[JobQueueService, FakeEngine]:
    engine = FakeEngine()
    svc = JobQueueService(settings.to_args(), engine)
    svc._lease_s = lease_s
    return svc, engine


async def stop_loops(*replicas: JobQueueService) -> None:
    """End the replicas' dispatch loops (started by their first API call) within the test's event loop."""
    for svc in replicas:
        svc._draining = True  # nothing starts a loop again
        if svc._loop_task is not None:
            svc._loop_task.cancel()
            await asyncio.gather(svc._loop_task, return_exceptions=True)


def test_the_lease_has_one_holder_until_released_or_expired(tmp_path):
    q = JobQueue(tmp_path / "jobs.sqlite3")
    held, holder, until = q.acquire_lease("a", 0.3)
    assert held and holder == "a" and until > time.time()
    assert q.acquire_lease("b", 0.3)[:2] == (False, "a")
    assert q.acquire_lease("a", 0.3)[0]  # the holder renews
    q.release_lease("b")  # not b's to release
    assert q.acquire_lease("b", 0.3)[:2] == (False, "a")
    time.sleep(0.35)
    assert q.acquire_lease("b", 0.3)[:2] == (True, "b")  # lapsed: b takes it
    assert q.acquire_lease("a", 0.3)[:2] == (False, "b")
    q.release_lease("b")
    assert q.acquire_lease("a", 0.3)[:2] == (True, "a")


def test_a_replica_without_the_lease_neither_dispatches_nor_requeues_until_it_takes_over(tmp_path):
    settings = make_settings(tmp_path, engine_replicas=1)
    old, old_engine = replica(settings)
    assert old._hold_lease()
    running, _ = old.queue.submit({"prompt": "on the old cluster", "seed": 1})
    old.queue.mark_running(running["id"])  # the old replica dispatched it; its engine still runs it
    assert old.queue.claim(running["id"], 1)
    queued, _ = old.queue.submit({"prompt": "submitted during the upgrade", "seed": 2})
    new, new_engine = replica(settings)

    async def scenario():
        await new.report_engine("N", {"ready": True, "busy_job": None})  # the new cluster's engine is idle
        new._ensure_dispatcher()
        await asyncio.sleep(0.4)  # the old replica renews nothing from here: its lease lapses at 0.6 s
        standby = (new.queue.get(running["id"])["status"], new.queue.get(queued["id"])["status"],
                   list(new_engine.sent), (await new.state())["dispatching"])
        deadline = time.monotonic() + 10
        while len(new_engine.sent) < 2 and time.monotonic() < deadline:
            await new.report_engine("N", {"ready": True, "busy_job": None})  # its periodic health report
            await asyncio.sleep(0.05)
        new._loop_task.cancel()
        return standby

    standby = asyncio.run(scenario())
    # While the old replica held the lease: its running job was left alone (an engine of the old
    # cluster runs it), and the queued job waited.
    assert standby == ("running", "queued", [], False)
    # Once it lapsed, the new replica took over: the job no engine of its own holds is re-queued
    # and dispatched, then the queued one, in the order they were submitted.
    assert new._leading and new_engine.sent == [running["id"], queued["id"]]
    assert old_engine.sent == []
    assert new.queue.get(running["id"])["attempts"] == 2


def test_a_released_lease_passes_at_once_and_ended_jobs_are_no_orphans(tmp_path):
    settings = make_settings(tmp_path, engine_replicas=1)
    old, _ = replica(settings, lease_s=60)
    assert old._hold_lease()
    job, _ = old.queue.submit({"prompt": "finishes on the old cluster", "seed": 1})
    old.queue.mark_running(job["id"])
    new, new_engine = replica(settings, lease_s=60)
    assert job["id"] in new.orphans and not new._hold_lease()
    # The old cluster's engine pushes the outcome to the old replica, which records it.
    old._apply_outcome(job["id"], {"status": "failed", "error": "out of memory"})
    asyncio.run(old.shut_down())  # Serve's graceful shutdown of the old replica hands the lease on
    assert new._hold_lease() and new.orphans == {}
    assert new.queue.get(job["id"])["status"] == "failed" and new_engine.sent == []


def test_images_submitted_while_another_replica_dispatches_stay_where_older_releases_read_them(tmp_path):
    """A KubeRay upgrade: the new cluster's JobQueue takes jobs while the old cluster's dispatches
    them, and releases before the fifteenth read a job's image from its request only."""
    settings = make_settings(tmp_path, engine_replicas=1)
    old, _ = replica(settings, lease_s=60)
    assert old._hold_lease()
    new, _ = replica(settings, lease_s=60)
    answer = asyncio.run(new.submit({"prompt": "an upgrade", "seed": 1, "image": "aW1hZ2U="}))
    job_id = answer["job"]["id"]
    row = new.queue._db.execute("SELECT request, image FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert json.loads(row["request"])["image"] == "aW1hZ2U=" and row["image"] is None  # as the old release reads
    assert answer["job"]["request"]["image"] == "aW1hZ2U=" and new.queue.image(job_id) == "aW1hZ2U="
    own = asyncio.run(old.submit({"prompt": "to the holder", "seed": 2, "image": "b3du"}))["job"]["id"]
    assert new.queue._db.execute("SELECT image FROM jobs WHERE id = ?", (own,)).fetchone()["image"] == "b3du"
    asyncio.run(old.shut_down())  # the old cluster goes: the new replica takes the lease
    assert new._hold_lease()
    row = new.queue._db.execute("SELECT request, image FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert "image" not in json.loads(row["request"]) and row["image"] == "aW1hZ2U="  # moved to its column
    assert new.queue.image(job_id) == "aW1hZ2U="


def test_a_second_application_on_the_same_store_is_refused(tmp_path):
    """Two apps (two models) given one data_dir: the lease holder would dispatch both apps' jobs to
    its own model. The second app's JobQueue does not start, and says why."""
    import pytest

    from service.queue import StoreOfAnotherApp

    first, _ = replica(make_settings(tmp_path, app_name="wanserve-t2v"))
    again, _ = replica(make_settings(tmp_path, app_name="wanserve-t2v"))  # the same app again: an upgrade
    with pytest.raises(StoreOfAnotherApp, match="'wanserve-t2v', not 'wanserve-i2v'.*its own data_dir"):
        JobQueueService(make_settings(tmp_path, app_name="wanserve-i2v").to_args(), FakeEngine())
    first.release_lease()
    again.release_lease()


def test_applications_are_told_apart_by_their_serve_names_not_the_app_name_setting(tmp_path, monkeypatch):
    """Under serve deploy each application has its Serve name, and the app_name setting keeps its
    default: two apps on one data_dir must still be told apart."""
    import types

    import pytest
    from ray import serve

    from service.queue import StoreOfAnotherApp

    def in_app(name):
        monkeypatch.setattr(serve, "get_replica_context", lambda: types.SimpleNamespace(app_name=name))

    in_app("t2v")
    first, _ = replica(make_settings(tmp_path))  # app_name left at its default, as under serve deploy
    in_app("i2v")
    with pytest.raises(StoreOfAnotherApp, match="'t2v', not 'i2v'.*UPDATE store_info"):
        JobQueueService(make_settings(tmp_path).to_args(), FakeEngine())
    first.release_lease()


def test_a_late_outcome_of_an_earlier_attempt_changes_neither_the_record_nor_the_new_runs_folder(tmp_path):
    """A replica that lost the lease while its engine call was out gets that call's answer after the
    new holder dispatched the job again: the answer is attempt 1's, the record and folder attempt 2's."""
    settings = make_settings(tmp_path, engine_replicas=1, max_attempts=3)
    old, _ = replica(settings, lease_s=60)
    job, _ = old.queue.submit({"prompt": "dispatched twice", "seed": 1})
    job_id = job["id"]
    old.queue.mark_running(job_id)  # attempt 1, on the replica that then lost the lease
    old.queue.requeue(job_id, "the new lease holder found no engine running it")
    assert old.queue.mark_running(job_id)["attempts"] == 2  # dispatched again, by the new holder
    folder = settings.results_dir / job_id
    folder.mkdir(parents=True)
    (folder / "video.mp4.partial").write_bytes(b"attempt 2 writing")
    for status in ("failed", "cancelled", "crashed", "unavailable", "superseded"):
        old._apply_outcome(job_id, {"status": status, "error": "attempt 1's run"}, attempt=1)
        record = old.queue.get(job_id)
        assert (record["status"], record["attempts"]) == ("running", 2), status
        assert (folder / "video.mp4.partial").exists(), status
    # record_outcome holds on its own, without the dispatcher's check before it
    for status in ("failed", "cancelled", "crashed", "unavailable"):
        record_outcome(old.queue, old.retention, job_id, {"status": status, "error": "attempt 1's run"}, attempt=1)
        record = old.queue.get(job_id)
        assert (record["status"], record["attempts"]) == ("running", 2), status
        assert (folder / "video.mp4.partial").exists(), status
    old._apply_outcome(job_id, {"status": "failed", "error": "attempt 2's run"}, attempt=2)
    record = old.queue.get(job_id)
    assert (record["status"], record["error"]) == ("failed", "attempt 2's run")
    assert not folder.exists()


def test_a_job_cancelled_before_an_engine_claims_it_is_not_started(tmp_path):
    settings = make_settings(tmp_path, engine_replicas=1)
    svc, _ = replica(settings, lease_s=60)
    job, _ = svc.queue.submit({"prompt": "cancelled while its dispatch waits", "seed": 1})
    svc.queue.mark_running(job["id"])

    async def scenario():
        await svc.cancel(job["id"])
        started = await svc.claim(job["id"], 1, "E1")
        svc._stopped = True
        if svc._loop_task is not None:
            svc._loop_task.cancel()
        return started

    assert asyncio.run(scenario()) is False
    assert svc.queue.get(job["id"])["status"] == "cancelled"


def test_shutting_down_requeues_what_no_engine_started_and_waits_only_for_what_runs(tmp_path):
    settings = make_settings(tmp_path, engine_replicas=1, drain_timeout_s=30.0)
    svc, _ = replica(settings, lease_s=60)
    running, _ = svc.queue.submit({"prompt": "an engine runs it", "seed": 1})
    waiting, _ = svc.queue.submit({"prompt": "waits in Serve's queue", "seed": 2})
    answers: dict[str, asyncio.Future] = {}

    async def call_engine(engine_job: dict) -> dict:
        answers[engine_job["id"]] = asyncio.get_running_loop().create_future()
        return await answers[engine_job["id"]]

    svc._call_engine = call_engine

    async def scenario():
        assert svc._hold_lease()
        for job in (running, waiting):
            dispatched = svc.queue.mark_running(job["id"])
            svc._start_run(dispatched)
        await asyncio.sleep(0.05)
        assert await svc.claim(running["id"], 1, "E1")
        asyncio.get_running_loop().call_later(0.3, answers[running["id"]].set_result,
                                              {"status": "failed", "error": "drained"})
        started = time.monotonic()
        await svc.shut_down()
        took_s, late_claim = time.monotonic() - started, await svc.claim(waiting["id"], 1, "E1")
        requeued = svc.queue.get(waiting["id"])
        # The next JobQueue sends it again: the old dispatch, should an engine get to it only now,
        # still does not start it, as the new one has another number.
        again = svc.queue.mark_running(waiting["id"])
        return took_s, late_claim, requeued, again, await svc.claim(waiting["id"], 1, "E1")

    took_s, late_claim, requeued, again, later_claim = asyncio.run(scenario())
    assert took_s < 5.0  # not drain_timeout_s + 15 s for the dispatch no engine took up
    assert late_claim is False  # an engine that gets to it after all does not start it
    assert svc.queue.get(running["id"])["status"] == "failed"
    assert (requeued["status"], requeued["attempts"]) == ("queued", 0)
    assert (again["attempts"], again["dispatch"], later_claim) == (1, 2, False)
    assert not svc._leading


def test_a_replica_changes_only_the_dispatch_it_sent_even_after_another_sent_the_job_again(tmp_path):
    """Replica A's lease lapsed (a stall) while its dispatch 1 waited in Serve's queue; B took over,
    dispatched the job again (2), and an engine runs that. A's shutdown, and its engine call's
    failure, must leave dispatch 2 alone: they are about dispatch 1."""
    settings = make_settings(tmp_path, engine_replicas=1)
    a, _ = replica(settings, lease_s=60)

    async def failing_call(engine_job: dict) -> dict:
        raise RuntimeError("the engine replica died")

    async def scenario():
        assert a._hold_lease()
        job_id = a.queue.submit({"prompt": "p", "seed": 1})[0]["id"]
        a.sent_dispatch[job_id] = a.queue.mark_running(job_id)["dispatch"]
        a.inflight[job_id] = asyncio.get_running_loop().create_future()  # its call waits in an engine's queue
        a.queue._db.execute("UPDATE dispatch_lease SET expires_at = 0")
        a.queue._db.commit()
        b, _ = replica(settings, lease_s=60)
        assert b._hold_lease()
        await b.report_engine("E2", {"ready": True, "busy_job": None})
        b._settle_orphans()
        again = b.queue.mark_running(job_id)
        assert await b.claim(job_id, again["dispatch"], "E2")
        a._leading = False
        await a.shut_down()
        after_shutdown = b.queue.get(job_id)
        a._call_engine = failing_call
        await a._run(b.queue.get(job_id) | {"dispatch": 1})  # dispatch 1's call fails only now
        await stop_loops(a, b)
        return again, after_shutdown, b.queue.get(job_id)

    again, after_shutdown, after_failure = asyncio.run(scenario())
    assert again["dispatch"] == 2
    for job in (after_shutdown, after_failure):
        assert (job["status"], job["dispatch"], job["attempts"]) == ("running", 2, 1), job
    assert not after_failure["error"] or "died" not in after_failure["error"]


def test_a_dispatch_claimed_through_another_replica_is_waited_for_at_shutdown_not_requeued(tmp_path):
    """In a redeploy Serve may route an engine's claim of A's dispatch to the new replica B: the
    store then holds the claim, and A's shutdown must not re-queue a job an engine runs."""
    settings = make_settings(tmp_path, engine_replicas=1, drain_timeout_s=30.0)
    a, _ = replica(settings, lease_s=60)
    answer: dict[str, asyncio.Future] = {}

    async def call_engine(engine_job: dict) -> dict:
        answer["f"] = asyncio.get_running_loop().create_future()
        return await answer["f"]

    a._call_engine = call_engine

    async def scenario():
        assert a._hold_lease()
        job_id = a.queue.submit({"prompt": "p", "seed": 1})[0]["id"]
        a._start_run(a.queue.mark_running(job_id))
        await asyncio.sleep(0.05)
        b, _ = replica(settings, lease_s=60)
        assert await b.claim(job_id, 1, "E1")
        asyncio.get_running_loop().call_later(0.3, answer["f"].set_result, {"status": "failed", "error": "drained"})
        started = time.monotonic()
        await a.shut_down()
        await stop_loops(a, b)
        return time.monotonic() - started, a.queue.get(job_id)

    took_s, job = asyncio.run(scenario())
    assert 0.2 < took_s < 5.0  # it waited for the run, as for the runs it saw claimed itself
    assert (job["status"], job["attempts"], job["dispatch"], job["error"]) == ("failed", 1, 1, "drained")


def test_an_adopted_job_is_requeued_only_while_the_adopted_dispatch_is_its_current_one(tmp_path):
    """A adopted dispatch 1 (engine E1) and lost the lease; B sent dispatch 2, which E2 runs. When A
    leads again and E1 has gone silent, dispatch 2 is not A's to re-queue: the re-queue is bound to
    the adopted dispatch, and taking the lease drops the adoption, the job then an orphan that waits
    for the engines' next reports (E2's names it)."""
    settings = make_settings(tmp_path, engine_replicas=2, max_attempts=3)
    a, _ = replica(settings, lease_s=60)

    async def scenario():
        job_id = a.queue.submit({"prompt": "p", "seed": 1})[0]["id"]
        a.queue.mark_running(job_id)  # a previous JobQueue's dispatch 1
        a.orphans[job_id] = time.monotonic() + 60
        assert await a.claim(job_id, 1, "E1", time.time())
        adoption = dict(a.adopted[job_id])
        assert adoption["dispatch"] == 1
        a.queue.requeue(job_id, "B: E1 lost", attempt=1)  # B, leading meanwhile
        second = a.queue.mark_running(job_id)["dispatch"]
        assert a.queue.claim(job_id, second) is not None  # E2 runs it
        await a.report_engine("E2", {"ready": True, "busy_job": None})  # made before E2's claim
        a._settle_orphans()  # E1 never reported to A: its adoption is given up, fenced to dispatch 1
        fenced = a.queue.get(job_id)
        a.adopted[job_id] = adoption  # again, for the takeover
        await a.report_engine("E1", {"ready": True, "busy_job": None})  # every engine reported while A stood by
        assert a._hold_lease()
        dropped, orphaned = dict(a.adopted), set(a.orphans)
        a._settle_orphans()  # E2's report came before the takeover: the orphan waits for its next one
        waited = a.queue.get(job_id)
        await a.report_engine("E2", {"ready": True, "busy_job": job_id})
        adopted = a.adopted[job_id]
        await stop_loops(a)
        return second, fenced, dropped, orphaned, waited, adopted, job_id

    second, fenced, dropped, orphaned, waited, adopted, job_id = asyncio.run(scenario())
    assert second == 2
    assert (fenced["status"], fenced["dispatch"]) == ("running", 2)
    assert dropped == {} and orphaned == {job_id}
    assert (waited["status"], waited["dispatch"]) == ("running", 2)
    assert (adopted["replica"], adopted["dispatch"]) == ("E2", 2)


def test_a_claim_times_only_the_dispatch_this_replica_sent(tmp_path):
    """A's call for dispatch 1 is still out when B sends dispatch 2 and its engine's claim reaches A:
    granted (the store's current dispatch), but it must not start the clock of A's dispatch 1."""
    settings = make_settings(tmp_path, engine_replicas=1)
    a, _ = replica(settings, lease_s=60)

    async def waits(engine_job: dict) -> dict:
        await asyncio.sleep(3600)

    a._call_engine = waits

    async def scenario():
        job_id = a.queue.submit({"prompt": "p", "seed": 1})[0]["id"]
        a._start_run(a.queue.mark_running(job_id))
        a.queue.requeue(job_id, "B found no engine running it", attempt=1)
        second = a.queue.mark_running(job_id)["dispatch"]
        granted = await a.claim(job_id, second, "E2")
        timed = job_id in a.claimed_at
        a.claimed_at[job_id] = time.monotonic()  # a claim of dispatch 1 left over ...
        a._start_run(a.queue.requeue(job_id, "x", attempt=second, count_attempt=False) and
                     a.queue.mark_running(job_id))  # ... is not the next dispatch's
        timed_next = job_id in a.claimed_at
        runs = list(a.inflight.values())
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)  # their ends poke the loop: stop it after
        await stop_loops(a)
        return second, granted, timed, timed_next

    second, granted, timed, timed_next = asyncio.run(scenario())
    assert (second, granted, timed, timed_next) == (2, True, False, False)
