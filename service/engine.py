"""``EngineReplica``: one model instance = one Serve replica owning a placement group of N workers.

Bundle 0 holds the replica itself (1 CPU); bundle ``i + 1`` holds worker rank ``i`` (1 GPU, or
1 CPU for gloo workers). ``max_ongoing_requests=1``: a replica runs one job at a time, so Serve's
queue length is the real load. A worker that dies or hangs makes the replica unhealthy, and
Serve replaces it (the placement group and the workers go with it).
"""
from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections import OrderedDict
from typing import Any, Optional

import ray
from ray import serve
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from service.config import ServiceSettings
from service.data_dir import data_dir_problem
from service.logs import job_log
from service.worker import GenerationWorker

logger = logging.getLogger("ray.serve")

QUEUE_DEPLOYMENT = "JobQueue"
RANK_GRACE_S = 5.0  # after one rank failed, the others get the process-group timeout plus this
RECENT_OUTCOMES = 64  # final outcomes remembered per replica, so a job dispatched again is not run again
OUTCOME_PUSH_S = 120.0  # how long an outcome push to the JobQueue is retried (it may be restarting)
CLAIM_WAIT_S = 120.0  # how long a job's claim is retried while the JobQueue is unreachable


def engine_bundles(settings: ServiceSettings) -> list[dict[str, float]]:
    """``[{"CPU": 1}] + [{"GPU": 1}] * N`` on GPUs; ``[{"CPU": 1}] * (N + 1)`` on CPU."""
    worker = {"GPU": 1} if settings.use_gpu else {"CPU": 1}
    return [{"CPU": 1}] + [dict(worker) for _ in range(settings.world_size)]


def engine_options(settings: ServiceSettings) -> dict[str, Any]:
    return {
        "name": "EngineReplica",
        "num_replicas": settings.engine_replicas,
        "max_ongoing_requests": 1,
        "ray_actor_options": {"num_cpus": 1},
        "placement_group_bundles": engine_bundles(settings),
        "placement_group_strategy": "STRICT_PACK",
        "health_check_period_s": settings.health_check_period_s,
        "health_check_timeout_s": settings.health_timeout_s + 5,
        "graceful_shutdown_timeout_s": settings.drain_timeout_s,  # Serve waits for the running job
    }


class EngineReplica:
    def __init__(self, args: dict[str, Any]):
        self.settings = ServiceSettings.coerce(args)
        self.broken: Optional[str] = None
        self.busy_job: Optional[str] = None
        self.jobs_done = 0
        # A job can reach this replica twice: its JobQueue replica restarted (or timed out its call)
        # while the first run went on, and then sent it again. The second call returns the first
        # run's outcome instead of running the job again. Crashes are not remembered: a crashed
        # replica is replaced, and the job must run again elsewhere.
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._pushes: set[asyncio.Task] = set()  # outcome pushes under way (held so they are not collected)
        # Outcomes whose push has not got through yet, also sent with every report: a JobQueue replica
        # that restarted meanwhile learns them from the report that tells it this replica is idle,
        # instead of re-queueing the job as if no engine had run it.
        self.unpushed: dict[str, dict[str, Any]] = {}
        self.data_dir_ok = False  # data_dir checked against the JobQueue's (_check_data_dir)
        self._data_dir_check: Optional[asyncio.Task] = None  # the check under way from a health check
        started = time.monotonic()
        context = serve.get_replica_context()
        self.app_name = context.app_name
        self.replica_id = context.replica_id.unique_id
        self.queue = serve.get_deployment_handle(QUEUE_DEPLOYMENT, app_name=self.app_name)
        pg = ray.util.get_current_placement_group()
        if pg is None:
            raise RuntimeError("EngineReplica must run in its placement group (placement_group_bundles)")
        world = self.settings.world_size
        use_gpu = self.settings.use_gpu
        actor = ray.remote(GenerationWorker)
        self.workers = [
            actor.options(
                name=f"wanserve-worker:{self.app_name}:{self.replica_id}:{rank}",
                num_cpus=0 if use_gpu else 1,
                num_gpus=1 if use_gpu else 0,
                max_concurrency=4,  # health() must answer while run() is busy
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank + 1),
            ).remote(rank, world)
            for rank in range(world)
        ]
        timeout = self.settings.worker_init_timeout_s
        master_addr, master_port = ray.get(self.workers[0].rendezvous.remote(), timeout=timeout)
        infos = ray.get([
            w.init.remote(master_addr=master_addr, master_port=master_port, use_gpu=use_gpu,
                          timeout_s=self.settings.nccl_timeout_s, factory=self.settings.generator_factory,
                          config=self.settings.generator_config(),
                          progress_target={"deployment": QUEUE_DEPLOYMENT, "app": self.app_name},
                          log_format=self.settings.log_format,
                          compile_cache_dir=self.settings.resolved_compile_cache_dir)
            for w in self.workers
        ], timeout=timeout)
        self.layout = infos[0].get("layout", "")
        self.compile_cache_dir = infos[0].get("compile_cache_dir")
        self.backend = "nccl" if use_gpu else "gloo"
        self.warmup = self._warm_up()
        self.init_s = time.monotonic() - started
        logger.info("engine replica %s ready: %d %s workers in %.1f s (%s)", self.replica_id, world,
                    self.backend, self.init_s, self.layout)
        self._report({"ready": True})

    def _warm_up(self) -> list[dict[str, Any]]:
        """Run the configured warm-up jobs on all ranks (first compilations happen here, not in a user's
        job); raise if one fails, so that a replica that cannot make these shapes never reports ready."""
        done = []
        with tempfile.TemporaryDirectory(prefix="wanserve-warmup-") as out_dir:
            for fields in self.settings.warmup_requests(out_dir):
                job = {"id": f"{fields['job_id']}-{self.replica_id}", "request": fields, "report_progress": False}
                before = self._compiled()
                started = time.monotonic()
                outcomes = ray.get([w.run.remote(job) for w in self.workers], timeout=self.settings.job_timeout_s)
                failed = [o for o in outcomes if o["status"] != "succeeded"]
                if failed:
                    raise RuntimeError(f"warm-up job {fields['job_id']} ({_shape(fields)}) failed: "
                                       f"{failed[0].get('error') or failed[0]['status']}")
                seconds = time.monotonic() - started
                after = self._compiled()
                compiled = {"compiled_graphs": after["graphs"] - before["graphs"],
                            "from_cache": after["from_cache"] - before["from_cache"]}
                logger.info("engine replica %s warmed up %s in %.1f s (rank 0 compiled %d graphs, %d of them "
                            "loaded from %s)", self.replica_id, _shape(fields), seconds, compiled["compiled_graphs"],
                            compiled["from_cache"], self.compile_cache_dir)
                done.append({**{k: fields.get(k) for k in ("width", "height", "num_frames", "steps")},
                             "seconds": round(seconds, 2), **compiled})
        return done

    def _compiled(self) -> dict[str, int]:
        """Rank 0's compile counters (``wan_model.compile.compile_stats``)."""
        return ray.get(self.workers[0].health.remote(), timeout=self.settings.health_timeout_s)["compiled"]

    # ---------------------------------------------------------------- info

    def _info(self, workers: Optional[list[dict]] = None) -> dict[str, Any]:
        return {
            "replica": self.replica_id, "variant": self.settings.variant_name, "model": self.settings.model,
            "world_size": self.settings.world_size, "gpus": self.settings.gpus, "backend": self.backend,
            "layout": self.layout, "init_s": self.init_s, "warmup": self.warmup, "busy_job": self.busy_job,
            "compile_cache_dir": self.compile_cache_dir,
            "broken": self.broken, "jobs_done": self.jobs_done, "workers": workers or [], "reported_at": time.time(),
            "outcomes": dict(self.unpushed),
        }

    def _report(self, extra: dict[str, Any], workers: Optional[list[dict]] = None) -> None:
        """Tell the queue deployment about this replica (for /models, /readyz, /metrics); best effort."""
        try:
            self.queue.report_engine.remote(self.replica_id, {**self._info(workers), **extra})
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not report engine state: %s", exc)

    # ---------------------------------------------------------------- Serve hooks

    async def _check_data_dir(self) -> None:
        """Mark this replica broken if its node's ``data_dir`` is not the JobQueue's: every job would run
        to its end and then fail for a video the JobQueue cannot see. Checked once it can be."""
        if self.data_dir_ok or self.broken:
            return
        try:
            expected = await asyncio.wait_for(_await_ref(self.queue.data_dir_id.remote()), timeout=10.0)
        except Exception:  # noqa: BLE001 - the JobQueue is not up yet: checked at the next health check or job
            return
        problem = data_dir_problem(self.settings.data_dir, expected, f"engine replica {self.replica_id}")
        if problem:
            logger.error("%s", problem)
            self.broken = problem
        else:
            self.data_dir_ok = True

    async def check_health(self) -> None:
        # The data_dir check asks the JobQueue, which may be slow or restarting: never inside the
        # health check's time limit. A broken verdict shows at the next check.
        if not self.data_dir_ok and (self._data_dir_check is None or self._data_dir_check.done()):
            self._data_dir_check = asyncio.get_running_loop().create_task(self._check_data_dir())
        if self.broken:
            # Tell the queue now: otherwise /readyz and /models count this replica until its report is stale.
            self._report({"ready": False})
            raise RuntimeError(f"engine replica unhealthy: {self.broken}")
        refs = [w.health.remote() for w in self.workers]
        try:
            workers = await asyncio.wait_for(asyncio.gather(*refs), timeout=self.settings.health_timeout_s)
        except asyncio.TimeoutError:
            self.broken = f"a worker did not answer the health check within {self.settings.health_timeout_s} s"
            self._report({"ready": False})
            raise RuntimeError(self.broken) from None
        except Exception as exc:  # noqa: BLE001
            self.broken = f"a worker failed its health check: {type(exc).__name__}: {exc}"
            self._report({"ready": False})
            raise RuntimeError(self.broken) from None
        self._report({"ready": True}, workers)

    async def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run one job on all ranks. Outcome ``status``: succeeded | cancelled | failed (the job's
        fault or a generator error) | crashed (a worker died or hung: run it again) | unavailable |
        superseded (not run: this dispatch is no longer the job's current one, see ``_claim``)."""
        log = job_log(logger, job["id"])  # Serve adds the replica id to JSON records
        if job["id"] in self.recent:
            log.warning("dispatched again after it ran here: returning that run's outcome, not running it twice")
            return {**self.recent[job["id"]], "repeated": True}
        await self._check_data_dir()
        if self.broken:
            log.warning("refused: this replica is broken (%s)", self.broken)
            return {"status": "unavailable", "error": self.broken}
        self.busy_job = job["id"]
        started = time.monotonic()
        ran = False
        try:
            refusal = await self._claim(job)
            if refusal is not None:
                log.warning("not run: %s", refusal)
                return {"status": "superseded", "error": refusal}
            ran = True
            log.info("started on %d ranks of replica %s", self.settings.world_size, self.replica_id)
            try:
                outcome = await self._run_on_all_ranks(job)
            except asyncio.CancelledError:
                # The JobQueue gave up on this call, but the ranks still run the job: a next job on them
                # would share their process group. Retire this replica (and its workers) instead.
                self.broken = f"job {job['id']} was abandoned by the JobQueue while its ranks ran it"
                log.warning("cancelled while running: %s; the replica retires", self.broken)
                self._report({"ready": False})
                raise
            duration_s = time.monotonic() - started
            log.log(logging.INFO if outcome["status"] in ("succeeded", "cancelled") else logging.WARNING,
                    "%s in %.1f s%s", outcome["status"], duration_s,
                    f": {outcome['error']}" if outcome.get("error") else "",
                    extra={"status": outcome["status"], "duration_s": duration_s})
            if outcome["status"] in ("succeeded", "cancelled", "failed"):
                self.recent[job["id"]] = outcome
                while len(self.recent) > RECENT_OUTCOMES:
                    self.recent.popitem(last=False)
            # Also pushed: if the JobQueue replica that sent the job has restarted meanwhile, this call's
            # return value goes nowhere, and its successor learns the outcome only from the push.
            pushed = {**outcome, "attempt": job.get("attempt")}
            self.unpushed[job["id"]] = pushed
            self._pushes.add(asyncio.get_running_loop().create_task(self._push_outcome(job["id"], pushed)))
            return outcome
        finally:
            self.busy_job = None
            self.jobs_done += ran

    async def _claim(self, job: dict[str, Any]) -> Optional[str]:
        """Ask the JobQueue whether this dispatch of the job is still the current one; None = run it.

        A job can wait in this replica's Serve queue while the JobQueue replica that sent it dies, and
        its successor may meanwhile have sent the job to another engine replica (a later attempt).
        The claim fences that off. While the JobQueue is unreachable the claim is retried, and
        ``busy_job`` already names the job, so a restarting JobQueue adopts it from this replica's
        report rather than sending it elsewhere.
        """
        if "attempt" not in job:
            return None  # a caller that does not number its dispatches
        try:
            granted = await self._call_queue(
                lambda: self.queue.claim.remote(job["id"], job["attempt"], self.replica_id, time.time()), CLAIM_WAIT_S)
        except Exception as exc:  # noqa: BLE001
            return f"the JobQueue could not be reached for {CLAIM_WAIT_S:.0f} s to claim the job ({exc})"
        if not granted:
            return (f"dispatch {job['attempt']} is no longer the job's current one (it was re-queued, "
                    "sent elsewhere, cancelled or ended)")
        return None

    async def _push_outcome(self, job_id: str, outcome: dict[str, Any]) -> None:
        """Send a job's outcome to the JobQueue deployment (``report_outcome``), retrying while it is down."""
        try:
            await self._call_queue(lambda: self.queue.report_outcome.remote(job_id, outcome), OUTCOME_PUSH_S)
        except Exception as exc:  # noqa: BLE001
            job_log(logger, job_id).warning("could not push the outcome to the JobQueue: %s", exc)
        finally:
            self.unpushed.pop(job_id, None)
            self._pushes.discard(asyncio.current_task())

    @staticmethod
    async def _call_queue(call: Any, wait_s: float) -> Any:
        """``await call()`` (a JobQueue method's ``.remote``), retried with back-off while the JobQueue
        replica is unreachable (it may be restarting); after ``wait_s`` the last error is raised."""
        deadline = time.monotonic() + wait_s
        delay = 0.5
        while True:
            try:
                return await asyncio.wait_for(_await_ref(call()), timeout=10.0)
            except Exception:  # noqa: BLE001 - the queue replica is restarting: try again
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(2 * delay, 10.0)

    async def _run_on_all_ranks(self, job: dict[str, Any]) -> dict[str, Any]:
        futures = {asyncio.ensure_future(_await_ref(w.run.remote(job))): rank for rank, w in enumerate(self.workers)}
        outcomes: dict[int, dict] = {}
        deadline = time.monotonic() + self.settings.job_timeout_s
        pending = set(futures)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()),
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                stuck = sorted(futures[f] for f in pending)
                failed = _failures(outcomes)
                if failed:
                    # A rank failed (e.g. its collective timed out) and the others are wedged.
                    self.broken = (f"generator error: {failed[0]['error']}; rank(s) {stuck} still had not "
                                   f"finished {self.settings.nccl_timeout_s + RANK_GRACE_S:.0f} s later")
                    return {"status": "failed", "error": self.broken}
                self.broken = f"job {job['id']} did not finish within {self.settings.job_timeout_s} s"
                return {"status": "failed", "error": self.broken}
            for fut in done:
                rank = futures[fut]
                try:
                    outcomes[rank] = fut.result()
                except Exception as exc:  # noqa: BLE001 - the actor died (ray.kill, OOM, segfault)
                    for other in pending:
                        other.cancel()
                    failed = _failures(outcomes)
                    if failed:
                        # Another rank failed first, and this one died waiting in a collective (NCCL's
                        # watchdog ends the process): the job's failure is the first rank's, and running
                        # it again would fail the same way.
                        self.broken = (f"generator error: {failed[0]['error']}; then worker rank {rank} "
                                       f"died ({type(exc).__name__})")
                        logger.error("%s: %s", self.broken, exc)
                        return {"status": "failed", "error": failed[0]["error"]}
                    self.broken = f"worker rank {rank} died during job {job['id']}: {type(exc).__name__}"
                    logger.error("%s: %s", self.broken, exc)
                    return {"status": "crashed", "error": self.broken}
                if outcomes[rank]["status"] == "failed":
                    # The other ranks reach a collective that times out within nccl_timeout_s; a rank
                    # stuck outside any collective must not hold the job until job_timeout_s.
                    deadline = min(deadline, time.monotonic() + self.settings.nccl_timeout_s + RANK_GRACE_S)
        failed = _failures(outcomes)
        if failed:
            if any(o.get("fatal") for o in failed):
                # An unexpected exception can leave the process group out of step: start afresh.
                self.broken = f"generator error: {failed[0]['error']}"
            return {"status": "failed", "error": failed[0]["error"]}
        if any(o["status"] == "cancelled" for o in outcomes.values()):
            return {"status": "cancelled"}
        return {"status": "succeeded", "result": outcomes[0].get("result")}

    def __del__(self) -> None:
        for w in getattr(self, "workers", []):
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001
                pass


def _failures(outcomes: dict[int, dict]) -> list[dict]:
    """The failed ranks' outcomes, lowest rank first."""
    return [o for _, o in sorted(outcomes.items()) if o["status"] == "failed"]


def _shape(fields: dict[str, Any]) -> str:
    return "x".join(str(fields.get(k, "default")) for k in ("width", "height", "num_frames")) + f", {fields['steps']} steps"


async def _await_ref(ref: Any) -> Any:
    """Await a Ray ``ObjectRef`` or a Serve ``DeploymentResponse`` (for ``asyncio.wait``/``wait_for``)."""
    return await ref
