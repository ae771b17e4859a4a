"""The WebDataset shard format: the one writer and the one reader every layer uses.

Writing: a shard is built under a temporary name and renamed into place only when complete, so a
killed or retried worker never leaves a truncated tar under a final name. Tar headers are fixed
(mtime 0, root owner, mode 0444) and samples are written in key order, so the same samples always
give the same bytes and the same sha256 in the manifest.

Reading: tars come from the network and from other tools, so every member is checked before
anything is read: no absolute path, no ``..``, regular files only (no links, devices or folders),
and no member name twice. A local shard, bytes, or any fsspec URL (streamed) go through the same
checks.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO

from facemllm.pipeline.core.files import commit, sha256_file, temporary_sibling, write_json_atomic
from facemllm.pipeline.core.storage import StorageOptions, open_url
from facemllm.schemas import ShardInfo

log = logging.getLogger(__name__)
# A member larger than this is skipped, never read: no image, crop or label a stage needs comes
# near it, and a 1 GiB member read whole took 1.47 GB.
MAX_MEMBER_BYTES = 64 << 20

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
        self._tmp = temporary_sibling(self.path)
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
        commit(self._tmp, self.path)
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


def shard_info(path: Path, nsamples: int, url: str) -> ShardInfo:
    return ShardInfo(url=url, sha256=sha256_file(path), nsamples=nsamples, bytes=path.stat().st_size)


def _checked(member: tarfile.TarInfo) -> tuple[str, str]:
    """The member's (key, extension), after refusing unsafe names and non-file members."""
    check_member_name(member.name)
    if not member.isfile():
        raise UnsafeTarError(f"tar member {member.name!r} is not a regular file")
    return split_member_name(member.name)


def group_samples(members: Iterable[tuple[str, str, bytes | None]]) -> Iterator[tuple[str, Sample]]:
    """Consecutive ``(key, ext, data)`` members -> ``(key, {ext: data})`` samples, in order; a
    member name seen before (a duplicate, or a key whose members are not contiguous) is refused.
    A member whose data is None (skipped) is left out, but its sample still comes, so the stage
    reading it accounts for it (a sample without its ``jpg`` gets a status, never vanishes)."""
    current_key: str | None = None
    sample: Sample = {}
    seen: set[str] = set()
    for key, ext, data in members:
        if key != current_key:
            if current_key is not None:
                yield current_key, sample
            if key in seen:
                raise ShardFormatError(f"sample {key!r} appears twice (its members are not contiguous)")
            seen.add(key)
            current_key, sample = key, {}
        if ext in sample:
            raise ShardFormatError(f"member {key}.{ext} appears twice")
        if data is not None:
            sample[ext] = data
    if current_key is not None:
        yield current_key, sample


def _members(
    tar: tarfile.TarFile, where: str, max_member_bytes: int
) -> Iterator[tuple[str, str, bytes | None]]:
    for member in tar:
        key, ext = _checked(member)
        if member.size > max_member_bytes:
            log.warning(
                "skipping %s in %s: %d bytes, over %d", member.name, where, member.size, max_member_bytes
            )
            yield key, ext, None
            continue
        yield key, ext, tar.extractfile(member).read()


def iter_tar_samples(
    source: Path | bytes | IO[bytes], max_member_bytes: int | None = None
) -> Iterator[tuple[str, Sample]]:
    """Yield ``(key, {ext: bytes})`` in tar order from a shard file, its bytes or an open stream,
    refusing unsafe, non-file and duplicate members; a member over ``max_member_bytes`` (default
    ``MAX_MEMBER_BYTES``) is skipped unread, its sample yielded without it."""
    max_member_bytes = MAX_MEMBER_BYTES if max_member_bytes is None else max_member_bytes
    where = str(source) if isinstance(source, str | Path) else "stream"
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    opened = (
        {"name": source, "mode": "r:"}
        if isinstance(source, str | Path)
        else {"fileobj": source, "mode": "r|*"}
    )
    with tarfile.open(**opened) as tar:
        yield from group_samples(_members(tar, where, max_member_bytes))


def iter_tar_url(url: str, options: StorageOptions | None = None) -> Iterator[tuple[str, Sample]]:
    """The same reader over any local path or fsspec URL, streamed (training and evaluation read
    shards published by others)."""
    with open_url(url, "rb", options) as raw:
        yield from iter_tar_samples(raw)


def repack_sorted(source: Path, final: Path, leave_out: Iterable[str] = ()) -> int:
    """Rewrite a tar written in any order (img2dataset's) as a sorted, deterministic shard, without
    the samples of ``leave_out`` (their bytes are never read).

    Reads the headers first, then one sample at a time, so memory stays at one sample.
    """
    left_out = set(leave_out)
    with tarfile.open(source, mode="r:") as tar:
        by_key: dict[str, dict[str, tarfile.TarInfo]] = {}
        for member in tar.getmembers():
            key, ext = _checked(member)
            by_key.setdefault(key, {})[ext] = member
        with ShardWriter(final) as writer:
            for key in sorted(by_key.keys() - left_out):
                writer.add(key, {ext: tar.extractfile(m).read() for ext, m in by_key[key].items()})
        return writer.count


SHARD_ID_DIGITS = 5
STATS_SUFFIX = "_stats.json"


def shard_paths(folder: Path, shard_id: int) -> dict[str, Path]:
    """A stage's files for one shard: the tar, its status parquet, and the stats file that marks
    the shard complete (img2dataset's naming, which every stage follows)."""
    name = f"{shard_id:0{SHARD_ID_DIGITS}d}"
    return {
        "tar": folder / f"{name}.tar",
        "parquet": folder / f"{name}.parquet",
        "stats": folder / f"{name}{STATS_SUFFIX}",
    }


def marker_shard_id(marker: Path) -> int:
    """The shard id of a completion marker ``NNNNN_stats.json``."""
    return int(marker.name.removesuffix(STATS_SUFFIX))


def completed_shards(folder: Path) -> list[int]:
    """Shard ids in ``folder`` that have a completion marker, sorted."""
    return sorted(marker_shard_id(p) for p in Path(folder).glob(f"*{STATS_SUFFIX}"))


def count_tar_keys(path: Path) -> int:
    """Samples in a tar, from member headers alone."""
    with tarfile.open(path, "r:") as tar:
        return len({split_member_name(member.name)[0] for member in tar})


def write_sizes(folder: Path, shards: Iterable[ShardInfo]) -> None:
    """``sizes.json`` as open_clip reads it: shard file name -> number of samples."""
    write_json_atomic(folder / "sizes.json", {Path(s.url).name: s.nsamples for s in shards})
