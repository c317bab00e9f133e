"""Webhooks through the deployed app: ``POST /generate`` with ``webhook_url`` -> the job runs on the
engine replica -> the JobQueue POSTs the signed outcome to a receiver in this process; the job's view
and ``/metrics`` say it was delivered. A host outside ``webhook_allowed_hosts`` is a 422 naming the
field, and writes nothing."""
from __future__ import annotations

import json

import httpx
import pytest

from reliability_helpers import TINY_JOB, reliability_settings
from service_helpers import TOKEN, deploy, wait_for, wait_status
from webhook_receiver import WebhookReceiver, signature_ok

pytestmark = pytest.mark.slow

SECRET = "a-webhook-secret-of-some-length"


@pytest.fixture(scope="module")
def app(serve_url, tmp_path_factory):
    from ray import serve

    settings = reliability_settings(tmp_path_factory.mktemp("webhooks"), app_name="wanserve-webhooks",
                                    webhook_allowed_hosts=["127.0.0.1"], webhook_secret=SECRET,
                                    webhook_retry_s=0.2, public_url="https://video.example.com")
    deploy(settings, serve_url)
    client = httpx.Client(base_url=serve_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    yield settings, client
    client.close()
    serve.delete(settings.app_name)


def test_a_finished_job_is_posted_to_its_webhook(app):
    _, client = app
    with WebhookReceiver(replies=[503]) as receiver:  # the first try fails: the retry delivers
        r = client.post("/generate", json={"prompt": "a heron", "webhook_url": receiver.url + "/done",
                                           "metadata": {"order": "A-17"}, **TINY_JOB})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        first, second = receiver.wait(2, timeout_s=60)
        job = wait_status(client, job_id, ("succeeded",), timeout_s=30,
                          predicate=lambda j: j["webhook"]["status"] == "delivered")
    assert first["body"] == second["body"] and first["headers"]["webhook-id"] == second["headers"]["webhook-id"]
    headers, body = second["headers"], second["body"]
    assert signature_ok(SECRET, headers, body) and not signature_ok(SECRET, headers, body + b" ")
    message = json.loads(body)
    assert message["type"] == "job.succeeded" and message["data"]["id"] == job_id
    assert message["data"]["request"]["metadata"] == job["request"]["metadata"] == {"order": "A-17"}
    assert message["data"]["result"]["video_url"] == f"https://video.example.com/jobs/{job_id}/video"
    assert message["data"]["result"]["size_bytes"] == job["result"]["size_bytes"]
    assert job["webhook"] == {"url": receiver.url + "/done", "status": "delivered", "attempts": 2,
                              "last_error": None, "delivered_at": job["webhook"]["delivered_at"]}
    assert "webhook_url" not in job["request"]  # kept beside the request, not sent to the generator
    metrics = wait_for(lambda: (m := client.get("/metrics").text) and
                       'wanserve_webhooks_total{outcome="delivered"} 1' in m and m, 10, "the delivered metric")
    assert "wanserve_webhooks_pending 0" in metrics


def test_a_host_outside_the_allowed_list_is_refused(app):
    _, client = app
    before = client.get("/jobs").json()["total"]
    for url, words in (("http://169.254.169.254/latest/meta-data", "not one this server sends to"),
                       ("file:///etc/passwd", "http:// or https://")):
        r = client.post("/generate", json={"prompt": "x", "webhook_url": url, **TINY_JOB})
        assert r.status_code == 422, r.text
        [entry] = [e for e in r.json()["detail"] if e["loc"][-1] == "webhook_url"]
        assert words in entry["msg"]
    assert client.get("/jobs").json()["total"] == before


def test_metadata_is_bounded(app):
    _, client = app
    for metadata, words in (({f"k{i}": "v" for i in range(17)}, "at most 16"), ({"": "v"}, "1 to 64"),
                            ({"k": "v" * 513}, "at most 512"), ({"k": 5}, "string")):
        r = client.post("/generate", json={"prompt": "x", "metadata": metadata, **TINY_JOB})
        assert r.status_code == 422, r.text
        assert any(e["loc"][1] == "metadata" and words in e["msg"] for e in r.json()["detail"]), r.text
