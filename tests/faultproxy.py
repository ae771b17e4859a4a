"""A fault-injecting TCP proxy on loopback, to put between an S3 client and a real server.

Each accepted connection passes, or with probability ``fault_rate`` (seeded) gets the next fault
in turn:

- ``pass``: bytes are relayed both ways;
- ``drop_request``: the connection is cut once part of the client's bytes reached the server, so
  a request dies half-sent;
- ``drop_response``: the client's request reaches the server, which acts on it, and the
  connection is cut before any of the response gets back: the client cannot tell it succeeded;
- ``503``: the request is answered ``503 SlowDown`` without reaching the server.

After ``max_faults`` faults every connection passes, so a client that retries always finishes.
``bytes_per_s`` throttles everything relayed, in both directions together, to slow an upload down
enough to be killed part-way.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import socket
import threading
import time
from collections import Counter

MODES = ("pass", "drop_request", "drop_response", "503")
SLOW_DOWN = (
    b"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)
CHUNK = 16 * 1024


class Throttle:
    """A shared rate limit: each chunk waits for its slot at ``bytes_per_s``."""

    def __init__(self, bytes_per_s: float):
        self.bytes_per_s = bytes_per_s
        self._lock = threading.Lock()
        self._next_free = time.monotonic()

    def take(self, nbytes: int) -> None:
        with self._lock:
            start = max(self._next_free, time.monotonic())
            self._next_free = start + nbytes / self.bytes_per_s
        time.sleep(max(0.0, start - time.monotonic()))


class FaultProxy:
    """``127.0.0.1:port`` -> ``127.0.0.1:upstream_port`` with injected faults; a context manager."""

    def __init__(
        self,
        upstream_port: int,
        fault_rate: float = 0.0,
        max_faults: int = 0,
        bytes_per_s: float | None = None,
        seed: int = 0,
    ):
        self.upstream = ("127.0.0.1", upstream_port)
        self.fault_rate = fault_rate
        self.max_faults = max_faults
        self.throttle = Throttle(bytes_per_s) if bytes_per_s else None
        self.counts: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._fault_cycle = itertools.cycle(MODES[1:])
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def faults(self) -> int:
        return sum(n for mode, n in self.counts.items() if mode != "pass")

    def _next_mode(self) -> tuple[str, int | None]:
        """This connection's mode, and for ``drop_request`` how many client bytes get through."""
        with self._lock:
            mode = "pass"
            if self.faults < self.max_faults and self._random.random() < self.fault_rate:
                mode = next(self._fault_cycle)
            self.counts[mode] += 1
            return mode, self._random.randint(1, 64 * 1024) if mode == "drop_request" else None

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.add(sock)
        return sock

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue  # look at the stop flag again
            except OSError:
                return
            client.settimeout(30)
            thread = threading.Thread(target=self._serve, args=(self._track(client),), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        mode, cut_after = self._next_mode()
        try:
            if mode == "503":
                self._answer_slow_down(client)
                return
            upstream = self._track(socket.create_connection(self.upstream, timeout=30))
            back = threading.Thread(
                target=self._relay, args=(upstream, client, None, mode == "drop_response"), daemon=True
            )
            back.start()
            self._relay(client, upstream, cut_after, False)
            back.join(timeout=60)
        except OSError:
            pass
        finally:
            self._close(client)

    def _relay(
        self, src: socket.socket, dst: socket.socket, cut_after: int | None, cut_on_first: bool
    ) -> None:
        """Copy ``src`` to ``dst`` until EOF; cut both after ``cut_after`` bytes, or at the first byte."""
        relayed = 0
        try:
            while chunk := src.recv(CHUNK):
                if cut_on_first or (cut_after is not None and relayed + len(chunk) > cut_after):
                    if cut_after is not None:
                        dst.sendall(chunk[: cut_after - relayed])
                    break
                if self.throttle is not None:
                    self.throttle.take(len(chunk))
                dst.sendall(chunk)
                relayed += len(chunk)
        except OSError:
            pass
        self._close(src)
        self._close(dst)

    @staticmethod
    def _answer_slow_down(client: socket.socket) -> None:
        """Read the request head (and its body, unless the client waits for 100-continue), answer 503."""
        client.settimeout(10)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = client.recv(CHUNK)
            if not chunk:
                return
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
        }
        if headers.get(b"expect", b"").lower() != b"100-continue":
            remaining = int(headers.get(b"content-length", b"0")) - len(body)
            while remaining > 0 and (chunk := client.recv(min(CHUNK, remaining))):
                remaining -= len(chunk)
        client.sendall(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
            + f"Content-Length: {len(SLOW_DOWN)}\r\nConnection: close\r\n\r\n".encode()
            + SLOW_DOWN
        )

    def _close(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def start(self) -> FaultProxy:
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            self._close(sock)
        self._acceptor.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
