"""Auth: with tokens configured every route but health needs one (metrics included), the token
check is constant-time (hmac.compare_digest decides), job ids are 128-bit random, and with
per-client tokens one client can neither list nor read nor cancel another's jobs, nor fill the
queue for the others (``max_jobs_per_client``)."""
from __future__ import annotations

import hmac
import re
import types
from unittest import mock

import httpx
import pytest

from reliability_helpers import TINY_JOB, reliability_settings, report
from service_helpers import TOKEN, deploy, wait_status

pytestmark = pytest.mark.slow

ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef"
OPEN = {"/healthz", "/readyz"}


@pytest.fixture(scope="module")
def app(serve_url, tmp_path_factory):
    from ray import serve

    settings = reliability_settings(tmp_path_factory.mktemp("reliability-auth"), app_name="wanserve-auth",
                                    client_tokens={ALICE: "alice", BOB: "bob"}, max_jobs_per_client=3)
    deploy(settings, serve_url)
    clients = {name: httpx.Client(base_url=serve_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
               for name, token in (("operator", TOKEN), ("alice", ALICE), ("bob", BOB))}
    yield settings, clients, serve_url
    for c in clients.values():
        c.close()
    serve.delete(settings.app_name)


def test_every_route_but_health_needs_a_token(app):
    _, clients, url = app
    job_id = clients["alice"].post("/generate", json={"prompt": "mine", **TINY_JOB}).json()["id"]
    wait_status(clients["alice"], job_id, ("succeeded",), timeout_s=60)
    spec = httpx.get(f"{url}/openapi.json").json()
    checked = []
    for path, methods in spec["paths"].items():
        concrete = path.replace("{job_id}", job_id)
        for method in methods:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
                r = httpx.request(method.upper(), url + concrete, headers=headers, json={"prompt": "x"}, timeout=30)
                if path in OPEN:
                    assert r.status_code in (200, 503), (method, path, r.status_code)
                else:
                    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path, r.text)
            checked.append(f"{method.upper()} {path}")
    assert "GET /metrics" in checked and "POST /generate" in checked and len(checked) >= 10
    assert clients["operator"].get("/metrics").status_code == 200  # metrics: behind the token (no own port)
    assert wait_status(clients["alice"], job_id, ("succeeded",))["status"] == "succeeded"  # DELETE was refused
    report("auth_routes", routes_checked=len(checked), open_routes=sorted(OPEN))


def _request(token: str):
    from starlette.requests import Request

    scope = {"type": "http", "method": "GET", "path": "/jobs", "query_string": b"",
             "headers": [(b"authorization", f"Bearer {token}".encode())]}
    return Request(scope)


def test_token_check_is_constant_time_compare_digest():
    from fastapi import HTTPException

    import service.ingress as ingress

    owner = types.SimpleNamespace(token=TOKEN, client_tokens={ALICE: "alice"})
    authorize = ingress.Ingress._authorize
    with mock.patch.object(ingress.hmac, "compare_digest", wraps=hmac.compare_digest) as spy:
        assert authorize(owner, _request(ALICE)) == "alice"
        assert authorize(owner, _request(TOKEN)) is None  # the operator token sees every job
    compared = [tuple(c.args) for c in spy.call_args_list]
    assert (ALICE.encode(), TOKEN.encode()) in compared and (ALICE.encode(), ALICE.encode()) in compared
    # compare_digest decides: with it answering "no", even the right token is refused.
    with mock.patch.object(ingress.hmac, "compare_digest", return_value=False):
        with pytest.raises(HTTPException) as err:
            authorize(owner, _request(TOKEN))
    assert err.value.status_code == 401


def test_job_ids_are_128_bit_random(app):
    from service.queue import new_job_id

    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)  # 32 hex = 128 bits
    _, clients, _ = app
    served = [clients["bob"].post("/generate", json={"prompt": f"id {i}", **TINY_JOB}).json()["id"] for i in range(3)]
    assert len(set(served)) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in served)
    assert clients["bob"].get("/jobs/" + served[0][:-1] + ("0" if served[0][-1] != "0" else "1")).status_code == 404
    for job_id in served:
        wait_status(clients["bob"], job_id, ("succeeded",), timeout_s=60)


def test_a_client_cannot_see_another_clients_jobs(app):
    _, clients, _ = app
    alice, bob, operator = clients["alice"], clients["bob"], clients["operator"]
    mine = alice.post("/generate", json={"prompt": "alice's", **TINY_JOB}, headers={"Idempotency-Key": "k1"}).json()
    wait_status(alice, mine["id"], ("succeeded",), timeout_s=60)
    for path in ("", "/video", "/preview.png", "/events"):
        assert bob.get(f"/jobs/{mine['id']}{path}").status_code == 404, path
    assert bob.get(f"/v1/videos/{mine['id']}").status_code == 404
    assert bob.get(f"/v1/videos/{mine['id']}/content").status_code == 404
    assert bob.delete(f"/jobs/{mine['id']}").status_code == 404
    assert mine["id"] not in [j["id"] for j in bob.get("/jobs", params={"limit": 500}).json()["jobs"]]
    listed = alice.get("/jobs", params={"limit": 500}).json()
    assert mine["id"] in [j["id"] for j in listed["jobs"]]
    assert {j["request"]["prompt"] for j in listed["jobs"]} <= {"alice's", "mine"}
    # The same idempotency key from another client is another job, never a look at alice's.
    theirs = bob.post("/generate", json={"prompt": "bob's", **TINY_JOB}, headers={"Idempotency-Key": "k1"}).json()
    assert theirs["id"] != mine["id"] and theirs["created"] is True
    assert alice.get(f"/jobs/{mine['id']}/video").status_code == 200
    everything = [j["id"] for j in operator.get("/jobs", params={"limit": 500}).json()["jobs"]]
    assert mine["id"] in everything and theirs["id"] in everything
    wait_status(bob, theirs["id"], ("succeeded",), timeout_s=60)


def test_one_client_cannot_fill_the_queue_for_the_others(app):
    settings, clients, _ = app
    alice, bob, operator = clients["alice"], clients["bob"], clients["operator"]
    slow = {**TINY_JOB, "steps": 100}  # 0.5 s each on the fake generator: the four posts find three active
    accepted = [alice.post("/generate", json={"prompt": f"a{i}", **slow}) for i in range(settings.max_jobs_per_client)]
    assert [r.status_code for r in accepted] == [202] * settings.max_jobs_per_client
    refused = alice.post("/generate", json={"prompt": "one too many", **slow})
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert "client 'alice' has 3 queued or running jobs" in refused.json()["detail"]
    others = [bob.post("/generate", json={"prompt": "bob's turn", **TINY_JOB}),
              operator.post("/generate", json={"prompt": "operator", **TINY_JOB})]
    assert [r.status_code for r in others] == [202, 202]
    for client, r in zip((alice, alice, alice, bob, operator), [*accepted, *others]):
        wait_status(client, r.json()["id"], ("succeeded",), timeout_s=60)
    assert alice.post("/generate", json={"prompt": "room again", **TINY_JOB}).status_code == 202


def test_a_client_cannot_jump_the_queue_with_priority(app):
    settings, clients, _ = app
    alice, operator = clients["alice"], clients["operator"]
    cap = settings.max_client_priority
    before = alice.get("/jobs").json()["total"]
    refused = alice.post("/generate", json={"prompt": "me first", "priority": cap + 1, **TINY_JOB})
    assert refused.status_code == 403, refused.text
    [entry] = refused.json()["detail"]
    assert entry["loc"] == ["body", "priority"] and f"above {cap}" in entry["msg"]
    assert alice.get("/jobs").json()["total"] == before  # nothing was queued
    low = alice.post("/generate", json={"prompt": "after the others", "priority": cap - 5, **TINY_JOB})
    urgent = operator.post("/generate", json={"prompt": "urgent", "priority": 100, **TINY_JOB})
    assert (low.status_code, urgent.status_code) == (202, 202)
    wait_status(alice, low.json()["id"], ("succeeded",), timeout_s=60)
    wait_status(operator, urgent.json()["id"], ("succeeded",), timeout_s=60)
