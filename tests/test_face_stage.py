"""The face stage over image shards: status per image, completion marker, hostile tars refused."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest

from benchmarks._common import peak_rss_mb, reset_peak_rss
from facemllm.annotators.faces import FaceConfig
from facemllm.pipeline.core.shards import ShardWriter, UnsafeTarError, iter_tar_samples, shard_paths
from facemllm.pipeline.stages.faces import FaceStage
from facemllm.pipeline.stages.framework import execute_unit
from facemllm.schemas import FaceRecord, FaceStatus
from facemllm.schemas.tables import arrow_schema
from tests.photos import insightface_masks, insightface_t1


@pytest.fixture
def stage(tmp_path, scrfd_dir):
    stage = FaceStage(FaceConfig()).bind(tmp_path)
    stage.setup()
    return stage


def test_status_table_has_a_column_per_record_field(stage, tmp_path):
    with ShardWriter(shard_paths(tmp_path / "images", 3)["tar"]) as writer:
        writer.add("000030000", {"jpg": insightface_t1().read_bytes(), "json": b"{}"})
    execute_unit(stage, 3)
    table = pq.read_table(stage.status_table(3))
    assert table.schema == arrow_schema(FaceStatus) and table.column_names == list(FaceStatus.model_fields)


def test_shard_gets_faces_a_status_per_image_and_a_marker(stage, tmp_path):
    images = shard_paths(tmp_path / "images", 7)["tar"]
    sources = {"000070000": insightface_t1(), "000070001": insightface_masks()[0]}
    with ShardWriter(images) as writer:
        for key, path in sources.items():
            meta = {"url": f"http://host/{path.name}", "SAMPLE_ID": 7, "caption": "alt", "LICENSE": "?"}
            writer.add(key, {"jpg": path.read_bytes(), "json": json.dumps(meta).encode()})
    stats, skipped = execute_unit(stage, 7)
    paths = shard_paths(tmp_path / "faces", 7)
    assert not skipped
    assert stats == json.loads(paths["stats"].read_text())
    assert stats["images"] == 2 and stats["faces"] == 6 and stats["status"] == {"success": 1, "no_face": 1}
    rows = pq.read_table(paths["parquet"]).to_pylist()
    assert [FaceStatus.model_validate(row).source_key for row in rows] == list(sources)
    faces = list(iter_tar_samples(paths["tar"]))
    assert [key for key, _ in faces] == [f"000070000_{i:02d}" for i in range(6)]
    record = FaceRecord.model_validate_json(faces[0][1]["json"])
    assert record.caption == "alt" and record.license == "?" and record.sample_id == 7
    before = paths["tar"].read_bytes()
    assert execute_unit(stage, 7) == (stats, True)  # done: the marker is trusted, nothing rewritten
    assert paths["tar"].read_bytes() == before


def test_faces_streamed_in_any_order_equal_faces_read_from_the_image_shard(stage, tmp_path, scrfd_dir):
    sources = {
        "000050000": insightface_t1(),
        "000050001": insightface_masks()[0],
        "000050002": insightface_t1(),
    }
    samples = [
        (key, path.read_bytes(), {"url": f"http://host/{key}", "SAMPLE_ID": int(key)})
        for key, path in sources.items()
    ]
    with ShardWriter(shard_paths(tmp_path / "images", 5)["tar"]) as writer:
        for key, data, meta in samples:
            writer.add(key, {"jpg": data, "json": json.dumps(meta).encode()})
    from_shard = execute_unit(stage, 5)[0]

    streamed = FaceStage(FaceConfig()).bind(tmp_path / "streamed")
    streamed.cropper = stage.cropper
    result = streamed.process_stream(5, reversed(samples))  # completion order is any order
    marker = {**result.stats, **streamed.recorded_outputs(5, result)}  # what execute_unit would write
    assert marker == from_shard and result.statuses == pq.read_table(stage.status_table(5)).to_pylist()
    assert streamed.paths(5)["tar"].read_bytes() == stage.paths(5)["tar"].read_bytes()
    assert [p.name for p in (tmp_path / "streamed" / "faces").iterdir()] == ["00005.tar"]  # no spill left


@pytest.mark.parametrize("name", ["../../etc/evil.jpg", "/abs/evil.jpg"])
def test_hostile_image_tar_is_rejected_and_leaves_no_shard(stage, tmp_path, name):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        payload = insightface_t1().read_bytes()
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    images = shard_paths(tmp_path / "images", 9)["tar"]
    images.parent.mkdir(parents=True)
    images.write_bytes(buffer.getvalue())
    with pytest.raises(UnsafeTarError):
        execute_unit(stage, 9)
    assert not any(path.exists() for path in shard_paths(tmp_path / "faces", 9).values())
    assert not list((tmp_path / "faces").glob(".*tmp*"))


class _GeneratedTar(io.RawIOBase):
    """A tar stream made on the fly: a ``big.jpg`` of ``big`` zero bytes (never held in memory),
    then ``big.json`` and ``small.jpg``."""

    def __init__(self, big: int):
        def pieces():
            yield _header("big.jpg", big)
            for _ in range(big // (1 << 20)):
                yield bytes(1 << 20)
            yield bytes(-big % 512)
            for name, payload in (("big.json", b"{}"), ("small.jpg", b"\xff\xd8small")):
                yield _header(name, len(payload)) + payload + bytes(-len(payload) % 512)
            yield bytes(1024)

        self._pieces = pieces()
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while not self._buffer:
            self._buffer = next(self._pieces, None)
            if self._buffer is None:
                return 0
        n = min(len(target), len(self._buffer))
        target[:n], self._buffer = self._buffer[:n], self._buffer[n:]
        return n


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(format=tarfile.PAX_FORMAT)


def test_a_huge_tar_member_is_skipped_unread_and_its_sample_still_comes():
    """A 1 GiB member was read whole (1.47 GB peak); now it is skipped at bounded memory."""
    reset_peak_rss()
    before = peak_rss_mb()
    samples = list(iter_tar_samples(_GeneratedTar(1 << 30)))
    assert peak_rss_mb() - before < 100
    assert samples == [("big", {"json": b"{}"}), ("small", {"jpg": b"\xff\xd8small"})]


def test_an_image_over_the_member_bound_gets_a_status_row(stage, tmp_path, monkeypatch):
    monkeypatch.setattr("facemllm.pipeline.core.shards.MAX_MEMBER_BYTES", 192 << 10)
    photo = insightface_t1().read_bytes()
    with ShardWriter(shard_paths(tmp_path / "images", 4)["tar"]) as writer:
        writer.add("000040000", {"jpg": photo, "json": b"{}"})
        writer.add("000040001", {"jpg": photo + bytes(128 << 10), "json": b"{}"})
    stats, _ = execute_unit(stage, 4)
    rows = pq.read_table(shard_paths(tmp_path / "faces", 4)["parquet"]).to_pylist()
    assert [row["source_key"] for row in rows] == ["000040000", "000040001"]
    assert rows[0]["status"] == "success" and rows[1]["status"] != "success"
    assert stats["images"] == 2
