"""``manifest.json`` and ``sizes.json``: the commit point of a run, built from what is on disk.

Only completed shards (those with a stats file, the completion marker) are listed, so a reader of
the manifest never sees a half-written shard. Everything in it is derived from shard bytes and
status tables, never from timing, so an interrupted-and-resumed run and an uninterrupted one give
the same manifest.
"""

from __future__ import annotations

import json
from collections import Counter
from importlib import metadata
from pathlib import Path

import pyarrow.parquet as pq

from facemllm.pipeline.core.files import write_json_atomic
from facemllm.pipeline.core.shards import (
    completed_shards,
    count_tar_keys,
    shard_info,
    shard_paths,
    write_sizes,
)
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


def shard_stage_manifest(out: Path, stage: str) -> ShardManifest:
    stage_dir = out / stage
    shards: list[ShardInfo] = []
    counts: Counter[str] = Counter()
    for shard_id in completed_shards(stage_dir):
        paths = shard_paths(stage_dir, shard_id)
        tar = paths["tar"]
        shards.append(shard_info(tar, count_tar_keys(tar), url=f"{stage}/{tar.name}"))
        status = pq.read_table(paths["parquet"], columns=["status"])
        counts.update(status["status"].to_pylist())
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


def select_manifest(out: Path) -> ShardManifest:
    counts: Counter[str] = Counter()
    for marker in sorted((out / "urls").glob("_select-*.json")):
        counts.update(json.loads(marker.read_text())["counts"])
    return ShardManifest(stage="urls", shards=[], counts=dict(sorted(counts.items())))


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def write_run_manifest(out: Path, config_hash: str) -> RunManifest:
    stages = {"urls": select_manifest(out)}
    for stage in SHARD_STAGES:
        if (out / stage).is_dir():
            stages[stage] = shard_stage_manifest(out, stage)
            write_sizes(out / stage, stages[stage].shards)
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
