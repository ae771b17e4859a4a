"""A fault-injecting HTTP proxy on 127.0.0.1, in front of a real OpenAI-compatible server.

Each POST to ``/v1/chat/completions`` is attributed to the face image it carries (the sha256 of
its image data URL) and counted; a ``plan(image, attempt)`` callable (attempt = how many requests
for that image came before, repairs included) decides what happens to it:

- ``None``: forwarded to the server, the answer relayed;
- ``"timeout"``: held open without an answer for ``hold_s`` (longer than the client's timeout);
- ``"reset"``: the connection is closed with a TCP RST, no answer;
- ``"500"``, ``"429"``: that status with a JSON error body (429 with ``Retry-After: 0``);
- ``"malformed"``: 200 with a body that is not JSON;
- ``"bad_content"``: forwarded, then the message content is cut in half (a well-formed completion
  whose answer is invalid JSON: the client's repair path).

``latency_s`` delays every forwarded request (to make runs long enough to be killed mid-way).
Requests are counted per image when they arrive (``requests_per_image``), so a request still in
flight when its client is killed is counted with that client's run; ``events`` records how each
ended (image, attempt, fault, status). Thread-safe.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from facemllm.annotators.mllm_client import image_data_url

Plan = Callable[[str, int], str | None]


@dataclass(frozen=True)
class ProxyEvent:
    image: str | None
    attempt: int
    fault: str | None
    status: int | None  # what the client got (None: no answer)


def image_of(body: bytes) -> str | None:
    """sha256 of the first image data URL in a chat request body."""
    try:
        messages = json.loads(body)["messages"]
    except (ValueError, KeyError, TypeError):
        return None
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "image_url":
                    return hashlib.sha256(part["image_url"]["url"].encode()).hexdigest()
    return None


def image_hash(jpeg: bytes) -> str:
    """How the proxy names an image: the sha256 of the data URL a client sends for it."""
    return hashlib.sha256(image_data_url(jpeg).encode()).hexdigest()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that went away (killed, timed out) is part of the tests, not an error to print."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FaultProxy:
    def __init__(self, upstream: str, plan: Plan | None = None, latency_s: float = 0.0, hold_s: float = 10.0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.plan: Plan = plan or (lambda image, attempt: None)
        self.latency_s = latency_s
        self.hold_s = hold_s
        self.events: list[ProxyEvent] = []  # one per finished request, with what the client got
        self.arrivals: list[str | None] = []  # the image of every request, counted when it arrives
        self._attempts: Counter[str | None] = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def reset_counts(self) -> None:
        with self._lock:
            self.events.clear()
            self.arrivals.clear()
            self._attempts.clear()

    def requests_per_image(self) -> Counter[str]:
        """Requests per image, counted on arrival (a request still in flight counts already)."""
        with self._lock:
            return Counter(image for image in self.arrivals if image is not None)

    def answered_images(self) -> set[str]:
        with self._lock:
            return {e.image for e in self.events if e.status == 200 and e.fault is None}

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def _decide(self, image: str | None) -> tuple[int, str | None]:
        with self._lock:
            attempt = self._attempts[image]
            self._attempts[image] += 1
            self.arrivals.append(image)
        return attempt, (self.plan(image, attempt) if image is not None else None)

    def _record(self, event: ProxyEvent) -> None:
        with self._lock:
            self.events.append(event)

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, method: str, body: bytes | None) -> tuple[int, bytes, str]:
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=600)
                try:
                    headers = {"Content-Type": "application/json"} if body is not None else {}
                    connection.request(method, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    return response.status, response.read(), response.getheader("Content-Type", "")
                finally:
                    connection.close()

            def do_GET(self) -> None:
                status, payload, _ = self._forward("GET", None)
                self._send(status, payload)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                image = image_of(body)
                attempt, fault = proxy._decide(image)
                if fault == "timeout":
                    proxy._stopping.wait(proxy.hold_s)
                    self.close_connection = True
                    proxy._record(ProxyEvent(image, attempt, fault, None))
                    return
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()  # RST before the server's orderly shutdown can send a FIN
                    self.close_connection = True
                    proxy._record(ProxyEvent(image, attempt, fault, None))
                    return
                if fault in ("500", "429"):
                    headers = {"Retry-After": "0"} if fault == "429" else None
                    self._send(int(fault), b'{"error": {"message": "injected"}}', headers)
                    proxy._record(ProxyEvent(image, attempt, fault, int(fault)))
                    return
                if fault == "malformed":
                    self._send(200, b"<html>upstream hiccup</html>")
                    proxy._record(ProxyEvent(image, attempt, fault, 200))
                    return
                if proxy.latency_s:
                    time.sleep(proxy.latency_s)
                status, payload, _ = self._forward("POST", body)
                if fault == "bad_content" and status == 200:
                    answer = json.loads(payload)
                    content = answer["choices"][0]["message"]["content"]
                    answer["choices"][0]["message"]["content"] = content[: len(content) // 2]
                    payload = json.dumps(answer).encode()
                proxy._record(ProxyEvent(image, attempt, fault, status))
                self._send(status, payload)

        return Handler
