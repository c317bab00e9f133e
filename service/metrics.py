"""Prometheus text exposition of the queue's state (no client library needed)."""
from __future__ import annotations

from typing import Any


def render_metrics(state: dict[str, Any]) -> str:
    counts: dict[str, int] = state["counts"]
    counters: dict[str, float] = state["counters"]
    lines = [
        "# HELP wanserve_queue_depth Jobs waiting to run.",
        "# TYPE wanserve_queue_depth gauge",
        f"wanserve_queue_depth {counts.get('queued', 0)}",
        "# HELP wanserve_jobs Jobs by status.",
        "# TYPE wanserve_jobs gauge",
        *(f'wanserve_jobs{{status="{status}"}} {n}' for status, n in sorted(counts.items())),
        "# HELP wanserve_step_seconds Denoising step time of finished jobs.",
        "# TYPE wanserve_step_seconds summary",
        f"wanserve_step_seconds_sum {counters.get('step_seconds', 0.0):.6f}",
        f"wanserve_step_seconds_count {int(counters.get('steps', 0))}",
        "# HELP wanserve_job_seconds Run time of succeeded jobs.",
        "# TYPE wanserve_job_seconds summary",
        f"wanserve_job_seconds_sum {counters.get('job_seconds', 0.0):.6f}",
        f"wanserve_job_seconds_count {int(counters.get('jobs_finished', 0))}",
        "# HELP wanserve_results_bytes Bytes of the videos kept in data_dir (succeeded jobs whose files are not deleted).",
        "# TYPE wanserve_results_bytes gauge",
        f"wanserve_results_bytes {int(state.get('results_bytes', 0))}",
        "# HELP wanserve_results_deleted_total Videos deleted, on expiry (result_ttl_s) or on request.",
        "# TYPE wanserve_results_deleted_total counter",
        f"wanserve_results_deleted_total {int(counters.get('results_deleted', 0))}",
        "# HELP wanserve_webhooks_total Webhook messages by outcome (failed: given up after retries or a 410).",
        "# TYPE wanserve_webhooks_total counter",
        f'wanserve_webhooks_total{{outcome="delivered"}} {int(counters.get("webhooks_delivered", 0))}',
        f'wanserve_webhooks_total{{outcome="failed"}} {int(counters.get("webhooks_failed", 0))}',
        "# HELP wanserve_store_info The job store's SQLite journal (wal, or delete on a volume several hosts mount).",
        "# TYPE wanserve_store_info gauge",
        f'wanserve_store_info{{journal="{state.get("store_journal", "unknown")}"}} 1',
        "# HELP wanserve_webhooks_pending Webhook messages of finished jobs still to be delivered.",
        "# TYPE wanserve_webhooks_pending gauge",
        f"wanserve_webhooks_pending {int(state.get('webhooks_pending', 0))}",
        "# HELP wanserve_dispatching 1 if this app's JobQueue holds the store's dispatch lease, else 0.",
        "# TYPE wanserve_dispatching gauge",
        f"wanserve_dispatching {int(bool(state.get('dispatching')))}",
        "# HELP wanserve_engine_replicas_ready Engine replicas that reported ready.",
        "# TYPE wanserve_engine_replicas_ready gauge",
        f"wanserve_engine_replicas_ready {sum(1 for e in state['engines'] if e.get('ready') and not e.get('broken'))}",
        "# HELP wanserve_gpu_memory_bytes GPU memory per worker (torch allocator).",
        "# TYPE wanserve_gpu_memory_bytes gauge",
    ]
    for engine in state["engines"]:
        for worker in engine.get("workers") or []:
            for kind in ("allocated", "reserved"):
                value = worker.get(f"gpu_memory_{kind}")
                if value is not None:
                    lines.append(f'wanserve_gpu_memory_bytes{{replica="{engine["replica"]}",rank="{worker["rank"]}",'
                                 f'kind="{kind}"}} {value}')
    return "\n".join(lines) + "\n"
