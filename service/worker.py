"""``GenerationWorker``: one rank of an engine's process group, as a Ray actor.

Narrow interface (like vLLM's workers): ``init`` (join the process group, build the generator
once), ``run(job)`` (one job, SPMD on every rank; rank 0 returns the result), ``health``.
"""
from __future__ import annotations

import concurrent.futures
import importlib
import logging
import os
import socket
import time
import traceback
from typing import Any, Callable, Optional

from service.logs import LogFormat, configure_worker_logging, job_log

PROGRESS_TIMEOUT_S = 10.0  # one progress report's wait for the JobQueue
FLUSH_WAIT_S = 2.0  # at a job's end, the wait for its last progress report

logger = logging.getLogger("wanserve.worker")


def load_factory(path: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"generator_factory must look like 'package.module:function', got {path!r}")
    return getattr(importlib.import_module(module_name), attr)


def init_process_group(*, use_gpu: bool, master_addr: str, master_port: int, rank: int, world_size: int,
                       timeout_s: float) -> None:
    """NCCL on GPUs (Ray gives each worker its one GPU as device 0), gloo on CPU; finite timeout."""
    from wan_model.parallel import init_distributed

    init_distributed(rank, world_size, master_addr=master_addr, master_port=master_port,
                     backend="nccl" if use_gpu else "gloo", timeout_s=timeout_s, local_rank=0 if use_gpu else None)


class GenerationWorker:
    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.generator: Any = None
        self.device = "cpu"
        self.busy_job: Optional[str] = None
        self.started_at = time.time()

    # ---------------------------------------------------------------- set-up

    def rendezvous(self) -> tuple[str, int]:
        """This node's IP and a free port: rank 0's answer is everyone's rendezvous."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ip, port

    def init(self, *, master_addr: str, master_port: int, use_gpu: bool, timeout_s: float,
             factory: str, config: dict[str, Any], progress_target: Optional[dict[str, str]] = None,
             log_format: LogFormat = "text", compile_cache_dir: Optional[str] = None) -> dict:
        """Join the process group (NCCL on GPUs, gloo on CPU) and build the generator once.
        ``compile_cache_dir``: where torch.compile's artifacts are kept (before anything compiles)."""
        configure_worker_logging(log_format)
        if compile_cache_dir is not None:
            from wan_model.compile import use_cache_dir

            use_cache_dir(compile_cache_dir)
        self.device = "cuda:0" if use_gpu else "cpu"
        init_process_group(use_gpu=use_gpu, master_addr=master_addr,
                           master_port=master_port, rank=self.rank, world_size=self.world_size,
                           timeout_s=timeout_s)
        self.progress_target = progress_target
        self.generator = load_factory(factory)(dict(config), self.rank, self.world_size)
        layout = self.generator.layout_string() if hasattr(self.generator, "layout_string") else \
            str(getattr(self.generator, "layout", ""))
        return {"rank": self.rank, "pid": os.getpid(), "device": self.device, "layout": layout,
                "compile_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}

    # ---------------------------------------------------------------- jobs

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run one job; every rank returns an outcome, rank 0's carries the result."""
        from wan_model.pipeline.request import GenerationRequest, InvalidRequest, JobCancelled

        self.busy_job = job["id"]
        log = job_log(logger, job["id"], rank=self.rank)
        reporter = None
        started = time.monotonic()
        log.info("rank %d: started", self.rank)
        try:
            # Warm-up jobs are no job of the queue's: nothing to report to it, and nobody can cancel
            # them. Made inside the try: a handle that cannot be made is this job's failure, reported.
            if self.rank == 0 and job.get("report_progress", True):
                reporter = _ProgressReporter(job["id"], self.progress_target, job.get("progress_interval_s", 0.5),
                                             log, attempt=job.get("attempt"))
            request = GenerationRequest(**job["request"])
            result = self.generator.generate(request, reporter if reporter else _no_cancel)
            out = {"status": "succeeded", "rank": self.rank}
            if result is not None:
                out["result"] = result.to_dict()
            duration_s = time.monotonic() - started
            log.info("rank %d: succeeded in %.1f s", self.rank, duration_s, extra={"duration_s": duration_s})
            return out
        except JobCancelled:
            log.info("rank %d: cancelled after %.1f s", self.rank, time.monotonic() - started)
            return {"status": "cancelled", "rank": self.rank}
        except InvalidRequest as exc:
            log.warning("rank %d: invalid request: %s", self.rank, exc, extra={"error": str(exc)})
            return {"status": "failed", "rank": self.rank, "error": f"invalid request: {exc}", "fatal": False}
        except Exception as exc:  # noqa: BLE001 - reported to the job record, then the replica restarts
            error = f"{type(exc).__name__}: {exc}"
            log.error("rank %d: failed: %s\n%s", self.rank, error, traceback.format_exc(), extra={"error": error})
            return {"status": "failed", "rank": self.rank, "error": error, "fatal": True}
        finally:
            self.busy_job = None
            if reporter is not None:
                reporter.flush()

    def health(self) -> dict[str, Any]:
        from wan_model.compile import compile_stats

        import ray

        info: dict[str, Any] = {"rank": self.rank, "ready": self.generator is not None, "busy_job": self.busy_job,
                                "node_id": ray.get_runtime_context().get_node_id(),
                                "compiled": compile_stats(),
                                "compile_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}
        if self.device.startswith("cuda"):
            import torch

            info["gpu_memory_allocated"] = torch.cuda.memory_allocated()
            info["gpu_memory_reserved"] = torch.cuda.memory_reserved()
        return info

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _no_cancel(progress: Any) -> bool:
    return False


class _ProgressReporter:
    """Rank 0's progress callback: sends progress to the job queue at most every ``interval_s``
    (and at each stage change), and returns the latest cancel flag it got back.

    The reports go from a thread of their own, one at a time, so that the job never waits for one:
    while the JobQueue cannot be reached (it is restarting, or draining while Serve stops the app)
    a report can take its whole timeout, and the steps go on meanwhile."""

    def __init__(self, job_id: str, target: Optional[dict[str, str]], interval_s: float,
                 log: Optional[logging.LoggerAdapter] = None, attempt: Optional[int] = None):
        self.job_id = job_id
        self.attempt = attempt  # the JobQueue ignores (and stops) a run of an attempt it no longer counts on
        self.log = log or job_log(logger, job_id, rank=0)
        self.logged_stage: Optional[str] = None
        self.logged_quarter = 0
        self.interval_s = interval_s
        self.cancel = False
        self.last_sent = 0.0
        self.last_stage: Optional[str] = None
        self.last_step_time: Optional[float] = None
        self.step_s: Optional[float] = None
        self.pending: Optional[dict] = None
        self.handle = None
        self._sender: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._in_flight: Optional[concurrent.futures.Future] = None
        if target is not None:
            from ray import serve

            self.handle = serve.get_deployment_handle(target["deployment"], app_name=target["app"])

    def __call__(self, progress: Any) -> bool:
        now = time.monotonic()
        if progress.stage == "denoise" and progress.step > 0:
            if self.last_step_time is not None:
                self.step_s = now - self.last_step_time
            self.last_step_time = now
        elif progress.stage == "denoise":
            self.last_step_time = now
        self._log_milestone(progress)
        self.pending = {"stage": progress.stage, "step": progress.step, "total_steps": progress.total_steps,
                        "elapsed_s": progress.elapsed_s, "step_s": self.step_s, "attempt": self.attempt}
        if progress.stage != self.last_stage or now - self.last_sent >= self.interval_s:
            self._send(now)
        return self.cancel

    def _log_milestone(self, progress: Any) -> None:
        """One line per stage and per quarter of the denoising steps, not one per step."""
        if progress.stage != self.logged_stage:
            self.logged_stage, self.logged_quarter = progress.stage, 0
            self.log.info("stage %s (%.1f s)", progress.stage, progress.elapsed_s,
                          extra={"stage": progress.stage, "elapsed_s": progress.elapsed_s})
        elif progress.stage == "denoise" and progress.total_steps:
            quarter = 4 * progress.step // progress.total_steps
            if quarter > self.logged_quarter:
                self.logged_quarter = quarter
                self.log.info("denoise step %d/%d (%.1f s)", progress.step, progress.total_steps,
                              progress.elapsed_s, extra={"stage": progress.stage, "step": progress.step,
                                                         "total_steps": progress.total_steps,
                                                         "elapsed_s": progress.elapsed_s})

    def _send(self, now: float) -> None:
        if self.handle is None or self.pending is None:
            return
        if self._in_flight is not None:
            if not self._in_flight.done():
                return  # the last report is still on its way: the newest progress goes with the next
            self._collect()
        self.last_sent, self.last_stage = now, self.pending["stage"]
        if self._sender is None:
            self._sender = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="progress")
        self._in_flight = self._sender.submit(self._report, self.pending)
        self.pending = None

    def _report(self, progress: dict) -> bool:
        return bool(self.handle.report_progress.remote(self.job_id, progress).result(timeout_s=PROGRESS_TIMEOUT_S))

    def _collect(self) -> None:
        """The cancel flag from the last report, which has arrived (or failed)."""
        try:
            self.cancel = self._in_flight.result()
        except Exception as exc:  # noqa: BLE001 - progress is best effort; the job goes on
            self.log.warning("progress report failed: %s", exc or type(exc).__name__)
        self._in_flight = None

    def flush(self) -> None:
        """At the job's end: the last progress, sent unless a report is still on its way, and waited
        for briefly (the job's outcome, which follows, matters more); a report already on its way is
        not waited for (the JobQueue may be unreachable: it drains while Serve stops the app). Then
        the thread goes."""
        earlier = self._in_flight
        self._send(time.monotonic())
        if self._in_flight is not None and self._in_flight is not earlier:
            concurrent.futures.wait([self._in_flight], timeout=FLUSH_WAIT_S)
        if self._sender is not None:
            self._sender.shutdown(wait=False)
