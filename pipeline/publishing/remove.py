"""``facemllm remove``: take samples out of a published dataset as a new version, on request.

A takedown names SAMPLE_IDs or source urls. Only the shards that hold a match are rewritten, into
the new version's own folders; nothing an earlier version lists is touched, so readers of version
N-1 keep working while and after version N is written.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tempfile
from collections.abc import Iterable
from pathlib import Path

from pydantic import Field

from facemllm.pipeline.core.shards import ShardWriter, iter_tar_samples, shard_info
from facemllm.pipeline.core.storage import Storage, StorageOptions
from facemllm.pipeline.publishing.layout import (
    checked_shards,
    commit_version,
    manifest_of_version,
    version_manifest_name,
    versioned_url,
)
from facemllm.schemas import RemovalSummary, ShardInfo, ShardManifest, StrictModel

ID_FIELDS = ("SAMPLE_ID", "sample_id")  # img2dataset's json, FaceRecord and later records
URL_FIELDS = ("url",)


class RemovalRequest:
    """SAMPLE_IDs and source urls to take out, one per line (blank lines and ``#`` comments ignored)."""

    def __init__(self, entries: Iterable[str]):
        cleaned = {line.strip() for line in entries} - {""}
        cleaned = {entry for entry in cleaned if not entry.startswith("#")}
        self.sample_ids = {int(entry) for entry in cleaned if entry.isdigit()}
        self.urls = {entry for entry in cleaned if not entry.isdigit()}
        if not cleaned:
            raise ValueError("the removal request lists no SAMPLE_ID or url")

    @classmethod
    def from_file(cls, path: Path) -> RemovalRequest:
        return cls(Path(path).read_text().splitlines())

    def entries(self) -> list[str]:
        return sorted([*map(str, self.sample_ids), *self.urls])

    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.entries()).encode()).hexdigest()

    def matches(self, record: dict) -> set[str]:
        """The request entries a sample's json record matches."""
        ids = {_as_sample_id(record.get(field)) for field in ID_FIELDS} & self.sample_ids
        return {str(i) for i in ids} | {record[f] for f in URL_FIELDS if record.get(f) in self.urls}


def _as_sample_id(value: object) -> int | None:
    """SAMPLE_IDs arrive as ints, or as floats or strings from tables that lost the type."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


class ShardRewrite(StrictModel):
    """What a removal did to one shard."""

    stage: str
    old: ShardInfo
    new: ShardInfo | None = Field(description="None if unchanged or emptied")
    removed_keys: list[str]
    matched: list[str]


class RemovalReport(StrictModel):
    dest: str
    version: int | None = Field(description="the new version, or None when nothing matched")
    requested: int
    removed: dict[str, list[str]] = Field(description="stage -> keys of the removed samples")
    rewritten: dict[str, str | None] = Field(description="old shard url -> its rewrite (None: emptied)")
    not_found: list[str] = Field(description="request entries that matched no sample")


def _sample_record(sample: dict[str, bytes]) -> dict:
    payload = sample.get("json")
    record = json.loads(payload) if payload is not None else {}
    return record if isinstance(record, dict) else {}


def rewrite_shard(
    storage: Storage, stage: str, shard: ShardInfo, request: RemovalRequest, version: int, scratch: Path
) -> ShardRewrite:
    """Find the requested samples in a shard; if any, upload a copy without them."""
    with tempfile.TemporaryDirectory(dir=scratch) as work:
        original = Path(work) / "original.tar"
        storage.download(shard.url, original)
        removed_keys: list[str] = []
        matched: set[str] = set()
        for key, sample in iter_tar_samples(original):
            if hits := request.matches(_sample_record(sample)):
                removed_keys.append(key)
                matched |= hits
        new = None
        if removed_keys:
            rewritten = Path(work) / "rewritten.tar"
            dropped = set(removed_keys)
            with ShardWriter(rewritten) as writer:
                for key, sample in iter_tar_samples(original):
                    if key not in dropped:
                        writer.add(key, sample)
            if writer.count:
                new = shard_info(rewritten, writer.count, versioned_url(shard.url, version))
                storage.upload(rewritten, new.url, new.sha256)
    return ShardRewrite(stage=stage, old=shard, new=new, removed_keys=removed_keys, matched=sorted(matched))


def _stage_after_removal(stage: ShardManifest, rewrites: list[ShardRewrite]) -> ShardManifest:
    """The stage without the removed samples: rewritten shards swapped in, emptied ones dropped."""
    by_url = {r.old.url: r for r in rewrites}
    shards = []
    for shard in stage.shards:
        rewrite = by_url.get(shard.url)
        if rewrite is None:
            shards.append(shard)
        elif rewrite.new is not None:
            shards.append(rewrite.new)
    removed = sum(len(r.removed_keys) for r in by_url.values())
    counts = dict(stage.counts)
    counts["removed"] = counts.get("removed", 0) + removed
    counts["samples"] = sum(s.nsamples for s in shards)
    return stage.model_copy(update={"shards": shards, "counts": dict(sorted(counts.items()))})


def remove(
    dest: str, request: RemovalRequest, options: StorageOptions | None = None, scratch: Path | None = None
) -> RemovalReport:
    """Take the requested samples out of every stage's shards and publish the result as a new version.

    Only shards holding a match are rewritten, under ``<folder>/v<N>/``; every other shard, and every
    object of earlier versions, is left as it is, so version N-1 stays readable. Rerunning after a
    kill redoes the same version (rewrites are byte-identical, so finished uploads are skipped).
    """
    storage = Storage(dest, options)
    current = manifest_of_version(storage, None)
    if not storage.exists(version_manifest_name(current.version)):  # a run written straight to DEST
        storage.write_json(version_manifest_name(current.version), current.model_dump(mode="json"))
    version = current.version + 1
    checked_shards(current)
    jobs = [(stage, shard) for stage, m in current.stages.items() for shard in m.shards]
    with tempfile.TemporaryDirectory(dir=scratch, prefix="facemllm-remove-") as work:
        rewrites = storage.parallel(
            jobs,
            lambda job: rewrite_shard(storage, job[0], job[1], request, version, Path(work)),
            f"remove from {dest}",
            size_of=lambda job: job[1].bytes,
        )
    changed = [r for r in rewrites if r.removed_keys]
    matched = {entry for r in changed for entry in r.matched}
    removed = {
        stage: [k for r in changed if r.stage == stage for k in r.removed_keys] for stage in current.stages
    }
    report = RemovalReport(
        dest=dest,
        version=version if changed else None,
        requested=len(request.entries()),
        removed={stage: keys for stage, keys in removed.items() if keys},
        rewritten={r.old.url: r.new.url if r.new else None for r in changed},
        not_found=sorted(set(request.entries()) - matched),
    )
    if not changed:
        return report
    stages = {
        name: _stage_after_removal(stage, [r for r in changed if r.stage == name])
        if name in report.removed
        else stage
        for name, stage in current.stages.items()
    }
    new_manifest = current.model_copy(
        update={
            "stages": stages,
            "version": version,
            "parent": current.version,
            "removal": RemovalSummary(
                request_sha256=request.sha256(),
                requested=report.requested,
                matched=len(matched),
                removed={stage: len(keys) for stage, keys in report.removed.items()},
            ),
        }
    )
    commit_version(storage, new_manifest, {posixpath.dirname(r.new.url) for r in changed if r.new})
    return report
