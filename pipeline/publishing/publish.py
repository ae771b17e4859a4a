"""``facemllm publish``: upload a finished run to DEST, resumably, and commit it as version 1.

The run's shards keep their names under DEST (see ``layout``); ``manifest.json`` is written only
after every shard is there, so a killed publish leaves nothing a reader would see, and rerunning it
uploads only what is still missing.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from pydantic import Field

from facemllm.pipeline.core.storage import Storage, StorageOptions
from facemllm.pipeline.publishing.layout import (
    CURRENT_MANIFEST,
    REPORT_DATA,
    all_shards,
    checked_shards,
    commit_version,
    read_manifest,
    report_data_name,
    version_manifest_name,
)
from facemllm.schemas import PublishedManifest, RunManifest, ShardInfo, StrictModel


class PublishConflictError(ValueError):
    """DEST already holds a different published dataset."""


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
    shards = checked_shards(manifest)
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
    run = Storage(out, options)  # reads go through the same path check as writes
    folders = sorted({posixpath.dirname(s.url) for s in shards})
    present = {rel: size for folder in folders for rel, size in storage.sizes(f"{folder}/*").items()}

    def upload(shard: ShardInfo) -> bool:
        # one listing per folder, then a HEAD only for a shard already there at the right size
        if present.get(shard.url) == shard.bytes and storage.holds(shard.url, shard.bytes, shard.sha256):
            return False  # a resumed upload: already there
        storage.put(Path(run.path(shard.url)), shard.url, shard.sha256)  # refuses a file that changed
        return True

    uploaded = storage.parallel(shards, upload, f"publish {dest}", size_of=lambda s: s.bytes)
    if (Path(out) / REPORT_DATA).is_file():  # counts only: the page itself is rebuilt from DEST
        storage.write_bytes(report_data_name(manifest.version), (Path(out) / REPORT_DATA).read_bytes())
    commit_version(storage, manifest, folders)
    return PublishReport(
        dest=dest,
        version=manifest.version,
        shards=len(shards),
        uploaded=sum(uploaded),
        skipped=len(shards) - sum(uploaded),
        bytes_uploaded=sum(s.bytes for s, done in zip(shards, uploaded, strict=True) if done),
    )
