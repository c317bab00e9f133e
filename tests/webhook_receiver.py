"""A local HTTP server that receives webhooks for the tests: it answers each POST with the next
scripted reply and records what it got."""
from __future__ import annotations

import base64
import hashlib
import hmac
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Union

# A reply: an HTTP status, ("sleep", seconds) to answer 200 late, or ("redirect", url) for a 302.
Reply = Union[int, tuple[str, Any]]


class WebhookReceiver:
    def __init__(self, replies: Optional[list[Reply]] = None, default: Reply = 200,
                 tls: Optional[tuple[str, str]] = None):
        """``tls``: (certificate file, key file) to answer HTTPS instead of HTTP."""
        self.replies = list(replies or [])
        self.default = default
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    receiver.received.append({"path": self.path, "headers": {k.lower(): v for k, v in
                                                                             self.headers.items()},
                                              "body": body, "at": time.time()})
                    reply = receiver.replies.pop(0) if receiver.replies else receiver.default
                if isinstance(reply, tuple) and reply[0] == "sleep":
                    time.sleep(reply[1])
                    reply = 200
                if isinstance(reply, tuple) and reply[0] == "redirect":
                    self.send_response(302)
                    self.send_header("Location", reply[1])
                else:
                    self.send_response(reply)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):  # keep the test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "WebhookReceiver":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait(self, count: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {count} webhook(s); got {len(self.received)}")


def signature_ok(secret: str, headers: dict, body: bytes) -> bool:
    """The receiver's check, written from the Standard Webhooks spec (not with service.webhooks): an
    HMAC-SHA256 of "id.timestamp.body", keyed with the base64 of a ``whsec_`` secret, else its bytes."""
    key = base64.b64decode(secret.split("_", 1)[1]) if secret.startswith("whsec_") else secret.encode()
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    given = [s.split(",", 1)[1] for s in headers["webhook-signature"].split(" ") if s.startswith("v1,")]
    return any(hmac.compare_digest(expected, g) for g in given)
