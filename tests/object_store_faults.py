"""A local S3 server (moto's own WSGI app, served by werkzeug as moto's server mode does) behind a seeded
fault injector: each request to the bucket may be answered by a fault instead of the service.

The faults are those of real object stores: a request that times out (no answer before the client's read
timeout, and never carried out), 500 InternalError, 503 SlowDown, a connection reset (RST, SO_LINGER 0)
before an answer, a PUT whose body was received and stored but whose connection is then reset (the client
cannot know it landed), and a GET whose body is cut short (Content-Length promises more bytes than come
before the connection closes). An outage answers every request 503 SlowDown until it is lifted.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

KINDS = {
    "timeout": "timeouts (no answer within the client's read timeout)",
    "500": "500 InternalError answers",
    "503": "503 SlowDown answers",
    "reset": "connection resets before an answer",
    "put-then-reset": "PUTs stored, then the connection reset (the client never hears)",
    "short-read": "GETs whose body was cut short",
}
ERRORS = {
    "500": (
        "500 Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
    "503": ("503 Slow Down", "SlowDown", "Please reduce your request rate."),
}


class Faults:
    """Which requests fail and how: a seeded draw per request, at `rate`; counted per kind."""

    def __init__(self, seed: int, rate: float, timeout_s: float):
        self.rng, self.rate, self.timeout_s = random.Random(seed), rate, timeout_s
        self.counts: Counter = Counter()
        self.requests = 0
        self.outage_after: int | None = None  # from this many requests on, every request gets a 503
        self.outage_when = lambda: False  # or from when this says so
        self.lock = threading.Lock()

    def draw(self, method: str) -> str | None:
        with self.lock:
            self.requests += 1
            if (self.outage_after is not None and self.requests > self.outage_after) or self.outage_when():
                self.counts["503 (outage)"] += 1
                return "503"
            if self.rng.random() >= self.rate:
                return None
            kinds = ["timeout", "500", "503", "reset"]
            kinds += ["put-then-reset"] if method == "PUT" else ["short-read"] if method == "GET" else []
            kind = self.rng.choice(kinds)
            self.counts[kind] += 1
            return kind

    @property
    def injected(self) -> int:
        return sum(self.counts.values())


def _reset(environ) -> None:
    """End the connection here, unanswered: its close becomes an RST (SO_LINGER 0), and it is shut down at
    once (else the server would keep it open, waiting for another request, while the client waits for an
    answer)."""
    sock = environ["werkzeug.socket"]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.shutdown(socket.SHUT_RDWR)
    raise ConnectionResetError("fault injected: connection reset")


def _error(environ, start_response, kind: str) -> list[bytes]:
    status, code, message = ERRORS[kind]
    body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>'
    start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return (
        [b""] if environ["REQUEST_METHOD"] == "HEAD" else [body.encode()]
    )  # (an answer to HEAD has no body)


class FaultyApp:
    """moto's app behind `faults`, for requests to `bucket` (creating the bucket is never faulted)."""

    def __init__(self, faults: Faults, bucket: str):
        self.app, self.faults, self.bucket = DomainDispatcherApplication(create_backend_app), faults, bucket

    def __call__(self, environ, start_response):
        inside = environ.get("PATH_INFO", "").startswith(f"/{self.bucket}/")
        kind = self.faults.draw(environ["REQUEST_METHOD"]) if inside else None
        if kind is None:
            return self.app(environ, start_response)
        if kind in ERRORS:
            return _error(environ, start_response, kind)
        if kind == "timeout":
            time.sleep(self.faults.timeout_s)  # the client gave up meanwhile; the request is not carried out
            _reset(environ)
        if kind == "put-then-reset":
            b"".join(self.app(environ, lambda *a, **k: None))  # stored
            _reset(environ)
        if kind == "short-read":
            return self._short(environ, start_response)
        _reset(environ)

    def _short(self, environ, start_response):
        answer = {}
        body = b"".join(
            self.app(environ, lambda status, headers, *a: answer.update(status=status, headers=headers))
        )
        if not answer["status"].startswith("2") or len(body) < 2:  # nothing to cut short: reset instead
            with self.faults.lock:
                self.faults.counts["short-read"] -= 1
                self.faults.counts["reset"] += 1
            _reset(environ)
        start_response(answer["status"], answer["headers"])  # Content-Length: the whole body
        return [body[: len(body) // 2]]


class FaultyS3:
    """The server on a free port of 127.0.0.1, in a thread: `url`, `faults`, `stop()`."""

    def __init__(self, faults: Faults, bucket: str):
        self.faults = faults
        self.server = make_server(
            "127.0.0.1", 0, FaultyApp(faults, bucket), threaded=True, request_handler=MotoRequestHandler
        )
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join()
