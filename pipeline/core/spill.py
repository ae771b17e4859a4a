"""Items that finish in any order, handed back in key order, at bounded memory.

A shard is written in key order so that its bytes never depend on timing, but its items finish in
whatever order the network or the detector gives. Waiting in memory would hold a shard's worth of
crops or answers (10,000 faces: hundreds of MB), and writing in order as they come would stall on
the slowest; so they wait in an anonymous temporary file, only their offsets in memory.
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Generic, TypeVar

Item = TypeVar("Item")


class KeyOrderSpill(Generic[Item]):
    """``with KeyOrderSpill(folder) as spill: spill.add(key, item) ...; spill.in_key_order()``.

    The file is created in ``folder`` (the output's own disk) and deleted when closed, even when the
    process is killed (``tempfile.TemporaryFile`` is unlinked at once)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._offsets: dict[str, tuple[int, int]] = {}
        self._file: IO[bytes] | None = None

    def __enter__(self) -> KeyOrderSpill[Item]:
        self._file = tempfile.TemporaryFile(dir=self.folder)
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def add(self, key: str, item: Item) -> None:
        payload = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        self._file.seek(0, 2)
        self._offsets[key] = (self._file.tell(), len(payload))
        self._file.write(payload)

    def in_key_order(self) -> Iterator[Item]:
        for key in sorted(self._offsets):
            offset, size = self._offsets[key]
            self._file.seek(offset)
            yield pickle.loads(self._file.read(size))  # our own file, written above
