"""The acquisition pipeline end to end on real parts: loopback photos, img2dataset, SCRFD, Beam.

One uninterrupted DirectRunner run is the reference; runs killed with SIGKILL and resumed, and a
run on the portable runner (local job service + EXTERNAL worker pool), must reproduce its shards
and manifest exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from facemllm.pipeline.core.files import sha256_file
from facemllm.pipeline.core.shards import iter_tar_samples
from facemllm.pipeline.demo.run import demo_config, expected_counts, observed_counts
from facemllm.schemas import DownloadStatus, FaceRecord, FaceStatus, RunManifest
from tests.conftest import subprocess_env

pytestmark = pytest.mark.slow


def write_config(sample, out: Path, overrides: list[str] = ()) -> Path:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(demo_config(sample, out, overrides).model_dump(mode="json")))
    return path


def start_run(config_path: Path) -> subprocess.Popen:
    """`facemllm run` in its own process group, so a kill takes its Beam workers with it."""
    return subprocess.Popen(
        [sys.executable, "-m", "facemllm.pipeline.cli", "run", str(config_path)],
        env=subprocess_env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish_run(config_path: Path) -> RunManifest:
    return finish_run_with_output(config_path)[0]


def finish_run_with_output(config_path: Path) -> tuple[RunManifest, str]:
    process = start_run(config_path)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    manifest_path = Path(yaml.safe_load(config_path.read_text())["out"]) / "manifest.json"
    return RunManifest.model_validate_json(manifest_path.read_text()), output


@pytest.fixture(scope="module")
def reference_run(served_sample, tmp_path_factory) -> tuple[Path, RunManifest, str]:
    _, sample = served_sample
    out = tmp_path_factory.mktemp("reference") / "out"
    return out, *finish_run_with_output(write_config(sample, out))


@pytest.fixture(scope="module")
def reference(reference_run) -> tuple[Path, RunManifest]:
    return reference_run[0], reference_run[1]


def test_beam_chatter_goes_to_the_run_log_not_the_console(reference_run):
    out, _, console = reference_run
    log = (out / "logs" / "beam.log").read_text()
    assert "INFO:apache_beam" in log  # the harnesses' start-up lines, written by worker processes
    assert "INFO:apache_beam" not in console and "apitools" not in console
    assert "facemllm run summary" in console  # what a person reads stays


def status_rows(out: Path, stage: str) -> list[dict]:
    return [
        row for path in sorted((out / stage).glob("*.parquet")) for row in pq.read_table(path).to_pylist()
    ]


def test_every_row_is_accounted_for(served_sample, reference):
    _, sample = served_sample
    out, manifest = reference
    assert observed_counts(manifest) == expected_counts(sample)
    urls = manifest.stages["urls"].counts
    assert urls["rows_read"] == urls["selected"] + urls["not_in_id_list"]

    downloads = status_rows(out, "images")
    assert len(downloads) == sample.selected_rows
    by_id = {row["SAMPLE_ID"]: row for row in downloads}
    assert {sid: row["status"] for sid, row in by_id.items()} == dict(sample.expected_status)
    for row in downloads:
        DownloadStatus.model_validate(
            {
                "key": row["key"],
                "sample_id": row["SAMPLE_ID"],
                "url": row["url"],
                "status": row["status"],
                "error": row["error_message"],
                "sha256": row["sha256"],
            }
        )
    errors = {
        row["url"].rsplit("/", 1)[-1]: row["error_message"] for row in downloads if row["status"] != "success"
    }
    assert "refused destination 10.255.255.1" in errors["redirect-private"]
    assert "CV_IO_MAX_IMAGE_PIXELS" in errors["bomb.png"]  # refused before decoding 20000x20000
    assert "X-Robots-Tag" in errors["noai.jpg"]
    assert errors["timeout"] == "timed out"

    faces = status_rows(out, "faces")
    assert len(faces) == manifest.stages["images"].counts["success"]
    for row in faces:
        FaceStatus.model_validate(row)
    assert sum(row["faces_kept"] for row in faces) == manifest.stages["faces"].counts["samples"]
    by_name = {row["url"].rsplit("/", 1)[-1]: row for row in faces}
    assert by_name["solvay_conference_1927.jpg"]["faces_kept"] == 29
    assert by_name["t1.jpg"]["faces_kept"] == 6
    assert all(by_name[f"mask_{c}.jpg"]["status"] == "no_face" for c in ("black", "blue", "green", "white"))


def test_shards_follow_webdataset_rules_and_manifest(reference):
    out, manifest = reference
    seen: set[str] = set()
    for stage in ("images", "faces"):
        sizes = json.loads((out / stage / "sizes.json").read_text())
        for shard in manifest.stages[stage].shards:
            tar = out / shard.url
            assert sha256_file(tar) == shard.sha256 and tar.stat().st_size == shard.bytes
            samples = list(iter_tar_samples(tar))
            assert len(samples) == shard.nsamples == sizes[tar.name]
            assert len({tuple(sorted(members)) for _, members in samples}) <= 1
            for key, members in samples:
                assert "." not in key and key not in seen
                seen.add(key)
                if stage == "faces":
                    assert sorted(members) == ["aligned.jpg", "jpg", "json"]
                    record = FaceRecord.model_validate_json(members["json"])
                    assert record.key == key and record.url.startswith("http://127.0.0.1")
                    assert record.license is not None and record.sample_id is not None
    assert json.loads((out / "sizes.json").read_text()) == {
        s.url: s.nsamples for m in manifest.stages.values() for s in m.shards
    }


def kill_when(process: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run ended before the kill point: " + process.stdout.read()
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize("stage", ["images", "faces"])
def test_sigkill_mid_stage_then_resume_matches_reference(served_sample, reference, tmp_path, stage):
    _, sample = served_sample
    _, expected = reference
    out = tmp_path / "out"
    config = write_config(sample, out)
    total = len(expected.stages[stage].shards)
    kill_when(start_run(config), lambda: len(list((out / stage).glob("*_stats.json"))) >= 1)
    done_at_kill = len(list((out / stage).glob("*_stats.json")))
    assert done_at_kill < total, "the kill landed after the stage finished: nothing was interrupted"
    assert not (out / "manifest.json").exists()

    resumed = finish_run(config)
    assert resumed == expected
    assert not list(out.glob("**/.*.tmp-*")) and not (out / "images" / "_tmp").exists()


def test_faces_streamed_from_the_download_equal_faces_read_from_the_image_shards(
    served_sample, reference, tmp_path
):
    """The run streams each downloaded image into the faces stage; downloading first and detecting
    from the finished image shards in a second run gives the same shards, byte for byte."""
    _, sample = served_sample
    _, expected = reference
    out = tmp_path / "out"
    finish_run_with_output(write_config(sample, out, ["stages=[select, download]"]))
    assert not (out / "faces").exists()
    assert finish_run(write_config(sample, out)) == expected


def test_portable_runner_gives_the_same_manifest(served_sample, reference, tmp_path):
    from tests.portable import local_portable_services

    _, sample = served_sample
    _, expected = reference
    with local_portable_services(tmp_path) as (job_endpoint, worker_pool):
        overrides = [
            "runner.runner=portable",
            f"runner.job_endpoint={job_endpoint}",
            "runner.environment_type=EXTERNAL",
            f"runner.environment_config={worker_pool}",
        ]
        manifest = finish_run(write_config(sample, tmp_path / "out", overrides))
    assert manifest == expected
    assert Counter(manifest.stages["faces"].counts) == Counter(expected.stages["faces"].counts)


def test_laion_face_qa_stage_reads_the_annotations_and_writes_datasets_with_manifests(
    served_sample, reference, tmp_path
):
    """`stages: [laion_face_qa]` on a finished run: a status row per annotated face, the caption
    dataset with a manifest and sizes (what publish, train and eval read), run manifest unchanged
    for the earlier stages."""
    _, sample = served_sample
    source, expected = reference
    out = tmp_path / "out"
    shutil.copytree(source, out)
    manifest = finish_run(write_config(sample, out, ["stages=[laion_face_qa]"]))
    assert manifest.stages["annotations"] == expected.stages["annotations"]
    faces = expected.stages["annotations"].counts["success"]
    rows = [
        row
        for path in sorted((out / "qa" / "_laion_face").glob("*.parquet"))
        for row in pq.read_table(path).to_pylist()
    ]
    assert len(rows) == faces and {row["status"] for row in rows} == {"success"}
    caption = RunManifest.model_validate_json(
        (out / "qa" / "laion_face_caption" / "manifest.json").read_text()
    )
    written = sum(s.nsamples for name, m in caption.stages.items() if name.count("/") == 2 for s in m.shards)
    assert written == sum(row["captions"] for row in rows) > 0
    for stage in caption.stages.values():
        for shard in stage.shards:
            assert sha256_file(out / "qa" / "laion_face_caption" / shard.url) == shard.sha256


def test_the_progress_log_has_a_line_per_completed_shard_and_totals_equal_to_the_manifest(reference):
    out, manifest = reference
    lines = [json.loads(line) for line in (out / "logs" / "progress.jsonl").read_text().splitlines()]
    *units, last = lines
    per_stage = {
        stage: [line for line in units if line["stage"] == stage]
        for stage in ("select", "download", "faces", "annotate")
    }
    assert {stage: len(rows) for stage, rows in per_stage.items()} == {
        "select": 1,
        "download": len(manifest.stages["images"].shards),
        "faces": len(manifest.stages["faces"].shards),
        "annotate": len(manifest.stages["annotations"].shards),
    }
    assert all(len({row["unit"] for row in rows}) == len(rows) for rows in per_stage.values())  # each once
    totals, images = last["totals"], manifest.stages["images"].counts
    assert totals["select"]["items"] == manifest.stages["urls"].counts["rows_read"]
    assert totals["download"]["items"] == manifest.stages["urls"].counts["selected"]
    assert totals["download"]["failures"] == images["failed_to_download"] + images["failed_to_resize"]
    assert totals["faces"]["items"] == images["success"]
    assert totals["annotate"]["items"] == manifest.stages["faces"].counts["samples"]
    assert per_stage["download"][-1]["done"] == per_stage["download"][-1]["total"]
