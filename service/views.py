"""How the API shows a job: the native view (``GET /jobs/{id}``, webhooks) and the OpenAI-style one."""
from __future__ import annotations

import time
from typing import Any, Optional

from service.config import ServiceSettings


def job_view(job: dict[str, Any], result_ttl_s: float, base: str = "") -> dict[str, Any]:
    """A job as the API shows it; ``result_ttl_s`` gives a succeeded job's ``expires_at``. Links are
    ``base`` + the route: the app's route prefix (``/t2v``), or a public URL (webhooks)."""
    result = job.get("result") or {}
    view = {
        "id": job["id"], "status": job["status"], "queue_position": job["queue_position"],
        "created_at": job["created_at"], "started_at": job["started_at"], "finished_at": job["finished_at"],
        "attempts": job["attempts"], "cancel_requested": job["cancel_requested"],
        "progress": {"stage": job["stage"], "step": job["step"], "total_steps": job["total_steps"]},
        "eta_s": job["eta_s"], "error": job["error"], "request": _public_request(job["request"]),
        "elapsed_s": ((job["finished_at"] or time.time()) - job["started_at"]) if job["started_at"] else None,
    }
    if job["status"] == "succeeded":
        deleted = job.get("files_deleted_at") is not None
        view["result"] = {
            "video_url": None if deleted else f"{base}/jobs/{job['id']}/video",
            "preview_url": None if deleted else f"{base}/jobs/{job['id']}/preview.png",
            "size_bytes": job["result_bytes"],
            "expires_at": expires_at(job, result_ttl_s),
            **{k: result.get(k) for k in ("width", "height", "num_frames", "fps", "seed", "layout", "encoder")},
            "warnings": result.get("warnings") or [],
        }
        if deleted:
            view["result"].update(deleted_at=job["files_deleted_at"], deleted_reason=job["files_deleted_reason"])
        view["timings"] = result.get("timings", {})
    if job.get("webhook_url"):
        view["webhook"] = {"url": job["webhook_url"], "status": job["webhook_status"],
                           "attempts": job["webhook_attempts"], "last_error": job["webhook_error"],
                           "delivered_at": job["webhook_delivered_at"]}
    return view


def expires_at(job: dict[str, Any], result_ttl_s: float) -> Optional[float]:
    """When a finished job's files are deleted (Unix time); None if kept forever or already gone."""
    if not result_ttl_s or not job.get("finished_at") or job.get("files_deleted_at") is not None:
        return None
    return job["finished_at"] + result_ttl_s


def openai_view(job: dict[str, Any], settings: ServiceSettings) -> dict[str, Any]:
    status = {"queued": "queued", "running": "in_progress", "succeeded": "completed"}.get(job["status"], "failed")
    req = job["request"]
    spec = settings.variant_spec
    result = job.get("result") or {}  # what was made: an image-to-video size follows the image
    width = result.get("width") or req.get("width") or spec.default_size[0]
    height = result.get("height") or req.get("height") or spec.default_size[1]
    frames = result.get("num_frames") or req.get("num_frames") or spec.default_frames
    progress = 100 if status == "completed" else (
        int(100 * job["step"] / job["total_steps"]) if job["total_steps"] else 0)
    # Every key of OpenAI's video object, null where it does not apply (typed clients require them).
    view = {"id": job["id"], "object": "video", "created_at": int(job["created_at"]), "status": status,
            "model": spec.name, "progress": progress, "size": f"{width}x{height}",
            "seconds": f"{frames / spec.fps:.2f}", "prompt": req.get("prompt"), "completed_at": None,
            "expires_at": None, "error": None, "remixed_from_video_id": None}
    if status == "failed":
        view["error"] = {"code": job["status"], "message": job["error"] or job["status"]}
    if job["finished_at"]:
        view["completed_at"] = int(job["finished_at"])
    if status == "completed":
        # Deleted (on request or expired): its content expired then, and /content answers 410.
        expiry = job.get("files_deleted_at") or expires_at(job, settings.result_ttl_s)
        view["expires_at"] = None if expiry is None else int(expiry)
    return view


def _public_request(req: dict[str, Any]) -> dict[str, Any]:
    out = dict(req)
    info = out.pop("image_info", None)
    if info:
        out["image"] = f"<{info['base64_chars']} base64 characters>"
    elif out.get("image"):  # a job an older release stored, its image in the request
        out["image"] = f"<{len(out['image'])} base64 characters>"
    deleted = out.pop("image_deleted", None)
    if deleted:
        out["image"] = f"<{deleted['base64_chars']} base64 characters, deleted with the results>"
    return out
