"""The one storage layer: local folders and object stores (``s3://``, ``gs://``, any fsspec URL).

The sink, the publisher and the shard readers all go through ``Storage``, so retries, checksums,
multipart and credentials are decided in one place:

- credentials come only from the provider's own chain (AWS environment variables, shared config
  and instance roles for S3; application-default credentials for GCS); an S3-compatible endpoint
  is set with ``StorageOptions.endpoint_url`` or ``$FACEMLLM_S3_ENDPOINT``.
- every call is retried with exponential backoff and jitter on transient failures (dropped
  connections, 5xx, throttling), above the client's own retries; a missing bucket or a denied
  request fails at once.
- uploads record the file's sha256 in the object's metadata (S3), so a resumed upload skips an
  object when one HEAD shows the right size and sha256; where a store keeps no such metadata, the
  object is read back and hashed instead. A smaller file is streamed from disk in one request
  that carries its sha256 for the store to check (S3's ``x-amz-checksum-sha256``); files of two
  multipart chunks or more go up as multipart uploads.
- object stores have no rename, but a single put (or a completed multipart upload) appears whole
  or not at all; so a unit of work is made visible by uploading its completion marker last.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import IO, TypeVar

import fsspec
from pydantic import Field
from pydantic_core import from_json

from facemllm.pipeline.core.files import atomic_path, default_cache_dir, sha256_file, write_bytes_atomic
from facemllm.schemas import StrictModel

ENDPOINT_ENV = "FACEMLLM_S3_ENDPOINT"
STAGING_ENV = "FACEMLLM_STAGING"
S3_PROTOCOLS = ("s3", "s3a")
SHA256_METADATA_KEY = "sha256"
MIB = 1 << 20
S3_MIN_PART_BYTES = 5 * MIB
READ_BLOCK_BYTES = 8 * MIB
# Errors that another attempt cannot fix: a missing bucket or object, a denied request, a bad input.
NOT_RETRYABLE = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)

log = logging.getLogger(__name__)
Job = TypeVar("Job")
Result = TypeVar("Result")


class StorageOptions(StrictModel):
    """How to reach a store and how hard to try; credentials are never part of it."""

    endpoint_url: str | None = Field(
        None, description=f"S3-compatible endpoint (default ${ENDPOINT_ENV}, else AWS's own)"
    )
    parallel: int = Field(8, ge=1, description="files transferred at once")
    attempts: int = Field(6, ge=1, description="tries per object before giving up")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles on each retry, with jitter")
    multipart_chunk_bytes: int = Field(
        64 * MIB, ge=S3_MIN_PART_BYTES, description="part size; files of two parts or more go multipart"
    )
    progress: bool = Field(True, description="show a progress bar when attached to a terminal")

    def resolved_endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get(ENDPOINT_ENV) or None


class TransferError(OSError):
    """An object could not be transferred, even after every retry."""


def protocol_of(location: str) -> str:
    protocol, _ = fsspec.core.split_protocol(str(location))
    return protocol or "file"


def is_remote(location: str | Path) -> bool:
    """True for any fsspec URL other than a plain local path or ``file://``."""
    return protocol_of(str(location)) not in ("file", "local")


def filesystem_options(protocol: str, options: StorageOptions) -> dict:
    """fsspec keyword arguments for ``protocol``: listing caches off (another writer may change the
    store at any time), and for S3 the endpoint override, a read block and a connection pool sized
    to the parallelism."""
    kwargs: dict = {"use_listings_cache": False}
    if protocol in S3_PROTOCOLS:
        kwargs["default_block_size"] = READ_BLOCK_BYTES
        kwargs["config_kwargs"] = {"max_pool_connections": max(10, 2 * options.parallel)}
        if endpoint := options.resolved_endpoint():
            kwargs["client_kwargs"] = {"endpoint_url": endpoint}
    return kwargs


def url_to_fs(url: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of any local path or fsspec URL, with this project's options
    (endpoint, no listing cache)."""
    return fsspec.core.url_to_fs(url, **filesystem_options(protocol_of(url), options or StorageOptions()))


def open_url(url: str, mode: str = "rb", options: StorageOptions | None = None) -> IO[bytes]:
    """Open any local path or fsspec URL as a binary file."""
    fs, path = url_to_fs(url, options)
    return fs.open(path, mode)


class UnsafePathError(ValueError):
    """A path (from a manifest, most often) that would leave the root it is relative to."""


def checked_relative(rel: str) -> str:
    """``rel`` when it names something under a root: relative, ``/``-separated, without ``..``,
    ``.`` or empty parts, backslashes, NUL, a drive or a URL scheme; else ``UnsafePathError``.

    Manifests are outside data (a published DEST may be anyone's): their shard urls reach the
    store only through this check."""
    parts = rel.split("/") if isinstance(rel, str) else [""]
    if any(part in ("", ".", "..") for part in parts) or "\\" in rel or "\x00" in rel or ":" in parts[0]:
        raise UnsafePathError(f"{rel!r} is not a path under the root (absolute, '..', or odd)")
    return rel


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class Storage:
    """A folder or object-store prefix; every path given to it is relative to ``root`` and must
    stay under it (``checked_relative``; for a local folder, symbolic links included)."""

    def __init__(self, root: str | Path, options: StorageOptions | None = None):
        self.options = options or StorageOptions()
        self.root_url = str(root).rstrip("/")
        self.protocol = protocol_of(self.root_url)
        self.fs, root_path = fsspec.core.url_to_fs(
            self.root_url, **filesystem_options(self.protocol, self.options)
        )
        self.root = root_path.rstrip("/")
        self._real_root = None if is_remote(self.root_url) else os.path.realpath(self.root or "/")
        self._client = None  # botocore's, for streamed puts: made on first use
        self._store_checks_sha256 = False  # learned from the first streamed put's reply
        self._client_lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_client_lock": None}  # a client stays in its process

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _client_lock=threading.Lock())

    def path(self, rel: str) -> str:
        """The filesystem path of ``rel``, refused when it would leave the root."""
        path = f"{self.root}/{checked_relative(rel)}"
        if self._real_root is not None and not _is_within(os.path.realpath(path), self._real_root):
            raise UnsafePathError(f"{rel!r} resolves outside {self.root_url} (a symbolic link)")
        return path

    def url(self, rel: str) -> str:
        return f"{self.root_url}/{checked_relative(rel)}"

    def retrying(self, what: str, call: Callable[[], Result]) -> Result:
        """``call()``, retried with exponential backoff and jitter on errors another try may fix."""
        for attempt in range(1, self.options.attempts + 1):
            try:
                return call()
            except NOT_RETRYABLE:
                raise
            except Exception as err:
                if attempt == self.options.attempts:
                    raise TransferError(f"{what}: failed after {attempt} attempts: {err!r}") from err
                delay = self.options.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())
                log.warning("%s: attempt %d failed (%r); retrying in %.2fs", what, attempt, err, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    # --- small objects -------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        return self.retrying(f"check {self.url(rel)}", lambda: self.fs.exists(self.path(rel)))

    def stat(self, rel: str) -> tuple[int | None, str | None]:
        """(size, recorded sha256) of an object, in one request; (None, None) if it does not exist.

        The sha256 is the one its uploader stored in the object's metadata (S3); None elsewhere.
        """

        def look() -> tuple[int | None, str | None]:
            try:
                if self.protocol in S3_PROTOCOLS:
                    bucket, key, _ = self.fs.split_path(self.path(rel))
                    head = self.fs.call_s3("head_object", Bucket=bucket, Key=key)
                    return head["ContentLength"], head.get("Metadata", {}).get(SHA256_METADATA_KEY)
                return self.fs.info(self.path(rel))["size"], None
            except FileNotFoundError:
                return None, None

        return self.retrying(f"stat {self.url(rel)}", look)

    def size(self, rel: str) -> int | None:
        """The object's size, or None when it does not exist."""
        return self.stat(rel)[0]

    def read_bytes(self, rel: str) -> bytes:
        return self.retrying(f"read {self.url(rel)}", lambda: self.fs.cat_file(self.path(rel)))

    def write_bytes(self, rel: str, payload: bytes) -> None:
        """One put: the object appears whole or not at all on an object store."""
        if not is_remote(self.root_url):
            write_bytes_atomic(Path(self.path(rel)), payload)
            return
        self.retrying(f"write {self.url(rel)}", lambda: self.fs.pipe_file(self.path(rel), payload))

    def read_json(self, rel: str) -> object:
        """JSON from the store (outside data: anything but JSON, deep nesting included, is a
        ValueError naming the object)."""
        try:
            return from_json(self.read_bytes(rel))
        except ValueError as err:
            raise ValueError(f"{self.url(rel)}: not JSON: {err}") from None

    def write_json(self, rel: str, obj: object) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def sizes(self, pattern: str) -> dict[str, int]:
        """Relative path -> size of every object matching ``pattern``, in one listing."""
        found = self.retrying(
            f"list {self.url(pattern)}", lambda: self.fs.glob(self.path(pattern), detail=True)
        )
        prefix = self.root + "/"
        return {path.removeprefix(prefix): info["size"] for path, info in found.items()}

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching ``pattern`` (fsspec glob syntax), sorted."""
        found = self.retrying(f"list {self.url(pattern)}", lambda: self.fs.glob(self.path(pattern)))
        prefix = self.root + "/"
        return sorted(p.removeprefix(prefix) for p in found)

    # --- files ---------------------------------------------------------------------------------

    @contextmanager
    def open_read(self, rel: str) -> Iterator[IO[bytes]]:
        with self.fs.open(self.path(rel), "rb") as stream:
            yield stream

    def sha256(self, rel: str) -> str:
        """Read the object back and hash it (the only check that trusts nothing but the bytes)."""

        def digest() -> str:
            hasher = hashlib.sha256()
            with self.open_read(rel) as stream:
                while block := stream.read(MIB):
                    hasher.update(block)
            return hasher.hexdigest()

        return self.retrying(f"hash {self.url(rel)}", digest)

    def holds(self, rel: str, size: int, sha256: str) -> bool:
        """True if the object exists with this size and sha256 (recorded at upload, else re-hashed)."""
        stored_size, recorded = self.stat(rel)
        if stored_size != size:
            return False
        return (recorded or self.sha256(rel)) == sha256

    def put(self, local: Path, rel: str, sha256: str) -> None:
        """Upload ``local`` to ``rel``, overwriting, with its sha256 in the object's metadata (S3).

        The bytes sent must have ``sha256`` (a ``LocalFileChangedError`` otherwise, and nothing is
        left at ``rel``), so a recorded sha256 is always the object's. On S3 a file below two
        multipart chunks is streamed from disk in one request that carries its sha256 for the store
        to check, and is hashed on the way for a store that does not; a larger one is hashed, then
        sent in parts.
        """
        s3 = self.protocol in S3_PROTOCOLS
        if s3 and local.stat().st_size < 2 * self.options.multipart_chunk_bytes:
            self.retrying(
                f"upload {local} -> {self.url(rel)}", partial(self._put_streamed, local, rel, sha256)
            )
            return
        _check_sha256(local, sha256_file(local), sha256)
        if not is_remote(self.root_url):
            send = partial(_copy_atomic, local, Path(self.path(rel)))
        else:
            options = {
                "Metadata": {SHA256_METADATA_KEY: sha256},
                "chunksize": self.options.multipart_chunk_bytes,
            }
            send = partial(self.fs.put_file, str(local), self.path(rel), **(options if s3 else {}))
        self.retrying(f"upload {local} -> {self.url(rel)}", send)

    def _put_streamed(self, local: Path, rel: str, sha256: str) -> None:
        """One ``put_object`` streamed from ``local`` (s3fs would read it into memory).

        The request carries the sha256 for the store to check. Until the store has shown that it
        checks (S3 echoes the checksum it verified), the bytes are also hashed on the way and
        checked here; where the store does not, an object with other bytes is removed again.
        """
        bucket, key, _ = self.fs.split_path(self.path(rel))
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
        with local.open("rb") as stream:
            body = stream if self._store_checks_sha256 else HashingReader(stream)
            try:
                reply = self._s3_client().put_object(
                    Bucket=bucket,
                    Key=key,
                    Body=body,
                    ContentLength=os.fstat(stream.fileno()).st_size,
                    ChecksumSHA256=checksum,
                    Metadata={SHA256_METADATA_KEY: sha256},
                )
            except Exception as err:
                if getattr(err, "response", {}).get("Error", {}).get("Code") == "BadDigest":
                    _check_sha256(local, sha256_file(local), sha256)  # refused: the file changed?
                raise
        if reply.get("ChecksumSHA256") == checksum:
            self._store_checks_sha256 = True
            return
        sent = body.sha256() if isinstance(body, HashingReader) else self.sha256(rel)
        if sent != sha256:
            self.retrying(f"remove {self.url(rel)}", lambda: self.fs.rm_file(self.path(rel)))
            _check_sha256(local, str(sent), sha256)

    def _s3_client(self):
        """botocore's S3 client for this store, made once. It shares s3fs's session loader, so the
        S3 service model is parsed once; same endpoint, same credential chain."""
        with self._client_lock:
            if self._client is None:
                import botocore.session
                from botocore.config import Config

                session = botocore.session.Session()
                self.fs.connect()
                session.register_component("data_loader", self.fs.session.get_component("data_loader"))
                self._client = session.create_client(
                    "s3",
                    endpoint_url=self.options.resolved_endpoint(),
                    config=Config(max_pool_connections=max(10, 2 * self.options.parallel)),
                )
            return self._client

    def upload(self, local: Path, rel: str, sha256: str | None = None) -> bool:
        """Put ``local`` at ``rel`` unless it is already there with the same bytes; True if it was put."""
        sha256 = sha256 or sha256_file(local)
        if self.holds(rel, local.stat().st_size, sha256):
            return False
        self.put(local, rel, sha256)
        return True

    def download(self, rel: str, local: Path) -> None:
        """Copy ``rel`` to ``local`` through a temporary sibling, so ``local`` is never partial."""

        def get() -> None:
            with atomic_path(local) as tmp:
                self.fs.get_file(self.path(rel), str(tmp))

        self.retrying(f"download {self.url(rel)}", get)

    def parallel(
        self,
        jobs: Sequence[Job],
        work: Callable[[Job], Result],
        desc: str,
        size_of: Callable[[Job], int] | None = None,
    ) -> list[Result]:
        """``work`` over ``jobs`` on ``options.parallel`` threads, in job order, with a progress bar
        (in bytes when ``size_of`` gives each job's size, else in jobs).

        The first failure cancels the jobs not yet started and is raised once running ones end.
        """
        from tqdm import tqdm

        weight = size_of or (lambda _: 1)
        results: dict[int, Result] = {}
        with (
            tqdm(
                total=sum(weight(job) for job in jobs),
                desc=desc,
                unit="B" if size_of else "it",
                unit_scale=True,
                disable=None if self.options.progress else True,
            ) as bar,
            ThreadPoolExecutor(max_workers=self.options.parallel) as pool,
        ):
            futures = {pool.submit(work, job): index for index, job in enumerate(jobs)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise future.exception()
                    index = futures[future]
                    results[index] = future.result()
                    bar.update(weight(jobs[index]))
        return [results[index] for index in range(len(jobs))]


class HashingReader:
    """A request body that hashes the bytes as they are read, for a check after they were sent.

    A retry rewinds to the start, which starts the hash again; ``sha256()`` is that of the bytes
    the last attempt read from start to end, or None when it read them out of order or not all.
    """

    def __init__(self, stream: IO[bytes]):
        self._stream = stream
        self._size = os.fstat(stream.fileno()).st_size
        self._position = 0
        self._restart()

    def _restart(self) -> None:
        self._hasher = hashlib.sha256()
        self._hashed = 0
        self._in_order = True

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if self._position == self._hashed:
            self._hasher.update(data)
            self._hashed += len(data)
        elif data:
            self._in_order = False  # bytes hashed once but sent twice, or never hashed
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._position = self._stream.seek(offset, whence)
        if self._position == 0:
            self._restart()
        return self._position

    def tell(self) -> int:
        return self._position

    def sha256(self) -> str | None:
        return self._hasher.hexdigest() if self._in_order and self._hashed == self._size else None


class LocalFileChangedError(ValueError):
    """A file to upload no longer has the sha256 it was listed with."""


def _check_sha256(local: Path, got: str, expected: str) -> None:
    if got != expected:
        raise LocalFileChangedError(
            f"{local} has sha256 {got}, expected {expected}: it changed since it was listed"
        )


def _copy_atomic(source: Path, final: Path) -> None:
    with atomic_path(final) as tmp:
        shutil.copyfile(source, tmp)


def parse_marker(content: bytes, name: str) -> dict:
    """A completion marker's content; ``ValueError`` naming the file for one that is not a JSON
    object (pydantic's parser: deep nesting is an error, not a crash)."""
    parsed = from_json(content)
    if not isinstance(parsed, dict):
        raise ValueError(f"{name}: a completion marker must be a JSON object")
    return parsed


def read_marker(marker: Path) -> dict | None:
    """A local completion marker's content, None when there is none."""
    return parse_marker(marker.read_bytes(), str(marker)) if marker.exists() else None


def local_folder(out: str) -> Path:
    """Where a run's stages write: ``out`` itself, or for an object-store URL its local mirror
    (``$FACEMLLM_STAGING``, else the cache folder's ``staging/``, one subfolder per URL)."""
    if not is_remote(out):
        return Path(out)
    root = Path(os.environ.get(STAGING_ENV) or default_cache_dir() / "staging").expanduser()
    return root / hashlib.sha256(out.rstrip("/").encode()).hexdigest()[:16]


class RunStore:
    """Where a pipeline run's files live, for stages that only know local paths.

    For a local ``out`` this does nothing: stages write there directly. For an object-store
    ``out``, stages write complete files into a local mirror (temporary name, then rename, as
    always) and each finished unit of work is uploaded with its completion marker last, so the
    store never shows a marker whose files are missing. A unit that another worker or an earlier
    run completed in the store is brought into the mirror, marker last, before a stage looks at it.
    """

    def __init__(self, out: str, options: StorageOptions | None = None):
        self.remote = Storage(out, options) if is_remote(out) else None
        self.local = local_folder(out)

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.local).as_posix()

    def fetch(self, path: Path) -> None:
        """Make sure the mirror holds ``path`` (an input another worker may have produced)."""
        if self.remote is not None and not path.exists():
            self.remote.download(self._rel(path), path)

    def fetch_completed(self, marker: Path, files_of: Callable[[dict], list[Path]]) -> None:
        """Bring a unit completed in the store into the mirror: the files its marker vouches for
        (``files_of(marker content)``), then the marker."""
        if self.remote is None or marker.exists() or (content := self._stored(marker)) is None:
            return
        for path in files_of(parse_marker(content, self._rel(marker))):
            self.remote.download(self._rel(path), path)
        write_bytes_atomic(marker, content)

    def push_completed(self, marker: Path, *files: Path) -> None:
        """Upload a completed unit: its files, then its marker. Skipped when the store holds this
        very marker; a unit redone over a stale one in the store (a changed setting) replaces it,
        each file put only if the store's bytes differ."""
        if self.remote is None or self.remote.holds(
            self._rel(marker), marker.stat().st_size, sha256_file(marker)
        ):
            return
        for path in (*files, marker):
            self.remote.upload(path, self._rel(path))

    def push(self, *paths: Path) -> None:
        """Upload files in order, each unless the store holds the same bytes: the last is the commit point."""
        for path in paths if self.remote is not None else ():
            self.remote.upload(path, self._rel(path))

    def in_store(self, pattern: str) -> list[Path]:
        """Mirror paths of the store's files matching ``pattern`` (relative to ``out``)."""
        return [self.local / rel for rel in self.remote.glob(pattern)] if self.remote is not None else []

    def matching(self, pattern: str) -> list[Path]:
        """Mirror paths of the files matching ``pattern`` in the mirror or in the store, sorted."""
        return sorted(set(self.local.glob(pattern)) | set(self.in_store(pattern)))

    def read_marker(self, marker: Path) -> dict | None:
        """A completion marker's content from the mirror, else from the store (not copied into the
        mirror, whose markers vouch for files there): what the driver reads of its workers' units
        when they ran on other machines. None when neither holds it."""
        if marker.exists() or self.remote is None:
            return read_marker(marker)
        content = self._stored(marker)
        return None if content is None else parse_marker(content, self._rel(marker))

    def _stored(self, path: Path) -> bytes | None:
        """The store's bytes for a mirror path, None when it has none (one request either way)."""
        try:
            return self.remote.read_bytes(self._rel(path))
        except FileNotFoundError:
            return None


def enable_webdataset_urls(
    options: StorageOptions | None = None, schemes: Sequence[str] = ("s3", "gs", "gcs")
) -> None:
    """Let ``webdataset.WebDataset`` and ``wids`` read these URL schemes through fsspec, so
    ``WebDataset("s3://bucket/ds/faces/{00000..00009}.tar")`` works (same endpoint and credentials).

    webdataset 0.2.111 has no ``s3://`` opener and shells out to ``gsutil`` for ``gs://``.
    """
    from wids import wids_dl

    gopen_module = importlib.import_module("webdataset.gopen")  # the package shadows it with a function

    def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: object) -> IO[bytes]:
        return open_url(url, mode, options)

    def copy_to_local(remote: str, local: str) -> None:
        folder, _, name = remote.rpartition("/")
        Storage(folder, options).download(name, Path(local))

    for scheme in schemes:
        gopen_module.gopen_schemes[scheme] = gopen_fsspec
        wids_dl.default_cmds[scheme] = copy_to_local
