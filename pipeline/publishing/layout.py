"""The published layout that publish, verify and remove all read and write, and how a version commits.

Published layout under DEST (any local folder or fsspec URL)::

    images/00000.tar ...              version 1's shards: the run's files, same names
    images/sizes.json                 {"00000.tar": n} for the shards in that folder (open_clip)
    faces/v2/00003.tar                a shard rewritten by version 2 (only the shards it changed)
    faces/v2/sizes.json
    manifest.v1.json manifest.v2.json every version's PublishedManifest, immutable
    sizes.v1.json                     {url: nsamples} of every shard of version 1
    images.v1.wids.json               wids shard index of a stage in version 1 (urls relative to DEST)
    report.v1.json                    the run's report data (profiles, duplicates): `facemllm report DEST`
    manifest.json                     the current version; written last: the commit point

A version's objects are all written before its ``manifest.json``, and no object another version
refers to is ever overwritten, so a reader that starts from ``manifest.json`` (or any
``manifest.vN.json``) always finds every shard it lists, whole, even while a publish or a removal
is running or after one was killed. Every name in that layout is spelled here and nowhere else.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable

from facemllm.pipeline.core.storage import Storage, StorageOptions, checked_relative
from facemllm.schemas import PublishedManifest, RunManifest, ShardInfo

CURRENT_MANIFEST = "manifest.json"
REPORT_DATA = "report.json"  # a run's report data, published as ``report_data_name(version)``
VERSION_FOLDER = re.compile(r"v\d+")

# --- names -------------------------------------------------------------------------------------


def version_manifest_name(version: int) -> str:
    return f"manifest.v{version}.json"


def version_sizes_name(version: int) -> str:
    return f"sizes.v{version}.json"


def report_data_name(version: int) -> str:
    """The run's report data (``ReportData``) as published with a version."""
    return f"report.v{version}.json"


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


# --- reading a version -------------------------------------------------------------------------


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


def checked_shards(manifest: RunManifest) -> list[ShardInfo]:
    """``all_shards``, after refusing the whole manifest if any url would leave its root: checked
    up front, so a hostile manifest transfers nothing at all (``UnsafePathError``)."""
    shards = all_shards(manifest)
    for shard in shards:
        checked_relative(shard.url)
    return shards


def shard_urls(
    dest: str, stage: str, options: StorageOptions | None = None, version: int | None = None
) -> list[str]:
    """Absolute urls of a stage's shards in a published version (default: current), for readers."""
    storage = Storage(dest, options)
    return [storage.url(s.url) for s in manifest_of_version(storage, version).stages[stage].shards]


# --- writing a version -------------------------------------------------------------------------


def commit_version(storage: Storage, manifest: PublishedManifest, new_folders: Iterable[str]) -> None:
    """Write a version's indexes, then its immutable manifest, then ``manifest.json``: last, the commit point.

    ``new_folders``: folders whose shards all belong to this version, which get a ``sizes.json``.
    """
    shards = all_shards(manifest)
    for folder in sorted(set(new_folders)):
        in_folder = {
            posixpath.basename(s.url): s.nsamples for s in shards if posixpath.dirname(s.url) == folder
        }
        storage.write_json(posixpath.join(folder, "sizes.json"), in_folder)
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
