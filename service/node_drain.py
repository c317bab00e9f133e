"""``wanserve drain-node``: hand a Ray node's Serve replicas over before the node goes away.

Meant as the ``preStop`` hook of a KubeRay GPU worker pod. Without it, a pod deleted by hand, or
evicted, takes its engine replica down at once: the running job is killed and runs again from the
start elsewhere, using up one of its ``max_attempts``. With it:
1. Ray is told that the node will go (``ray drain-node``, reason preemption, with a deadline). Ray
   schedules nothing new there. Serve starts replacements for the node's replicas elsewhere and
   stops the old ones gracefully: an engine replica first finishes its running job (its
   ``drain_timeout_s``), and the JobQueue records the outcome.
2. The hook waits until no Serve replica and no ``GenerationWorker`` is left alive on the node, then
   returns, and Kubernetes stops the container.

The deadline should exceed ``drain_timeout_s`` (Serve stops a replica by
``deadline - graceful_shutdown_timeout_s`` at the latest, and needs that long to stop it), and the
pod's ``terminationGracePeriodSeconds`` should exceed the deadline.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import time
from typing import Any, Callable, Optional

DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"  # accepted even while the node is busy (unlike idle termination)
WORKER_CLASS = "GenerationWorker"


def actors_to_wait_for(actors: list[dict[str, Any]]) -> list[str]:
    """Of a node's live actors (``ray.util.state.list_actors`` rows): the Serve replicas and the
    generation workers, as names to print."""
    names = []
    for actor in actors:
        cls = actor.get("class_name") or ""
        if cls.startswith("ServeReplica:") or cls.endswith(WORKER_CLASS):
            names.append(actor.get("name") or cls)
    return names


def request_drain(address: str, node_id: str, deadline_s: int, message: str) -> Optional[str]:
    """``ray drain-node`` for ``node_id``; returns why it was refused, or None if accepted."""
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", address, "--node-id", node_id,
           "--reason", DRAIN_REASON, "--reason-message", message, "--deadline-remaining-seconds", str(deadline_s)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "`ray drain-node` did not answer within 60 s"
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return lines[-1] if lines else f"exit status {proc.returncode}"
    return None


def wait_until_gone(list_live: Callable[[], list[str]], deadline: float, poll_s: float,
                    say: Callable[[str], None]) -> bool:
    """Poll ``list_live`` until it is empty (True) or the monotonic ``deadline`` passes (False)."""
    last: Optional[list[str]] = None
    while True:
        live = list_live()
        if not live:
            return True
        if live != last:
            say(f"waiting for {len(live)} actor(s) to stop: {', '.join(sorted(live))}")
            last = live
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


class ClusterUnreachable(RuntimeError):
    """The cluster's state could not be read for ``unreachable_s``: its head is gone."""


class LiveActors:
    """``list_live`` for ``wait_until_gone``: a failed look answers "(unknown)" and is asked again, but
    failures without a break for ``unreachable_s`` raise ``ClusterUnreachable``. When the whole
    RayCluster is deleted, its head stops within seconds, and nothing can be handed over any more:
    holding the pod (and its GPUs) until the deadline would gain nothing."""

    def __init__(self, list_names: Callable[[], list[str]], say: Callable[[str], None], unreachable_s: float = 60.0):
        self.list_names, self.say, self.unreachable_s = list_names, say, unreachable_s
        self.failing_since: Optional[float] = None

    def __call__(self) -> list[str]:
        try:
            names = self.list_names()
        except Exception as exc:  # noqa: BLE001 - the state API can hiccup; ask again
            now = time.monotonic()
            self.failing_since = self.failing_since or now
            if now - self.failing_since >= self.unreachable_s:
                raise ClusterUnreachable(f"the cluster's state could not be read for {now - self.failing_since:.0f} s "
                                         f"({type(exc).__name__}: {exc})") from None
            self.say(f"could not list actors ({type(exc).__name__}: {exc}); asking again")
            return ["(unknown)"]
        self.failing_since = None
        return names


def drain_node(address: str = "auto", node_id: Optional[str] = None, deadline_s: int = 690,
               poll_s: float = 2.0, say: Callable[[str], None] = print, unreachable_s: float = 60.0) -> int:
    """Drain ``node_id`` (default: the node this runs on) and wait for its replicas to stop. Exit
    status: 0 when they are gone, 1 when the deadline passed first, Ray refused the drain, or the
    cluster could not be reached for ``unreachable_s`` (its head is gone)."""
    import ray
    from ray.util.state import list_actors

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        node = node_id or ray.get_runtime_context().get_node_id()
        gcs = ray.get_runtime_context().gcs_address
        started = time.monotonic()
        refused = request_drain(gcs, node, deadline_s, "wanserve drain-node (the pod is stopping)")
        if refused:
            say(f"Ray refused to drain node {node}: {refused}")  # e.g. already drained: still wait below
        else:
            say(f"node {node} is draining; Serve moves its replicas (deadline {deadline_s} s)")

        def names() -> list[str]:
            # The cluster this joined, by its address: with none, the state API looks for one on its
            # own and gives up where a machine runs more than one Ray instance.
            rows = list_actors(address=gcs, filters=[("node_id", "=", node), ("state", "=", "ALIVE")],
                               limit=10_000, raise_on_missing_output=False)
            return actors_to_wait_for([r if isinstance(r, dict) else r.__dict__ for r in rows])

        try:
            gone = wait_until_gone(LiveActors(names, say, unreachable_s), started + deadline_s, poll_s, say)
        except ClusterUnreachable as exc:
            say(f"node {node}: giving up, {exc}: its head is gone, so nothing is left to hand over")
            return 1
        took = time.monotonic() - started
        if gone:
            say(f"node {node}: no Serve replica or worker left after {took:.0f} s")
            return 0
        say(f"node {node}: replicas still alive after the {deadline_s} s deadline")
        return 1
    finally:
        ray.shutdown()
