"""The Beam pipeline writing straight to an object-store URL (a real SeaweedFS server), killed and
resumed on a fresh local mirror (as another machine would), then a removal on what it wrote; and
the executor keeping each worker's mirror and the store in agreement, one unit at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from facemllm.pipeline.core.shards import ShardWriter, iter_tar_samples
from facemllm.pipeline.core.storage import STAGING_ENV, RunStore, Storage, StorageOptions, local_folder
from facemllm.pipeline.demo.run import demo_config, expected_counts, observed_counts
from facemllm.pipeline.publishing.remove import RemovalRequest, remove
from facemllm.pipeline.publishing.verify import verify
from facemllm.pipeline.stages.framework import ShardOutputStage, UnitResult, execute_unit
from facemllm.schemas import PublishedManifest, RunManifest
from tests.conftest import subprocess_env

pytestmark = pytest.mark.slow
QUIET = StorageOptions(progress=False, backoff_s=0.05)


def start_run(config: Path, mirror: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "facemllm.pipeline.cli", "run", str(config)],
        env={**subprocess_env(), STAGING_ENV: str(mirror)},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_run_straight_to_s3_killed_and_resumed_on_a_fresh_mirror(
    served_sample, s3_bucket, tmp_path, monkeypatch
):
    _, sample = served_sample
    out = f"{s3_bucket}/runs/demo"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(demo_config(sample, out).model_dump(mode="json")))
    store = Storage(out, QUIET)

    first = start_run(config, tmp_path / "mirror-a")
    deadline = time.monotonic() + 240
    while not store.glob("faces/*_stats.json"):
        assert first.poll() is None, "the run ended before the kill point:\n" + first.stdout.read()
        assert time.monotonic() < deadline, "no face shard reached the store"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert not store.exists("manifest.json")
    for stage in ("images", "faces"):  # a marker in the store means its shard's files are there
        for marker in store.glob(f"{stage}/*_stats.json"):
            shard = marker.removesuffix("_stats.json")
            assert store.exists(f"{shard}.tar") and store.exists(f"{shard}.parquet")

    second = start_run(config, tmp_path / "mirror-b")
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output

    manifest = RunManifest.model_validate(store.read_json("manifest.json"))
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "mirror-b"))
    assert manifest == RunManifest.model_validate_json((local_folder(out) / "manifest.json").read_text())
    assert observed_counts(manifest) == expected_counts(sample)
    checked = verify(out, QUIET)
    assert checked.ok and checked.samples == sum(
        s.nsamples for m in manifest.stages.values() for s in m.shards
    )
    assert not [path for path in store.glob("**") if ".tmp-" in path]

    # the run's prefix is a published dataset (version 1): a takedown by SAMPLE_ID reaches the faces too
    face_shard = manifest.stages["faces"].shards[0]
    local = tmp_path / "face.tar"
    store.download(face_shard.url, local)
    sample_id = json.loads(next(iter_tar_samples(local))[1]["json"])["sample_id"]
    report = remove(out, RemovalRequest([str(sample_id)]), QUIET, scratch=tmp_path)
    assert report.version == 2 and len(report.removed["images"]) == 1
    assert set(report.removed) == {"images", "faces", "annotations"} & set(manifest.stages)
    current = PublishedManifest.model_validate(store.read_json("manifest.json"))
    assert current.stages["faces"].counts["samples"] == manifest.stages["faces"].counts["samples"] - len(
        report.removed["faces"]
    )
    assert verify(out, QUIET).ok and verify(out, QUIET, version=1).ok


class VersionedShards(ShardOutputStage):
    """Unit N writes one sample saying which ``version`` of the setting made it; a unit made with
    another version is not current (as with a changed config)."""

    name = "versioned"
    output_dir = "versioned"

    def __init__(self, version: int):
        self.version = version

    def is_current(self, stats: dict) -> bool:
        return super().is_current(stats) and stats["version"] == self.version

    def process(self, unit: int) -> UnitResult:
        with ShardWriter(self.paths(unit)["tar"]) as writer:
            writer.add(f"{unit:05d}0000", {"txt": f"version {self.version}".encode()})
        return UnitResult({"version": self.version}, [{"key": f"{unit:05d}0000", "status": "success"}])


def test_a_unit_only_a_mirror_holds_is_uploaded_and_a_redone_unit_replaces_a_stale_one(
    s3_bucket, tmp_path, monkeypatch
):
    out = f"{s3_bucket}/units"
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "machine-a"))
    store = RunStore(out, QUIET)
    first = VersionedShards(1).bind(store.local)
    execute_unit(first, 0)  # completed in this mirror only: the worker was killed before its upload
    assert not store.remote.exists("versioned/00000_stats.json")
    assert execute_unit(first, 0, store)[1]  # found complete here, so not redone: uploaded
    assert store.remote.read_json("versioned/00000_stats.json")["version"] == 1
    assert store.remote.exists("versioned/00000.tar") and store.remote.exists("versioned/00000.parquet")

    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "machine-b"))  # another machine, the setting changed
    store = RunStore(out, QUIET)
    stats, skipped = execute_unit(VersionedShards(2).bind(store.local), 0, store)
    assert not skipped and stats["version"] == 2
    assert store.remote.read_json("versioned/00000_stats.json") == stats
    (tar,) = [p for p in store.local.rglob("*.tar")]
    store.remote.download("versioned/00000.tar", tmp_path / "stored.tar")
    assert (tmp_path / "stored.tar").read_bytes() == tar.read_bytes()
    assert next(iter_tar_samples(tmp_path / "stored.tar"))[1]["txt"] == b"version 2"
