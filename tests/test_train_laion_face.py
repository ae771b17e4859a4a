"""LAION-Face annotation shards -> stage-1 caption and stage-2 VQA shards the trainer reads."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from facemllm.pipeline.cli import main
from facemllm.pipeline.core.shards import ShardWriter, iter_tar_samples
from facemllm.pipeline.stages.laion_face_qa import run_laion_face_qa
from facemllm.reformatters.laion_face import (
    BINARY,
    CATEGORICAL,
    LaionFaceQAConfig,
    LaionFaceQASample,
    LaionFaceVQASample,
)
from facemllm.schemas import LaionFaceQAStatus, RunManifest
from facemllm.schemas.annotation import FaceAnnotation, FaceAttributes, Provenance
from tests.photos import skimage_photo


def attributes(flag: bool) -> FaceAttributes:
    """Every boolean ``flag``, every enum its first value, numbers their minimum (via the JSON schema)."""
    schema = FaceAttributes.model_json_schema()
    defs = schema["$defs"]

    def fill(node: dict) -> object:
        if "$ref" in node:
            return fill(defs[node["$ref"].rsplit("/", 1)[1]])
        if "enum" in node:
            return node["enum"][0]
        if node.get("type") == "boolean":
            return flag
        if node.get("type") == "integer":
            return node.get("minimum", 0) + 30
        return {name: fill(prop) for name, prop in node["properties"].items()}

    return FaceAttributes.model_validate(fill(schema))


def annotation(key: str, caption: str, attrs: FaceAttributes | None) -> FaceAnnotation:
    return FaceAnnotation(
        key=key,
        source_key=key.split("_")[0],
        url=f"https://example.org/{key}.jpg",
        sample_id=int(key.split("_")[0]),
        license="CC-BY-4.0",
        caption=caption,
        attributes=attrs,
        provenance=Provenance(
            annotator="mllm" if attrs else "template",
            model="test-mllm" if attrs else "template",
            prompt_version="face-v1",
            prompt_sha256="0" * 64,
        ),
    )


def write_annotation_shards(folder: Path) -> dict[str, FaceAnnotation]:
    jpeg = skimage_photo("astronaut.png").read_bytes()  # a PNG is fine: bytes pass through
    faces = {
        "000000001_00": annotation(
            "000000001_00", "A smiling woman with short dark hair in a spacesuit.", attributes(True)
        ),
        "000000002_00": annotation(
            "000000002_00", "A man looking to the left under soft light.", attributes(False)
        ),
        "000000003_00": annotation("000000003_00", "A face seen from the front, template caption.", None),
        "000000004_00": annotation("000000004_00", "short", attributes(False)),
    }
    folder.mkdir(parents=True)
    for shard, keys in enumerate((list(faces)[:2], list(faces)[2:])):
        with ShardWriter(folder / f"{shard:05d}.tar") as writer:
            for key in keys:
                writer.add(
                    key,
                    {
                        "jpg": jpeg,
                        "txt": faces[key].caption.encode(),
                        "json": faces[key].model_dump_json().encode(),
                    },
                )
        # a malformed record: counted, never fatal
    with ShardWriter(folder / "00002.tar") as writer:
        writer.add("000000005_00", {"jpg": jpeg, "txt": b"x", "json": b"{not json"})
    return faces


def read_folder(folder: Path) -> list[LaionFaceQASample]:
    """Every caption or question in a folder of shards, one at a time."""
    samples = []
    for tar in sorted(folder.glob("*.tar")):
        for key, members in iter_tar_samples(tar):
            assert set(members) == {"jpg", "json"} and "." not in key
            if folder.parent.name == "laion_face_vqa":  # one sample per face, its questions as turns
                face = LaionFaceVQASample.model_validate_json(members["json"])
                assert face.key == face.face_key == key
                samples += face.question_samples()
            else:
                sample = LaionFaceQASample.model_validate_json(members["json"])
                assert sample.key == key
                samples.append(sample)
    return samples


def test_annotations_become_caption_and_vqa_shards_with_every_face_counted(tmp_path):
    faces = write_annotation_shards(tmp_path / "annotations")
    config = LaionFaceQAConfig(vqa_per_face=5, val_fraction=0.0)
    manifests = run_laion_face_qa(tmp_path / "annotations", tmp_path / "qa", config)
    rows = {
        row["key"]: LaionFaceQAStatus.model_validate(row)
        for table in sorted((tmp_path / "qa" / "_laion_face").glob("*.parquet"))
        for row in pq.read_table(table).to_pylist()
    }
    assert sorted(rows) == [*faces, "000000005_00"]  # every face has a status row
    assert rows["000000005_00"].status == "bad_annotation" and rows["000000005_00"].error
    assert [rows[key].captions for key in faces] == [1, 1, 1, 0]  # the last caption is too short
    assert [rows[key].questions for key in faces] == [5, 5, 0, 5]  # the template face has no attributes
    assert manifests["laion_face_vqa"].stages["qa/laion_face_vqa/train"].counts["samples"] == 3
    for dataset in ("laion_face_caption", "laion_face_vqa"):  # what publish and eval read
        written = RunManifest.model_validate_json((tmp_path / "qa" / dataset / "manifest.json").read_text())
        assert written.stages[f"qa/{dataset}"].counts == {"bad_annotation": 1, "faces": 5, "success": 4}

    captions = read_folder(tmp_path / "qa" / "laion_face_caption" / "train")
    assert [s.face_key for s in captions] == ["000000001_00", "000000002_00", "000000003_00"]
    for sample in captions:
        human, gpt = sample.conversations
        assert human.speaker == "human" and human.value.startswith("<image>\n")
        assert gpt.value == faces[sample.face_key].caption
        assert sample.url == faces[sample.face_key].url and sample.license == "CC-BY-4.0"
    vqa = read_folder(tmp_path / "qa" / "laion_face_vqa" / "train")
    assert len(vqa) == 15
    assert {s.task for s in vqa} <= set(CATEGORICAL) | set(BINARY) | {"age"}
    for sample in vqa:
        answer = sample.conversations[1].value
        assert answer == sample.label.answer
        if sample.answer_style == "yes_no":
            assert answer in ("Yes", "No")
        if sample.task in BINARY:  # the first face has every flag set, the others none
            assert answer == ("Yes" if sample.face_key == "000000001_00" else "No")
    sizes = json.loads((tmp_path / "qa" / "laion_face_vqa" / "train" / "sizes.json").read_text())
    assert sum(sizes.values()) == 3  # one sample (and one copy of the crop) per face with questions

    # the JSON is what the trainer reads: LLaVA conversations under "conversations"
    raw = json.loads(
        next(iter_tar_samples(tmp_path / "qa" / "laion_face_vqa" / "train" / "00000.tar"))[1]["json"]
    )
    assert raw["conversations"][0]["from"] == "human"

    # a rerun skips completed shards and changes nothing
    before = {p: p.read_bytes() for p in (tmp_path / "qa").rglob("*.tar")}
    markers = {p: p.stat().st_mtime_ns for p in (tmp_path / "qa" / "_laion_face").glob("*_stats.json")}
    assert run_laion_face_qa(tmp_path / "annotations", tmp_path / "qa", config) == manifests
    assert {p: p.read_bytes() for p in (tmp_path / "qa").rglob("*.tar")} == before
    assert {p: p.stat().st_mtime_ns for p in markers} == markers


def test_split_is_by_face_and_command_line(tmp_path, capsys):
    write_annotation_shards(tmp_path / "annotations")
    code = main(
        [
            "laion-face-qa",
            str(tmp_path / "annotations"),
            "--out",
            str(tmp_path / "qa"),
            "--set",
            "val_fraction=0.5",
            "--set",
            "vqa_per_face=2",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"]["faces"] == 5
    by_face: dict[str, set[str]] = {}
    for folder in (tmp_path / "qa").glob("laion_face_*/*"):
        if folder.is_dir():
            for sample in read_folder(folder):
                by_face.setdefault(sample.face_key, set()).add(sample.split)
    assert all(len(splits) == 1 for splits in by_face.values())  # a face never straddles splits
