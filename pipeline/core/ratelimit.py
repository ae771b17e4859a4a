"""A request rate bound per process: starts spaced at least ``1 / per_second`` apart.

Stages that reach out (image hosts, the MLLM server) bound their rate per worker with it, so that
a large cluster does not hammer a host: the overall rate is at most the per-worker rate times the
number of workers. Thread-safe (img2dataset's download threads) and usable from asyncio (the
annotate client): a caller reserves the next free slot under a lock and sleeps until it.
"""

from __future__ import annotations

import asyncio
import threading
import time


class RateLimit:
    def __init__(self, per_second: float):
        if per_second <= 0:
            raise ValueError(f"a rate limit must be positive, got {per_second}")
        self.interval = 1.0 / per_second
        self._next = 0.0
        self._lock = threading.Lock()

    def _reserve(self) -> float:
        """Seconds until this caller's slot."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
            return start - now

    def wait(self) -> None:
        time.sleep(self._reserve())

    async def wait_async(self) -> None:
        await asyncio.sleep(self._reserve())
