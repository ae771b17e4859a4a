"""``manifest.json`` and ``sizes.json``: the commit point of a run, built from the completion markers.

Only completed shards (those with a stats file, the completion marker) are listed, so a reader of
the manifest never sees a half-written shard. Each marker records its shard's sha256, samples and
bytes and its status counts (``shard_record``, taken by the worker that wrote the shard), so the
driver reads markers only: it never downloads or rereads the shards, which at LAION-Face scale are
terabytes on other machines. Everything in it is derived from shard bytes and status rows, never
from timing, so an interrupted-and-resumed run and an uninterrupted one give the same manifest.
"""

from __future__ import annotations

from collections import Counter
from importlib import metadata
from pathlib import Path

import pyarrow as pa

from facemllm.pipeline.core.files import write_json_atomic
from facemllm.pipeline.core.shards import (
    STATS_SUFFIX,
    count_tar_keys,
    marker_shard_id,
    shard_info,
    write_sizes,
)
from facemllm.pipeline.core.storage import RunStore
from facemllm.schemas import RunManifest, ShardInfo, ShardManifest

TRACKED_PACKAGES = (
    "facemllm",
    "apache-beam",
    "img2dataset",
    "insightface",
    "onnxruntime",
    "opencv-python",
    "webdataset",
    "pyarrow",
    "numpy",
)
SHARD_STAGES = ("images", "faces", "annotations")


SHARD_RECORD = "shard"  # in a shard stage's marker: the shard's sha256, nsamples and bytes
STATUS_COUNTS = "status_counts"  # in a shard stage's marker: its status rows counted by status


def shard_record(tar: Path, statuses: list[dict] | pa.Table | None) -> dict:
    """What a shard stage's completion marker records for the manifest, taken by the worker that
    just wrote the shard (its bytes still in the page cache)."""
    info = shard_info(tar, count_tar_keys(tar), url=tar.name)
    if statuses is None:
        values = []
    elif isinstance(statuses, pa.Table):
        values = statuses["status"].to_pylist()
    else:
        values = [row["status"] for row in statuses]
    return {
        SHARD_RECORD: info.model_dump(include={"sha256", "nsamples", "bytes"}),
        STATUS_COUNTS: dict(sorted(Counter(values).items())),
    }


def shard_stage_manifest(store: RunStore, stage: str) -> ShardManifest:
    """A shard stage's folder (``stage``, relative to the run) from its completion markers, in the
    mirror or the store."""
    markers = store.matching(f"{stage}/*{STATS_SUFFIX}")
    shards: list[ShardInfo] = []
    counts: Counter[str] = Counter()
    for marker in sorted(markers, key=marker_shard_id):
        stats = store.read_marker(marker) or {}
        if SHARD_RECORD not in stats:
            raise ValueError(
                f"{stage}/{marker.name} records no shard (a marker from before facemllm recorded "
                "them): rerun that stage so its markers are current"
            )
        shards.append(ShardInfo(url=f"{stage}/{marker_shard_id(marker):05d}.tar", **stats[SHARD_RECORD]))
        counts.update(stats[STATUS_COUNTS])
    counts["samples"] = sum(s.nsamples for s in shards)
    return ShardManifest(stage=stage, shards=shards, counts=dict(sorted(counts.items())))


def write_dataset_manifest(
    dataset_dir: Path,
    status_counts: dict[str, int],
    shards: dict[str, list[ShardInfo]],
    split_counts: dict[str, dict[str, int]],
    config_hash: str,
) -> RunManifest:
    """A QA dataset's ``sizes.json`` per split, then its ``manifest.json`` (the commit point, last):
    stage ``qa/<dataset>`` holds the status counts, ``qa/<dataset>/<split>`` each split's shards
    (urls relative to the dataset folder) and sample counts, as ``publish`` and ``eval`` read them."""
    name = f"qa/{dataset_dir.name}"
    stages = {name: ShardManifest(stage=name, shards=[], counts=dict(sorted(status_counts.items())))}
    for split in sorted(shards):
        write_sizes(dataset_dir / split, shards[split])
        counts = {"samples": sum(s.nsamples for s in shards[split]), **split_counts.get(split, {})}
        stages[f"{name}/{split}"] = ShardManifest(
            stage=f"{name}/{split}", shards=shards[split], counts=dict(sorted(counts.items()))
        )
    manifest = RunManifest(config_hash=config_hash, package_versions=package_versions(), stages=stages)
    write_json_atomic(dataset_dir / "manifest.json", manifest.model_dump(mode="json"))
    return manifest


def select_manifest(store: RunStore) -> ShardManifest:
    counts: Counter[str] = Counter()
    for marker in store.matching("urls/_select-*.json"):
        counts.update((store.read_marker(marker) or {})["counts"])
    return ShardManifest(stage="urls", shards=[], counts=dict(sorted(counts.items())))


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def write_run_manifest(store: RunStore, config_hash: str) -> RunManifest:
    """The run's ``manifest.json`` and the ``sizes.json`` files in the mirror (pushed by the caller)."""
    out = store.local
    stages = {"urls": select_manifest(store)}
    for stage in SHARD_STAGES:
        stage_manifest = shard_stage_manifest(store, stage)
        if stage_manifest.shards or (out / stage).is_dir():
            stages[stage] = stage_manifest
            write_sizes(out / stage, stage_manifest.shards)
    manifest = RunManifest(config_hash=config_hash, package_versions=package_versions(), stages=stages)
    write_json_atomic(out / "sizes.json", {s.url: s.nsamples for m in stages.values() for s in m.shards})
    write_json_atomic(out / "manifest.json", manifest.model_dump(mode="json"))  # commit point, last
    return manifest


def summary_rows(manifest: RunManifest) -> list[tuple[str, str, int]]:
    """(stage, outcome, count) rows for the end-of-run table."""
    return [
        (stage, outcome, count) for stage, m in manifest.stages.items() for outcome, count in m.counts.items()
    ]


def print_summary(manifest: RunManifest) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="facemllm run summary")
    for column in ("stage", "outcome", "count"):
        table.add_column(column, justify="right" if column == "count" else "left")
    for stage, outcome, count in summary_rows(manifest):
        table.add_row(stage, outcome, str(count))
    Console().print(table)
