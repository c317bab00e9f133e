"""The HTTP API (FastAPI behind ``@serve.ingress``): validation, auth, jobs through the queue."""
# No "from __future__ import annotations": FastAPI must see real annotation objects, because Serve
# ships this class by value and its functions keep only the globals their bodies use.

import asyncio
import base64
import hmac
import json
import logging
import os
import time
from stat import S_ISREG
from typing import Any, Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import GetTimeoutError, RayActorError
from ray.serve.exceptions import RayServeException

from service.config import ServiceSettings
from service.data_dir import data_dir_problem
from service.logs import job_log
from service.metrics import render_metrics
from service.queue import STATUSES, TERMINAL, request_fingerprint
from service.schemas import (GenerateRequest, VideoCreateRequest, as_openai_errors, field_errors,
                             fingerprint_fields, from_openai, openapi_body, pydantic_errors, resolve_generate,
                             to_job_request)
from service.views import job_view, openai_view

api = FastAPI(title="wanserve", description="Wan2.1/Wan2.2 video generation jobs")

OPEN_ROUTES = {"/healthz", "/readyz"}
SSE_POLL_S = 0.2
MAX_OFFSET = 2**63 - 1
SSE_KEEPALIVE_S = 15.0
INGRESS_OTHER_REQUESTS = 200  # an Ingress replica's concurrent requests besides its event streams

logger = logging.getLogger("ray.serve")


def _error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


QUEUE_RETRY_AFTER_S = 5


async def _queue_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """What a call to the JobQueue raises while it cannot answer (its replica restarting, Serve's queue
    to it full, a call timed out): nothing was stored, and the request may be tried again."""
    logger.warning("%s %s: the JobQueue is unavailable: %s", request.method, request.url.path, _cause(exc))
    return _error(503, f"the job queue is unavailable ({_cause(exc)}); try again",
                  {"Retry-After": str(QUEUE_RETRY_AFTER_S)})


for _unavailable in (RayActorError, GetTimeoutError, RayServeException):
    api.add_exception_handler(_unavailable, _queue_unavailable)


@api.exception_handler(Exception)
async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    """Any other failure: a JSON 500 naming the error, never plain text (Starlette logs it too)."""
    return _error(500, f"internal error: {_cause(exc)}")


def _prefix(request: Request) -> str:
    """The app's route prefix as Serve passes it (ASGI ``root_path``): "" at "/", "/t2v" under "/t2v"."""
    return request.scope.get("root_path", "").rstrip("/")


def _cause(exc: BaseException) -> str:
    """The innermost error of a remote call's exception (Ray wraps it), in one line."""
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {cause}".splitlines()[0]


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, RecursionError):  # RecursionError: nested thousands deep
        return value


@serve.ingress(api)
class Ingress:
    def __init__(self, args: dict[str, Any], queue: Any):
        self.settings = ServiceSettings.coerce(args)
        self.event_streams = 0  # GET /jobs/{id}/events streams open now
        self.queue = queue
        self.token = self.settings.resolved_auth_token()
        self.client_tokens = dict(self.settings.client_tokens)

    # ---------------------------------------------------------------- helpers

    def _authorize(self, request: Request) -> Optional[str]:
        """Check the bearer token; returns the client name of a per-client token, else ``None`` (all jobs)."""
        request.state.client = None
        if not (self.token or self.client_tokens) or request.url.path in OPEN_ROUTES:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        given_bytes = given.strip().encode()
        # Constant time, and every configured token compared, so timing tells nothing about which matched.
        operator = bool(self.token) and hmac.compare_digest(given_bytes, self.token.encode())
        client = None
        for token, name in self.client_tokens.items():
            if hmac.compare_digest(given_bytes, token.encode()):
                client = name
        if scheme.lower() != "bearer" or not (operator or client):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        request.state.client = None if operator else client
        return request.state.client

    async def _read_body(self, request: Request) -> dict[str, Any]:
        """JSON or multipart form (the image as a file upload); 413 past ``max_body_bytes``."""
        limit = self.settings.max_body_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise HTTPException(413, f"request body of {length} bytes is over the limit of {limit} bytes")
        # Counted as it arrives, so that a body without a length (chunked) is held to the limit too.
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPException(413, f"request body is over the limit of {limit} bytes")
        ctype = request.headers.get("content-type", "")
        if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            async def replay() -> dict[str, Any]:  # the form parser reads the body already read
                return {"type": "http.request", "body": body, "more_body": False}

            form = await Request(request.scope, replay).form(max_part_size=limit)
            data: dict[str, Any] = {}
            for key, value in form.multi_items():
                if hasattr(value, "read"):  # an uploaded file (within the body's limit, read above)
                    data[key] = base64.b64encode(await value.read()).decode()
                elif key in ("lora", "guidance", "metadata"):
                    data[key] = _maybe_json(value)
                else:
                    data[key] = value
            return data
        try:
            data = json.loads(body or b"null")
        except ValueError as exc:
            raise HTTPException(422, f"body is not valid JSON: {exc}") from None
        except RecursionError:
            raise HTTPException(422, "body is not valid JSON here: it is nested too deep") from None
        if not isinstance(data, dict):
            raise HTTPException(422, "body must be a JSON object")
        return data

    async def _job(self, job_id: str, request: Request) -> dict[str, Any]:
        job = await self.queue.get.remote(job_id)
        client = getattr(request.state, "client", None)
        if job is None or (client is not None and job.get("owner") != client):  # another client's: not there
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    async def _submit(self, req: GenerateRequest, request: Request, extra: Optional[dict] = None,
                      openai: bool = False):
        # Fingerprinted as sent, before the size an image implies and a random seed are filled in.
        key = request.headers.get("idempotency-key") or None
        fingerprint = request_fingerprint(fingerprint_fields(req)) if key is not None else None
        # An image is decoded to check it: off the event loop, which serves every other request.
        req, errors = (await asyncio.to_thread(resolve_generate, req, self.settings) if req.image
                       else resolve_generate(req, self.settings))
        if openai:
            errors = as_openai_errors(errors)
        if extra:
            errors = {**extra, **errors}
        if errors:
            return JSONResponse({"detail": field_errors(errors)}, status_code=422)
        client = getattr(request.state, "client", None)
        if client is not None and req.priority > self.settings.max_client_priority:
            return JSONResponse({"detail": [{
                "loc": ["body", "priority"], "type": "forbidden",
                "msg": (f"priority {req.priority} is above {self.settings.max_client_priority}, the highest a "
                        f"client token may set (max_client_priority); the operator token may set up to 100")}]},
                status_code=403)
        if key is not None and len(key) > 255:
            return JSONResponse({"detail": field_errors({"Idempotency-Key": "longer than 255 characters"})}, 422)
        answer = await self.queue.submit.remote(to_job_request(req), key, req.priority, client, fingerprint,
                                                req.webhook_url)
        if answer.get("key_reused"):
            return JSONResponse({"detail": [{"loc": ["header", "Idempotency-Key"], "msg": answer["error"],
                                             "type": "value_error"}]}, status_code=422)
        if answer.get("full"):
            logger.warning("submission refused: %s", answer["error"])
            return _error(429, answer["error"], headers={"Retry-After": str(answer["retry_after_s"])})
        job = answer["job"]
        job_log(logger, job["id"]).info(
            "accepted%s (client %s, queue position %s)", "" if answer["created"] else " again (same Idempotency-Key)",
            client or "-", job["queue_position"], extra={"client": client, "new_job": answer["created"]})
        return answer

    # ---------------------------------------------------------------- jobs

    @api.post("/generate", status_code=202, openapi_extra=openapi_body(GenerateRequest))
    async def generate(self, request: Request):
        self._authorize(request)
        data = await self._read_body(request)
        try:
            req = GenerateRequest.model_validate(data)
        except ValidationError as exc:
            return JSONResponse({"detail": pydantic_errors(exc)}, status_code=422)
        answer = await self._submit(req, request)
        if isinstance(answer, Response):
            return answer
        job = answer["job"]
        status_url = f"{_prefix(request)}/jobs/{job['id']}"
        return JSONResponse(
            {"id": job["id"], "status": job["status"], "status_url": status_url, "events_url": f"{status_url}/events",
             "queue_position": job["queue_position"], "created": answer["created"]},
            status_code=202, headers={"Location": status_url})

    @api.get("/jobs/{job_id}")
    async def job_status(self, job_id: str, request: Request):
        self._authorize(request)
        return job_view(await self._job(job_id, request), self.settings.result_ttl_s, _prefix(request))

    @api.get("/jobs")
    async def jobs(self, request: Request, status: Optional[str] = None, limit: int = 50, offset: int = 0):
        self._authorize(request)
        errors = {}
        if status is not None and status not in STATUSES:
            errors["status"] = f"unknown status {status!r}; one of {', '.join(STATUSES)}"
        if not 1 <= limit <= 500:
            errors["limit"] = "limit must be between 1 and 500"
        if not 0 <= offset <= MAX_OFFSET:  # SQLite integers are 64-bit: a bigger offset was a 500
            errors["offset"] = f"offset must be between 0 and {MAX_OFFSET}"
        if errors:
            return JSONResponse({"detail": [{"loc": ["query", k], "msg": v, "type": "value_error"}
                                            for k, v in errors.items()]}, status_code=422)
        page = await self.queue.list.remote(status, limit, offset, getattr(request.state, "client", None))
        return {"jobs": [job_view(j, self.settings.result_ttl_s, _prefix(request)) for j in page["jobs"]],
                "total": page["total"], "limit": limit, "offset": offset}

    @api.delete("/jobs/{job_id}")
    async def cancel(self, job_id: str, request: Request):
        self._authorize(request)
        job = await self._job(job_id, request)
        if job["status"] in TERMINAL:  # nothing to cancel: delete its video and preview
            job = await self._delete_files(job_id, request)
            if isinstance(job, Response):
                return job
        else:
            job = await self.queue.cancel.remote(job_id)
        return job_view(job, self.settings.result_ttl_s, _prefix(request))

    @api.post("/jobs/{job_id}/cancel")
    async def cancel_only(self, job_id: str, request: Request):
        """Cancel, and only cancel: a job that has already succeeded or failed gets 409 and keeps its
        files (``DELETE`` of a finished job deletes them, so a client racing the job's end would lose
        its video)."""
        self._authorize(request)
        await self._job(job_id, request)
        job = await self.queue.cancel.remote(job_id)  # leaves a finished job as it is, atomically
        if job["status"] in ("succeeded", "failed"):
            return _error(409, f"job {job_id} has already {job['status']}: nothing to cancel")
        return job_view(job, self.settings.result_ttl_s, _prefix(request))

    async def _delete_files(self, job_id: str, request: Request) -> "dict[str, Any] | Response":
        """Delete a finished job's files through the JobQueue: the job after it, or a 503 to retry."""
        try:
            job = await self.queue.delete_files.remote(job_id)
        except Exception as exc:  # noqa: BLE001 - e.g. the volume refused (logged by the JobQueue)
            return _error(503, f"the files of job {job_id} could not be deleted now ({_cause(exc)}); try again",
                          headers={"Retry-After": "60"})
        job_log(logger, job_id).info("files deleted on request (client %s)",
                                     getattr(request.state, "client", None) or "-")
        return job

    @api.get("/jobs/{job_id}/events")
    async def events(self, job_id: str, request: Request):
        self._authorize(request)
        await self._job(job_id, request)
        if self.event_streams >= self.settings.max_event_streams:
            return _error(429, f"this replica already has {self.event_streams} event streams open "
                               f"(max_event_streams); poll GET /jobs/{job_id} instead, or retry later",
                          headers={"Retry-After": "10"})
        return StreamingResponse(self._event_stream(job_id, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _event_stream(self, job_id: str, request: Request):
        self.event_streams += 1  # counted once it runs: a stream never started is never ended either
        try:
            async for chunk in self._job_events(job_id, request):
                yield chunk
        finally:
            self.event_streams -= 1

    async def _job_events(self, job_id: str, request: Request):
        last: Optional[tuple] = None
        last_sent = time.monotonic()
        prefix = _prefix(request)
        while True:
            job = await self.queue.get.remote(job_id)
            if job is None:
                yield _sse("error", {"detail": f"job {job_id} disappeared"})
                return
            view = job_view(job, self.settings.result_ttl_s, prefix)
            key = (view["status"], view["progress"]["stage"], view["progress"]["step"], view["queue_position"])
            if key != last:
                last, last_sent = key, time.monotonic()
                yield _sse("progress", view)
            if job["status"] in TERMINAL:
                yield _sse("end", view)
                return
            if time.monotonic() - last_sent > SSE_KEEPALIVE_S:
                last_sent = time.monotonic()
                yield ": keep-alive\n\n"
            if await request.is_disconnected():
                return
            await asyncio.sleep(SSE_POLL_S)

    # HEAD (curl -I, download managers) is its own route: one route of both methods gives the API's
    # description one operationId twice.
    @api.get("/jobs/{job_id}/video")
    @api.head("/jobs/{job_id}/video", operation_id="video_head")
    async def video(self, job_id: str, request: Request):
        self._authorize(request)
        return self._file(await self._job(job_id, request), "video")

    @api.get("/jobs/{job_id}/preview.png")
    @api.head("/jobs/{job_id}/preview.png", operation_id="preview_head")
    async def preview(self, job_id: str, request: Request):
        self._authorize(request)
        return self._file(await self._job(job_id, request), "preview")

    def _file(self, job: dict[str, Any], kind: str) -> Response:
        if job["status"] in ("queued", "running"):  # not yet: 409, so that a client can tell it from no job
            return _error(409, f"job {job['id']} is {job['status']}: its {kind} is not made yet")
        if job["status"] != "succeeded":
            return _error(404, f"job {job['id']} is {job['status']}: no {kind} (only succeeded jobs have one)")
        if job.get("files_deleted_at") is not None:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(job["files_deleted_at"]))
            return _error(410, f"the {kind} of job {job['id']} was deleted at {when} ({job['files_deleted_reason']})")
        path = job["result_path"] if kind == "video" else job["preview_path"]
        try:  # one stat, handed to the response: a file deleted meanwhile (a DELETE, the TTL) is a 410
            stat = os.stat(path) if path else None
        except OSError:
            stat = None
        if stat is None or not S_ISREG(stat.st_mode):
            return _error(410, f"the {kind} of job {job['id']} is gone from the server")
        if kind == "video" and job.get("result_bytes") is not None and stat.st_size != job["result_bytes"]:
            # Truncated or overwritten since the job finished: never serve a broken file as the result.
            return _error(410, f"the video of job {job['id']} is corrupt on the server (its size changed from "
                               f"{job['result_bytes']} to {stat.st_size} bytes)")
        media = "video/mp4" if kind == "video" else "image/png"
        name = f"{job['id']}.mp4" if kind == "video" else f"{job['id']}.png"
        return FileResponse(path, media_type=media, filename=name, content_disposition_type="inline", stat_result=stat)

    # ---------------------------------------------------------------- service

    @api.get("/models")
    async def models(self, request: Request):
        self._authorize(request)
        state = await self.queue.state.remote()
        spec = self.settings.variant_spec
        return {"models": [{
            "id": spec.name, "model": self.settings.model, "task": spec.task, "tiny": spec.tiny,
            "defaults": {"width": spec.default_size[0], "height": spec.default_size[1],
                         "num_frames": spec.default_frames, "steps": spec.steps, "fps": spec.fps},
            "size_multiple": spec.size_multiple, "max_tokens": self.settings.max_tokens,
            "gpus_per_replica": self.settings.gpus, "world_size": self.settings.world_size,
            "backend": "nccl" if self.settings.use_gpu else "gloo",
            "replicas": [{k: e.get(k) for k in ("replica", "layout", "ready", "busy_job", "broken", "init_s",
                                                 "warmup", "compile_cache_dir", "workers")}
                         for e in state["engines"]],
        }]}

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self):
        try:
            state = await asyncio.wait_for(self._queue_state(), timeout=5)
        except Exception as exc:  # noqa: BLE001
            return _error(503, f"job queue not answering: {type(exc).__name__}: {exc}")
        if state.get("store_id"):
            problem = data_dir_problem(self.settings.data_dir, state["store_id"], "this Ingress replica")
            if problem:
                return _error(503, problem)
        ready = [e for e in state["engines"] if e.get("ready") and not e.get("broken")]
        if not ready:
            broken = [e["broken"] for e in state["engines"] if e.get("broken")]
            return _error(503, "no engine replica is ready yet" + (f" (one is broken: {broken[0]})" if broken else ""))
        # dispatching false: another JobQueue on the same store holds the dispatch lease (an upgrade
        # under way); jobs are accepted and wait for it to end.
        return {"status": "ready", "engines": len(ready), "dispatching": state.get("dispatching")}

    async def _queue_state(self) -> dict[str, Any]:
        return await self.queue.state.remote()

    @api.get("/metrics")
    async def metrics(self, request: Request):
        self._authorize(request)
        state = await self.queue.state.remote()
        return PlainTextResponse(render_metrics(state), media_type="text/plain; version=0.0.4")

    # ---------------------------------------------------------------- OpenAI-style video API

    @api.post("/v1/videos", openapi_extra=openapi_body(VideoCreateRequest))
    async def openai_create(self, request: Request):
        self._authorize(request)
        data = await self._read_body(request)
        try:
            oreq = VideoCreateRequest.model_validate(data)
            req, extra = from_openai(oreq, self.settings)
        except ValidationError as exc:
            return JSONResponse({"detail": pydantic_errors(exc)}, status_code=422)
        answer = await self._submit(req, request, extra, openai=True)
        if isinstance(answer, Response):
            return answer
        return openai_view(answer["job"], self.settings)

    @api.get("/v1/videos/{job_id}")
    async def openai_get(self, job_id: str, request: Request):
        self._authorize(request)
        return openai_view(await self._job(job_id, request), self.settings)

    @api.delete("/v1/videos/{job_id}")
    async def openai_delete(self, job_id: str, request: Request):
        self._authorize(request)
        job = await self._job(job_id, request)
        if job["status"] not in TERMINAL:
            return _error(409, f"video {job_id} is {openai_view(job, self.settings)['status']}: only a finished "
                               f"video can be deleted (cancel it first: POST {_prefix(request)}"
                               f"/jobs/{job_id}/cancel)")
        deleted = await self._delete_files(job_id, request)
        if isinstance(deleted, Response):
            return deleted
        return {"id": job_id, "object": "video.deleted", "deleted": True}

    @api.get("/v1/videos/{job_id}/content")
    @api.head("/v1/videos/{job_id}/content", operation_id="openai_content_head")
    async def openai_content(self, job_id: str, request: Request, variant: str = "video"):
        self._authorize(request)
        if variant not in ("video", "thumbnail"):
            return JSONResponse({"detail": [{"loc": ["query", "variant"], "type": "value_error",
                                             "msg": f"variant must be 'video' or 'thumbnail', not {variant!r}"}]}, 422)
        return self._file(await self._job(job_id, request), "video" if variant == "video" else "preview")
