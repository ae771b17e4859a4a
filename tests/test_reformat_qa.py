"""The QA builder, template banks and native-file parsers, without Beam."""

from __future__ import annotations

import io
import re
import string
from collections import Counter

import pytest
from PIL import Image
from pydantic import ValidationError

from facemllm.pipeline.cli import main
from facemllm.pipeline.demo.face_datasets import build_celeba, build_fairface, build_rafdb, celeba_attr_line
from facemllm.reformatters import QAConfig, make_reformatter
from facemllm.reformatters.base import ImageLoader, RowRejected
from facemllm.reformatters.celeba_attributes import CELEBA_ATTRIBUTES
from facemllm.reformatters.demographics import AGE_BANDS, GENDERS
from facemllm.reformatters.qa import ANSWER_STYLES, QABuilder
from facemllm.reformatters.rafdb import EXPRESSIONS
from facemllm.reformatters.templates import TEMPLATES
from facemllm.reformatters.utkface import RACES as UTK_RACES
from facemllm.schemas.vocab import OPTION_LETTERS, age_band
from tests.photos import skimage_photo

PERCEIVED = re.compile(r"appear|apparent|perceiv|look", re.IGNORECASE)
SLOTS = {"candidate": "X", "statement": "is X", "phrase": "X"}


def test_every_task_has_many_paraphrases_that_fill_cleanly():
    for task, bank in TEMPLATES.items():
        for templates in (bank.ask, bank.yes_no):
            assert len(set(templates)) == len(templates), f"{task}: repeated paraphrase"
            for template in templates:
                fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
                assert fields <= set(SLOTS), f"{task}: unknown slot in {template!r}"
        assert len(bank.ask) >= 6 or len(bank.yes_no) >= 6, task


@pytest.mark.parametrize("task", ["age", "age_band", "gender", "race"])
def test_demographic_questions_and_answers_speak_of_perception(task):
    bank = TEMPLATES[task]
    for text in (*bank.ask, *bank.yes_no, bank.open_answer):
        assert PERCEIVED.search(text), f"{task}: {text!r} does not ask about appearance"


def builder(**qa) -> QABuilder:
    return QABuilder(QAConfig(**qa), "rafdb")


def test_same_seed_same_pairs_other_seed_other_pairs():
    def run(seed):
        b = builder(seed=seed, styles_per_task=3)
        return [b.categorical(f"img{i}.jpg", "expression", "fear", EXPRESSIONS) for i in range(30)]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_multiple_choice_options_come_from_the_label_space_in_shuffled_order():
    b = builder(answer_styles=["multiple_choice"], choices=4)
    letters = Counter()
    for i in range(200):
        truth = EXPRESSIONS.values[i % 7]
        (pair,) = b.categorical(f"img{i}.jpg", "expression", truth, EXPRESSIONS)
        options = pair.label.options
        assert len(options) == len(set(options)) == 4 and set(options) <= set(EXPRESSIONS.values)
        assert [options[OPTION_LETTERS.index(pair.answer)]] == [truth] == pair.label.truth
        for letter, option in zip(OPTION_LETTERS, options, strict=False):
            assert f"\n{letter}. {EXPRESSIONS[option].option}" in pair.question
        letters[pair.answer] += 1
    assert set(letters) == set("ABCD") and min(letters.values()) > 25
    (gender,) = b.categorical("img.jpg", "gender", "female", GENDERS)
    assert sorted(gender.label.options) == ["female", "male"]  # capped by the label space


def test_yes_no_proposes_the_truth_about_half_the_time():
    b = builder(answer_styles=["yes_no"])
    answers = Counter()
    for i in range(200):
        (pair,) = b.categorical(f"img{i}.jpg", "race", "asian", UTK_RACES)
        assert pair.label.truth == ["asian"] and pair.answer == (
            "Yes" if pair.label.asked == "asian" else "No"
        )
        assert UTK_RACES[pair.label.asked].phrase in pair.question
        answers[pair.answer] += 1
    assert 60 < answers["Yes"] < 140


def test_styles_per_task_draws_distinct_configured_styles():
    b = builder(styles_per_task=3)
    pairs = b.categorical("img.jpg", "age_band", "20-29", AGE_BANDS)
    assert [p.answer_style for p in pairs] == list(ANSWER_STYLES)
    assert pairs[0].answer == "The person appears to be between 20 and 29 years old."
    assert builder(answer_styles=["open"], styles_per_task=3).categorical("i", "gender", "male", GENDERS)[
        0
    ].answer == ("The person appears to be male.")


def test_age_bands_are_fairface_bins():
    assert [age_band(a) for a in (0, 2, 3, 19, 20, 69, 70, 116)] == [
        "0-2", "0-2", "3-9", "10-19", "20-29", "60-69", "more than 70", "more than 70",
    ]  # fmt: skip


def celeba(tmp_path, **celeba_options):
    truth = build_celeba(tmp_path / "celeba")
    return truth, make_reformatter("celeba", truth.root, QAConfig(celeba=celeba_options))


def test_celeba_hold_out_is_configurable_and_never_asked_outside_zeroshot(tmp_path):
    truth, reformatter = celeba(tmp_path, zero_shot_attributes=["Smiling"], attribute_questions=39)
    for row in reformatter.rows:
        if row.rejection is not None or row.image not in truth.labels:  # its image is missing
            continue
        for split, pair in reformatter.qa_pairs(row):
            if split == "zeroshot":
                assert truth.splits[row.image] == "test" and pair.label.asked == "Smiling"
                assert pair.label.truth == (["Smiling"] if truth.labels[row.image]["Smiling"] else [])
            else:
                assert "Smiling" not in {pair.label.asked, *pair.label.options, *pair.label.truth}
                assert "smiling" not in pair.question.lower() + pair.answer.lower()


def test_celeba_parser_tolerates_a_missing_count_line_and_reordered_names(tmp_path):
    truth, reformatter = celeba(tmp_path)
    attr_file = truth.root / "Anno" / "list_attr_celeba.txt"
    count, names, *rows = attr_file.read_text().splitlines()
    reference = [(r.image, r.label, r.rejection) for r in reformatter.rows]

    attr_file.write_text("\n".join([names, *rows]) + "\n")
    assert [
        (r.image, r.label, r.rejection) for r in make_reformatter("celeba", truth.root, QAConfig()).rows
    ] == reference

    order = list(reversed(CELEBA_ATTRIBUTES))
    reordered = []
    for row in rows:
        name, *values = row.split()
        if len(values) == 40:
            by_name = dict(zip(CELEBA_ATTRIBUTES, values, strict=True))
            row = celeba_attr_line(name, [int(by_name[a]) for a in order])
        reordered.append(row)
    attr_file.write_text("\n".join([count, " ".join(order), *reordered]) + "\n")
    rows_now = make_reformatter("celeba", truth.root, QAConfig()).rows
    assert [(r.image, r.label) for r in rows_now if r.rejection is None] == [
        (image, label) for image, label, rejection in reference if rejection is None
    ]


def test_celeba_header_with_other_names_rejects_every_row(tmp_path):
    truth, _ = celeba(tmp_path)
    attr_file = truth.root / "Anno" / "list_attr_celeba.txt"
    count, names, *rows = attr_file.read_text().splitlines()
    attr_file.write_text("\n".join([count, names.replace("Smiling", "Smiles"), *rows]) + "\n")
    rows = make_reformatter("celeba", truth.root, QAConfig()).rows
    assert {r.rejection.reason for r in rows} == {"bad_header"}
    assert "Smiling" in rows[0].rejection.detail and len(rows) == len(truth.statuses)


def test_fairface_header_without_required_columns_rejects_that_file_only(tmp_path):
    truth = build_fairface(tmp_path / "fairface")
    train_csv = truth.root / "fairface_label_train.csv"
    _, *rows = train_csv.read_text().splitlines()
    train_csv.write_text("\n".join(["path,years,sex,race,service_test", *rows]) + "\n")
    reasons = Counter(
        (row.split, row.rejection.reason if row.rejection else "ok")
        for row in make_reformatter("fairface", truth.root, QAConfig()).rows
    )
    assert reasons == {("train", "bad_header"): len(rows), ("val", "ok"): 3}


def test_a_label_file_whose_every_row_fails_its_header_stops_the_run(tmp_path, capsys):
    """A FairFace CSV with the wrong columns used to give every row bad_header and exit 0."""
    truth = build_fairface(tmp_path / "fairface")
    train_csv = truth.root / "fairface_label_train.csv"
    _, *rows = train_csv.read_text().splitlines()
    train_csv.write_text("\n".join(["path,years,sex,race,service_test", *rows]) + "\n")
    args = ["reformat", "fairface", "--root", str(truth.root), "--out", str(tmp_path / "qa")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "fairface_label_train.csv: all" in err and "fail the header check" in err
    assert not (tmp_path / "qa" / "fairface").exists()


@pytest.mark.parametrize("dataset", ["fairface", "celeba", "rafdb"])
def test_label_files_saved_with_a_byte_order_mark_read_as_without(dataset, tmp_path):
    """Spreadsheet programs save UTF-8 with a BOM; it used to make every row bad_header."""
    build = {"fairface": build_fairface, "celeba": build_celeba, "rafdb": build_rafdb}[dataset]
    truth = build(tmp_path / dataset)
    before = make_reformatter(dataset, truth.root, QAConfig()).rows
    for label_file in [*truth.root.rglob("*.csv"), *truth.root.rglob("*.txt")]:
        label_file.write_bytes(b"\xef\xbb\xbf" + label_file.read_bytes())
    after = make_reformatter(dataset, truth.root, QAConfig()).rows
    assert [(r.image, r.split, r.label, r.rejection) for r in after] == [
        (r.image, r.split, r.label, r.rejection) for r in before
    ]


def test_utkface_split_is_stratified_seeded_and_independent_of_other_groups(tmp_path):
    root = tmp_path / "utk"
    root.mkdir()
    for i in range(200):  # two groups of 100: (20-29, male, White) and (60-69, female, Indian)
        (root / f"{20 + i % 10}_0_0_2017011{i:012d}.jpg.chip.jpg").touch()
        (root / f"{60 + i % 10}_1_3_2017011{i:012d}.jpg.chip.jpg").touch()

    def splits(seed):
        rows = make_reformatter("utkface", root, QAConfig(seed=seed)).rows
        return {row.image: row.split for row in rows}

    first = splits(0)
    for group in ("_0_0_", "_1_3_"):
        counts = Counter(split for image, split in first.items() if group in image)
        assert counts == {"train": 160, "val": 20, "test": 20}
    assert splits(0) == first
    assert splits(1) != first
    for path in list(root.glob("6*")):  # removing one group leaves the other's assignment as it was
        path.unlink()
    assert splits(0) == {image: split for image, split in first.items() if "_0_0_" in image}


def test_image_loader_keeps_jpeg_bytes_and_reencodes_png(tmp_path):
    loader = ImageLoader(max_pixels=4096 * 4096, jpeg_quality=90)
    png = skimage_photo("astronaut.png")
    encoded = loader(png)
    assert encoded == loader(png) and Image.open(io.BytesIO(encoded)).format == "JPEG"
    jpeg = tmp_path / "a.jpg"
    jpeg.write_bytes(encoded)
    assert loader(jpeg) == encoded
    with pytest.raises(RowRejected) as rejected:
        ImageLoader(max_pixels=100 * 100, jpeg_quality=90)(png)
    assert rejected.value.rejection.reason == "unreadable_image"
    truncated = tmp_path / "t.jpg"
    truncated.write_bytes(encoded[: len(encoded) // 2])
    with pytest.raises(RowRejected):
        loader(truncated)
    with pytest.raises(RowRejected) as missing:
        loader(tmp_path / "none.jpg")
    assert missing.value.rejection.reason == "missing_image"


@pytest.mark.parametrize(
    "options, field",
    [
        ({"celeba": {"zero_shot_attributes": ["Nope"]}}, "zero_shot_attributes"),
        ({"utkface": {"train": 0.9, "val": 0.1, "test": 0.1}}, "utkface"),
        ({"answer_styles": []}, "answer_styles"),
        ({"choices": 1}, "choices"),
    ],
)
def test_bad_qa_settings_are_refused_naming_the_field(options, field):
    with pytest.raises(ValidationError, match=field):
        QAConfig.model_validate(options)
