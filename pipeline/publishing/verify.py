"""``facemllm verify``: read a published version back and compare every shard with its manifest.

A shard counts as good only if its bytes hash to the manifest's sha256 and it reads as a tar with
the manifest's sample count; each shard is streamed once, so verifying costs one download of the
version and no local disk.
"""

from __future__ import annotations

import hashlib
import tarfile

from pydantic import computed_field

from facemllm.pipeline.core.shards import check_member_name, split_member_name
from facemllm.pipeline.core.storage import MIB, Storage, StorageOptions, UnsafePathError
from facemllm.pipeline.publishing.layout import all_shards, manifest_of_version
from facemllm.schemas import ShardInfo, StrictModel


class CorruptShardError(ValueError):
    """A stored shard cannot be read as a tar: another attempt would read the same bytes."""


class ShardProblem(StrictModel):
    url: str
    problem: str


class VerifyReport(StrictModel):
    dest: str
    version: int
    shards: int
    samples: int
    problems: list[ShardProblem]

    @computed_field
    @property
    def ok(self) -> bool:
        return not self.problems


class _HashingReader:
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, stream):
        self.stream = stream
        self.digest = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        block = self.stream.read(size)
        self.digest.update(block)
        self.bytes += len(block)
        return block


def inspect_shard(storage: Storage, url: str) -> tuple[str, int, int]:
    """(sha256, samples, bytes) of a stored shard, in one streaming pass over its bytes."""

    def scan() -> tuple[str, int, int]:
        with storage.open_read(url) as stream:
            reader = _HashingReader(stream)
            keys = set()
            try:
                with tarfile.open(fileobj=reader, mode="r|") as tar:
                    for member in tar:
                        check_member_name(member.name)
                        keys.add(split_member_name(member.name)[0])
            except tarfile.TarError as err:
                raise CorruptShardError(f"{storage.url(url)} is not a readable tar: {err}") from err
            while reader.read(MIB):  # the tar's end padding counts in the checksum too
                pass
            return reader.digest.hexdigest(), len(keys), reader.bytes

    return storage.retrying(f"inspect {storage.url(url)}", scan)


def check_shard(storage: Storage, shard: ShardInfo) -> ShardProblem | None:
    """None when the stored shard matches its manifest entry, else what differs."""
    try:
        if storage.size(shard.url) is None:
            return ShardProblem(url=shard.url, problem="missing")
        sha256, nsamples, size = inspect_shard(storage, shard.url)
    except UnsafePathError as err:  # a manifest entry pointing outside DEST: never read
        return ShardProblem(url=shard.url, problem=f"unsafe url: {err}")
    except ValueError as err:  # CorruptShardError, or an unsafe or malformed member name
        return ShardProblem(url=shard.url, problem=f"unreadable: {err}")
    differences = [
        f"{name} {got} != manifest {want}"
        for name, got, want in (
            ("sha256", sha256, shard.sha256),
            ("nsamples", nsamples, shard.nsamples),
            ("bytes", size, shard.bytes),
        )
        if got != want
    ]
    return ShardProblem(url=shard.url, problem="; ".join(differences)) if differences else None


def verify(dest: str, options: StorageOptions | None = None, version: int | None = None) -> VerifyReport:
    """Read back every shard of a version (default: the current one) and compare it with the manifest."""
    storage = Storage(dest, options)
    manifest = manifest_of_version(storage, version)
    shards = all_shards(manifest)
    found = storage.parallel(shards, lambda s: check_shard(storage, s), f"verify {dest}", lambda s: s.bytes)
    return VerifyReport(
        dest=dest,
        version=manifest.version,
        shards=len(shards),
        samples=sum(s.nsamples for s in shards),
        problems=[problem for problem in found if problem is not None],
    )
