"""``facemllm reformat`` end to end on each dataset's native layout, through Beam.

Datasets are built from real face photos (pipeline/demo/face_datasets.py) with malformed rows mixed
in. Checked: a status row per input with the right reason, labels equal to the source files',
official splits, the zero-shot hold-out, WebDataset conformance, byte-identical reruns (also on
another runner mode and from torchvision's CelebA layout), the LLaVA export, and that Hugging Face
``datasets`` reads the shards.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from facemllm.pipeline.cli import REPO_CONFIGS, build_parser, main
from facemllm.pipeline.core.files import sha256_file
from facemllm.pipeline.core.shards import iter_tar_samples
from facemllm.pipeline.demo.face_datasets import build_celeba, build_fairface, build_rafdb, build_utkface
from facemllm.pipeline.stages.reformat import load_reformat_config, run_reformat
from facemllm.reformatters.celeba_attributes import CELEBA_ATTRIBUTES
from facemllm.reformatters.config import CelebAOptions
from facemllm.schemas import QAImageSample, QASample, ReformatStatus, RunManifest, read_qa_samples
from facemllm.schemas.vocab import OPTION_LETTERS, age_band
from tests.photos import insightface_masks, insightface_t1, skimage_photo

IN_MEMORY = ["runner.direct_running_mode=in_memory", "runner.direct_num_workers=1", "rows_per_chunk=4"]
HELD_OUT = CelebAOptions().zero_shot_attributes


def reformat(dataset: str, root: Path, out: Path, *overrides: str, llava: bool = False) -> RunManifest:
    config = load_reformat_config(
        None, [*IN_MEMORY, *overrides], dataset=dataset, root=str(root), out=str(out), llava=llava
    )
    return run_reformat(config)


def shard_samples(dataset_dir: Path) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
    """split -> [(key, members)] over the split's shards in order."""
    return {
        split.name: [sample for tar in sorted(split.glob("*.tar")) for sample in iter_tar_samples(tar)]
        for split in sorted(dataset_dir.iterdir())
        if split.is_dir() and any(split.glob("*.tar"))
    }


def records(dataset_dir: Path) -> list[QASample]:
    """Every question in the shards, one at a time."""
    return [
        question
        for samples in shard_samples(dataset_dir).values()
        for _, members in samples
        for question in read_qa_samples(members["json"])
    ]


def statuses(dataset_dir: Path) -> list[ReformatStatus]:
    return [
        ReformatStatus.model_validate(row)
        for row in pq.read_table(dataset_dir / "status.parquet").to_pylist()
    ]


def all_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def check_accounting(dataset_dir: Path, expected_statuses: list[str], manifest: RunManifest) -> None:
    """One status row per input, in input order; samples in the shards add up to the ok rows' counts."""
    rows = statuses(dataset_dir)
    assert [row.status for row in rows] == expected_statuses
    assert [row.row for row in rows] == list(range(len(rows)))
    assert all(row.samples > 0 for row in rows if row.status == "ok")
    assert sum(row.samples for row in rows) == len(records(dataset_dir))  # questions
    written = sum(len(samples) for samples in shard_samples(dataset_dir).values())
    dataset = rows[0].dataset
    assert manifest.stages[f"qa/{dataset}"].counts == {"rows": len(rows), **Counter(expected_statuses)}
    assert (
        sum(m.counts["samples"] for stage, m in manifest.stages.items() if stage.count("/") == 2) == written
    )
    # each source image is stored once per split it has questions in, never once per question
    per_split = Counter((q.image, q.split) for q in records(dataset_dir))
    assert written == len(per_split)


def check_webdataset_rules(dataset_dir: Path) -> None:
    """Same members in every sample, increasing dot-free keys, unique across shards; sizes match."""
    keys = []
    for split, samples in shard_samples(dataset_dir).items():
        assert {tuple(sorted(members)) for _, members in samples} == {("jpg", "json")}, split
        for tar in sorted((dataset_dir / split).glob("*.tar")):
            shard_keys = [key for key, _ in iter_tar_samples(tar)]
            assert shard_keys == sorted(shard_keys) and all("." not in key for key in shard_keys)
        keys += [key for key, _ in samples]
        sizes = json.loads((dataset_dir / split / "sizes.json").read_text())
        assert sum(sizes.values()) == len(samples)
    assert len(keys) == len(set(keys))
    manifest = RunManifest.model_validate_json((dataset_dir / "manifest.json").read_text())
    for stage in manifest.stages.values():
        for shard in stage.shards:
            assert sha256_file(dataset_dir / shard.url) == shard.sha256


def check_answer(sample: QASample) -> None:
    """The gpt turn is the label's answer, and closed answers agree with the label's truth."""
    label = sample.label
    human, gpt = sample.conversations
    assert human.speaker == "human" and human.value.startswith("<image>\n") and gpt.value == label.answer
    if sample.answer_style == "yes_no":
        assert label.answer == ("Yes" if label.asked in label.truth else "No")
    elif sample.task == "attribute_selection":
        expected = [OPTION_LETTERS[label.options.index(value)] for value in label.truth]
        assert label.answer == (", ".join(sorted(expected)) or "None")
    elif sample.answer_style == "multiple_choice":
        assert [label.options[OPTION_LETTERS.index(label.answer)]] == label.truth


# ---------------------------------------------------------------------------------------- CelebA


@pytest.fixture(scope="module")
def celeba_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("celeba")
    truth = build_celeba(base / "data")
    manifest = reformat("celeba", truth.root, base / "qa", llava=True)
    return truth, base / "qa" / "celeba", manifest


def test_celeba_status_labels_and_splits_follow_the_source_files(celeba_run):
    truth, out, manifest = celeba_run
    check_accounting(out, truth.statuses, manifest)
    check_webdataset_rules(out)
    samples = records(out)
    assert {s.task for s in samples} == {"attribute", "attribute_selection", "attribute_description"}
    seen = [a for a in CELEBA_ATTRIBUTES if a not in HELD_OUT]
    by_split = defaultdict(set)
    for sample in samples:
        check_answer(sample)
        attributes = truth.labels[sample.image]
        by_split[sample.split].add(sample.image)
        expected_split = "test" if sample.split == "zeroshot" else sample.split
        assert truth.splits[sample.image] == expected_split
        label = sample.label
        if sample.task == "attribute":
            assert label.truth == ([label.asked] if attributes[label.asked] else [])
        elif sample.task == "attribute_selection":
            assert label.truth == [option for option in label.options if attributes[option]]
        else:
            assert label.truth == [a for a in seen if attributes[a]]
    assert {split: len(images) for split, images in by_split.items()} == {
        "train": 5,
        "val": 2,
        "test": 2,
        "zeroshot": 2,
    }
    source = truth.root / "Img"
    for key, members in shard_samples(out)["train"]:
        image = json.loads(members["json"])["image"]
        assert members["jpg"] == (source / image).read_bytes(), key  # the aligned JPEG, byte for byte


@pytest.mark.parametrize("dataset", ["celeba", "rafdb", "utkface", "fairface"])
def test_image_samples_hold_exactly_the_one_question_samples_of_before(dataset, tmp_path):
    """Grouping changes the layout only: the same questions, answers, options and labels (same
    seed), one image member per source image and split, and legacy one-question JSON still reads."""
    from facemllm.reformatters import QAConfig, make_reformatter

    build = {
        "celeba": build_celeba,
        "rafdb": build_rafdb,
        "utkface": build_utkface,
        "fairface": build_fairface,
    }
    truth = build[dataset](tmp_path / dataset)
    reformat(dataset, truth.root, tmp_path / "qa")
    reformatter = make_reformatter(dataset, str(truth.root), QAConfig())
    ok = {status.row for status in statuses(tmp_path / "qa" / dataset) if status.status == "ok"}
    before = [q for row in reformatter.rows if row.row in ok for q in reformatter.question_samples(row)]
    written = records(tmp_path / "qa" / dataset)
    assert sorted(written, key=lambda q: q.key) == sorted(before, key=lambda q: q.key)
    image_members = sum(len(samples) for samples in shard_samples(tmp_path / "qa" / dataset).values())
    assert image_members == len({(q.image, q.split) for q in before})
    legacy = before[0].model_dump_json(by_alias=True)
    assert read_qa_samples(legacy) == [before[0]]


def test_zero_shot_attributes_never_leak_into_training_shards(celeba_run):
    truth, out, _ = celeba_run
    words = [w for a in HELD_OUT for w in CELEBA_ATTRIBUTES[a]]
    mention = re.compile("|".join(rf"\b{re.escape(w)}\b" for w in words), re.IGNORECASE)
    zero_shot = Counter()
    for sample in records(out):
        label = sample.label
        if sample.split == "zeroshot":
            assert sample.task == "attribute" and label.asked in HELD_OUT
            zero_shot[sample.image] += 1
            continue
        named = {label.asked, *label.options, *label.truth}
        assert not named & set(HELD_OUT), sample.key
        assert not mention.search(json.dumps([t.value for t in sample.conversations])), sample.key
    test_images = {image for image, split in truth.splits.items() if split == "test"}
    assert zero_shot == dict.fromkeys(test_images, len(HELD_OUT))


def test_llava_export_loads_and_names_existing_images(celeba_run):
    _, out, _ = celeba_run
    shards = shard_samples(out)
    for split, samples in shards.items():
        entries = json.loads((out / "llava" / f"{split}.json").read_text())
        assert [entry["id"] for entry in entries] == [key for key, _ in samples]
        for entry, (_, members) in zip(entries, samples, strict=True):
            assert set(entry) == {"id", "image", "conversations"}
            assert (out / "llava" / entry["image"]).read_bytes() == members["jpg"]
            record = QAImageSample.model_validate_json(members["json"])
            assert entry["conversations"] == json.loads(members["json"])["conversations"]
            assert [turn["from"] for turn in entry["conversations"]] == ["human", "gpt"] * len(
                record.questions
            )


def test_hugging_face_datasets_reads_our_shards(celeba_run, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _, out, manifest = celeba_run
    files = {split: [str(p) for p in sorted((out / split).glob("*.tar"))] for split in ("train", "zeroshot")}
    loaded = datasets.load_dataset("webdataset", data_files=files, cache_dir=str(tmp_path / "hf"))
    for split in files:
        assert loaded[split].num_rows == manifest.stages[f"qa/celeba/{split}"].counts["samples"]
        first = loaded[split][0]
        assert first["json"]["split"] == split and first["jpg"].size == (178, 218)


def test_reruns_give_identical_bytes_on_any_runner_and_layout(celeba_run, tmp_path):
    truth, out, manifest = celeba_run
    reference = all_files(out)
    multi = ["runner.direct_running_mode=multi_processing", "runner.direct_num_workers=2"]
    reformat("celeba", truth.root, tmp_path / "again", *multi, llava=True)
    assert all_files(tmp_path / "again" / "celeba") == reference

    assert reformat("celeba", truth.root, out.parent, llava=True) == manifest  # finished chunks are kept
    assert all_files(out) == reference

    torchvision = build_celeba(tmp_path / "torchvision", layout="torchvision")
    tv_manifest = reformat("celeba", torchvision.root, tmp_path / "tv", llava=True)
    assert {k: m.shards for k, m in tv_manifest.stages.items()} == {
        k: m.shards for k, m in manifest.stages.items()
    }

    with pytest.raises(ValueError, match="another configuration"):
        reformat("celeba", truth.root, out.parent, "qa.seed=1", llava=True)


# ---------------------------------------------------------------------------------------- RAF-DB


def test_rafdb_expressions_splits_and_aligned_images(tmp_path):
    truth = build_rafdb(tmp_path / "rafdb")
    manifest = reformat("rafdb", truth.root, tmp_path / "qa", "qa.styles_per_task=3")
    out = tmp_path / "qa" / "rafdb"
    check_accounting(out, truth.statuses, manifest)
    check_webdataset_rules(out)
    names = dict(
        zip(
            "1234567",
            ["surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"],
            strict=True,
        )
    )
    styles = Counter()
    for sample in records(out):
        check_answer(sample)
        assert sample.task == "expression" and sample.label.truth == [names[truth.labels[sample.image]]]
        assert sample.split == truth.splits[sample.image]
        styles[sample.image, sample.answer_style] += 1
    assert set(styles.values()) == {1} and len(styles) == 3 * len(truth.labels)
    for _, members in shard_samples(out)["test"]:
        assert members["jpg"] == (truth.root / json.loads(members["json"])["image"]).read_bytes()


def test_a_rerun_picks_up_a_repaired_image_and_redoes_only_its_chunk(tmp_path):
    truth = build_rafdb(tmp_path / "rafdb")
    damaged = truth.root / "Image" / "aligned" / "train_00002_aligned.jpg"
    good = damaged.read_bytes()
    damaged.write_bytes(good[: len(good) // 3])  # truncated: unreadable_image
    reformat("rafdb", truth.root, tmp_path / "qa")
    out = tmp_path / "qa" / "rafdb"
    assert statuses(out)[1].status == "unreadable_image"
    untouched = {p.name: p.stat().st_mtime_ns for p in (out / "_chunks").glob("*_stats.json")}
    damaged.write_bytes(good)  # repaired since
    reformat("rafdb", truth.root, tmp_path / "qa")
    assert [row.status for row in statuses(out)] == truth.statuses
    redone = {
        p.name for p in (out / "_chunks").glob("*_stats.json") if p.stat().st_mtime_ns != untouched[p.name]
    }
    assert redone == {"00000_stats.json"}  # rows 0-3 (rows_per_chunk=4): only the repaired image's chunk


# --------------------------------------------------------------------------------------- UTKFace


def test_utkface_labels_come_from_file_names(tmp_path):
    truth = build_utkface(tmp_path / "utk")
    manifest = reformat("utkface", truth.root, tmp_path / "qa")
    out = tmp_path / "qa" / "utkface"
    check_accounting(out, truth.statuses, manifest)
    check_webdataset_rules(out)
    splits = {}
    for sample in records(out):
        check_answer(sample)
        age, gender, race = truth.labels[sample.image]
        expected = {
            "age": str(age),
            "age_band": age_band(age),
            "gender": ["male", "female"][gender],
            "race": ["white", "black", "asian", "indian", "other"][race],
        }
        assert sample.label.truth == [expected[sample.task]]
        assert splits.setdefault(sample.image, sample.split) == sample.split  # one split per image
    assert sorted(splits) == sorted(truth.labels)
    assert Counter(splits.values()) == {
        "train": 8 + 8 + 5,
        "val": 1 + 1,
        "test": 1 + 1,
    }  # two groups of 10, 5 loners


def test_unaligned_images_can_be_cropped_by_the_face_stage(tmp_path, scrfd_dir):
    root = tmp_path / "part1"
    root.mkdir()
    photos = {"30_0_0_20170109120000001.jpg": skimage_photo("astronaut.png")}
    photos["40_1_2_20170109120000002.jpg"] = insightface_t1()
    photos["50_0_3_20170109120000003.jpg"] = insightface_masks()[0]
    for name, photo in photos.items():
        (root / name).write_bytes(photo.read_bytes())  # a PNG under a .jpg name is fine: we decode
    out = tmp_path / "qa" / "utkface"
    reformat(
        "utkface",
        root,
        tmp_path / "qa",
        "crop_faces=true",
        "qa.utkface.train=1",
        "qa.utkface.val=0",
        "qa.utkface.test=0",
    )
    assert [row.status for row in statuses(out)] == ["ok", "ok", "no_face"]
    for _, members in shard_samples(out)["train"]:
        assert Image.open(io.BytesIO(members["jpg"])).size == (384, 384)


# -------------------------------------------------------------------------------------- FairFace


def test_fairface_labels_and_official_splits(tmp_path):
    truth = build_fairface(tmp_path / "fairface")
    manifest = reformat("fairface", truth.root, tmp_path / "qa", "qa.styles_per_task=2")
    out = tmp_path / "qa" / "fairface"
    check_accounting(out, truth.statuses, manifest)
    check_webdataset_rules(out)
    for sample in records(out):
        check_answer(sample)
        age, gender, race = truth.labels[sample.image]
        expected = {"age_band": age, "gender": gender.lower(), "race": race}
        assert sample.label.truth == [expected[sample.task]] and sample.split == truth.splits[sample.image]
    assert {stage for stage in manifest.stages} == {"qa/fairface", "qa/fairface/train", "qa/fairface/val"}


# ------------------------------------------------------------------------------------- interface


def test_reformat_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["reformat", "--help"])
    assert exit_info.value.code == 0 and "--format" in capsys.readouterr().out


def test_cli_reformats_and_prints_the_summary(tmp_path, capsys):
    truth = build_rafdb(tmp_path / "rafdb")
    sets = [arg for override in IN_MEMORY for arg in ("--set", override)]
    code = main(
        [
            "reformat",
            "rafdb",
            "--root",
            str(truth.root),
            "--out",
            str(tmp_path / "qa"),
            "--format",
            "llava",
            *sets,
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "qa/rafdb/train" in printed and "unknown_label" in printed
    assert json.loads((tmp_path / "qa" / "rafdb" / "llava" / "test.json").read_text())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "qa.celeba.zero_shot_attributes=[Smiles]"], "zero_shot_attributes"),
        (["--set", "rows_per_chunk=0"], "rows_per_chunk"),
        ([], "list_attr_celeba.txt"),
    ],
)
def test_bad_settings_or_layout_stop_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "qa"
    assert main(["reformat", "celeba", "--root", str(tmp_path), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("path", sorted(REPO_CONFIGS.glob("reformat_*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path, tmp_path):
    config = load_reformat_config(path, [], dataset="utkface", root=str(tmp_path), out=str(tmp_path / "qa"))
    assert config.runner.direct_running_mode == "multi_processing"
