"""Webhooks without Ray: ``WebhookSender`` over a ``JobQueue`` posting to a local receiver. What a
receiver gets (Standard Webhooks headers, a signature checked here by the spec's own recipe), retries
with backoff, giving up, 410, timeouts, redirects not followed, the hold that keeps two senders off
one delivery, and a pending webhook surviving a restart. The HTTP path is in test_webhooks_service.py."""
from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import subprocess
import time

import pytest

from service.config import ServiceSettings
from service.metrics import render_metrics
from service.queue import JobQueue
from service import webhooks
from service.webhooks import WebhookSender, address_problem, parse_host_pattern, url_problem
from service_helpers import make_settings, write_old_store
from webhook_receiver import WebhookReceiver, signature_ok

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def settings_for(tmp_path, **overrides) -> ServiceSettings:
    fields = dict(webhook_allowed_hosts=["127.0.0.1"], webhook_secret=SECRET, webhook_retry_s=0.05,
                  webhook_timeout_s=2.0, public_url="https://video.example.com")
    fields.update(overrides)
    return make_settings(tmp_path, **fields)


def finished(queue: JobQueue, url: str, status: str = "succeeded") -> str:
    job, _ = queue.submit({"prompt": "a cat", "seed": 7, "metadata": {"order": "A-17"}}, webhook_url=url)
    if status == "cancelled":
        queue.cancel(job["id"])  # while queued
        return job["id"]
    queue.mark_running(job["id"])
    if status == "succeeded":
        queue.finish(job["id"], "succeeded", result={"width": 64, "height": 64}, result_bytes=10)
    else:
        queue.finish(job["id"], status, error="out of memory")
    return job["id"]


def pump(sender: WebhookSender, until, timeout_s: float = 20.0) -> None:
    """Run the sender as the dispatch loop does until ``until()`` holds."""
    async def loop():
        deadline = time.monotonic() + timeout_s
        while not until():
            assert time.monotonic() < deadline, "timed out pumping webhooks"
            sender.send_due()
            await asyncio.sleep(0.02)
        await sender.drain(5.0)

    asyncio.run(loop())


@pytest.mark.parametrize("url, hosts, problem", [
    ("https://hooks.example.com/x", ["hooks.example.com"], None),
    ("https://HOOKS.example.com./x", ["hooks.example.com"], None),
    ("https://a.b.example.com/x", ["*.example.com"], None),
    ("https://example.com/x", ["*.example.com"], "not one this server sends to"),
    ("https://evil-example.com/x", ["*.example.com"], "not one this server sends to"),
    ("http://10.0.0.7:8080/x", ["10.0.0.7:8080"], None),
    ("http://10.0.0.7:8081/x", ["10.0.0.7:8080"], "not one this server sends to"),
    ("http://[::1]:9000/x", ["[::1]:9000"], None),
    ("http://169.254.169.254/latest", ["hooks.example.com"], "not one this server sends to"),
    ("https://hooks.example.com/x", [], "webhooks are not enabled"),
    ("ftp://hooks.example.com/x", ["hooks.example.com"], "http:// or https://"),
    ("https:///x", ["hooks.example.com"], "http:// or https://"),
    ("https://u:p@hooks.example.com/x", ["hooks.example.com"], "credentials"),
    ("https://hooks.example.com:99999/x", ["hooks.example.com"], "not a valid URL"),
    ("https://hooks.example.com/" + "a" * 3000, ["hooks.example.com"], "longer than"),
])
def test_which_urls_are_accepted(url, hosts, problem):
    found = url_problem(url, hosts)
    assert (found is None) if problem is None else (problem in found), found


def test_bad_settings_are_refused_at_start(tmp_path):
    for bad in (["hooks.example.com:http"], ["a/b"], ["*"], ["hooks.*.com"]):
        with pytest.raises(ValueError, match="webhook_allowed_hosts entry"):
            parse_host_pattern(bad[0])
        with pytest.raises(ValueError, match="webhook_allowed_hosts"):
            ServiceSettings(webhook_allowed_hosts=bad)
    with pytest.raises(ValueError, match="not both"):
        ServiceSettings(webhook_secret="s", webhook_secret_file=str(tmp_path / "f"))
    with pytest.raises(ValueError, match="public_url"):
        ServiceSettings(public_url="video.example.com")
    settings = settings_for(tmp_path, webhook_secret="whsec_not base64!")
    with pytest.raises(ValueError, match="not base64"):
        WebhookSender(JobQueue(settings.db_path), settings)


def test_a_finished_job_posts_one_signed_message(tmp_path):
    settings = settings_for(tmp_path)
    queue = JobQueue(settings.db_path)
    sender = WebhookSender(queue, settings)
    with WebhookReceiver() as receiver:
        job_id = finished(queue, receiver.url + "/hooks/video?tenant=7")
        pump(sender, lambda: queue.get(job_id)["webhook_status"] == "delivered")
        [got] = receiver.received
        for _ in range(5):  # nothing more is owed
            asyncio.run(asyncio.sleep(0.01))
            sender.send_due()
        assert len(receiver.received) == 1
    assert got["path"] == "/hooks/video?tenant=7"
    headers, body = got["headers"], got["body"]
    assert headers["content-type"] == "application/json"
    assert headers["webhook-id"] == f"msg_{job_id}_succeeded"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert signature_ok(SECRET, headers, body)
    assert not signature_ok(SECRET, headers, body.replace(b"a cat", b"a dog"))  # the check can fail
    message = json.loads(body)
    assert message["type"] == "job.succeeded" and message["timestamp"].endswith("Z")
    data = message["data"]
    assert data["id"] == job_id and data["status"] == "succeeded" and data["request"]["prompt"] == "a cat"
    assert data["request"]["metadata"] == {"order": "A-17"}  # the client's labels, to match it up
    assert data["result"]["video_url"] == f"https://video.example.com/jobs/{job_id}/video"
    assert "webhook" not in data
    job = queue.get(job_id)
    assert job["webhook_attempts"] == 1 and job["webhook_delivered_at"] is not None and job["webhook_error"] is None
    assert queue.counters()["webhooks_delivered"] == 1 and queue.webhooks_pending() == 0


def test_failed_and_cancelled_jobs_are_reported_too(tmp_path):
    settings = settings_for(tmp_path, webhook_secret=None, public_url=None)
    queue = JobQueue(settings.db_path)
    sender = WebhookSender(queue, settings)
    with WebhookReceiver() as receiver:
        failed = finished(queue, receiver.url, "failed")
        cancelled = finished(queue, receiver.url, "cancelled")
        running, _ = queue.submit({"prompt": "still going"}, webhook_url=receiver.url)
        queue.mark_running(running["id"])
        pump(sender, lambda: len(receiver.received) == 2)
    messages = {json.loads(r["body"])["data"]["id"]: (json.loads(r["body"]), r["headers"]) for r in receiver.received}
    assert messages[failed][0]["type"] == "job.failed" and messages[failed][0]["data"]["error"] == "out of memory"
    assert messages[cancelled][0]["type"] == "job.cancelled"
    assert all("webhook-signature" not in h for _, h in messages.values())  # no secret: unsigned
    assert running["id"] not in messages and queue.get(running["id"])["webhook_status"] == "pending"


def test_a_failing_receiver_is_retried_with_backoff_until_it_answers(tmp_path):
    settings = settings_for(tmp_path, webhook_retry_s=0.2)
    queue = JobQueue(settings.db_path)
    sender = WebhookSender(queue, settings)
    with WebhookReceiver(replies=[500, 503, 200]) as receiver:
        job_id = finished(queue, receiver.url)
        pump(sender, lambda: queue.get(job_id)["webhook_status"] == "delivered")
    assert len(receiver.received) == 3
    assert len({r["headers"]["webhook-id"] for r in receiver.received}) == 1  # one message, three tries
    gaps = [b["at"] - a["at"] for a, b in zip(receiver.received, receiver.received[1:])]
    assert gaps[0] >= 0.2 * 0.9 and gaps[1] >= 0.4 * 0.9, gaps  # the wait doubles
    job = queue.get(job_id)
    assert job["webhook_attempts"] == 3 and job["webhook_error"] is None


def test_it_gives_up_after_max_attempts_and_says_why(tmp_path):
    settings = settings_for(tmp_path, webhook_max_attempts=3)
    queue = JobQueue(settings.db_path)
    sender = WebhookSender(queue, settings)
    with WebhookReceiver(default=500) as receiver:
        job_id = finished(queue, receiver.url)
        pump(sender, lambda: queue.get(job_id)["webhook_status"] == "failed")
        time.sleep(0.3)
        asyncio.run(asyncio.sleep(0))
        sender.send_due()  # given up: nothing more is sent
    assert len(receiver.received) == 3
    job = queue.get(job_id)
    assert job["webhook_error"].startswith("HTTP 500") and "after 3 attempts" in job["webhook_error"]
    assert queue.counters()["webhooks_failed"] == 1
    metrics = render_metrics({"counts": queue.counts(), "counters": queue.counters(), "engines": [],
                              "webhooks_pending": queue.webhooks_pending()})
    assert 'wanserve_webhooks_total{outcome="failed"} 1' in metrics and "wanserve_webhooks_pending 0" in metrics


def test_410_gone_stops_at_once(tmp_path):
    settings = settings_for(tmp_path)
    queue = JobQueue(settings.db_path)
    sender = WebhookSender(queue, settings)
    with WebhookReceiver(default=410) as receiver:
        job_id = finished(queue, receiver.url)
        pump(sender, lambda: queue.get(job_id)["webhook_status"] == "failed")
    assert len(receiver.received) == 1 and "HTTP 410" in queue.get(job_id)["webhook_error"]


def test_a_slow_or_absent_receiver_is_an_error_and_retried(tmp_path):
    settings = settings_for(tmp_path, webhook_timeout_s=0.3, webhook_retry_s=30)
    queue = JobQueue(settings.db_path)
    sender = WebhookSender(queue, settings)
    with WebhookReceiver(replies=[("sleep", 1.5)]) as receiver:
        slow = finished(queue, receiver.url)
        pump(sender, lambda: queue.get(slow)["webhook_error"] is not None)
    closed = finished(queue, receiver.url)  # the receiver is gone: nothing listens on its port
    pump(sender, lambda: queue.get(closed)["webhook_error"] is not None)
    for job_id, word in ((slow, "timed out"), (closed, "refused")):
        job = queue.get(job_id)
        assert job["webhook_status"] == "pending" and word in job["webhook_error"].lower(), job["webhook_error"]
        assert job["webhook_next_at"] > time.time() + 20  # the next try waits webhook_retry_s
    assert queue.webhooks_pending() == 2


def test_redirects_are_not_followed(tmp_path):
    settings = settings_for(tmp_path, webhook_max_attempts=1)
    queue = JobQueue(settings.db_path)
    sender = WebhookSender(queue, settings)
    with WebhookReceiver() as elsewhere, WebhookReceiver(replies=[("redirect", elsewhere.url + "/x")]) as receiver:
        job_id = finished(queue, receiver.url)
        pump(sender, lambda: queue.get(job_id)["webhook_status"] == "failed")
        assert elsewhere.received == []
    assert "HTTP 302" in queue.get(job_id)["webhook_error"]


def test_a_delivery_in_flight_is_held_from_other_senders_and_a_pending_one_survives_a_restart(tmp_path):
    settings = settings_for(tmp_path)
    queue = JobQueue(settings.db_path)
    with WebhookReceiver() as receiver:
        job_id = finished(queue, receiver.url)
        held = queue.start_webhook(job_id, hold_s=60)  # another sender is sending it (or died doing so)
        assert held["webhook_attempts"] == 1 and queue.start_webhook(job_id, hold_s=60) is None
        queue.close()
        # A new JobQueue replica over the same store: the held delivery is left alone until its hold ends.
        queue = JobQueue(settings.db_path)
        sender = WebhookSender(queue, settings)
        asyncio.run(_send_once(sender))
        assert receiver.received == []
        queue._db.execute("UPDATE jobs SET webhook_next_at = ? WHERE id = ?", (time.time() - 1, job_id))
        pump(sender, lambda: queue.get(job_id)["webhook_status"] == "delivered")
    assert len(receiver.received) == 1 and queue.get(job_id)["webhook_attempts"] == 2


async def _send_once(sender: WebhookSender) -> None:
    sender.send_due()
    await sender.drain(5.0)


def test_an_older_database_gains_the_webhook_columns(tmp_path):
    db = tmp_path / "jobs.sqlite3"
    write_old_store(db, ", files_deleted_at REAL, files_deleted_reason TEXT")  # as the eleventh release wrote it
    queue = JobQueue(db)
    assert queue.get("a1")["webhook_url"] is None and queue.webhooks_pending() == 0
    assert queue.webhooks_due(time.time()) == []
    assert "jobs_webhooks" in {r[1] for r in queue._db.execute("PRAGMA index_list(jobs)")}


def test_the_idempotency_fingerprint_of_a_request_without_a_webhook_is_unchanged():
    from service.queue import request_fingerprint
    from service.schemas import GenerateRequest, fingerprint_fields

    plain = GenerateRequest(prompt="a cat", seed=3)
    before_webhooks = plain.model_dump(mode="json")
    before_webhooks.pop("webhook_url")  # the fields as the eleventh release hashed them
    before_webhooks.pop("metadata")
    assert request_fingerprint(fingerprint_fields(plain)) == request_fingerprint(before_webhooks)
    hooked = GenerateRequest(prompt="a cat", seed=3, webhook_url="https://hooks.example.com/a")
    assert request_fingerprint(fingerprint_fields(hooked)) != request_fingerprint(fingerprint_fields(plain))
    labelled = GenerateRequest(prompt="a cat", seed=3, metadata={"order": "A-17"})
    assert request_fingerprint(fingerprint_fields(labelled)) != request_fingerprint(fingerprint_fields(plain))


def test_a_host_taken_off_the_list_is_not_called_any_more(tmp_path):
    settings = settings_for(tmp_path)
    queue = JobQueue(settings.db_path)
    with WebhookReceiver() as receiver:
        job_id = finished(queue, receiver.url)  # accepted while 127.0.0.1 was listed
        narrower = settings_for(tmp_path, webhook_allowed_hosts=["hooks.example.com"])  # a restart, new list
        sender = WebhookSender(queue, narrower)
        pump(sender, lambda: queue.get(job_id)["webhook_status"] == "failed")
        assert receiver.received == []
    assert "not one this server sends to" in queue.get(job_id)["webhook_error"]


# --- where a webhook may connect: names resolving inside, DNS rebinding, TLS ---

def _info(address: str, port: int = 443) -> tuple:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return (family, socket.SOCK_STREAM, 6, "", (address, port))


@pytest.mark.parametrize("host, addresses, private_networks, refused", [
    ("hooks.example.com", ["93.184.215.14"], False, None),
    ("hooks.example.com", ["93.184.215.14", "10.0.0.9"], False, "10.0.0.9"),  # one inside is enough
    ("hooks.example.com", ["127.0.0.1"], False, "127.0.0.1"),
    ("hooks.example.com", ["169.254.169.254"], False, "169.254.169.254"),  # cloud metadata
    ("hooks.example.com", ["100.64.0.1"], False, "100.64.0.1"),  # shared (carrier-grade NAT)
    ("hooks.example.com", ["::ffff:10.0.0.1"], False, "::ffff:10.0.0.1"),  # IPv4-mapped
    ("hooks.example.com", ["fd00::7"], False, "fd00::7"),
    ("hooks.example.com", ["10.0.0.9"], True, None),  # the operator allows in-cluster receivers
    ("10.0.0.7", ["10.0.0.7"], False, None),  # an address listed as such
])
def test_a_name_must_resolve_to_public_addresses(host, addresses, private_networks, refused):
    problem = address_problem(host, [_info(a) for a in addresses], private_networks)
    if refused is None:
        assert problem is None
    else:
        assert f"resolves to {refused}," in problem and "webhook_private_networks" in problem


def test_a_listed_name_that_resolves_to_loopback_is_not_called(tmp_path):
    with WebhookReceiver() as receiver:
        url = f"http://localhost:{receiver.port}/hook"
        settings = settings_for(tmp_path, webhook_allowed_hosts=["localhost"])
        queue = JobQueue(settings.db_path)
        job_id = finished(queue, url)
        pump(WebhookSender(queue, settings), lambda: queue.get(job_id)["webhook_status"] != "pending")
        job = queue.get(job_id)
        assert job["webhook_status"] == "failed" and job["webhook_attempts"] == 1  # not retried
        assert "not a public address" in job["webhook_error"] and receiver.received == []

        allowed = settings_for(tmp_path / "b", webhook_allowed_hosts=["localhost"], webhook_private_networks=True)
        queue = JobQueue(allowed.db_path)
        job_id = finished(queue, url)
        pump(WebhookSender(queue, allowed), lambda: queue.get(job_id)["webhook_status"] == "delivered")
        assert receiver.received[0]["headers"]["host"] == f"localhost:{receiver.port}"


def test_the_connection_goes_to_the_address_that_was_checked(tmp_path, monkeypatch):
    """DNS rebinding: the name is resolved once per try, and the connection uses that answer. A
    second lookup (which a rebinding server would answer with another address) never happens."""
    real = socket.getaddrinfo
    lookups = []

    def rebinding_dns(host, port, *args, **kwargs):
        if host != "hooks.test":
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        # The first answer is the receiver; any later one is an address nothing listens on.
        return [_info("127.0.0.1" if len(lookups) == 1 else "10.255.255.1", port)]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    settings = settings_for(tmp_path, webhook_allowed_hosts=["hooks.test"], webhook_private_networks=True)
    queue = JobQueue(settings.db_path)
    with WebhookReceiver() as receiver:
        job_id = finished(queue, f"http://hooks.test:{receiver.port}/hook?x=1")
        pump(WebhookSender(queue, settings), lambda: queue.get(job_id)["webhook_status"] == "delivered")
    assert lookups == ["hooks.test"]
    got = receiver.received[0]
    assert got["path"] == "/hook?x=1" and got["headers"]["host"] == f"hooks.test:{receiver.port}"


def _certificate(folder, name: str) -> tuple[str, str]:
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}", "-keyout", key, "-out", cert],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_https_checks_the_certificate_against_the_name(tmp_path, monkeypatch):
    cert, key = _certificate(tmp_path, "hooks.test")
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: [_info("127.0.0.1", port)]
                        if host in ("hooks.test", "other.test") else real(host, port, *a, **k))
    monkeypatch.setattr(webhooks, "tls_context", lambda: ssl.create_default_context(cafile=cert))
    settings = settings_for(tmp_path, webhook_allowed_hosts=["hooks.test", "other.test"],
                            webhook_private_networks=True, webhook_max_attempts=1)
    queue = JobQueue(settings.db_path)
    sender = WebhookSender(queue, settings)
    with WebhookReceiver(tls=(cert, key)) as receiver:
        good = finished(queue, f"https://hooks.test:{receiver.port}/hook")
        wrong_name = finished(queue, f"https://other.test:{receiver.port}/hook")
        pump(sender, lambda: all(queue.get(j)["webhook_status"] != "pending" for j in (good, wrong_name)))
    assert queue.get(good)["webhook_status"] == "delivered"
    assert len(receiver.received) == 1 and signature_ok(SECRET, receiver.received[0]["headers"],
                                                         receiver.received[0]["body"])
    failed = queue.get(wrong_name)
    assert failed["webhook_status"] == "failed" and "certificate" in failed["webhook_error"].lower()


def test_a_try_that_outlasts_its_deadline_is_given_up_and_never_sent_twice_at_once(tmp_path, monkeypatch):
    """A receiver that trickles its answer keeps every socket operation within webhook_timeout_s: the
    try as a whole is given up at its deadline, within its hold, and retried later."""
    settings = settings_for(tmp_path, webhook_timeout_s=0.2, webhook_retry_s=30)
    queue = JobQueue(settings.db_path)
    sender = WebhookSender(queue, settings)
    calls = []

    def trickling_post(url, *args):
        calls.append(url)
        time.sleep(1.5)
        return None, False

    monkeypatch.setattr(webhooks, "post", trickling_post)
    monkeypatch.setattr(webhooks, "DEADLINE_MARGIN_S", 0.3)
    job_id = finished(queue, "http://127.0.0.1:9/hook")

    async def scenario():
        sender.send_due()
        first = sender.sending[job_id]
        queue._db.execute("UPDATE jobs SET webhook_next_at = 0 WHERE id = ?", (job_id,))  # as if its hold ran out
        sender.send_due()
        assert sender.sending[job_id] is first and queue.get(job_id)["webhook_attempts"] == 1
        started = time.monotonic()
        await sender.drain(5.0)
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 1.0  # given up at 0.5 s, not when the post returns at 1.5 s
    job = queue.get(job_id)
    assert len(calls) == 1
    assert job["webhook_status"] == "pending" and job["webhook_error"] == "no complete answer within 0.5 s"
    assert job["webhook_next_at"] > time.time() + 20
