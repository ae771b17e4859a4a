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

from facemllm.schemas import ShardInfo

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


def _temporary_sibling(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")


def _commit(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it into place only if the block succeeds."""
    tmp = _temporary_sibling(final)
    try:
        yield tmp
        _commit(tmp, final)
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
    """Streams samples into a temporary tar that is renamed into place on ``close``.

    Samples must come in strictly increasing key order: that makes the bytes deterministic, keys
    unique, and memory constant (one sample at a time). Tar headers are fixed (mtime 0, root,
    0444). Every sample must carry the same extensions (the Hugging Face ``webdataset`` loader
    infers its features from the first samples) and keys must be free of dots. Leaving the
    ``with`` block on an exception discards the temporary file.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._tmp = _temporary_sibling(self.path)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - closed by close()/abort()
        self._last_key: str | None = None
        self._extensions: tuple[str, ...] | None = None
        self.count = 0

    def add(self, key: str, sample: Mapping[str, bytes]) -> None:
        if not key or "." in key or "/" in key:
            raise ShardFormatError(f"key {key!r} must be non-empty and free of dots and slashes")
        if self._last_key is not None and key <= self._last_key:
            raise ShardFormatError(
                f"key {key!r} after {self._last_key!r} in {self.path.name}: keys must increase"
            )
        extensions = tuple(sorted(sample))
        if self._extensions is None:
            self._extensions = extensions
        elif extensions != self._extensions:
            raise ShardFormatError(f"sample {key!r} has members {extensions}, shard has {self._extensions}")
        for ext in extensions:
            _add_member(self._tar, f"{key}.{ext}", sample[ext])
        self._last_key = key
        self.count += 1

    def close(self) -> int:
        """Commit the shard (even an empty one: it is still a completed shard); returns its size."""
        self._tar.close()
        _commit(self._tmp, self.path)
        return self.count

    def abort(self) -> None:
        self._tar.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


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


def _open_tar(source: Path | bytes) -> tarfile.TarFile:
    if isinstance(source, bytes):
        return tarfile.open(fileobj=io.BytesIO(source), mode="r:")
    return tarfile.open(source, mode="r:")


def _checked(member: tarfile.TarInfo) -> tuple[str, str]:
    """The member's (key, extension), after refusing unsafe names and non-file members."""
    check_member_name(member.name)
    if not member.isfile():
        raise UnsafeTarError(f"tar member {member.name!r} is not a regular file")
    return split_member_name(member.name)


def group_samples(members: Iterable[tuple[str, str, bytes]]) -> Iterator[tuple[str, Sample]]:
    """Consecutive ``(key, ext, data)`` members -> ``(key, {ext: data})`` samples, in order."""
    current_key: str | None = None
    sample: Sample = {}
    for key, ext, data in members:
        if key != current_key:
            if current_key is not None:
                yield current_key, sample
            current_key, sample = key, {}
        sample[ext] = data
    if current_key is not None:
        yield current_key, sample


def iter_tar_samples(source: Path | bytes) -> Iterator[tuple[str, Sample]]:
    """Yield ``(key, {ext: bytes})`` in tar order, refusing unsafe or non-file members."""
    with _open_tar(source) as tar:
        yield from group_samples((*_checked(member), tar.extractfile(member).read()) for member in tar)


def repack_sorted(source: Path, final: Path) -> int:
    """Rewrite a tar written in any order (img2dataset's) as a sorted, deterministic shard.

    Reads the headers first, then one sample at a time, so memory stays at one sample.
    """
    with _open_tar(source) as tar:
        by_key: dict[str, dict[str, tarfile.TarInfo]] = {}
        for member in tar.getmembers():
            key, ext = _checked(member)
            by_key.setdefault(key, {})[ext] = member
        with ShardWriter(final) as writer:
            for key in sorted(by_key):
                writer.add(key, {ext: tar.extractfile(m).read() for ext, m in by_key[key].items()})
        return writer.count


SHARD_ID_DIGITS = 5


def shard_paths(folder: Path, shard_id: int) -> dict[str, Path]:
    """A stage's files for one shard: the tar, its status parquet, and the stats file that marks
    the shard complete (img2dataset's naming, which every stage follows)."""
    name = f"{shard_id:0{SHARD_ID_DIGITS}d}"
    return {
        "tar": folder / f"{name}.tar",
        "parquet": folder / f"{name}.parquet",
        "stats": folder / f"{name}_stats.json",
    }


def write_sizes(folder: Path, shards: Iterable[ShardInfo]) -> None:
    """``sizes.json`` as open_clip reads it: shard file name -> number of samples."""
    write_json_atomic(folder / "sizes.json", {Path(s.url).name: s.nsamples for s in shards})
