"""A hostile OpenAI-compatible server on 127.0.0.1: every misbehaviour a chat server has shown us.

``HostileServer(plan)`` answers ``POST /v1/chat/completions``; ``plan`` is a list of behaviour
names played one per request in order, the last repeated (``["gzip_bomb", "ok"]``: one bomb, then
good answers). Each request is recorded (``requests``: behaviour, the Authorization header it
carried, when it arrived). The behaviours:

- ``ok``: a valid completion whose content is a valid ``FaceResponse``, after ``latency_s``;
- ``trickle``: a 200 whose body arrives one byte every ``trickle_s`` (never trips a per-read timeout);
- ``stall_headers``: reads the request and never answers;
- ``reset``: closes the connection with a TCP RST;
- ``echo_key_401`` / ``echo_key_500``: an error body that echoes the request's Authorization header;
- ``echo_key_caption``: a valid answer whose caption holds the Authorization header's key;
- ``huge_usage``: a valid answer with ``usage.prompt_tokens`` = 2**70;
- ``negative_usage``: a valid answer with negative and non-integer token counts;
- ``gzip_bomb``: 200, ``Content-Encoding: gzip``, about 0.5 MB that inflates to 512 MiB;
- ``huge_body``: 200 with a 64 MiB body, no Content-Length (chunked);
- ``huge_declared``: a Content-Length of 64 MiB (the body is never sent);
- ``unknown_encoding``: a body labelled ``Content-Encoding: br`` (never asked for);
- ``invalid_json``: 200 with a body that is not JSON;
- ``error_object``: 200 carrying ``{"error": ...}`` instead of a completion;
- ``null_content``: a completion whose message content is null;
- ``schema_violation``: JSON content that is not a ``FaceResponse``;
- ``prose``: content that is prose, no JSON;
- ``rate_limited``: 429 with ``Retry-After: 0``; ``rate_limited_inf``: 429 with ``Retry-After: inf``.
"""

from __future__ import annotations

import json
import socket
import socketserver
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from functools import cache

BOMB_INFLATED_BYTES = 512 << 20


@cache
def gzip_bomb() -> bytes:
    """gzip of 512 MiB of zeros, built a block at a time (about 0.5 MB)."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = bytes(1 << 20)
    parts = [deflater.compress(block) for _ in range(BOMB_INFLATED_BYTES >> 20)]
    return b"".join([*parts, deflater.flush()])


def completion(content: str | None, usage: dict | None = None) -> dict:
    return {
        "id": "cmpl-hostile",
        "object": "chat.completion",
        "model": "hostile",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": usage or {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


@dataclass
class Seen:
    behaviour: str
    authorization: str | None
    at: float  # time.monotonic() when the request arrived


class ListeningServer(socketserver.ThreadingTCPServer):
    """socketserver's listen backlog is 5: with 64 clients connecting at once (every answer closes
    its connection), the kernel drops SYNs and a client retries one a second later. Real servers
    (uvicorn: 2048) queue them."""

    request_queue_size = 1024


class HostileServer:
    """``with HostileServer(["trickle"], answer=...) as server: server.url``."""

    def __init__(self, plan: list[str], answer: dict, trickle_s: float = 0.2, latency_s: float = 0.0):
        self.plan = list(plan)
        self.answer = answer  # a valid FaceResponse object: what ``ok`` answers
        self.trickle_s = trickle_s
        self.latency_s = latency_s  # how long ``ok`` takes: a server of fixed speed, for benchmarks
        self.requests: list[Seen] = []
        if "gzip_bomb" in plan:
            gzip_bomb()  # built before any request waits on it
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = ListeningServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def behaviours(self) -> list[str]:
        return [seen.behaviour for seen in self.requests]

    def _next(self, authorization: str | None) -> str:
        with self._lock:
            behaviour = self.plan[min(len(self.requests), len(self.plan) - 1)]
            self.requests.append(Seen(behaviour, authorization, time.monotonic()))
            return behaviour

    def _handler_class(self):
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                head = _read_request(self.request)
                if head is None:
                    return
                authorization = head.get("authorization")
                behaviour = server._next(authorization)
                getattr(server, f"_play_{behaviour}")(self.request, authorization or "")

        return Handler

    # -- behaviours ---------------------------------------------------------------------------------

    def _ok_content(self, caption: str | None = None) -> str:
        answer = dict(self.answer)
        if caption is not None:
            answer["caption"] = caption
        return json.dumps(answer)

    def _play_ok(self, sock, authorization) -> None:
        if self.latency_s:
            self._stop.wait(self.latency_s)
        _send_json(sock, 200, completion(self._ok_content()))

    def _play_trickle(self, sock, authorization) -> None:
        payload = json.dumps(completion(self._ok_content())).encode()
        sock.sendall(_head(200, {"Content-Type": "application/json", "Content-Length": str(len(payload))}))
        for byte in payload:
            if self._stop.wait(self.trickle_s):
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return  # the client gave up: what a deadline is for

    def _play_stall_headers(self, sock, authorization) -> None:
        self._stop.wait(60)

    def _play_reset(self, sock, authorization) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def _play_echo_key_401(self, sock, authorization) -> None:
        _send_json(sock, 401, {"error": {"message": f"invalid credentials: {authorization}"}})

    def _play_echo_key_500(self, sock, authorization) -> None:
        _send_json(
            sock, 500, {"error": {"message": f"upstream refused header Authorization: {authorization}"}}
        )

    def _play_echo_key_caption(self, sock, authorization) -> None:
        key = authorization.removeprefix("Bearer ")
        _send_json(sock, 200, completion(self._ok_content(f"A face; the server saw the key {key} here.")))

    def _play_huge_usage(self, sock, authorization) -> None:
        usage = {"prompt_tokens": 2**70, "completion_tokens": 5, "total_tokens": 2**70 + 5}
        _send_json(sock, 200, completion(self._ok_content(), usage))

    def _play_negative_usage(self, sock, authorization) -> None:
        usage = {"prompt_tokens": -5, "completion_tokens": 1.5e300, "total_tokens": "many"}
        _send_json(sock, 200, completion(self._ok_content(), usage))

    def _play_gzip_bomb(self, sock, authorization) -> None:
        payload = gzip_bomb()
        headers = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "Content-Length": str(len(payload)),
        }
        _send_raw(sock, _head(200, headers) + payload)

    def _play_huge_body(self, sock, authorization) -> None:
        sock.sendall(_head(200, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}))
        chunk = b" " * (1 << 20)
        for _ in range(64):
            if not _send_raw(sock, b"%x\r\n%s\r\n" % (len(chunk), chunk)):
                return
        _send_raw(sock, b"0\r\n\r\n")

    def _play_huge_declared(self, sock, authorization) -> None:
        _send_raw(sock, _head(200, {"Content-Type": "application/json", "Content-Length": str(64 << 20)}))
        self._stop.wait(5)

    def _play_unknown_encoding(self, sock, authorization) -> None:
        payload = b"\x0b\x02\x80{}\x03"
        headers = {
            "Content-Type": "application/json",
            "Content-Encoding": "br",
            "Content-Length": str(len(payload)),
        }
        _send_raw(sock, _head(200, headers) + payload)

    def _play_invalid_json(self, sock, authorization) -> None:
        _send_body(sock, 200, b"<html>not json</html>", "text/html")

    def _play_error_object(self, sock, authorization) -> None:
        _send_json(sock, 200, {"error": {"message": "model overloaded", "type": "server_error"}})

    def _play_null_content(self, sock, authorization) -> None:
        _send_json(sock, 200, completion(None))

    def _play_schema_violation(self, sock, authorization) -> None:
        _send_json(sock, 200, completion(json.dumps({"caption": "a face", "attributes": {"age": "old"}})))

    def _play_prose(self, sock, authorization) -> None:
        _send_json(sock, 200, completion("This person looks happy and is about thirty years old."))

    def _play_rate_limited(self, sock, authorization) -> None:
        _send_json(sock, 429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})

    def _play_rate_limited_inf(self, sock, authorization) -> None:
        _send_json(sock, 429, {"error": {"message": "slow down"}}, {"Retry-After": "inf"})


def _read_request(sock: socket.socket) -> dict[str, str] | None:
    """The request's headers (lower-case names), after reading its whole body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    raw_head, _, body = data.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    head = {
        name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])
    }
    length = int(head.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        body += chunk
    return head


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} X", *(f"{k}: {v}" for k, v in {**headers, "Connection": "close"}.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _send_raw(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
        return True
    except OSError:
        return False


def _send_body(sock, status: int, payload: bytes, content_type: str, headers: dict | None = None) -> None:
    headers = {"Content-Type": content_type, "Content-Length": str(len(payload)), **(headers or {})}
    _send_raw(sock, _head(status, headers) + payload)


def _send_json(sock, status: int, obj: object, headers: dict | None = None) -> None:
    _send_body(sock, status, json.dumps(obj).encode(), "application/json", headers)
