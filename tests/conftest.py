"""Shared fixtures. ``ray_session``: ONE local Ray cluster for all service tests (its start-up is
the big cost); ``serve_url``: Ray Serve's HTTP proxy on a free port on 127.0.0.1; ``serve_warnings``:
what this process logs to ``ray.serve`` at WARNING and above."""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # Workers inherit the environment of the local raylet: let them import tests' helpers too.
    paths = [str(REPO_DIR), str(TESTS_DIR)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    started = not ray.is_initialized()
    if started:
        # 4 logical CPUs on 2 cores: 3 for an engine replica (1 + 2 gloo workers) and 1 spare.
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        if started:
            ray.shutdown()


@pytest.fixture(scope="session")
def serve_url(ray_session):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.messages)


@pytest.fixture()
def serve_warnings():
    """Warnings logged to ``ray.serve``. Not caplog: once Serve has set up its logging in this
    process (an earlier test), that logger no longer propagates to pytest's handler."""
    handler = _Warnings()
    logger = logging.getLogger("ray.serve")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
