"""Webhooks: a job's outcome POSTed to the URL its request named, when the job finishes.

Delivery is at least once. Each finished job owes one message: ``job.succeeded``, ``job.failed`` or
``job.cancelled``, whose body is ``{"type", "timestamp", "data": <the job's view>}``. Its headers
follow the Standard Webhooks specification (standardwebhooks.com):
- ``webhook-id`` (the same on every attempt, so a receiver can drop repeats);
- ``webhook-timestamp`` (Unix seconds);
- with ``webhook_secret`` set, ``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``.

A 2xx answer delivers the message. Anything else is tried again after ``webhook_retry_s``, doubling
each time, up to ``webhook_max_attempts``; a 410 (Gone) stops at once. Redirects are not followed.

A URL is accepted only if its host is in ``webhook_allowed_hosts``. The JobQueue sends from inside
the cluster, so an open list would let any client make it call internal addresses. For the same
reason a listed *name* must resolve to public addresses at each try (unless
``webhook_private_networks`` is set), and the connection goes to the addresses that were checked.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import time
from datetime import datetime, timezone
from typing import Any, Optional
from urllib.parse import urlsplit

from service.config import ServiceSettings
from service.logs import job_log
from service.queue import JobQueue
from service.views import job_view

logger = logging.getLogger("ray.serve")

MAX_URL_CHARS = 2048
RETRY_CAP_S = 3600.0  # the longest wait between two attempts
MAX_SENDING = 8  # deliveries in flight at once
HOLD_MARGIN_S = 30.0  # a delivery in flight is held this much beyond its timeout from other senders
# webhook_timeout_s bounds each socket operation; a receiver that trickles its answer, or a slow name
# lookup, could outlast it many times. A try is given up (and retried later) this long past it, well
# within its hold, so that no other sender starts the same delivery meanwhile.
DEADLINE_MARGIN_S = 10.0
EVENT_TYPES = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}


def url_problem(url: str, allowed_hosts: list[str]) -> Optional[str]:
    """Why ``url`` may not be a webhook here, or ``None`` if it may. ``allowed_hosts`` entries are
    host names or addresses (``hooks.example.com``, ``10.0.0.7``), optionally ``*.``-prefixed for
    any subdomain and ``:port``-suffixed for one port only."""
    if not allowed_hosts:
        return "webhooks are not enabled on this server (its webhook_allowed_hosts is empty)"
    if len(url) > MAX_URL_CHARS:
        return f"webhook_url is longer than {MAX_URL_CHARS} characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"webhook_url is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "webhook_url must be an http:// or https:// URL with a host"
    if parts.username is not None or parts.password is not None:
        return "webhook_url may not carry credentials; use webhook signatures (webhook_secret) to authenticate"
    if not host_allowed(parts.hostname, port, allowed_hosts):
        return f"webhook host {parts.hostname!r} is not one this server sends to (webhook_allowed_hosts)"
    return None


def host_allowed(host: str, port: Optional[int], patterns: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for pattern in patterns:
        name, want_port = parse_host_pattern(pattern)
        if want_port is not None and port != want_port:
            continue
        if host.endswith(name[1:]) if name.startswith("*.") else host == name:
            return True
    return False


def parse_host_pattern(pattern: str) -> tuple[str, Optional[int]]:
    """``host``, ``host:port``, ``*.domain``, ``[v6]`` or ``[v6]:port`` -> (lower-case name, port or None);
    ``ValueError`` for anything else."""
    text = pattern.strip().lower()
    if text.startswith("["):
        name, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        name, port = text.split(":")
    else:
        name, port = text, ""
    name = name.rstrip(".")
    if not name or (port and not port.isdigit()) or "/" in name or "*" in name.removeprefix("*."):
        raise ValueError(f"webhook_allowed_hosts entry {pattern!r} is not a host, *.domain or host:port")
    return name, int(port) if port else None


def signing_key(secret: str) -> bytes:
    """Standard Webhooks secrets look like ``whsec_<base64 key>``; any other string is used as is."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_"):], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("webhook secret starts with 'whsec_' but the rest is not base64") from None
    return secret.encode()


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one message."""
    digest = hmac.new(signing_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def message(job: dict[str, Any], settings: ServiceSettings) -> tuple[str, bytes]:
    """A finished job's ``(webhook-id, body)``. The view's links are absolute under ``public_url``
    when it is set (which includes the app's route prefix, if any)."""
    view = job_view(job, settings.result_ttl_s, base=(settings.public_url or "").rstrip("/"))
    view.pop("webhook", None)  # the delivery's own state is not news to the receiver
    finished = datetime.fromtimestamp(job["finished_at"] or time.time(), timezone.utc)
    timestamp = finished.isoformat().replace("+00:00", "Z")
    body = {"type": EVENT_TYPES[job["status"]], "timestamp": timestamp, "data": view}
    return f"msg_{job['id']}_{job['status']}", json.dumps(body, separators=(",", ":")).encode()


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:10.0.0.1 reaches 10.0.0.1
    return address.is_global and not address.is_multicast


def address_problem(host: str, addresses: list[tuple], private_networks: bool) -> Optional[str]:
    """Why the resolved ``addresses`` of ``host`` may not be called, or ``None``. Every address must be
    public (not loopback, private, link-local, shared or reserved) unless ``private_networks`` is set.
    An address written as the URL's host was listed as such by the operator, so it is always allowed.
    ``post`` then connects to exactly these addresses: a name whose answer changes between the check
    and the connection (DNS rebinding) cannot slip an internal address in."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if private_networks:
        return None
    for address in addresses:
        text = address[4][0]
        if not _is_public(ipaddress.ip_address(text.split("%", 1)[0])):  # without an IPv6 zone
            return (f"webhook host {host!r} resolves to {text}, which is not a public address (list the "
                    "address itself in webhook_allowed_hosts, or set webhook_private_networks)")
    return None


def _connect(addresses: list[tuple], timeout_s: float) -> socket.socket:
    error: OSError = OSError("no address to connect to")
    for family, kind, proto, _, sockaddr in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout_s)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


class _CheckedHTTP(http.client.HTTPConnection):
    """Connects only to the addresses ``post`` checked (the Host header keeps the name)."""

    def __init__(self, host: str, port: int, addresses: list[tuple], timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.addresses = addresses

    def connect(self) -> None:
        self.sock = _connect(self.addresses, self.timeout)


def tls_context() -> ssl.SSLContext:
    """The system's trusted CAs, certificate and name checked (tests swap in their own CA)."""
    return ssl.create_default_context()


class _CheckedHTTPS(_CheckedHTTP):
    default_port = 443

    def connect(self) -> None:  # TLS is verified against the name, as for any HTTPS client
        self.sock = tls_context().wrap_socket(_connect(self.addresses, self.timeout), server_hostname=self.host)


def post(url: str, msg_id: str, body: bytes, secret: Optional[str], timeout_s: float,
         private_networks: bool = False) -> tuple[Optional[str], bool]:
    """POST one message (blocking), straight to the receiver: no proxy, no redirects (either could lead
    past the checks). Returns ``(error, retry)``: ``error`` None when delivered."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    try:
        addresses = list(dict.fromkeys(socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)))
    except (OSError, ValueError) as exc:  # a name that does not resolve now may later (ValueError: bad IDNA)
        return f"cannot resolve {parts.hostname!r}: {exc}", True
    problem = address_problem(parts.hostname, addresses, private_networks)
    if problem is not None:  # not a passing state: the operator has to change the settings
        return problem, False
    timestamp = int(time.time())
    headers = {"content-type": "application/json", "user-agent": "wanserve-webhooks",
               "webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
    if secret:
        headers["webhook-signature"] = signature(secret, msg_id, timestamp, body)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = (_CheckedHTTPS if https else _CheckedHTTP)(parts.hostname, port, addresses, timeout_s)
    try:
        connection.request("POST", target, body=body, headers=headers)
        answer = connection.getresponse()
        answer.read(1024)
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:300], True
    finally:
        connection.close()
    if 200 <= answer.status < 300:
        return None, False
    return f"HTTP {answer.status} {answer.reason}", answer.status != 410  # 3xx are not followed


class WebhookSender:
    """Sends the webhooks the JobQueue owes, from its dispatch loop (only while it holds the lease)."""

    def __init__(self, queue: JobQueue, settings: ServiceSettings):
        self.queue = queue
        self.settings = settings
        self.secret = settings.resolved_webhook_secret()
        if self.secret:
            signing_key(self.secret)  # a malformed secret fails the start, not every delivery
        self.sending: dict[str, asyncio.Task] = {}

    def retry_delay_s(self, attempts: int) -> float:
        return min(RETRY_CAP_S, self.settings.webhook_retry_s * 2 ** (attempts - 1))

    def send_due(self) -> None:
        """Start deliveries for the webhooks that are due, up to ``MAX_SENDING`` at once."""
        room = MAX_SENDING - len(self.sending)
        if room <= 0:
            return
        # A delivery in flight is held (not due), so what comes back is not being sent already; one
        # still in flight here past its hold (it cannot be, see DEADLINE_MARGIN_S) is not sent twice.
        for job in self.queue.webhooks_due(time.time(), limit=room + len(self.sending)):
            if job["id"] in self.sending:
                continue
            if len(self.sending) >= MAX_SENDING:
                break
            started = self.queue.start_webhook(job["id"], self.settings.webhook_timeout_s + HOLD_MARGIN_S)
            if started is not None:
                task = asyncio.get_running_loop().create_task(self._deliver(started))
                self.sending[job["id"]] = task

    async def _deliver(self, job: dict[str, Any]) -> None:
        log = job_log(logger, job["id"])
        try:
            msg_id, body = message(job, self.settings)
            # Checked again at each try: the operator may have taken the host off the list since.
            error = url_problem(job["webhook_url"], self.settings.webhook_allowed_hosts)
            retry = False
            if error is None:
                deadline_s = self.settings.webhook_timeout_s + DEADLINE_MARGIN_S
                try:
                    error, retry = await asyncio.wait_for(
                        asyncio.to_thread(post, job["webhook_url"], msg_id, body, self.secret,
                                          self.settings.webhook_timeout_s, self.settings.webhook_private_networks),
                        deadline_s)
                except asyncio.TimeoutError:  # the thread ends at its socket timeouts; its answer is dropped
                    error, retry = f"no complete answer within {deadline_s:g} s", True
            attempts = job["webhook_attempts"]
            if error is None:
                log.info("webhook delivered (attempt %d)", attempts)
                self.queue.record_webhook(job["id"], error=None, retry_at=None)
            elif retry and attempts < self.settings.webhook_max_attempts:
                delay = self.retry_delay_s(attempts)
                log.warning("webhook attempt %d failed (%s); next in %.0f s", attempts, error, delay)
                self.queue.record_webhook(job["id"], error=error, retry_at=time.time() + delay)
            else:
                log.warning("webhook failed for good after %d attempts: %s", attempts, error)
                self.queue.record_webhook(job["id"], error=f"{error} (after {attempts} attempts)", retry_at=None)
        except Exception:  # noqa: BLE001 - the hold expires and the next sender tries again
            log.exception("webhook delivery error")
        finally:
            if self.sending.get(job["id"]) is asyncio.current_task():
                del self.sending[job["id"]]

    async def drain(self, timeout_s: float) -> None:
        """Let deliveries in flight finish (at shutdown); an unfinished one is sent again later."""
        if self.sending:
            await asyncio.wait(list(self.sending.values()), timeout=timeout_s)
