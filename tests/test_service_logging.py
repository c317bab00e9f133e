"""Structured job logs (service/logs.py): the job id is a JSON field in Serve's records and the
workers', and ``log_format`` reaches every deployment's ``logging_config``. No Ray cluster."""
from __future__ import annotations

import io
import json
import logging
import uuid

import pytest

from service.logs import JOB_ID_FIELD, configure_worker_logging, job_log, json_formatter, serve_logging_config


def _capture(formatter: logging.Formatter, *filters: logging.Filter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    for f in filters:
        handler.addFilter(f)
    logger = logging.getLogger(f"test_service_logging.{uuid.uuid4().hex}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, stream


def _records(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_job_log_is_a_json_field_and_in_the_message():
    logger, stream = _capture(json_formatter())
    job_id = uuid.uuid4().hex
    job_log(logger, job_id, rank=3).info("succeeded in %.1f s", 2.5, extra={"duration_s": 2.5})
    (record,) = _records(stream)
    assert record[JOB_ID_FIELD] == job_id
    assert record["rank"] == 3 and record["duration_s"] == 2.5
    assert record["message"] == f"job {job_id}: succeeded in 2.5 s"  # text mode keeps the id too
    assert record["levelname"] == "INFO" and record["name"] == logger.name


def test_call_extra_merges_with_the_job_fields():
    logger, stream = _capture(json_formatter())
    log = job_log(logger, "a1")
    log.warning("failed: %s", "boom", extra={"error": "boom"})
    log.info("no extra")
    first, second = _records(stream)
    assert (first[JOB_ID_FIELD], first["error"]) == ("a1", "boom")
    assert second[JOB_ID_FIELD] == "a1" and "error" not in second


def test_fields_that_clash_with_log_record_attributes_are_named():
    logger, _ = _capture(json_formatter())
    with pytest.raises(ValueError, match="created"):
        job_log(logger, "a1").info("accepted", extra={"created": True})  # LogRecord.created is a timestamp


def test_serve_json_pipeline_keeps_the_job_field():
    """Serve's JSON handler strips ``job_id`` from records (it is Ray's job id): ours must survive."""
    from ray.serve._private.logging_utils import (ServeComponentFilter, ServeContextFilter,
                                                  ServeLogAttributeRemovalFilter)

    # The filters Serve puts on a replica's JSON handler (configure_component_logger).
    logger, stream = _capture(json_formatter(), ServeContextFilter(),
                              ServeComponentFilter("JobQueue", "replica-1"), ServeLogAttributeRemovalFilter())
    job_log(logger, "job-7").info("dispatched (attempt %d)", 1, extra={"job_id": "job-7", "attempt": 1})
    (record,) = _records(stream)
    assert "job_id" not in record, "Serve drops job_id: the reason the field is wanserve_job_id"
    assert record[JOB_ID_FIELD] == "job-7" and record["attempt"] == 1
    assert record["component_name"] == "JobQueue"


def test_worker_logging_json_and_text(capsys):
    logger = logging.getLogger("wanserve.worker")
    try:
        configure_worker_logging("json")
        job_log(logger, "w1", rank=1).info("rank %d: started", 1)
        configure_worker_logging("json")  # idempotent: still one line per record
        job_log(logger, "w1", rank=1).info("stage %s", "denoise", extra={"stage": "denoise"})
        lines = capsys.readouterr().err.splitlines()
        records = [json.loads(line) for line in lines]
        assert [r[JOB_ID_FIELD] for r in records] == ["w1", "w1"]
        assert records[1]["stage"] == "denoise" and records[0]["message"] == "job w1: rank 1: started"

        configure_worker_logging("text")
        job_log(logger, "w2").info("cancelled")
        (line,) = capsys.readouterr().err.splitlines()
        assert line.endswith("INFO wanserve.worker: job w2: cancelled")
    finally:
        root = logging.getLogger("wanserve")
        root.handlers[:] = []
        root.propagate = True
        root.setLevel(logging.NOTSET)


def test_bad_log_format_is_refused():
    from pydantic import ValidationError

    from service.config import ServiceSettings

    with pytest.raises(ValueError, match="log_format"):
        serve_logging_config("xml")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="log_format"):
        ServiceSettings(log_format="xml")


@pytest.mark.parametrize("log_format, encoding", [("json", "JSON"), ("text", "TEXT")])
def test_build_app_sets_every_deployments_logging_config(tmp_path, log_format, encoding):
    from ray.serve._private.build_app import build_app as serve_build  # what `serve build` uses

    from service.app import build_app
    from service.config import ServiceSettings

    settings = ServiceSettings(data_dir=str(tmp_path), log_format=log_format)
    built = serve_build(build_app(settings), name="wanserve")
    configs = {d.name: d.logging_config for d in built.deployments}
    assert set(configs) == {"Ingress", "JobQueue", "EngineReplica"}
    for name, config in configs.items():
        assert config is not None and config["encoding"] == encoding, (name, config)


def test_env_turns_json_on(monkeypatch, tmp_path):
    from service.config import ServiceSettings

    monkeypatch.setenv("WANSERVE_LOG_FORMAT", "json")
    assert ServiceSettings(data_dir=str(tmp_path)).log_format == "json"


def test_worker_json_records_carry_the_ray_ids(ray_session):
    """In a Ray worker the JSON lines name the Ray job, node and worker (public runtime-context API)."""
    import ray

    @ray.remote
    def log_one_line() -> dict:
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(json_formatter())
        from service.logs import RayContextFilter

        handler.addFilter(RayContextFilter())
        logger = logging.getLogger("wanserve.test_ids")
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
        job_log(logger, "r1", rank=0).info("hello")
        return json.loads(stream.getvalue())

    record = ray.get(log_one_line.remote(), timeout=60)
    assert record[JOB_ID_FIELD] == "r1" and record["rank"] == 0
    assert record["job_id"] and record["node_id"] and record["worker_id"]
