"""``serve_forever``: joins the running Ray, serves the embedded default (tiny model, 2 gloo CPU
workers), answers a job, and stops cleanly when told to (SIGINT/SIGTERM set the same event)."""
from __future__ import annotations

import threading

import httpx
import pytest

from service_helpers import wait_for, wait_status

pytestmark = pytest.mark.slow


def test_serve_forever_runs_the_embedded_default_and_stops(serve_url, tmp_path):
    from ray import serve

    from service.config import ServiceSettings
    from service.launcher import serve_forever

    port = int(serve_url.rsplit(":", 1)[1])
    settings = ServiceSettings(app_name="wanserve-launcher", data_dir=str(tmp_path), host="127.0.0.1", port=port,
                               health_check_period_s=1.0)
    assert (settings.model, settings.gpus, settings.world_size, settings.variant_name) == ("tiny", 0, 2, "tiny-t2v")
    stop = threading.Event()
    errors: list = []

    def target() -> None:
        try:
            serve_forever(settings, stop)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        wait_for(lambda: errors or _ready(serve_url), 120, "the launched service to be ready", interval_s=0.5)
        assert not errors, errors
        client = httpx.Client(base_url=serve_url, timeout=30)
        job_id = client.post("/generate", json={"prompt": "a lighthouse at dusk", "steps": 2}).json()["id"]
        job = wait_status(client, job_id, ("succeeded", "failed"), timeout_s=60)
        assert job["status"] == "succeeded", job
        assert job["result"]["layout"].startswith("world=2")  # the real tiny generator, 2 ranks
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive() and not errors, errors
    assert "wanserve-launcher" not in serve.status().applications


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_delete_app_waits_past_serves_own_60_s_for_the_drain(monkeypatch):
    """Serve's blocking delete gives up after 60 s; ``delete_app`` waits as long as it is told, polling
    the app's status, and stops waiting at its own bound."""
    import types

    from service import launcher

    polls = {"n": 0}
    deleted: list = []

    def status():
        polls["n"] += 1
        still_there = polls["n"] <= 3  # the app goes on the fourth look
        return types.SimpleNamespace(applications={"app": object()} if still_there else {})

    monkeypatch.setattr(launcher.serve, "delete", lambda name, _blocking=True: deleted.append((name, _blocking)))
    monkeypatch.setattr(launcher.serve, "status", status)
    monkeypatch.setattr(launcher.time, "sleep", lambda s: None)
    launcher.delete_app("app", timeout_s=700)
    assert deleted == [("app", False)] and polls["n"] == 4
    polls["n"] = -10**9  # never goes: the bound ends the wait
    clock = iter(range(0, 10**6, 100))
    monkeypatch.setattr(launcher.time, "monotonic", lambda: next(clock))
    launcher.delete_app("app", timeout_s=700)
    assert polls["n"] < -10**9 + 20
