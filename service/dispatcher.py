"""``JobQueueService``: the Serve deployment around ``JobQueue`` (one replica: the single writer).

It records jobs for the ingress, takes progress from the engines' rank 0, and dispatches queued
jobs to engine replicas in FIFO order, at most one per engine replica at a time, so that a job
waits in the durable queue (cancellable, survives restarts) rather than in Serve's memory.

A JobQueue replica can restart while engine replicas go on running the jobs it dispatched. The new
replica finds those jobs ``running`` in SQLite, and it must not send them out again, because another
engine replica would then run them a second time. So it holds them as *orphans* until each engine
replica has reported (engines report the job they are busy with at start-up and at every health
check):
- a job that an engine reports busy with, or claims, is *adopted*: it stays running, and the engine
  pushes its outcome when it ends (``report_outcome``);
- a job that no engine holds is re-queued, as is one whose engine is lost or ends it without an
  outcome.
The jobs this replica dispatched itself get their outcome as the engine call's return value.

Every dispatch is numbered (the job's ``dispatch``: its attempts and the dispatches not counted as
one, so that no number is given twice), and an engine replica claims its dispatch
before it starts the job (``claim``). A dispatch that waited in an engine replica's Serve queue
while its JobQueue replica died, and whose job has since been re-queued or sent elsewhere, is
refused there, so it does not run a second time.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from service.config import ServiceSettings
from service.data_dir import ensure_store_id
from service.logs import job_log
from service.lora import resolve_lora
from service.outcomes import record_outcome
from service.queue import FAILED, RUNNING, TERMINAL, IdempotencyKeyReused, JobQueue, QueueFull
from service.retention import ResultRetention
from service.store_journal import choose_journal
from service.webhooks import WebhookSender

logger = logging.getLogger("ray.serve")

DRAIN_MARGIN_S = 30.0  # the JobQueue's own shutdown budget beyond the engines' drain_timeout_s
DISPATCH_LEASE_MIN_S = 10.0  # the dispatch lease's length, at least (2 health periods if longer)
ENGINE_STALE_S = 120.0  # an engine report older than this no longer counts as ready
# A dispatched job may wait in Serve's queue (behind another job, or for a replica to load) for up to
# job_timeout_s + worker_init_timeout_s + this; once an engine has claimed it, the engine's own limit
# (job_timeout_s, then nccl_timeout_s for wedged ranks) plus this. Past either, the call is given up.
DISPATCH_MARGIN_S = 60.0
ORPHAN_GRACE_PERIODS = 3  # health periods an orphaned job waits for an engine to claim it (if not all report)
PREPARE_RETRY_S = 2.0  # a job whose folder or stored image could not be read waits this long before its next try


def _serve_app_name() -> Optional[str]:
    """The Serve application this replica belongs to (its ``name:`` in a Serve config), or None outside
    Serve. Not the ``app_name`` setting: under ``serve deploy`` that is left at its default."""
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - not in a Serve replica (tests build this class directly)
        return None


class DispatchGivenUp(Exception):
    """A dispatch no engine started within the waiting limit: the job is already re-queued (``job``)."""

    def __init__(self, message: str, job: dict[str, Any]):
        super().__init__(message)
        self.job = job


class JobQueueService:
    def __init__(self, args: dict[str, Any], engine: Any):
        self.settings = ServiceSettings.coerce(args)
        self.engine = engine
        journal, why = choose_journal(self.settings.store_journal, Path(self.settings.data_dir))
        self.queue = JobQueue(self.settings.db_path, max_size=self.settings.queue_size,
                              max_attempts=self.settings.max_attempts,
                              max_per_owner=self.settings.max_jobs_per_client, journal=journal)
        logger.info("job store %s: journal %s (%s)", self.settings.db_path, self.queue.journal_mode, why)
        self.queue.claim_for_app(_serve_app_name() or self.settings.app_name)
        self.settings.results_dir.mkdir(parents=True, exist_ok=True)
        self.store_id = ensure_store_id(self.settings.data_dir)  # checked by the engines and the Ingress
        self.retention = ResultRetention(self.queue, self.settings)
        self.webhooks = WebhookSender(self.queue, self.settings)
        self.engines: dict[str, dict[str, Any]] = {}
        # Jobs a previous JobQueue replica left running: job id -> when to stop waiting for an engine
        # to claim it (monotonic clock).
        grace = self._orphan_grace_s
        self.orphans: dict[str, float] = {job_id: time.monotonic() + grace for job_id in self.queue.running_ids()}
        # job id -> {"replica", "since": adopted at (wall clock), "ended_at": first later report not busy with it}
        self.adopted: dict[str, dict[str, Any]] = {}
        self.reported: set[str] = set()  # engine replicas heard from since this replica took the lease
        for job_id in self.orphans:
            job_log(logger, job_id).warning("was running when the JobQueue replica started: waiting for an "
                                            "engine replica to claim it (at most %.0f s)", grace)
        self.inflight: dict[str, asyncio.Task] = {}
        self.sent_dispatch: dict[str, int] = {}  # job id -> the dispatch number this replica sent (its in-flight run)
        self.claimed_at: dict[str, float] = {}  # job id -> when its engine claimed this replica's dispatch (monotonic)
        # Only the holder of the store's dispatch lease dispatches and re-queues (JobQueue.acquire_lease);
        # another replica on the same store stands by, and still records what engines report.
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lease_s = max(DISPATCH_LEASE_MIN_S, 2 * self.settings.health_check_period_s)
        self._leading = False
        self._lease_until = 0.0  # wall clock
        self._standing_by_for: Optional[str] = None
        self._draining = False  # shutting down: dispatch nothing more
        self._stopped = False  # shut down: the loop ends and takes the lease no more
        self._wake: Optional[asyncio.Event] = None
        self._loop_task: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._ensure_dispatcher()

    # ---------------------------------------------------------------- dispatch loop

    def _ensure_dispatcher(self) -> None:
        if self._draining:
            return  # shutting down: the loop stays stopped
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not on the event loop yet; the first async call starts it
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = loop.create_task(self._dispatch_loop())
            self._loop = loop

    def _poke(self) -> None:
        self._ensure_dispatcher()
        if self._wake is not None:
            self._wake.set()

    async def _dispatch_loop(self) -> None:
        while not self._stopped:
            try:
                leading = self._hold_lease()
                if leading:
                    self._settle_orphans()
                    await self.retention.sweep()
                    self.webhooks.send_due()
                busy = len(self.inflight) + len(self.orphans) + len(self.adopted)
                if leading and not self._draining and busy < self.settings.engine_replicas:
                    job = self.queue.next_queued()
                    if job is not None:
                        job = self.queue.mark_running(job["id"])
                        if job is not None:
                            job_log(logger, job["id"]).info("dispatched (attempt %d, dispatch %d)", job["attempts"],
                                                            job["dispatch"], extra={"attempt": job["attempts"]})
                            self._start_run(job)
                            continue
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=0.5)
                except asyncio.TimeoutError:
                    pass
            except Exception:  # noqa: BLE001 - the loop must survive anything
                logger.exception("dispatch loop error")
                await asyncio.sleep(1.0)

    def _hold_lease(self) -> bool:
        """Whether this replica may dispatch now: take or renew the store's dispatch lease (renewed
        when half of it is left). Taking it over resynchronises the orphans with the store."""
        if self._leading and self._lease_until - time.time() > self._lease_s / 2:
            return True
        held, holder, expires_at = self.queue.acquire_lease(self.holder, self._lease_s)
        if held and not self._leading:
            self._resync_orphans()
            self.queue.move_images_out()  # those submitted here while another replica dispatched (submit)
            logger.info("JobQueue %s holds the dispatch lease: dispatching", self.holder)
        elif not held and holder != self._standing_by_for:
            logger.warning("JobQueue %s holds the dispatch lease of this store (until %s): %s stands by, and "
                           "takes over if it lapses", holder, time.strftime("%H:%M:%S", time.localtime(expires_at)),
                           self.holder)
        self._leading, self._lease_until = held, (expires_at if held else 0.0)
        self._standing_by_for = None if held else holder
        return held

    def _resync_orphans(self) -> None:
        """On taking the lease: the jobs running in the store that this replica neither dispatched nor
        adopted are orphans, each with a fresh grace for an engine replica to claim it. Jobs that have
        ended since (another replica held the lease) are no longer orphans."""
        deadline = time.monotonic() + self._orphan_grace_s
        # Reports heard while standing by may predate a claim granted since (by this replica or the
        # one that led): the orphans wait for each engine's next report, which names the job it runs.
        self.reported = set()
        for job_id, adoption in list(self.adopted.items()):  # ended, or sent again by another replica since
            job = self.queue.get(job_id) or {}
            if job.get("status") != RUNNING or job.get("dispatch") != adoption["dispatch"]:
                del self.adopted[job_id]
        running = self.queue.running_ids()
        self.orphans = {job_id: max(self.orphans.get(job_id, 0.0), deadline) for job_id in running
                        if job_id not in self.inflight and job_id not in self.adopted}

    def __del__(self):
        # Serve calls this on a graceful shutdown, on the loop the dispatcher runs on, and awaits a
        # coroutine it returns. Python's own collection of the object (tests) happens elsewhere:
        # then only the lease is handed on.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or loop is not getattr(self, "_loop", None):
            if hasattr(self, "_leading"):
                self.release_lease()
            return None
        return self.shut_down()

    async def shut_down(self) -> None:
        """Serve's graceful shutdown (a redeploy, ``serve shutdown``): dispatch nothing more, re-queue
        the dispatches no engine has started, wait for the jobs engines run (they drain them for
        ``drain_timeout_s``) and record their outcomes, then hand the dispatch lease on."""
        self._draining = True
        # A dispatch no engine has claimed yet waits in Serve's queue (behind a job, or for a replica
        # to start): no engine will take it up before this application goes, so it goes back to the
        # queue now, uncounted, for the next JobQueue to send. Once re-queued its claim is refused.
        for job_id, task in list(self.inflight.items()):
            if job_id not in self.claimed_at and not task.done():
                sent = self.sent_dispatch.get(job_id)
                # Only the dispatch this replica sent, and only while no engine has claimed it (in
                # the store: the claim may reach another JobQueue replica).
                requeued = self.queue.requeue(job_id, "this JobQueue shut down before an engine started it",
                                              count_attempt=False, attempt=sent, only_if_unclaimed=True)
                if self._claimed_in_store(job_id, sent):  # its claim reached another JobQueue replica:
                    continue  # wait for it like the others
                task.cancel()  # and with it the engine call
                job_log(logger, job_id).info("shutting down: not started by an engine; job is %s",
                                             requeued["status"], extra={"status": requeued["status"]})
        pending = [task for job_id, task in self.inflight.items() if not task.done() and job_id in self.claimed_at]
        if pending:
            logger.info("shutting down: waiting up to %.0f s for %d running job(s) to end",
                        self.settings.drain_timeout_s, len(pending))
            await asyncio.wait(pending, timeout=self.settings.drain_timeout_s + DRAIN_MARGIN_S / 2)
        if self._leading:  # the outcomes just recorded owe their webhooks; what is not sent now waits in the store
            self.webhooks.send_due()
            await self.webhooks.drain(min(self.settings.webhook_timeout_s, DRAIN_MARGIN_S / 3))
        self._stopped = True  # or the loop would take the lease again once it is released
        if self._loop_task is not None:
            self._loop_task.cancel()
        self.release_lease()

    def _claimed_in_store(self, job_id: str, dispatch: Optional[int]) -> bool:
        """Whether an engine claimed ``dispatch`` of the job, through any JobQueue replica (then the
        claim time is noted here, as if it had come to this one)."""
        job = self.queue.get(job_id) or {}
        if dispatch is None or job.get("status") != RUNNING or job.get("dispatch") != dispatch \
                or job.get("claimed_at") is None:
            return False
        # The store's wall clock is that of the replica that granted the claim, maybe on another host:
        # a clock behind this one's shortens the running limit (minutes) by the difference.
        if job_id not in self.claimed_at:  # wall clock of the store -> this replica's monotonic clock
            self.claimed_at[job_id] = time.monotonic() - max(0.0, time.time() - job["claimed_at"])
        return True

    def release_lease(self) -> None:
        """Hand the dispatch lease on at once, so that a successor need not wait for it to lapse."""
        try:
            if self._leading:
                self.queue.release_lease(self.holder)
                self._leading = False
        except Exception:  # noqa: BLE001 - the store may already be closed
            pass

    @property
    def _orphan_grace_s(self) -> float:
        """How long an orphaned job waits for an engine replica to claim it (unless all have reported)."""
        return max(ORPHAN_GRACE_PERIODS * self.settings.health_check_period_s, 10.0)

    @property
    def _engine_stale_s(self) -> float:
        """How old an engine's last report may be before the engine no longer counts (ready or alive)."""
        return max(ENGINE_STALE_S, 3 * self.settings.health_check_period_s)

    def _settle_orphans(self) -> None:
        """Re-queue the orphans no engine holds, and the adopted jobs whose engine went away without an outcome."""
        now = time.monotonic()
        all_reported = len(self.reported) >= self.settings.engine_replicas
        for job_id, deadline in list(self.orphans.items()):
            if all_reported or now >= deadline:
                del self.orphans[job_id]
                # A dispatch no engine ever claimed did not run: it is not counted. (Should it still be
                # waiting in an engine's queue, its claim is refused: the next dispatch has a new number.)
                job = self.queue.requeue_orphan(job_id)
                job_log(logger, job_id).warning("no engine replica is running it: now %s", job["status"],
                                                extra={"status": job["status"]})
        wall = time.time()
        # An engine pushes the outcome as soon as the job ends, before its next health report.
        outcome_wait_s = max(ORPHAN_GRACE_PERIODS * self.settings.health_check_period_s, 15.0)
        for job_id, adoption in list(self.adopted.items()):
            engine = self.engines.get(adoption["replica"])
            if engine is None or wall - engine["seen_at"] > self._engine_stale_s:
                reason = f"engine replica {adoption['replica']} stopped reporting while running the adopted job"
            elif adoption["ended_at"] is not None and wall - adoption["ended_at"] > outcome_wait_s:
                reason = f"engine replica {adoption['replica']} ended the adopted job without reporting its outcome"
            else:
                continue
            del self.adopted[job_id]
            # Only the dispatch adopted: another replica may have sent the job again meanwhile.
            job = self.queue.requeue(job_id, reason, attempt=adoption["dispatch"])
            job_log(logger, job_id).warning("%s: now %s", reason, job["status"], extra={"status": job["status"]})

    def _engine_job(self, job: dict[str, Any]) -> dict[str, Any]:
        """The stored API request -> ``GenerationRequest`` fields for the workers."""
        req = dict(job["request"])
        out_dir = self.settings.results_dir / job["id"]
        out_dir.mkdir(parents=True, exist_ok=True)
        fields: dict[str, Any] = {
            "prompt": req["prompt"], "output_dir": str(out_dir), "job_id": job["id"],
            "negative_prompt": req.get("negative_prompt") or "", "seed": req["seed"],
        }
        for name in ("width", "height", "num_frames", "steps", "shift", "sampler"):
            if req.get(name) is not None:
                fields[name] = req[name]
        if req.get("guidance") is not None:
            g = req["guidance"]
            fields["guidance"] = tuple(g) if isinstance(g, list) else g
        if req.get("image_info") or req.get("image") or req.get("image_deleted"):
            image = self.queue.image(job["id"])
            if image is None:
                raise ValueError("its input image is no longer stored")
            fields["image"] = base64.b64decode(image)
        if req.get("lora"):
            fields["lora"] = str(resolve_lora(self.settings.lora_dir, req["lora"]["name"]))
            fields["lora_scale"] = float(req["lora"].get("scale", 1.0))
        return {"id": job["id"], "attempt": job["dispatch"], "request": fields,
                "progress_interval_s": self.settings.progress_interval_s}

    def _start_run(self, job: dict[str, Any]) -> None:
        """Send a job just marked running to an engine, as a task of its own."""
        self.sent_dispatch[job["id"]] = job["dispatch"]
        self.claimed_at.pop(job["id"], None)  # an earlier dispatch's claim is not this one's
        self.inflight[job["id"]] = asyncio.get_running_loop().create_task(self._run(job))

    async def _run(self, job: dict[str, Any]) -> None:
        job_id, dispatch = job["id"], job["dispatch"]  # every change below is to this dispatch only
        log = job_log(logger, job_id)
        try:
            try:
                engine_job = self._engine_job(job)
            except (OSError, sqlite3.Error) as exc:  # the volume or store, which may recover: one more try
                await asyncio.sleep(PREPARE_RETRY_S)
                job = self.queue.requeue(job_id, f"cannot prepare job: {type(exc).__name__}: {exc}",
                                         attempt=dispatch)
                log.warning("cannot prepare job (%s); job is now %s", exc, job["status"],
                            extra={"status": job["status"]})
                return
            except Exception as exc:  # noqa: BLE001 - e.g. the LoRA file was removed since submission
                self.queue.finish(job_id, FAILED, error=f"cannot prepare job: {exc}", attempt=dispatch)
                log.warning("failed: cannot prepare job: %s", exc, extra={"error": f"cannot prepare job: {exc}"})
                return
            try:
                outcome = await self._await_engine(job_id, engine_job)
            except DispatchGivenUp as exc:
                log.warning("engine call timed out (%s); job is now %s", exc, exc.job["status"],
                            extra={"status": exc.job["status"]})
                return
            except asyncio.TimeoutError as exc:
                job = self.queue.requeue(job_id, str(exc), attempt=dispatch)
                log.warning("engine call timed out (%s); job is now %s", exc, job["status"],
                            extra={"status": job["status"]})
                return
            except Exception as exc:  # noqa: BLE001 - the engine replica itself died
                job = self.queue.requeue(job_id, f"engine replica failed: {type(exc).__name__}: {exc}",
                                         attempt=dispatch)
                log.warning("engine replica failed (%s); job is now %s", exc, job["status"],
                            extra={"status": job["status"]})
                return
            if outcome["status"] == "unavailable":
                # The replica waits for Serve to replace it. Wait before re-queueing (the job still
                # running and in flight), or the loop would send it straight back to the same replica.
                await asyncio.sleep(1.0)
            self._apply_outcome(job_id, outcome, engine_job["attempt"])
        except Exception:  # noqa: BLE001
            log.exception("dispatch error")
            self.queue.requeue(job_id, "dispatch error", attempt=dispatch)
        finally:
            # Only this run's entry: a later dispatch of the same job may have its own by now.
            if self.inflight.get(job_id) is asyncio.current_task():
                del self.inflight[job_id]
                self.claimed_at.pop(job_id, None)
                self.sent_dispatch.pop(job_id, None)
            self._poke()

    async def _await_engine(self, job_id: str, engine_job: dict[str, Any]) -> dict[str, Any]:
        """The engine's outcome, bounded so that a job never stays "running": while no engine has
        claimed the dispatch (it waits in Serve's queue, or for a replica to start), by the time that
        can take; once claimed, by the engine's own limit, counted from the claim."""
        call = asyncio.ensure_future(self._call_engine(engine_job))
        dispatched = time.monotonic()
        waiting_s = self.settings.job_timeout_s + self.settings.worker_init_timeout_s + DISPATCH_MARGIN_S
        running_s = self.settings.job_timeout_s + self.settings.nccl_timeout_s + DISPATCH_MARGIN_S
        try:
            while True:
                claimed = self.claimed_at.get(job_id)
                left = (claimed + running_s if claimed is not None else dispatched + waiting_s) - time.monotonic()
                if left <= 0 and claimed is None:
                    # Re-queued only if no engine claimed it, in the same transaction: the claim may
                    # have reached another JobQueue replica, and then the running limit applies.
                    message = f"no engine replica started the job within {waiting_s:.0f} s"
                    job = self.queue.requeue(job_id, message, attempt=engine_job["attempt"], only_if_unclaimed=True)
                    if self._claimed_in_store(job_id, engine_job["attempt"]):
                        continue
                    raise DispatchGivenUp(message, job)
                if left <= 0:
                    raise asyncio.TimeoutError(
                        f"the engine replica did not finish the job within {running_s:.0f} s of starting it")
                done, _ = await asyncio.wait({call}, timeout=min(left, 5.0))
                if done:
                    return call.result()
        finally:
            if not call.done():
                call.cancel()  # Serve cancels the request; an engine running it then retires its workers

    async def _call_engine(self, engine_job: dict[str, Any]) -> dict[str, Any]:
        return await self.engine.run.remote(engine_job)

    def _apply_outcome(self, job_id: str, outcome: dict[str, Any], attempt: Optional[int] = None) -> None:
        """Record the engine's outcome, then log what the job became (from the record: it is the truth).
        ``attempt``: the dispatch the outcome answers, when this replica sent it."""
        status = outcome["status"]
        if status == "superseded":
            if attempt is None:
                job_log(logger, job_id).info("engine did not run a dispatch: %s", outcome.get("error"))
                return
            # The engine did not run this dispatch. If the dispatch is still the job's current one (the
            # engine could not reach this JobQueue to claim it), nobody runs the job: queue it again,
            # without counting the attempt. Otherwise the record belongs to a later dispatch.
            job = self.queue.requeue(job_id, f"engine did not start it: {outcome.get('error')}",
                                     count_attempt=False, attempt=attempt)
            job_log(logger, job_id).warning("engine did not run this dispatch (%s); job is %s",
                                            outcome.get("error"), job["status"], extra={"status": job["status"]})
            return
        log = job_log(logger, job_id)
        before = self.queue.get(job_id) or {}
        if attempt is not None and (before.get("status") != RUNNING or before.get("dispatch") != attempt):
            # An earlier run's late answer (this replica lost its lease while the call was out, and
            # another dispatched the job again): the record and the results folder are the later run's.
            log.warning("ignored the outcome %s of dispatch %d: the job is %s at dispatch %s", status, attempt,
                        before.get("status"), before.get("dispatch"), extra={"dispatch": attempt})
            return
        record_outcome(self.queue, self.retention, job_id, outcome, attempt)
        job = self.queue.get(job_id) or {}
        final = job.get("status")
        fields = {"status": final}
        if final == "succeeded":
            run_s = (job.get("finished_at") or 0) - (job.get("started_at") or 0)
            log.info("succeeded in %.1f s (%s bytes)", run_s, job.get("result_bytes"),
                     extra={**fields, "duration_s": run_s})
        elif final == "cancelled":
            log.info("cancelled while running", extra=fields)
        elif final == FAILED:
            log.warning("failed: %s", job.get("error"), extra={**fields, "error": job.get("error")})
        else:  # re-queued (crashed / unavailable engine)
            log.warning("engine outcome %s (%s); re-queued", status, outcome.get("error"),
                        extra={**fields, "error": outcome.get("error")})

    # ---------------------------------------------------------------- API for the ingress

    async def submit(self, request: dict[str, Any], idempotency_key: Optional[str] = None,
                     priority: int = 0, owner: Optional[str] = None, fingerprint: Optional[str] = None,
                     webhook_url: Optional[str] = None) -> dict[str, Any]:
        """``{"job": ..., "created": bool}``, ``{"full": True, "retry_after_s": n, "error": ...}``, or
        ``{"key_reused": True, "error": ...}`` (the idempotency key belongs to a different request)."""
        # While another replica dispatches (a KubeRay upgrade: the old cluster's), the image stays in
        # the request, where an older release reads it; on taking the lease it moves to its column.
        try:
            job, created = self.queue.submit(request, idempotency_key=idempotency_key, priority=priority,
                                            owner=owner, fingerprint=fingerprint, webhook_url=webhook_url,
                                            image_in_request=self._another_dispatches(request))
        except QueueFull as exc:
            return {"full": True, "retry_after_s": exc.retry_after_s, "error": str(exc)}
        except IdempotencyKeyReused as exc:
            return {"key_reused": True, "error": str(exc)}
        self._poke()
        return {"job": job, "created": created}

    def _another_dispatches(self, request: dict[str, Any]) -> bool:
        return bool(request.get("image")) and not self._leading and self.queue.lease_held_by_another(self.holder)

    async def get(self, job_id: str) -> Optional[dict[str, Any]]:
        self._ensure_dispatcher()
        return self.queue.get(job_id)

    async def list(self, status: Optional[str] = None, limit: int = 50, offset: int = 0,
                   owner: Optional[str] = None) -> dict[str, Any]:
        jobs, total = self.queue.list(status=status, limit=limit, offset=offset, owner=owner)
        return {"jobs": jobs, "total": total}

    async def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.queue.cancel(job_id)
        job_log(logger, job_id).info("cancel requested; job is now %s", job.get("status"),
                                     extra={"status": job.get("status")})
        self._poke()
        return job

    async def delete_files(self, job_id: str) -> dict[str, Any]:
        """Delete a finished job's video and preview now (``DELETE`` of a finished job). The job's
        record stays; its files are reported deleted. ``ValueError`` for a job not finished."""
        job = self.queue.get(job_id)
        if job is None:
            raise ValueError(f"no job {job_id}")
        if job["files_deleted_at"] is not None:
            return job
        if job["status"] not in TERMINAL:
            raise ValueError(f"job {job_id} is {job['status']}: only a finished job's files can be deleted")
        return await self.retention.delete(job, "deleted by request")

    async def report_progress(self, job_id: str, progress: dict[str, Any]) -> bool:
        return self.queue.report_progress(job_id, stage=progress["stage"], step=progress.get("step", 0),
                                          total_steps=progress.get("total_steps", 0),
                                          elapsed_s=progress.get("elapsed_s", 0.0), step_s=progress.get("step_s"),
                                          attempt=progress.get("attempt"))

    async def report_engine(self, replica_id: str, info: dict[str, Any]) -> None:
        self._ensure_dispatcher()
        now = time.time()
        self.engines[replica_id] = {**self.engines.get(replica_id, {}), **info, "seen_at": now}
        self.reported.add(replica_id)
        for job_id, outcome in (info.get("outcomes") or {}).items():  # ended, its push not through yet
            self._take_engine_outcome(job_id, outcome)
        busy = info.get("busy_job")
        made_at = info.get("reported_at", now)  # the engine's clock, as is an adoption's "since"
        if busy in self.orphans:
            self._adopt(busy, replica_id, made_at, "is still running it")
        # A report the engine made before it claimed the job (reports are not ordered with claims)
        # says nothing about whether the job has ended.
        for job_id, adoption in self.adopted.items():
            if (adoption["replica"] == replica_id and busy != job_id and adoption["ended_at"] is None
                    and made_at > adoption["since"]):
                adoption["ended_at"] = now
        self._poke()

    async def claim(self, job_id: str, attempt: int, replica_id: str, claimed_at: Optional[float] = None) -> bool:
        """An engine replica asks, before it starts a job, whether dispatch ``attempt`` is still current:
        the job is running and has had no later attempt, and no cancel was asked for meanwhile (the job
        then ends cancelled here). A job left running by a previous JobQueue
        replica is adopted by that engine replica, so it is not re-queued behind its back.
        ``claimed_at``: the engine's clock when it claimed (its reports carry the same clock)."""
        self._ensure_dispatcher()
        job = self.queue.claim(job_id, attempt)
        if job is None:
            return False
        if job["status"] != RUNNING:  # cancelled while it waited for an engine
            job_log(logger, job_id).info("cancelled before engine replica %s started it", replica_id,
                                         extra={"status": job["status"]})
            self.orphans.pop(job_id, None)
            return False
        if job_id in self.inflight and self.sent_dispatch.get(job_id) == attempt:
            self.claimed_at[job_id] = time.monotonic()  # its run's time limit counts from here
        if job_id in self.orphans:
            self._adopt(job_id, replica_id, claimed_at if claimed_at is not None else time.time(), "claimed it",
                        attempt)
        return True

    def _adopt(self, job_id: str, replica_id: str, since: float, how: str, dispatch: Optional[int] = None) -> None:
        """An orphan becomes engine replica ``replica_id``'s: it stays running until that engine's
        outcome. ``dispatch``: the one the engine runs (default: the job's current one)."""
        del self.orphans[job_id]
        if dispatch is None:
            dispatch = (self.queue.get(job_id) or {}).get("dispatch")
        self.adopted[job_id] = {"replica": replica_id, "ended_at": None, "since": since, "dispatch": dispatch}
        job_log(logger, job_id).info("adopted: engine replica %s %s", replica_id, how)

    async def report_outcome(self, job_id: str, outcome: dict[str, Any]) -> bool:
        """An engine replica's outcome of a job, pushed when the job ends. Recorded only for a job
        that a previous JobQueue replica dispatched (an orphan, adopted or not yet); the jobs this
        replica dispatched get the same outcome as their call's return value. Returns whether it
        was recorded."""
        return self._take_engine_outcome(job_id, outcome)

    def _take_engine_outcome(self, job_id: str, outcome: dict[str, Any]) -> bool:
        """Record an outcome an engine pushed or reported, if the job is one this replica has no call
        out for (an orphan, adopted or not yet) and the outcome is of its current attempt."""
        if job_id not in self.orphans and job_id not in self.adopted:
            return False
        attempt = outcome.get("attempt")
        if attempt is not None and (self.queue.get(job_id) or {}).get("dispatch") != attempt:
            return False
        self.orphans.pop(job_id, None)
        self.adopted.pop(job_id, None)
        # Recorded only for that dispatch, checked again in the store's transaction. (A "superseded"
        # dispatch is one this replica did not send: it is only logged.)
        self._apply_outcome(job_id, outcome, None if outcome["status"] == "superseded" else attempt)
        self._poke()
        return True

    async def data_dir_id(self) -> str:
        """The id this replica's ``data_dir`` holds (``service.data_dir``)."""
        return self.store_id

    async def state(self) -> dict[str, Any]:
        """Engines, counts and counters for /models, /readyz and /metrics."""
        self._ensure_dispatcher()
        now = time.time()
        fresh = {rid: e for rid, e in self.engines.items()
                 if now - e["seen_at"] < self._engine_stale_s}
        self.engines = fresh
        return {"engines": list(fresh.values()), "counts": self.queue.counts(), "counters": self.queue.counters(),
                "results_bytes": self.queue.results_bytes(), "webhooks_pending": self.queue.webhooks_pending(),
                "store_journal": self.queue.journal_mode, "store_id": self.store_id,
                "dispatcher_alive": self._loop_task is not None and not self._loop_task.done(),
                "dispatching": self._leading, "standing_by_for": self._standing_by_for,
                "running": [*self.inflight, *self.adopted], "orphaned": list(self.orphans)}

    async def check_health(self) -> None:
        self._ensure_dispatcher()
        if not self._draining and (self._loop_task is None or self._loop_task.done()):
            raise RuntimeError("the dispatch loop is not running")

