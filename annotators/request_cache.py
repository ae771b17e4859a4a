"""The request cache: answers already received, so a resumed run never asks for them again.

A key is the sha256 of what decides an answer: the image bytes' hash, the prompt version and the
prompt file's hash, the model, the sampling parameters and the response schema. Entries are JSON
lines appended to a file (one per shard in the annotate stage), each written with one ``write``
call and flushed, so an answer survives a kill of the process the moment it is recorded; a torn
last line (a kill mid-write) is skipped on load. Only successful answers are stored: a failure is
asked again on the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any


def request_key(**parts: Any) -> str:
    """A stable hash of the request's deciding parts (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class RequestCache:
    """An append-only JSONL map ``key -> value`` (a dict); thread-safe; ``path=None`` disables it."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._fd: int | None = None
        if self.path is not None and self.path.is_file():
            for line in self.path.read_bytes().splitlines():
                try:
                    entry = json.loads(line)
                    self._entries[entry["key"]] = entry["value"]
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line from a killed writer

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> dict | None:
        return self._entries.get(key)

    def put(self, key: str, value: dict) -> None:
        line = (json.dumps({"key": key, "value": value}, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self._entries[key] = value
            if self.path is None:
                return
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                if os.fstat(self._fd).st_size:  # start on a fresh line after a torn one
                    os.write(self._fd, b"\n")
            os.write(self._fd, line)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> RequestCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
