"""A loopback image host with the failure modes of the real web, for tests, the demo and benchmarks.

LAION urls decay and misbehave: 404s, 500s, stalls, truncated bodies, HTML served as JPEG, empty
bodies, decompression bombs, redirects into private networks and ``X-Robots-Tag: noai`` opt-outs.
``SampleServer`` serves real photos plus one route per failure so every stage's handling of them
can be tested offline, on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import mimetypes
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote, unquote, urlsplit

PHOTO_PREFIX = "/img/"
PRIVATE_REDIRECT_TARGET = "http://10.255.255.1/x.jpg"
BOMB_SIDE = 20_000

FAULT_ROUTES = (
    "/fault/404",
    "/fault/500",
    "/fault/timeout",
    "/fault/truncated.jpg",
    "/fault/not-an-image.jpg",
    "/fault/empty.jpg",
    "/fault/bomb.png",
    "/fault/redirect-private",
    "/fault/noai.jpg",
)

NOT_AN_IMAGE_BODY = (
    b"<!doctype html><html><head><title>Access denied</title></head>"
    b"<body><h1>403</h1><p>Hotlinking is not permitted.</p></body></html>"
)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A 138-byte PNG whose valid header declares side x side RGB pixels (1.2 GB at 20000).

    The IDAT holds one row only. A decoder that trusts the header sizes its buffer from it before
    noticing the data is short; the defence is a pixel limit checked against the header
    (cv2's OPENCV_IO_MAX_IMAGE_PIXELS, PIL's Image.MAX_IMAGE_PIXELS).
    """
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    one_row = zlib.compress(b"\x00" * (1 + 3 * side))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", one_row)
        + _png_chunk(b"IEND", b"")
    )


class _Httpd(ThreadingHTTPServer):
    daemon_threads = True  # a stalled handler must not keep the process alive
    request_queue_size = 1024  # the default backlog of 5 drops connects from a 256-thread downloader


class SampleServer:
    """Serves ``photos`` under ``/img/<name>`` and the ``FAULT_ROUTES`` on 127.0.0.1, in a thread.

    ``stall_s`` is how long ``/fault/timeout`` holds its response: set it above the client's
    timeout. The stall waits on the shutdown event, so closing ends it at once (with no response).
    ``latency_s`` delays every response (for benchmarks that need a realistic round trip).
    ``/fault/truncated.jpg`` is a file cut in half at the origin: its Content-Length is honest, so
    the download succeeds and decoding fails.
    """

    def __init__(
        self, photos: Mapping[str, Path], *, stall_s: float = 10.0, latency_s: float = 0.0, port: int = 0
    ) -> None:
        self.photos = {name: Path(path) for name, path in photos.items()}
        jpegs = sorted(name for name, path in self.photos.items() if path.suffix.lower() in (".jpg", ".jpeg"))
        if not jpegs:
            raise ValueError(
                "SampleServer needs at least one .jpg photo for /fault/truncated.jpg and noai.jpg"
            )
        self.fault_source = self.photos[jpegs[0]]
        # Bodies are read once: a benchmark should measure the client, not this server's disk.
        self._bodies = {name: path.read_bytes() for name, path in self.photos.items()}
        self._fault_body = self._bodies[jpegs[0]]
        self._bomb = decompression_bomb_png()
        self.stall_s = stall_s
        self.latency_s = latency_s
        self._closing = threading.Event()
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._httpd = _Httpd(("127.0.0.1", port), self._handler_class())
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="sample-server", daemon=True
        )
        self._thread.start()

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def photo_url(self, name: str) -> str:
        return f"{self.base_url}{PHOTO_PREFIX}{quote(name)}"

    def request_count(self, path: str) -> int:
        """Requests received for ``path`` (query string ignored)."""
        with self._counts_lock:
            return self._counts[path]

    def close(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _count(self, path: str) -> None:
        with self._counts_lock:
            self._counts[path] += 1

    def _stall(self) -> bool:
        """Hold for ``stall_s``; False if the server started closing meanwhile."""
        return not self._closing.wait(self.stall_s)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                """Quiet: tests and benchmarks make thousands of requests."""

            def do_GET(self) -> None:
                path = unquote(urlsplit(self.path).path)
                server._count(path)
                if server.latency_s:
                    server._closing.wait(server.latency_s)
                # A client that gave up (its timeout) has nothing left to answer.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self._route(path)

            def _send(
                self, status: int, body: bytes, content_type: str, extra: Mapping[str, str] | None = None
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def _route(self, path: str) -> None:
                name = path.removeprefix(PHOTO_PREFIX)
                fault_source = server._fault_body
                if path.startswith(PHOTO_PREFIX) and name in server.photos:
                    self._send(200, server._bodies[name], _content_type(server.photos[name]))
                elif path == "/fault/404":
                    self._send(404, b"not found", "text/plain")
                elif path == "/fault/500":
                    self._send(500, b"internal error", "text/plain")
                elif path == "/fault/timeout":
                    if server._stall():
                        self._send(200, fault_source, "image/jpeg")
                elif path == "/fault/truncated.jpg":
                    self._send(200, fault_source[: len(fault_source) // 2], "image/jpeg")
                elif path == "/fault/not-an-image.jpg":
                    self._send(200, NOT_AN_IMAGE_BODY, "image/jpeg")
                elif path == "/fault/empty.jpg":
                    self._send(200, b"", "image/jpeg")
                elif path == "/fault/bomb.png":
                    self._send(200, server._bomb, "image/png")
                elif path == "/fault/redirect-private":
                    self._send(302, b"", "text/plain", {"Location": PRIVATE_REDIRECT_TARGET})
                elif path == "/fault/noai.jpg":
                    self._send(200, fault_source, "image/jpeg", {"X-Robots-Tag": "noai"})
                else:
                    self._send(404, b"not found", "text/plain")

        return Handler


def _content_type(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"
