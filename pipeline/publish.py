"""Publish a run's shards to a URL, verify them, and remove samples on request.

Published layout under DEST (any local folder or fsspec URL)::

    images/00000.tar ...              version 1's shards: the run's files, same names
    images/sizes.json                 {"00000.tar": n} for the shards in that folder (open_clip)
    faces/v2/00003.tar                a shard rewritten by version 2 (only the shards it changed)
    faces/v2/sizes.json
    manifest.v1.json manifest.v2.json every version's PublishedManifest, immutable
    sizes.v1.json                     {url: nsamples} of every shard of version 1
    images.v1.wids.json               wids shard index of a stage in version 1 (urls relative to DEST)
    manifest.json                     the current version; written last: the commit point

A version's objects are all written before its ``manifest.json``, and no object another version
refers to is ever overwritten, so a reader that starts from ``manifest.json`` (or any
``manifest.vN.json``) always finds every shard it lists, whole, even while a publish or a removal
is running or after one was killed.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

from pydantic import Field, computed_field

from facemllm.pipeline.core.shards import (
    ShardWriter,
    check_member_name,
    iter_tar_samples,
    shard_info,
    split_member_name,
)
from facemllm.pipeline.core.storage import MIB, Storage, StorageOptions
from facemllm.schemas import (
    PublishedManifest,
    RemovalSummary,
    RunManifest,
    ShardInfo,
    ShardManifest,
    StrictModel,
)

CURRENT_MANIFEST = "manifest.json"
VERSION_FOLDER = re.compile(r"v\d+")
ID_FIELDS = ("SAMPLE_ID", "sample_id")  # img2dataset's json, FaceRecord and later records
URL_FIELDS = ("url",)


class PublishConflictError(ValueError):
    """DEST already holds a different published dataset."""


class CorruptShardError(ValueError):
    """A stored shard cannot be read as a tar: another attempt would read the same bytes."""


def version_manifest_name(version: int) -> str:
    return f"manifest.v{version}.json"


def version_sizes_name(version: int) -> str:
    return f"sizes.v{version}.json"


def wids_index_name(stage: str, version: int) -> str:
    return f"{stage.replace('/', '-')}.v{version}.wids.json"


def base_url(url: str) -> str:
    """A shard url without its version folder: ``faces/v2/00003.tar`` -> ``faces/00003.tar``."""
    folder, name = posixpath.split(url)
    if VERSION_FOLDER.fullmatch(posixpath.basename(folder)):
        folder = posixpath.dirname(folder)
    return posixpath.join(folder, name)


def versioned_url(url: str, version: int) -> str:
    """Where version ``version`` puts its rewrite of the shard at ``url``."""
    folder, name = posixpath.split(base_url(url))
    return posixpath.join(folder, f"v{version}", name)


def read_manifest(storage: Storage, name: str = CURRENT_MANIFEST) -> PublishedManifest | None:
    """A published (or plain run) manifest, or None when there is none under that name."""
    if not storage.exists(name):
        return None
    return PublishedManifest.model_validate(storage.read_json(name))


def manifest_of_version(storage: Storage, version: int | None) -> PublishedManifest:
    """The manifest of a published version (None: the current one); FileNotFoundError if absent."""
    name = CURRENT_MANIFEST if version is None else version_manifest_name(version)
    manifest = read_manifest(storage, name)
    if manifest is None:
        raise FileNotFoundError(f"{storage.url(name)}: no manifest there")
    return manifest


def all_shards(manifest: RunManifest) -> list[ShardInfo]:
    return [shard for stage in manifest.stages.values() for shard in stage.shards]


def commit_version(storage: Storage, manifest: PublishedManifest, new_folders: Iterable[str]) -> None:
    """Write a version's indexes, then its immutable manifest, then ``manifest.json``: last, the commit point.

    ``new_folders``: folders whose shards all belong to this version, which get a ``sizes.json``.
    """
    shards = all_shards(manifest)
    for folder in sorted(set(new_folders)):
        in_folder = {
            posixpath.basename(s.url): s.nsamples for s in shards if posixpath.dirname(s.url) == folder
        }
        storage.write_json(f"{folder}/sizes.json", in_folder)
    for stage, stage_manifest in manifest.stages.items():
        if stage_manifest.shards:
            storage.write_json(wids_index_name(stage, manifest.version), wids_index(stage_manifest.shards))
    storage.write_json(version_sizes_name(manifest.version), {s.url: s.nsamples for s in shards})
    document = manifest.model_dump(mode="json")
    storage.write_json(version_manifest_name(manifest.version), document)
    storage.write_json(CURRENT_MANIFEST, document)


def wids_index(shards: list[ShardInfo]) -> dict:
    """A wids shard index; urls stay relative to DEST, where the index itself lies."""
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "shardlist": [
            {"url": s.url, "nsamples": s.nsamples, "filesize": s.bytes, "sha256": s.sha256} for s in shards
        ],
    }


# --- publish -----------------------------------------------------------------------------------


class PublishReport(StrictModel):
    dest: str
    version: int
    shards: int
    uploaded: int = Field(description="shards uploaded by this call")
    skipped: int = Field(description="shards already in DEST with the right sha256 (a resumed upload)")
    bytes_uploaded: int
    already_published: bool = False


def collect_run_manifest(out: Path) -> PublishedManifest:
    """``out/manifest.json`` plus the stages of every dataset manifest one or two folders below it
    (the QA datasets' ``qa/<dataset>/manifest.json``), with every shard url made relative to ``out``."""
    top = out / CURRENT_MANIFEST
    if not top.is_file():
        raise FileNotFoundError(f"{top}: no run manifest; finish the run first")
    manifest = PublishedManifest.model_validate_json(top.read_text())
    if manifest.version != 1:
        raise ValueError(f"{top} is a published version ({manifest.version}), not a run's manifest")
    for nested in sorted([*out.glob(f"*/{CURRENT_MANIFEST}"), *out.glob(f"*/*/{CURRENT_MANIFEST}")]):
        prefix = nested.parent.relative_to(out).as_posix()
        for name, stage in RunManifest.model_validate_json(nested.read_text()).stages.items():
            if name in manifest.stages:
                raise ValueError(f"{nested}: stage {name!r} is also in {top}")
            shards = [s.model_copy(update={"url": f"{prefix}/{s.url}"}) for s in stage.shards]
            manifest.stages[name] = stage.model_copy(update={"shards": shards})
    return manifest


def publish(out: Path, dest: str, options: StorageOptions | None = None) -> PublishReport:
    """Upload a finished run's shards (QA datasets under it included) to ``dest``, then the
    manifest as the commit point.

    Rerunning resumes: shards already in ``dest`` with the right size and sha256 are skipped.
    ``dest`` must be empty of other datasets; republishing the same run is a no-op, which also
    means a removal made since is never undone by publishing the original run again.
    """
    manifest = collect_run_manifest(Path(out))
    storage = Storage(dest, options)
    current = read_manifest(storage)
    if current is not None:
        if read_manifest(storage, version_manifest_name(1)) == manifest:
            return PublishReport(
                dest=dest,
                version=current.version,
                shards=len(all_shards(current)),
                uploaded=0,
                skipped=0,
                bytes_uploaded=0,
                already_published=True,
            )
        raise PublishConflictError(
            f"{dest} already holds another dataset (version {current.version}); publish to a new prefix"
        )
    shards = all_shards(manifest)

    def upload(shard: ShardInfo) -> bool:
        if storage.holds(shard.url, shard.bytes, shard.sha256):
            return False  # a resumed upload: already there
        storage.put(Path(out) / shard.url, shard.url, shard.sha256)  # refuses a file that changed
        return True

    uploaded = storage.parallel(shards, upload, f"publish {dest}", size_of=lambda s: s.bytes)
    commit_version(storage, manifest, {posixpath.dirname(s.url) for s in shards})
    return PublishReport(
        dest=dest,
        version=manifest.version,
        shards=len(shards),
        uploaded=sum(uploaded),
        skipped=len(shards) - sum(uploaded),
        bytes_uploaded=sum(s.bytes for s, done in zip(shards, uploaded, strict=True) if done),
    )


# --- verify ------------------------------------------------------------------------------------


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
    if storage.size(shard.url) is None:
        return ShardProblem(url=shard.url, problem="missing")
    try:
        sha256, nsamples, size = inspect_shard(storage, shard.url)
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


# --- remove ------------------------------------------------------------------------------------


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


def shard_urls(
    dest: str, stage: str, options: StorageOptions | None = None, version: int | None = None
) -> list[str]:
    """Absolute urls of a stage's shards in a published version (default: current), for readers."""
    storage = Storage(dest, options)
    return [storage.url(s.url) for s in manifest_of_version(storage, version).stages[stage].shards]
