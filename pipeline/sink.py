"""The one WebDataset shard writer and reader every stage uses.

Writing: a shard is built under a temporary name and renamed into place only when complete, so a
killed or retried worker never leaves a truncated tar under a final name. Tar headers are fixed
(mtime 0, root owner, mode 0444) and samples are written in key order, so the same samples always
give the same bytes and the same sha256 in the manifest.

Reading: tars come from the network and from other tools, so member names are checked (no
absolute paths, no ``..``, regular files only) before anything is read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import ShardInfo

Sample = dict[str, bytes]  # extension -> payload, e.g. {"jpg": ..., "json": ...}


class UnsafeTarError(ValueError):
    """A tar member would escape the extraction folder or is not a regular file."""


class ShardFormatError(ValueError):
    """A sample breaks the WebDataset rules (dotted key, differing members)."""


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the basename up to its first dot, the rest is the extension."""
    directory, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    if not dot or not key:
        raise ShardFormatError(f"member {name!r} has no KEY.ext form")
    return (f"{directory}/{key}" if directory else key), ext


def check_member_name(name: str) -> None:
    if name.startswith("/") or "\\" in name or any(part == ".." for part in name.split("/")):
        raise UnsafeTarError(f"unsafe tar member path {name!r}")


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it into place only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(final: Path, payload: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(payload)


def write_json_atomic(final: Path, obj: object) -> None:
    write_bytes_atomic(final, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_parquet_atomic(final: Path, rows: list[dict], schema: pa.Schema | None = None) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp)


class ShardWriter:
    """Collects samples for one shard and writes them as a deterministic tar, atomically.

    Every sample of a shard must carry the same extensions (the Hugging Face ``webdataset``
    loader infers its features from the first samples) and keys must be free of dots.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._samples: dict[str, Sample] = {}
        self._extensions: tuple[str, ...] | None = None

    def add(self, key: str, sample: Mapping[str, bytes]) -> None:
        if not key or "." in key or "/" in key:
            raise ShardFormatError(f"key {key!r} must be non-empty and free of dots and slashes")
        if key in self._samples:
            raise ShardFormatError(f"duplicate key {key!r} in {self.path.name}")
        extensions = tuple(sorted(sample))
        if self._extensions is None:
            self._extensions = extensions
        elif extensions != self._extensions:
            raise ShardFormatError(f"sample {key!r} has members {extensions}, shard has {self._extensions}")
        self._samples[key] = dict(sample)

    def __len__(self) -> int:
        return len(self._samples)

    def close(self) -> ShardInfo:
        """Write the tar (even an empty one: a shard with no sample is still a completed shard)."""
        with atomic_path(self.path) as tmp:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for key in sorted(self._samples):
                    for ext in self._extensions or ():
                        _add_member(tar, f"{key}.{ext}", self._samples[key][ext])
        return shard_info(self.path, len(self._samples), url=self.path.name)


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def shard_info(path: Path, nsamples: int, url: str) -> ShardInfo:
    return ShardInfo(url=url, sha256=sha256_file(path), nsamples=nsamples, bytes=path.stat().st_size)


def iter_tar_samples(source: Path | bytes) -> Iterator[tuple[str, Sample]]:
    """Yield ``(key, {ext: bytes})`` in tar order, refusing unsafe or non-file members."""
    opener = (
        tarfile.open(fileobj=io.BytesIO(source), mode="r:")
        if isinstance(source, bytes)
        else tarfile.open(source, mode="r:")
    )
    with opener as tar:
        current_key: str | None = None
        sample: Sample = {}
        for member in tar:
            check_member_name(member.name)
            if not member.isfile():
                raise UnsafeTarError(f"tar member {member.name!r} is not a regular file")
            key, ext = split_member_name(member.name)
            if key != current_key:
                if current_key is not None:
                    yield current_key, sample
                current_key, sample = key, {}
            extracted = tar.extractfile(member)
            sample[ext] = extracted.read() if extracted else b""
        if current_key is not None:
            yield current_key, sample


def count_tar_samples(path: Path) -> int:
    return sum(1 for _ in iter_tar_samples(path))


def write_sizes(folder: Path, shards: Iterable[ShardInfo]) -> None:
    """``sizes.json`` as open_clip reads it: shard file name -> number of samples."""
    write_json_atomic(folder / "sizes.json", {Path(s.url).name: s.nsamples for s in shards})
