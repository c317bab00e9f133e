"""``serve_forever(settings)``: start or join Ray, run the app on a port, stop on SIGINT/SIGTERM."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Optional

import ray
from ray import serve

from service.app import build_app
from service.config import ServiceSettings
from service.dispatcher import DRAIN_MARGIN_S

logger = logging.getLogger("wanserve")


def start_ray(settings: ServiceSettings) -> bool:
    """Join the cluster at ``RAY_ADDRESS`` or a running local one, else start one; True if started."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), logging_level=logging.WARNING)
        return False
    except ConnectionError:
        needed = settings.world_size + 1
        ray.init(num_cpus=max(os.cpu_count() or 1, needed) if not settings.use_gpu else None,
                 logging_level=logging.WARNING)
        return True


def run_app(settings: ServiceSettings) -> str:
    """Deploy the app with ``serve.run(..., blocking=False)``; returns the URL."""
    if settings.use_gpu and ray.cluster_resources().get("GPU", 0) < settings.gpus:
        raise RuntimeError(f"settings ask for {settings.gpus} GPUs per replica but the Ray cluster has "
                           f"{ray.cluster_resources().get('GPU', 0):g}")
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings), name=settings.app_name, route_prefix="/", blocking=False)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}"


def delete_app(name: str, timeout_s: float) -> None:
    """``serve.delete`` that waits as long as the app's drain may take: Serve's own blocking delete
    gives up after 60 s, while an engine replica may finish its running job for ``drain_timeout_s``."""
    serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while name in serve.status().applications:
        if time.monotonic() > deadline:
            logger.warning("app %s still not deleted after %.0f s; going on", name, timeout_s)
            return
        time.sleep(0.5)


def serve_forever(settings: ServiceSettings, stop: Optional[threading.Event] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started_ray = start_ray(settings)
    stop = stop or threading.Event()

    def _on_second_signal(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    def _on_signal(signum, frame):  # noqa: ARG001
        logger.info("signal %d: shutting down; a running job may take up to drain_timeout_s (%.0f s) to "
                    "finish; Ctrl-C again to stop at once", signum, settings.drain_timeout_s)
        stop.set()
        signal.signal(signal.SIGINT, _on_second_signal)
        signal.signal(signal.SIGTERM, _on_second_signal)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
    try:
        t0 = time.monotonic()
        url = run_app(settings)
        spec = settings.variant_spec
        workers = f"{settings.gpus} GPU (NCCL)" if settings.use_gpu else f"{settings.cpu_workers} CPU (gloo)"
        logger.info("wanserve: %s on %s workers per replica, at %s (deployed in %.1f s; data in %s)",
                    spec.name, workers, url, time.monotonic() - t0, settings.data_dir)
        if spec.tiny:
            logger.info("the tiny model has random weights: it makes noise videos (for trying the API)")
        stop.wait()
    finally:
        # Our app goes; Serve itself (and other apps on it) only when this process started Ray.
        try:
            delete_app(settings.app_name, settings.drain_timeout_s + DRAIN_MARGIN_S)
            if started_ray:
                serve.shutdown()
        except KeyboardInterrupt:
            logger.warning("stopping at once: a job still running is marked so in %s and runs again at the next "
                           "start", settings.data_dir)
        finally:
            if started_ray:
                ray.shutdown()
        logger.info("wanserve stopped")
