"""publish, verify and remove against a real S3-compatible server (SeaweedFS) on loopback.

The run published here is built with the real shard sink in the layout the pipeline writes:
``images/`` (img2dataset's json: SAMPLE_ID, url), ``faces/`` (FaceRecord-style json: sample_id,
url) and a QA dataset under ``qa/demo/`` with its own manifest. Each test publishes to its own
prefix of one bucket. Kills and faults go through ``tests.faultproxy`` between client and server.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import posixpath
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facemllm.pipeline.core.files import sha256_file, write_json_atomic
from facemllm.pipeline.core.shards import ShardWriter, iter_tar_samples, shard_info
from facemllm.pipeline.core.storage import (
    MIB,
    HashingReader,
    LocalFileChangedError,
    Storage,
    StorageOptions,
    enable_webdataset_urls,
)
from facemllm.pipeline.publishing.layout import (
    CURRENT_MANIFEST,
    read_manifest,
    shard_urls,
    version_manifest_name,
    version_sizes_name,
    wids_index_name,
)
from facemllm.pipeline.publishing.publish import publish
from facemllm.pipeline.publishing.remove import RemovalRequest, remove
from facemllm.pipeline.publishing.verify import verify
from facemllm.schemas import PublishedManifest, RunManifest, ShardManifest
from tests.conftest import subprocess_env
from tests.faultproxy import FaultProxy

IMAGE_SHARDS = 6
IMAGES_PER_SHARD = 5
FACES_PER_IMAGE = 2
QA_SHARDS = 2
SHARDS = IMAGE_SHARDS * 2 + QA_SHARDS
FIRST_SAMPLE_ID = 1_700_000_000
QUIET = {"progress": False, "backoff_s": 0.05}


def jpeg(rng: np.random.Generator, side: int) -> bytes:
    """A real JPEG of noise: incompressible, so shards have a realistic size."""
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def sample_url(sample_id: int) -> str:
    return f"http://127.0.0.1:9/photos/{sample_id}.jpg"  # data only: never fetched


def write_stage(out: Path, stage: str, folder: str, shards: list[list[tuple[str, dict]]]) -> ShardManifest:
    infos = []
    for shard_id, samples in enumerate(shards):
        path = out / folder / f"{shard_id:05d}.tar"
        with ShardWriter(path) as writer:
            for key, sample in samples:
                writer.add(key, sample)
        infos.append(shard_info(path, writer.count, f"{folder}/{path.name}"))
    samples = sum(s.nsamples for s in infos)
    return ShardManifest(stage=stage, shards=infos, counts={"samples": samples, "success": samples})


def build_run(out: Path, image_side: int = 96, seed: int = 0) -> None:
    """A finished run: image and face shards, a QA dataset with its own manifest, manifest.json last."""
    rng = np.random.default_rng(seed)
    images, faces = [], []
    for shard_id in range(IMAGE_SHARDS):
        image_samples, face_samples = [], []
        for row in range(IMAGES_PER_SHARD):
            key = f"{shard_id:05d}{row:04d}"
            sample_id = FIRST_SAMPLE_ID + shard_id * IMAGES_PER_SHARD + row
            meta = {"SAMPLE_ID": sample_id, "url": sample_url(sample_id), "LICENSE": "?", "key": key}
            image_samples.append(
                (key, {"jpg": jpeg(rng, image_side), "txt": b"a face", "json": json.dumps(meta).encode()})
            )
            for face in range(FACES_PER_IMAGE):
                record = {
                    "key": f"{key}_{face:02d}",
                    "source_key": key,
                    "sample_id": sample_id,
                    "url": meta["url"],
                }
                face_samples.append(
                    (
                        record["key"],
                        {
                            "jpg": jpeg(rng, 48),
                            "aligned.jpg": jpeg(rng, 24),
                            "json": json.dumps(record).encode(),
                        },
                    )
                )
        images.append(image_samples)
        faces.append(face_samples)
    qa_dir = out / "qa" / "demo"
    qa = [
        [(f"demo_{n:06d}", {"jpg": jpeg(rng, 32), "json": json.dumps({"image": f"img/{n}.jpg"}).encode()})]
        for n in range(QA_SHARDS)
    ]
    qa_manifest = RunManifest(
        config_hash="qa",
        package_versions={},
        stages={"qa/demo/train": write_stage(qa_dir, "qa/demo/train", "train", qa)},
    )
    write_json_atomic(qa_dir / CURRENT_MANIFEST, qa_manifest.model_dump(mode="json"))
    manifest = RunManifest(
        config_hash="test",
        package_versions={"facemllm": "test"},
        stages={
            "urls": ShardManifest(
                stage="urls", shards=[], counts={"selected": IMAGE_SHARDS * IMAGES_PER_SHARD}
            ),
            "images": write_stage(out, "images", "images", images),
            "faces": write_stage(out, "faces", "faces", faces),
        },
    )
    write_json_atomic(out / CURRENT_MANIFEST, manifest.model_dump(mode="json"))


@pytest.fixture(scope="module")
def run_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    build_run(out)
    return out


@pytest.fixture
def dest(s3_bucket, request) -> str:
    return f"{s3_bucket}/{request.node.name.replace('[', '-').rstrip(']')}"


def stored_objects(dest: str) -> set[str]:
    storage = Storage(dest)
    return {path.removeprefix(storage.root + "/") for path in storage.fs.find(storage.root)}


def expected_objects(versions: list[PublishedManifest]) -> set[str]:
    """Everything a sequence of committed versions leaves under DEST, and nothing else."""
    expected = {CURRENT_MANIFEST}
    for manifest in versions:
        shards = [s for stage in manifest.stages.values() for s in stage.shards]
        expected |= {s.url for s in shards}
        expected |= {f"{posixpath.dirname(s.url)}/sizes.json" for s in shards}
        expected |= {version_manifest_name(manifest.version), version_sizes_name(manifest.version)}
        expected |= {
            wids_index_name(n, manifest.version) for n, stage in manifest.stages.items() if stage.shards
        }
    return expected


def keys_of(storage: Storage, manifest: PublishedManifest, stage: str, tmp_path: Path) -> list[str]:
    keys = []
    for shard in manifest.stages[stage].shards:
        local = tmp_path / "read" / shard.url
        storage.download(shard.url, local)
        keys += [key for key, _ in iter_tar_samples(local)]
    return keys


@pytest.mark.parametrize("where", ["s3", "local"])
def test_publish_verify_and_republish(run_out, dest, tmp_path, where):
    dest = dest if where == "s3" else str(tmp_path / "published")
    report = publish(run_out, dest, StorageOptions(**QUIET))
    local = RunManifest.model_validate_json((run_out / CURRENT_MANIFEST).read_text())
    assert report.shards == report.uploaded == SHARDS and report.skipped == 0

    storage = Storage(dest)
    current = read_manifest(storage)
    assert current == read_manifest(storage, version_manifest_name(1))
    assert current.version == 1 and current.parent is None and current.removal is None
    assert (
        current.stages["images"] == local.stages["images"]
        and current.stages["faces"] == local.stages["faces"]
    )
    qa_shard = current.stages["qa/demo/train"].shards[0]
    assert qa_shard.url == "qa/demo/train/00000.tar"  # the QA dataset's urls, made relative to OUT
    assert stored_objects(dest) == expected_objects([current])
    assert storage.read_json("images/sizes.json") == {
        f"{n:05d}.tar": IMAGES_PER_SHARD for n in range(IMAGE_SHARDS)
    }
    index = storage.read_json(wids_index_name("faces", 1))
    assert index["wids_version"] == 1 and [s["url"] for s in index["shardlist"]] == [
        s.url for s in local.stages["faces"].shards
    ]

    checked = verify(dest, StorageOptions(**QUIET))
    assert (
        checked.ok and checked.samples == IMAGE_SHARDS * IMAGES_PER_SHARD * (1 + FACES_PER_IMAGE) + QA_SHARDS
    )

    again = publish(run_out, dest, StorageOptions(**QUIET))
    assert again.already_published and again.uploaded == 0
    other = tmp_path / "other"
    build_run(other, seed=1)
    with pytest.raises(ValueError, match="already holds another dataset"):
        publish(other, dest, StorageOptions(**QUIET))


def test_publish_refuses_a_shard_changed_since_the_run(run_out, dest, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run_out, out)
    with (out / "faces" / "00003.tar").open("r+b") as shard:
        shard.seek(600)
        shard.write(b"\0")
    result = run_cli("publish", str(out), dest, tmp=tmp_path)
    assert result.returncode == 2 and "faces/00003.tar has sha256" in result.stderr
    assert CURRENT_MANIFEST not in stored_objects(dest)


def test_a_put_never_records_a_sha256_its_bytes_do_not_have(dest, tmp_path, monkeypatch):
    """A file that changed after it was listed: the store refuses the request's sha256, and where a
    store does not check it, the hash taken while sending catches it. Either way nothing is left."""
    storage = Storage(dest, StorageOptions(**QUIET))
    local = tmp_path / "shard.tar"
    local.write_bytes(os.urandom(3 * MIB))
    listed = sha256_file(local)
    storage.put(local, "a.tar", listed)
    assert storage.stat("a.tar") == (3 * MIB, listed) and storage.sha256("a.tar") == listed
    assert storage._store_checks_sha256  # SeaweedFS echoed the checksum it verified
    assert pickle.loads(pickle.dumps(storage)).size("a.tar") == 3 * MIB  # workers get a copy

    local.write_bytes(os.urandom(3 * MIB))
    with pytest.raises(LocalFileChangedError, match="it changed since it was listed"):
        storage.put(local, "b.tar", listed)  # streamed unhashed: the store's check refuses it

    unchecking = Storage(dest, StorageOptions(**QUIET))
    client = unchecking._s3_client()
    send = client.put_object
    monkeypatch.setattr(client, "put_object", lambda ChecksumSHA256, **request: send(**request))
    with pytest.raises(LocalFileChangedError, match="it changed since it was listed"):
        unchecking.put(local, "c.tar", listed)
    assert not unchecking._store_checks_sha256
    assert storage.size("b.tar") is None and storage.size("c.tar") is None


def test_hashing_reader_hashes_only_one_whole_attempt_read_in_order(tmp_path):
    data = os.urandom(5000)
    (tmp_path / "body").write_bytes(data)
    with (tmp_path / "body").open("rb") as stream:
        body = HashingReader(stream)
        assert body.read(1000) == data[:1000] and body.sha256() is None  # not all of it yet
        body.read()
        assert body.sha256() == hashlib.sha256(data).hexdigest()
        body.seek(0)  # a retry starts the hash again
        assert body.sha256() is None and body.read() == data
        assert body.sha256() == hashlib.sha256(data).hexdigest()
        body.seek(10)
        body.read()  # bytes hashed once but sent twice: the hash no longer vouches for them
        assert body.sha256() is None


def test_verify_names_tampered_and_missing_shards(run_out, dest, tmp_path):
    publish(run_out, dest, StorageOptions(**QUIET))
    storage = Storage(dest)
    tampered = bytearray(storage.read_bytes("faces/00002.tar"))
    tampered[700] ^= 0xFF  # inside the first member's payload: still a valid tar
    storage.fs.pipe_file(storage.path("faces/00002.tar"), bytes(tampered))
    storage.fs.rm_file(storage.path("images/00004.tar"))

    report = verify(dest, StorageOptions(**QUIET))
    problems = {p.url: p.problem for p in report.problems}
    assert set(problems) == {"faces/00002.tar", "images/00004.tar"}
    assert problems["faces/00002.tar"].startswith("sha256 ") and "nsamples" not in problems["faces/00002.tar"]
    assert problems["images/00004.tar"] == "missing"

    result = run_cli("verify", dest, tmp=tmp_path)
    assert result.returncode == 1
    assert (
        "MISMATCH faces/00002.tar: sha256" in result.stderr and "MISMATCH images/00004.tar" in result.stderr
    )


def run_cli(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "facemllm.pipeline.cli", *args, "--no-progress"],
        env={**subprocess_env(), "TMPDIR": str(tmp)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_remove_by_sample_id_and_url(run_out, dest, tmp_path):
    publish(run_out, dest, StorageOptions(**QUIET))
    storage = Storage(dest)
    v1 = read_manifest(storage)
    by_id, by_url = FIRST_SAMPLE_ID + 7, FIRST_SAMPLE_ID + 21  # image shards 1 and 4
    ids = tmp_path / "ids.txt"
    ids.write_text(f"# takedown 42\n{by_id}\n\n{sample_url(by_url)}\n999\nhttp://127.0.0.1:9/unknown.jpg\n")

    result = run_cli("remove", dest, "--ids", str(ids), tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["version"] == 2 and report["requested"] == 4
    assert report["not_found"] == ["999", "http://127.0.0.1:9/unknown.jpg"]
    assert report["removed"] == {
        "images": ["000010002", "000040001"],
        "faces": ["000010002_00", "000010002_01", "000040001_00", "000040001_01"],
    }
    assert report["rewritten"] == {
        "images/00001.tar": "images/v2/00001.tar",
        "images/00004.tar": "images/v2/00004.tar",
        "faces/00001.tar": "faces/v2/00001.tar",
        "faces/00004.tar": "faces/v2/00004.tar",
    }

    v2 = read_manifest(storage)
    assert v2 == read_manifest(storage, version_manifest_name(2))
    assert (v2.version, v2.parent) == (2, 1)
    assert v2.removal.matched == 2 and v2.removal.removed == {"images": 2, "faces": 4}
    assert v2.removal.request_sha256 == RemovalRequest.from_file(ids).sha256()
    for stage, removed in (("images", 2), ("faces", 4)):
        before, after = v1.stages[stage], v2.stages[stage]
        assert after.counts["removed"] == removed
        assert (
            after.counts["samples"]
            == before.counts["samples"] - removed
            == sum(s.nsamples for s in after.shards)
        )
        assert after.counts["success"] == before.counts["success"]  # what happened at download time
        unchanged = [s for s in after.shards if s.url in {b.url for b in before.shards}]
        assert len(unchanged) == len(before.shards) - 2 and all(s in before.shards for s in unchanged)
    assert v2.stages["qa/demo/train"] == v1.stages["qa/demo/train"]
    assert storage.read_json("images/v2/sizes.json") == {"00001.tar": 4, "00004.tar": 4}

    # v2 lacks exactly the removed samples; v1 is untouched and still verifies
    face_keys_v1 = keys_of(storage, v1, "faces", tmp_path / "v1")
    face_keys_v2 = keys_of(storage, v2, "faces", tmp_path / "v2")
    assert face_keys_v2 == [k for k in face_keys_v1 if k not in report["removed"]["faces"]]
    assert verify(dest, StorageOptions(**QUIET)).ok and verify(dest, StorageOptions(**QUIET), version=1).ok
    assert stored_objects(dest) == expected_objects([v1, v2])

    again = remove(dest, RemovalRequest.from_file(ids), StorageOptions(**QUIET), scratch=tmp_path)
    assert again.version is None and again.removed == {}  # nothing left to remove: no v3
    assert read_manifest(storage).version == 2


def test_large_shards_go_up_as_multipart(dest, tmp_path):
    out = tmp_path / "big"
    rng = np.random.default_rng(3)
    stage = write_stage(out, "images", "images", [[(f"k{i}", {"bin": rng.bytes(4 * MIB)}) for i in range(3)]])
    write_json_atomic(
        out / CURRENT_MANIFEST,
        RunManifest(config_hash="big", package_versions={}, stages={"images": stage}).model_dump(mode="json"),
    )
    options = StorageOptions(multipart_chunk_bytes=5 * MIB, **QUIET)
    assert publish(out, dest, options).uploaded == 1
    storage = Storage(dest)
    assert storage.fs.info(storage.path("images/00000.tar"))["ETag"].strip('"').endswith("-3")  # 3 parts
    assert verify(dest, options).ok
    assert publish(out, dest, options).already_published


def test_webdataset_and_wids_read_s3_urls(run_out, dest, tmp_path):
    import webdataset as wds
    from wids import ShardListDataset
    from wids.wids import DefaultLocalname

    publish(run_out, dest, StorageOptions(**QUIET))
    enable_webdataset_urls()
    pattern = f"{dest}/images/{{00000..{IMAGE_SHARDS - 1:05d}}}.tar"
    samples = list(
        wds.WebDataset(pattern, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "json")
    )
    assert len(samples) == IMAGE_SHARDS * IMAGES_PER_SHARD
    key, image, meta = samples[7]
    assert key == "000010002" and image.size == (96, 96) and meta["SAMPLE_ID"] == FIRST_SAMPLE_ID + 7

    remove(dest, RemovalRequest([str(FIRST_SAMPLE_ID)]), StorageOptions(**QUIET), scratch=tmp_path)
    faces = list(wds.WebDataset(shard_urls(dest, "faces"), shardshuffle=False).to_tuple("__key__"))
    assert len(faces) == IMAGE_SHARDS * IMAGES_PER_SHARD * FACES_PER_IMAGE - FACES_PER_IMAGE
    assert ("000000000_00",) not in faces

    dataset = ShardListDataset(
        f"{dest}/{wids_index_name('faces', 2)}",
        localname=DefaultLocalname(str(tmp_path / "wids")),
        transformations=[],
    )
    assert len(dataset) == len(faces)
    assert dataset[0]["__key__"] == "000000001_00"


def start_cli(*args: str, endpoint: str, tmp: Path) -> subprocess.Popen:
    """The CLI in its own session, so a SIGKILL takes it alone and leaves no orphan."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "facemllm.pipeline.cli",
            *args,
            "--endpoint-url",
            endpoint,
            "--parallel",
            "2",
            "--no-progress",
        ],
        env={**subprocess_env(), "TMPDIR": str(tmp)},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_when(process: subprocess.Popen, ready, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert process.poll() is None, "finished before the kill point:\n" + process.stdout.read()
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def server_port() -> int:
    """The S3 server's port, for a proxy in front of it (the session fixture set the endpoint)."""
    return int(os.environ["FACEMLLM_S3_ENDPOINT"].rsplit(":", 1)[1])


def tars_stored(dest: str, under: str = "") -> set[str]:
    return {p for p in stored_objects(dest) if p.endswith(".tar") and under in p}


def test_sigkill_mid_publish_then_resume(run_out, dest, tmp_path):
    with FaultProxy(server_port(), bytes_per_s=600_000) as slow:
        process = start_cli("publish", str(run_out), dest, endpoint=slow.endpoint_url, tmp=tmp_path)
        kill_when(process, lambda: len(tars_stored(dest)) >= 3)
    present = tars_stored(dest)
    assert 3 <= len(present) < SHARDS, "the kill landed after the upload: nothing was interrupted"
    assert CURRENT_MANIFEST not in stored_objects(dest)  # nothing committed: readers see no dataset

    report = publish(run_out, dest, StorageOptions(**QUIET))
    assert report.skipped >= len(present) and report.uploaded + report.skipped == SHARDS
    assert verify(dest, StorageOptions(**QUIET)).ok
    assert stored_objects(dest) == expected_objects([read_manifest(Storage(dest))])


def test_sigkill_mid_removal_keeps_the_old_version_current(run_out, dest, tmp_path):
    publish(run_out, dest, StorageOptions(**QUIET))
    storage = Storage(dest)
    v1 = read_manifest(storage)
    ids = tmp_path / "ids.txt"  # one image of every shard: every image and face shard is rewritten
    ids.write_text("\n".join(str(FIRST_SAMPLE_ID + n * IMAGES_PER_SHARD) for n in range(IMAGE_SHARDS)))
    with FaultProxy(server_port(), bytes_per_s=600_000) as slow:
        process = start_cli("remove", dest, "--ids", str(ids), endpoint=slow.endpoint_url, tmp=tmp_path)
        kill_when(process, lambda: len(tars_stored(dest, "/v2/")) >= 1)
    assert len(tars_stored(dest, "/v2/")) < IMAGE_SHARDS * 2
    assert read_manifest(storage) == v1  # the old version stays current and whole
    assert verify(dest, StorageOptions(**QUIET)).ok

    report = remove(dest, RemovalRequest.from_file(ids), StorageOptions(**QUIET), scratch=tmp_path)
    assert report.version == 2 and len(report.rewritten) == IMAGE_SHARDS * 2
    v2 = read_manifest(storage)
    assert verify(dest, StorageOptions(**QUIET)).ok and verify(dest, StorageOptions(**QUIET), version=1).ok
    assert stored_objects(dest) == expected_objects([v1, v2])


def test_dropped_connections_and_503s_lose_nothing(run_out, dest):
    with FaultProxy(server_port(), fault_rate=0.5, max_faults=15, seed=3) as faulty:
        options = StorageOptions(endpoint_url=faulty.endpoint_url, parallel=4, attempts=10, **QUIET)
        report = publish(run_out, dest, options)
        assert verify(dest, options).ok
    assert report.uploaded == SHARDS
    assert all(faulty.counts[mode] >= 1 for mode in ("drop_request", "drop_response", "503")), faulty.counts
    assert verify(dest, StorageOptions(**QUIET)).ok  # straight to the server, past the proxy
    assert stored_objects(dest) == expected_objects([read_manifest(Storage(dest))])
