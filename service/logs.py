"""Structured job logs: every line about a job carries its id as a field.

``log_format="json"`` (``ServiceSettings``) makes each Serve deployment log JSON (Serve's own
``LoggingConfig(encoding="JSON")``: one object per line in ``/tmp/ray/session_latest/logs/serve/``)
and makes the worker actors (plain Ray actors, not Serve replicas) write JSON lines with the same
keys to their stderr (Ray's ``worker-*.err`` files). Filter one job across ingress, queue, engine
replicas and every rank with e.g. ``jq 'select(.wanserve_job_id == "<id>")'``.

The field is ``wanserve_job_id``, not ``job_id``: Ray's context filter (applied to Serve's JSON
records and to Ray core's JSON logs) sets ``job_id`` to the *Ray* job id and would overwrite ours.
In text mode the id stays in the message (``job <id>: ...``).
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any, Literal, MutableMapping

LogFormat = Literal["text", "json"]

JOB_ID_FIELD = "wanserve_job_id"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WANSERVE_LOGGER = "wanserve"  # workers log under wanserve.*; Serve replicas under ray.serve

_HANDLER_MARK = "_wanserve_handler"
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JobLog(logging.LoggerAdapter):
    """A logger for one job: prefixes ``job <id>: `` and adds ``wanserve_job_id`` (and any
    ``fields``, e.g. ``rank``) as structured fields, merged with a call's own ``extra``."""

    def __init__(self, logger: logging.Logger, job_id: str, **fields: Any):
        super().__init__(logger, {JOB_ID_FIELD: job_id, **fields})
        self.job_id = job_id

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = {**self.extra, **(kwargs.get("extra") or {})}
        reserved = sorted(set(extra) & _RECORD_ATTRS)
        if reserved:  # logging's own KeyError would come from deep inside makeRecord
            raise ValueError(f"log fields {reserved} are LogRecord attributes: name them otherwise")
        kwargs["extra"] = extra
        return f"job {self.job_id}: {msg}", kwargs


def job_log(logger: logging.Logger, job_id: str, **fields: Any) -> JobLog:
    return JobLog(logger, job_id, **fields)


def serve_logging_config(log_format: LogFormat) -> dict[str, Any]:
    """The ``logging_config`` option of every deployment (Serve's ``LoggingConfig`` fields)."""
    if log_format not in ("text", "json"):
        raise ValueError(f"log_format must be 'text' or 'json', got {log_format!r}")
    return {"encoding": "JSON" if log_format == "json" else "TEXT", "log_level": "INFO"}


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record with the keys of Ray's JSON logs (asctime, levelname, message,
    filename, lineno, process, name) plus every ``extra`` field (``wanserve_job_id``, ``rank``, ...).
    Our own, on public APIs only, so the workers' logs do not depend on Ray internals."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "asctime": self.formatTime(record), "levelname": record.levelname, "message": record.getMessage(),
            "filename": record.filename, "lineno": record.lineno, "process": record.process, "name": record.name,
        }
        data.update((k, v) for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and not k.startswith("_"))
        if record.exc_info:
            data["exc_text"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class RayContextFilter(logging.Filter):
    """Adds the Ray ids (job, node, worker, actor) to each record, like the context Serve's records carry."""

    def filter(self, record: logging.LogRecord) -> bool:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            record.job_id = context.get_job_id()
            record.node_id = context.get_node_id()
            record.worker_id = context.get_worker_id()
            actor_id = context.get_actor_id()
            if actor_id:
                record.actor_id = actor_id
        return True


def json_formatter() -> logging.Formatter:
    """The workers' JSON formatter: one object per line, standard keys plus every ``extra`` field."""
    return JsonLineFormatter()


def configure_worker_logging(log_format: LogFormat) -> None:
    """Give the ``wanserve`` loggers of a plain Ray actor one stderr handler in ``log_format``.

    Ray configures JSON for Serve replicas only (and for actors only when the *driver* passed
    ``ray.LoggingConfig``, which ``serve deploy`` onto a running cluster does not); without a
    handler a worker's INFO lines would be dropped. Idempotent: a second call replaces the handler.
    """
    serve_logging_config(log_format)  # validates
    logger = logging.getLogger(WANSERVE_LOGGER)
    for handler in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    if log_format == "json":
        handler.setFormatter(json_formatter())
        handler.addFilter(RayContextFilter())  # actor_id, node_id, worker_id, like Serve's records
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # one line per record, whatever the root logger has
