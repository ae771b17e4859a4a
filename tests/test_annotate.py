"""The annotate stage without a server: schema, prompts, parsing, cache, template annotator, config.

Server-facing behaviour (requests, retries, repair, resume) is tested against a real vLLM server in
``test_annotate_vllm.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from facemllm.annotators.annotate_config import AnnotateConfig
from facemllm.annotators.mllm_client import (
    InvalidAnswer,
    normalize_base_url,
    parse_answer,
    redact_url,
    response_schema,
)
from facemllm.annotators.prompts import available_prompts, load_prompt
from facemllm.annotators.request_cache import RequestCache, request_key
from facemllm.annotators.template_annotator import TemplateAnnotator
from facemllm.pipeline.cli import build_parser, main
from facemllm.pipeline.core.files import sha256_file
from facemllm.pipeline.core.shards import ShardWriter, iter_tar_samples, shard_paths
from facemllm.pipeline.stages.annotate import AnnotateStage
from facemllm.pipeline.stages.framework import execute_unit
from facemllm.schemas.annotation import CELEBA_FIELDS, FaceAnnotation, FaceAttributes
from facemllm.schemas.records import CropGeometry, FaceDetection, FaceRecord

# list_attr_celeba.txt's header, in order (shared REFERENCE.md)
CELEBA_40 = [
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
]


def example_attributes(flag: bool = False) -> dict:
    """A valid FaceAttributes object: every boolean ``flag``, every enum its first value."""

    def fill(schema: dict, defs: dict) -> object:
        if "$ref" in schema:
            return fill(defs[schema["$ref"].split("/")[-1]], defs)
        if "enum" in schema:
            return schema["enum"][0]
        if schema.get("type") == "boolean":
            return flag
        if schema.get("type") == "integer":
            return schema.get("minimum", 0) + 30
        return {name: fill(prop, defs) for name, prop in schema["properties"].items()}

    schema = FaceAttributes.model_json_schema()
    return fill(schema, schema["$defs"])


def test_attributes_cover_celeba_40_in_order():
    assert list(CELEBA_FIELDS) == CELEBA_40
    attributes = FaceAttributes.model_validate(example_attributes(True))
    assert attributes.celeba() == dict.fromkeys(CELEBA_40, True)
    assert len({target for target in CELEBA_FIELDS.values()}) == 40


def test_response_schema_is_closed_and_constrainable():
    """Every object closed and fully required, no arrays, the only free string bounded."""
    schema = response_schema(123)
    assert schema["properties"]["caption"]["maxLength"] == 123
    for name, definition in {"root": schema, **schema["$defs"]}.items():
        assert definition.get("additionalProperties") is False, name
        assert set(definition["required"]) == set(definition["properties"]), name
        for field, prop in definition["properties"].items():
            assert prop.get("type") != "array", (name, field)
            if prop.get("type") == "string" and "enum" not in prop:
                assert (name, field) == ("root", "caption")
            if prop.get("type") == "integer":
                assert "minimum" in prop and "maximum" in prop
    perceived = schema["$defs"]["Perceived"]["properties"]
    assert perceived["gender"]["enum"] == ["female", "male", "unclear"]


def test_bundled_prompts_load_and_never_ask_for_identity():
    assert {"face-v1", "face-v1-compact"} <= set(available_prompts())
    for name in available_prompts():
        prompt = load_prompt(name)
        assert prompt.version == name and len(prompt.sha256) == 64
        assert "{" not in prompt.user_text(100).split("JSON")[0]  # placeholders filled
        text = f"{prompt.system} {prompt.user}".lower()
        assert "never identify" in text or "do not name or identify" in text
        assert "who" not in prompt.user_text(100).lower().replace("do not guess who", "")
    production = load_prompt("face-v1")
    user = production.user_text(1500).lower()
    for detail in ("face shape", "eyes", "eyebrows", "nose", "mouth", "skin", "hair", "facial hair", "makeup",
                   "accessories", "expression", "head pose", "lighting", "image quality"):  # fmt: skip
        assert detail in user, detail
    for group, model in FaceAttributes.model_fields.items():  # the prompt lists every field
        assert f'"{group}"' in user
        for field in model.annotation.model_fields:
            assert field in user, (group, field)
    assert "at most 1500 characters" in user


def test_prompt_files_by_path_and_bad_names(tmp_path):
    custom = tmp_path / "mine.yaml"
    custom.write_text("version: mine-v3\nsystem: s\nuser: 'u {caption_max_chars}'\nrepair: 'r {error}'\n")
    assert load_prompt(str(custom)).version == "mine-v3"
    with pytest.raises(FileNotFoundError, match="face-v1"):
        load_prompt("nope-v9")
    custom.write_text("version: x\nsystem: s\nuser: 'u {unknown}'\nrepair: r\n")
    with pytest.raises(ValueError, match="placeholder"):
        load_prompt(str(custom))


def test_parse_answer_tolerates_control_chars_and_fences_and_rejects_the_rest():
    attributes = example_attributes()
    raw = json.dumps({"caption": "An oval face,\x01 dark\teyes", "attributes": attributes})
    raw = raw.replace("\\u0001", "\x01").replace(
        "\\t", "\t"
    )  # raw control characters, as xgrammar lets through
    assert parse_answer(raw, 100).caption == "An oval face, dark eyes"
    assert parse_answer(f"```json\n{raw}\n```", 100).attributes.hair.bald is False
    with pytest.raises(InvalidAnswer, match="no JSON object"):
        parse_answer("I cannot help with that.", 100)
    with pytest.raises(InvalidAnswer, match="invalid JSON"):
        parse_answer(raw[: len(raw) // 2] + "}", 100)
    broken = {"caption": "x", "attributes": {**attributes, "hair": {"bald": "maybe"}}}
    with pytest.raises(InvalidAnswer, match=r"attributes\.hair"):
        parse_answer(json.dumps(broken), 100)
    with pytest.raises(InvalidAnswer, match="longer than 5"):
        parse_answer(json.dumps({"caption": "a long caption", "attributes": attributes}), 5)
    with pytest.raises(InvalidAnswer):
        parse_answer(json.dumps({"caption": "\x02\x03", "attributes": attributes}), 5)  # empty once cleaned


def test_urls_never_carry_credentials():
    assert redact_url("https://user:secret@gpu.example:8443/v1?key=k") == "https://gpu.example:8443"
    assert normalize_base_url("http://h:8000/") == "http://h:8000/v1"
    assert normalize_base_url("http://h:8000/openai/v1/") == "http://h:8000/openai/v1"


def test_request_cache_survives_a_torn_line(tmp_path):
    path = tmp_path / "c.jsonl"
    key = request_key(image_sha256="ab", model="m", sampling={"t": 1})
    assert key == request_key(sampling={"t": 1}, model="m", image_sha256="ab")
    with RequestCache(path) as cache:
        cache.put(key, {"caption": "c"})
    with open(path, "ab") as handle:
        handle.write(b'{"key": "torn", "val')  # a writer killed mid-line
    with RequestCache(path) as cache:
        assert cache.get(key) == {"caption": "c"} and "torn" not in cache and len(cache) == 1
        cache.put("k2", {"caption": "d"})
    assert RequestCache(path).get("k2") == {"caption": "d"}


def face_record(key: str, bbox, landmarks, caption: str | None = "A scientist at his desk") -> FaceRecord:
    return FaceRecord(
        key=key,
        source_key=key.split("_")[0],
        url=f"http://photos.test/{key}.jpg",
        sample_id=7,
        caption=caption,
        license="CC-BY",
        detection=FaceDetection(
            bbox=bbox, landmarks=landmarks, score=0.876, face_index=0, image_width=800, image_height=600
        ),
        crop=CropGeometry(context_box=(0, 0, 10, 10), context_size=384, margin=0.5),
    )


FRONTAL = ((100.0, 100.0), (140.0, 100.0), (120.0, 120.0), (105.0, 140.0), (135.0, 140.0))


def test_template_caption_is_deterministic_labelled_and_geometric():
    annotator = TemplateAnnotator()
    record = face_record("000000001_00", (80.0, 60.0, 160.0, 170.0), FRONTAL)
    caption = annotator.caption(record)
    assert caption == annotator.caption(record.model_copy(deep=True)) == TemplateAnnotator().caption(record)
    assert caption.startswith("[template]") and "no model looked at this face" in caption
    assert "80x110 pixels (10% of the image width) in the upper left of a 800x600 photo" in caption
    assert "roughly frontal, head upright, detection score 0.88" in caption
    assert 'alt text reads: "A scientist at his desk"' in caption
    turned = ((100.0, 100.0), (140.0, 110.0), (150.0, 120.0), (105.0, 140.0), (135.0, 140.0))
    caption = annotator.caption(face_record("k_00", (600.0, 250.0, 680.0, 330.0), turned, caption=None))
    assert "turned strongly toward the image right" in caption and "tilted 14 degrees clockwise" in caption
    assert "middle right" in caption and "has no alt text" in caption
    long_alt = annotator.caption(face_record("k_00", (0.0, 0.0, 1.0, 1.0), FRONTAL, caption="word " * 200))
    assert long_alt.endswith('...".') and len(long_alt) < 900
    assert annotator.provenance.annotator == "template" and annotator.provenance.model == "template"


def write_face_shard(path: Path, records: dict[str, FaceRecord | bytes]) -> None:
    with ShardWriter(path) as writer:
        for key, record in records.items():
            payload = record if isinstance(record, bytes) else record.model_dump_json().encode()
            writer.add(
                key, {"jpg": b"\xff\xd8jpeg-bytes-" + key.encode(), "aligned.jpg": b"a", "json": payload}
            )


def test_template_stage_writes_every_face_and_is_byte_identical_on_rerun(tmp_path):
    faces = tmp_path / "faces" / "00003.tar"
    write_face_shard(
        faces,
        {
            "000030000_00": face_record("000030000_00", (80.0, 60.0, 160.0, 170.0), FRONTAL),
            "000030000_01": b"{not a record",
            "000030001_00": face_record("000030001_00", (10.0, 10.0, 60.0, 70.0), FRONTAL, caption=None),
        },
    )
    config = AnnotateConfig(annotator="template")

    def annotate(output_dir: str) -> tuple[dict, bool]:
        stage = AnnotateStage(config, output_dir=output_dir).bind(tmp_path)
        stage.setup()
        return execute_unit(stage, 3)

    stats, _ = annotate("a")
    first = tmp_path / "a"
    assert stats["faces"] == 3 and stats["annotated"] == 2
    assert stats["status"] == {"bad_input": 1, "success": 2} and stats["model"] == "template"
    paths = shard_paths(first, 3)
    rows = pq.read_table(paths["parquet"]).to_pylist()
    assert [(row["key"], row["status"]) for row in rows] == [
        ("000030000_00", "success"),
        ("000030000_01", "bad_input"),
        ("000030001_00", "success"),
    ]
    assert "unreadable FaceRecord" in rows[1]["error"]
    samples = dict(iter_tar_samples(paths["tar"]))
    annotation = FaceAnnotation.model_validate_json(samples["000030000_00"]["json"])
    assert annotation.attributes is None and annotation.provenance.annotator == "template"
    assert annotation.caption == samples["000030000_00"]["txt"].decode()
    assert samples["000030000_00"]["jpg"] == b"\xff\xd8jpeg-bytes-000030000_00"
    assert annotation.license == "CC-BY" and annotation.sample_id == 7
    second = tmp_path / "b"
    annotate("b")
    for name in ("tar", "parquet"):
        assert sha256_file(paths[name]) == sha256_file(shard_paths(second, 3)[name])
    before = paths["tar"].stat().st_mtime_ns
    assert annotate("a") == (stats, True)  # done: marker trusted
    assert paths["tar"].stat().st_mtime_ns == before


def test_mllm_mode_needs_a_server_before_any_work(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"annotate\.endpoint .* annotate\.server\.model"):
        AnnotateConfig().check_ready()
    with pytest.raises(ValueError, match=r"annotate\.model"):
        AnnotateConfig(endpoint="http://h:8000/v1").check_ready()
    with pytest.raises(ValueError, match="not both"):
        AnnotateConfig(endpoint="http://h/v1", server={"model": "m"})
    config = tmp_path / "run.yaml"
    metadata = tmp_path / "m.parquet"
    metadata.write_bytes(b"")
    (tmp_path / "ids.txt").write_text("1\n")
    config.write_text(
        yaml.safe_dump(
            {
                "out": str(tmp_path / "out"),
                "select": {"metadata": [str(metadata)], "ids": str(tmp_path / "ids.txt")},
            }
        )
    )
    assert main(["run", str(config)]) == 2
    assert "annotate.endpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_annotate_command_help_and_template_mode(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["annotate", "--help"])
    assert exit_info.value.code == 0 and "--endpoint" in capsys.readouterr().out
    faces = tmp_path / "faces"
    write_face_shard(
        faces / "00000.tar", {"000000000_00": face_record("000000000_00", (1.0, 1.0, 50.0, 60.0), FRONTAL)}
    )
    (faces / "00000_stats.json").write_text("{}")
    out = tmp_path / "annotations"
    assert main(["annotate", "--in", str(faces), "--out", str(out), "--template"]) == 0
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 1}
    assert json.loads((out / "00000_stats.json").read_text())["status"] == {"success": 1}
    assert "annotations" in capsys.readouterr().out
    assert main(["annotate", "--in", str(faces), "--out", str(out), "--endpoint", "http://h/v1"]) == 2
    assert "annotate.model" in capsys.readouterr().err
