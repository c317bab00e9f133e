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
from service_helpers import FakeEngine, make_settings


def service(tmp_path, engine_replicas: int = 2, left_running: int = 0,
            claimed: bool = True) -> tuple[JobQueueService, FakeEngine, list[str]]:
    """A JobQueue replica starting on a store where a previous replica marked ``left_running`` jobs
    running (``claimed``: and engines claimed them) and then died (the store closed); returns it,
    its fake engine, and those job ids."""
    settings = make_settings(tmp_path, engine_replicas=engine_replicas)
    q = JobQueue(settings.db_path, max_size=settings.queue_size, max_attempts=settings.max_attempts)
    ids = []
    for i in range(left_running):
        job, _ = q.submit({"prompt": f"p{i}", "seed": i})
        q.mark_running(job["id"])
        if claimed:
            assert q.claim(job["id"], 1)
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


# ---- claims: an engine replica asks before it starts a dispatch ------------------------------------

def test_a_claim_is_granted_only_for_the_current_dispatch(tmp_path):
    svc, _, _ = service(tmp_path)
    job_id = svc.queue.submit({"prompt": "p", "seed": 1})[0]["id"]

    async def scenario():
        assert await svc.claim(job_id, 1, "A") is False  # queued: nothing dispatched yet
        svc.queue.mark_running(job_id)  # dispatch 1
        assert await svc.claim(job_id, 1, "A") is True
        svc.queue.requeue(job_id, "engine lost")
        assert await svc.claim(job_id, 1, "A") is False  # re-queued since
        svc.queue.mark_running(job_id)  # dispatch 2, to another engine
        assert await svc.claim(job_id, 1, "A") is False and await svc.claim(job_id, 2, "B") is True
        svc.queue.finish(job_id, "cancelled", error="cancelled while running")
        return await svc.claim(job_id, 2, "B")

    assert asyncio.run(scenario()) is False
    assert svc.adopted == {}  # jobs this replica dispatched are not adoptions


def test_an_orphan_claimed_by_an_engine_is_adopted_and_not_requeued_on_an_older_report(tmp_path):
    """The dispatch waited in engine A's Serve queue while the JobQueue restarted: A reported idle,
    then claimed it. The idle report may arrive after the claim; it must not re-queue the job."""
    svc, engine, (job_id,) = service(tmp_path, engine_replicas=2, left_running=1)
    t0 = time.time()

    async def scenario():
        assert await svc.claim(job_id, 1, "A", claimed_at=t0) is True
        assert job_id in svc.adopted and job_id not in svc.orphans
        await svc.report_engine("B", {"ready": True, "busy_job": None, "reported_at": t0})
        await svc.report_engine("A", {"ready": True, "busy_job": None, "reported_at": t0 - 1})  # made before
        svc._settle_orphans()
        assert svc.queue.get(job_id)["status"] == "running" and svc.adopted[job_id]["ended_at"] is None
        await svc.report_engine("A", {"ready": True, "busy_job": job_id, "reported_at": t0 + 1})
        assert await svc.report_outcome(job_id, {"status": "failed", "error": "x"}) is True
        return svc.queue.get(job_id)

    job = asyncio.run(scenario())
    assert job["status"] == "failed" and job["attempts"] == 1 and engine.sent == []


def test_an_orphan_requeued_before_its_claim_is_refused_there(tmp_path):
    svc, _, (job_id,) = service(tmp_path, engine_replicas=1, left_running=1)

    async def scenario():
        await svc.report_engine("A", {"ready": True, "busy_job": None})
        svc._settle_orphans()  # every engine reported, none holds it: re-queued
        assert svc.queue.get(job_id)["status"] == "queued"
        return await svc.claim(job_id, 1, "A")

    assert asyncio.run(scenario()) is False


def test_an_orphan_no_engine_claimed_is_not_counted_and_its_dispatch_stays_refused(tmp_path):
    """The JobQueue died while its dispatch waited in an engine's Serve queue: the job did not run, so
    the attempt does not count; and the waiting dispatch, taken up after the job has been dispatched
    again, must not run it a second time."""
    svc, engine, (job_id,) = service(tmp_path, engine_replicas=1, left_running=1, claimed=False)

    async def scenario():
        await svc.report_engine("A", {"ready": True, "busy_job": None})
        svc._settle_orphans()
        requeued = svc.queue.get(job_id)
        again = svc.queue.mark_running(job_id)  # the next dispatch
        return requeued, again, await svc.claim(job_id, 1, "A"), await svc.claim(job_id, again["dispatch"], "A")

    requeued, again, stale_claim, claim = asyncio.run(scenario())
    assert (requeued["status"], requeued["attempts"]) == ("queued", 0)
    assert "before an engine replica started the job" in requeued["error"]
    assert (again["attempts"], again["dispatch"]) == (1, 2)
    assert stale_claim is False and claim is True


def test_a_superseded_outcome_of_an_old_dispatch_leaves_the_job_as_it_is(tmp_path):
    svc, _, _ = service(tmp_path)
    job_id = svc.queue.submit({"prompt": "p", "seed": 1})[0]["id"]
    svc.queue.mark_running(job_id)
    svc.queue.requeue(job_id, "replica died")
    before = svc.queue.mark_running(job_id)  # attempt 2 now runs elsewhere
    svc._apply_outcome(job_id, {"status": "superseded", "error": "attempt 1 is no longer current"}, 1)
    svc._apply_outcome(job_id, {"status": "superseded", "error": "pushed, of no dispatch of ours"})
    after = svc.queue.get(job_id)
    assert (after["status"], after["attempts"], after["error"]) == ("running", 2, before["error"])


def test_a_dispatch_whose_engine_could_not_claim_it_is_queued_again(tmp_path):
    """The engine could not reach this JobQueue to claim the dispatch and did not run it, while the
    dispatch is still the job's current one: no one runs the job, so it must not stay running."""
    svc, engine, _ = service(tmp_path)
    job_id = svc.queue.submit({"prompt": "p", "seed": 1})[0]["id"]
    job = svc.queue.mark_running(job_id)

    async def unclaimed(engine_job: dict) -> dict:
        engine.sent.append(engine_job["id"])
        return {"status": "superseded", "error": "the JobQueue could not be reached for 120 s to claim the job"}

    svc._call_engine = unclaimed

    async def scenario():
        svc.inflight[job_id] = asyncio.current_task()
        await svc._run(job)
        return svc.queue.get(job_id)  # before the dispatcher, woken, sends it out again

    after = asyncio.run(scenario())
    assert engine.sent == [job_id]
    # queued again, and the attempt the engine never started is not counted
    assert (after["status"], after["attempts"]) == ("queued", 0) and "could not be reached" in after["error"]


@pytest.mark.parametrize("problem, status", [
    (OSError(28, "No space left on device"), "queued"),  # the volume may recover: tried again
    (ValueError("unknown LoRA 'gone'; available: none"), "failed"),  # it will not
])
def test_a_job_that_cannot_be_prepared_is_tried_again_only_when_the_cause_may_pass(tmp_path, monkeypatch,
                                                                                     problem, status):
    import service.dispatcher as dispatcher

    monkeypatch.setattr(dispatcher, "PREPARE_RETRY_S", 0.0)
    svc, engine, _ = service(tmp_path)
    job_id = svc.queue.submit({"prompt": "p", "seed": 1})[0]["id"]
    job = svc.queue.mark_running(job_id)

    def cannot_prepare(_job: dict) -> dict:
        raise problem

    svc._engine_job = cannot_prepare

    async def scenario():
        svc.inflight[job_id] = asyncio.current_task()
        await svc._run(job)
        return svc.queue.get(job_id)

    after = asyncio.run(scenario())
    assert engine.sent == [] and after["status"] == status and "cannot prepare job" in after["error"]
    assert after["attempts"] == 1  # the try counts: a volume that stays full fails the job after max_attempts


class FakeQueueHandle:
    """The JobQueue handle an engine replica holds: ``claim`` answers from a script, the first
    ``unreachable`` calls fail as while the JobQueue replica restarts."""

    def __init__(self, grant: bool, unreachable: int = 0, store_id: str | None = None) -> None:
        self.grant, self.unreachable, self.claims, self.outcomes = grant, unreachable, [], []
        self.store_id = store_id  # None: the id of the engine's own data_dir (one shared volume)
        self.claim = _Remote(self._claim)
        self.report_outcome = _Remote(self._report_outcome)
        self.data_dir_id = _Remote(self._data_dir_id)
        self.reports = []
        self.report_engine = _Remote(lambda replica_id, info: self.reports.append(info))

    async def _data_dir_id(self):
        return self.store_id

    async def _claim(self, job_id, attempt, replica_id, claimed_at):
        self.claims.append((job_id, attempt, replica_id))
        if self.unreachable:
            self.unreachable -= 1
            raise ConnectionError("JobQueue replica restarting")
        return self.grant

    async def _report_outcome(self, job_id, outcome):
        self.outcomes.append((job_id, outcome["status"]))
        return True


class _Remote:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


def engine_replica(tmp_path, queue: FakeQueueHandle):
    """An ``EngineReplica`` without Ray: its ranks are a stub that records the jobs they run."""
    from collections import OrderedDict

    from service.engine import EngineReplica

    from service.data_dir import ensure_store_id

    replica = object.__new__(EngineReplica)
    replica.settings, replica.queue, replica.replica_id = make_settings(tmp_path), queue, "A"
    if queue.store_id is None:
        queue.store_id = ensure_store_id(replica.settings.data_dir)
    replica.data_dir_ok, replica._data_dir_check = False, None
    replica.broken, replica.busy_job, replica.jobs_done = None, None, 0
    replica.recent, replica._pushes, replica.unpushed, replica.ran = OrderedDict(), set(), {}, []

    async def run_on_all_ranks(job):
        replica.ran.append((job["id"], replica.busy_job))
        return {"status": "succeeded", "result": {}}

    replica._run_on_all_ranks = run_on_all_ranks
    return replica


@pytest.mark.parametrize("grant", [True, False])
def test_an_engine_runs_a_dispatch_only_when_its_claim_is_granted(tmp_path, monkeypatch, grant):
    import service.engine as engine_module

    monkeypatch.setattr(engine_module.asyncio, "sleep", _no_wait)
    queue = FakeQueueHandle(grant=grant, unreachable=2)  # the first two claims find no JobQueue
    replica = engine_replica(tmp_path, queue)

    async def scenario():
        outcome = await replica.run({"id": "j1", "attempt": 3, "request": {}})
        await asyncio.gather(*replica._pushes)
        return outcome

    outcome = asyncio.run(scenario())
    assert queue.claims == [("j1", 3, "A")] * 3 and replica.busy_job is None
    if grant:
        assert outcome["status"] == "succeeded" and replica.ran == [("j1", "j1")] and replica.jobs_done == 1
        assert queue.outcomes == [("j1", "succeeded")]
    else:
        assert outcome["status"] == "superseded" and "dispatch 3 is no longer" in outcome["error"]
        assert replica.ran == [] and replica.jobs_done == 0 and queue.outcomes == []  # nothing pushed


async def _no_wait(_delay):
    return None


def test_an_engine_whose_running_call_is_cancelled_retires(tmp_path):
    """The JobQueue gave up on a call (its time limit) while the ranks ran the job: they may still be
    running it, so the replica must not take another job on them; it reports itself broken."""
    replica = engine_replica(tmp_path, FakeQueueHandle(grant=True))
    started = asyncio.Event()

    async def runs_long(job):
        started.set()
        await asyncio.sleep(3600)

    replica._run_on_all_ranks = runs_long

    async def scenario():
        call = asyncio.ensure_future(replica.run({"id": "j1", "attempt": 1, "request": {}}))
        await asyncio.wait_for(started.wait(), 5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        return await replica.run({"id": "j2", "attempt": 1, "request": {}})

    next_outcome = asyncio.run(scenario())
    assert replica.broken and "abandoned" in replica.broken and replica.busy_job is None
    assert next_outcome["status"] == "unavailable"  # the next job goes to another replica


@pytest.mark.parametrize("attempt, recorded", [(1, True), (2, False)])
def test_an_outcome_carried_by_an_engine_report_settles_an_orphan(tmp_path, attempt, recorded):
    """The engine finished the job while the JobQueue was down, and its push has not got through yet:
    the report that says it is idle carries the outcome, so the job is not re-queued and run again.
    An outcome of another attempt than the job's current one is not taken."""
    svc, _, (job_id,) = service(tmp_path, engine_replicas=2, left_running=1)

    async def scenario():
        outcome = {"status": "failed", "error": "out of memory", "attempt": attempt}
        await svc.report_engine("A", {"ready": True, "busy_job": None, "outcomes": {job_id: outcome}})
        await svc.report_engine("B", {"ready": True, "busy_job": None, "outcomes": {}})
        svc._settle_orphans()
        return svc.queue.get(job_id)

    job = asyncio.run(scenario())
    if recorded:
        assert job["status"] == "failed" and job["error"] == "out of memory" and job["attempts"] == 1
    else:
        assert job["status"] == "queued" and "no engine replica was running it" in job["error"]


def test_an_engine_reports_an_outcome_until_its_push_gets_through(tmp_path):
    queue = FakeQueueHandle(grant=True)
    replica = engine_replica(tmp_path, queue)
    replica.layout = replica.init_s = replica.warmup = replica.compile_cache_dir = replica.backend = None
    replica.settings = make_settings(tmp_path, variant="tiny-t2v")
    release = asyncio.Event()
    pushed = queue._report_outcome

    async def slow_push(job_id, outcome):
        await release.wait()
        return await pushed(job_id, outcome)

    queue.report_outcome = _Remote(slow_push)

    async def scenario():
        await replica.run({"id": "j1", "attempt": 2, "request": {}})
        while_pushing = replica._info()["outcomes"]
        release.set()
        await asyncio.gather(*replica._pushes)
        return while_pushing, replica._info()["outcomes"]

    while_pushing, after = asyncio.run(scenario())
    assert while_pushing == {"j1": {"status": "succeeded", "result": {}, "attempt": 2}}
    assert after == {} and queue.outcomes == [("j1", "succeeded")]


class _Worker:
    def __init__(self, outcome=None, dies_after_s=None):
        self.outcome, self.dies_after_s = outcome, dies_after_s
        self.run = _Remote(self._run)

    async def _run(self, job):
        if self.dies_after_s is not None:
            await asyncio.sleep(self.dies_after_s)
            raise RuntimeError("The actor died unexpectedly before finishing this task.")
        return self.outcome


@pytest.mark.parametrize("rank0_fails_first, status", [(True, "failed"), (False, "crashed")])
def test_a_rank_that_dies_after_another_failed_does_not_make_the_job_run_again(tmp_path, rank0_fails_first, status):
    """With NCCL, a rank left waiting in a collective after rank 0 failed is ended by the watchdog. The
    job failed (it would fail again): it is not a crash to run again. A death on its own still is."""
    replica = engine_replica(tmp_path, FakeQueueHandle(grant=True))
    del replica._run_on_all_ranks  # the real one, over stub workers
    first = {"status": "failed", "rank": 0, "error": "OutOfMemoryError: CUDA out of memory", "fatal": True}
    rank0 = _Worker(first) if rank0_fails_first else _Worker(dies_after_s=0.3)
    replica.workers = [rank0, _Worker(dies_after_s=0.1 if not rank0_fails_first else 0.3)]
    try:
        outcome = asyncio.run(replica._run_on_all_ranks({"id": "j1", "attempt": 1, "request": {}}))
    finally:
        replica.workers = []  # its __del__ would ray.kill them (and start Ray to do it)
    assert outcome["status"] == status and replica.broken
    if status == "failed":
        assert outcome["error"] == first["error"] and "then worker rank 1 died" in replica.broken


def test_an_engine_that_does_not_see_the_jobqueues_data_dir_refuses_jobs(tmp_path):
    """On several nodes data_dir must be one shared volume. A node-local path let every job run to its
    end and then fail for "no video"; the engine now compares store ids first and takes no job."""
    queue = FakeQueueHandle(grant=True, store_id="the JobQueue's store on another node")
    replica = engine_replica(tmp_path, queue)
    outcome = asyncio.run(replica.run({"id": "j1", "attempt": 1, "request": {}}))
    assert outcome["status"] == "unavailable" and "is not the JobQueue's" in outcome["error"]
    assert "every node mounts at the same path" in replica.broken
    assert replica.ran == [] and queue.claims == []  # not even claimed: the job waits for a usable replica
    with pytest.raises(RuntimeError, match="is not the JobQueue's"):
        asyncio.run(replica.check_health())  # so Serve replaces it, and /readyz says why


def test_the_data_dir_check_never_holds_up_a_health_check(tmp_path):
    """The JobQueue may be slow to answer (starting, draining): the health check must not wait for it,
    or Serve kills a healthy replica whose check ran past health_check_timeout_s."""
    queue = FakeQueueHandle(grant=True, store_id="another node's store")
    answered = asyncio.Event()

    async def slow_id():
        await answered.wait()
        return queue.store_id

    queue.data_dir_id = _Remote(slow_id)
    replica = engine_replica(tmp_path, queue)
    replica.workers = []

    async def scenario():
        await asyncio.wait_for(replica.check_health(), 1.0)  # returns although the JobQueue has not answered
        assert replica.broken is None
        answered.set()
        await asyncio.wait_for(replica._data_dir_check, 1.0)
        with pytest.raises(RuntimeError, match="is not the JobQueue's"):
            await replica.check_health()

    try:
        asyncio.run(scenario())
    finally:
        replica.workers = []


def test_data_dir_ids_agree_between_processes_racing_to_make_one(tmp_path):
    import multiprocessing

    from service.data_dir import data_dir_problem, ensure_store_id, read_store_id

    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        ids = pool.map(ensure_store_id, [str(tmp_path)] * 8)
    assert len(set(ids)) == 1 and read_store_id(tmp_path) == ids[0] == ensure_store_id(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store-id"]  # no temp file left
    assert data_dir_problem(tmp_path, ids[0], "x") is None
    assert "(it holds another job store)" in data_dir_problem(tmp_path, "some other id", "x")
    assert "(it holds no job store)" in data_dir_problem(tmp_path / "elsewhere", ids[0], "x")


def test_the_engine_job_carries_the_input_image_read_from_its_own_column(tmp_path):
    import base64

    svc, _, _ = service(tmp_path)
    image = bytes(range(256)) * 10
    job = svc.queue.submit({"prompt": "p", "seed": 1, "image": base64.b64encode(image).decode()})[0]
    assert "image" not in job["request"]
    assert svc._engine_job(svc.queue.mark_running(job["id"]))["request"]["image"] == image
    svc.queue.finish(job["id"], "succeeded", result={})
    svc.queue.mark_files_deleted(job["id"], "expired")  # the image goes with the files: no run can be prepared
    with pytest.raises(ValueError, match="no longer stored"):
        svc._engine_job(svc.queue.get(job["id"]))
