"""Files that are either complete or absent: temporary sibling, fsync, rename; and their sha256.

Every stage writes through these, so a killed or retried worker never leaves a truncated file
under a final name; what it leaves under a temporary name (``.NAME.tmp-XXXXXXXX``) is removed by
``remove_stale_temporaries`` before the next run starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pyarrow is imported where parquet is written: publish and verify never need it
    import pyarrow as pa

CACHE_ENV = "FACEMLLM_CACHE"
TEMPORARY_GLOB = ".*.tmp-*"


def default_cache_dir() -> Path:
    """``$FACEMLLM_CACHE``, else ``~/.cache/facemllm``: one place for every downloaded artifact."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "facemllm").expanduser()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def temporary_sibling(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")


def commit(tmp: Path, final: Path) -> None:
    """fsync ``tmp`` and rename it over ``final``: readers see the old file or the new one, whole."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it into place only if the block succeeds."""
    tmp = temporary_sibling(final)
    try:
        yield tmp
        commit(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(final: Path, payload: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(payload)


def write_json_atomic(final: Path, obj: object) -> None:
    write_bytes_atomic(final, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_parquet_atomic(final: Path, rows: list[dict] | pa.Table, schema: pa.Schema | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp)


def remove_stale_temporaries(root: Path) -> None:
    """Remove what killed writers left half-written anywhere under ``root`` (at any depth); call it
    only where no writer is running, i.e. from the driver before and after a run."""
    for stray in Path(root).rglob(TEMPORARY_GLOB):
        if stray.is_file():
            stray.unlink(missing_ok=True)
