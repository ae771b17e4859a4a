"""Property-based fuzzing of every parser that reads outside data.

The property, for every parser: it returns a valid result or raises an error its caller is
documented to catch (``ValueError`` and its subclasses: pydantic's ``ValidationError``,
``IdListError``, ``InvalidAnswer``, ``JSONDecodeError``, ``UnicodeDecodeError``; ``OSError`` for
files), never an ``IndexError``, ``KeyError``, ``TypeError``, ``AttributeError``,
``RecursionError``, ``OverflowError`` ..., and never a hang (every example has a deadline).
Where a parser's contract is stronger (the reformatters reject a bad row with a named reason, the
answer parsers return None for a reply they cannot read), the stronger contract is checked.

Inputs are raw text and bytes, and near-valid documents built from each format's real shape with
mutations, so the fuzzing reaches past the first check. Hypothesis profiles: ``ci`` (the default:
small, derandomized, for ``make test``) and ``fuzz`` (20 times more examples, random: ``make
fuzz``), chosen by ``FACEMLLM_FUZZ_PROFILE``.

Every crash the fuzzing found has a regression example (``@example``) or a test of its own at
the end (deeply nested JSON, markers that are not objects, byte-order marks, odd ``sizes.json``).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from facemllm.annotators.mllm_client import InvalidAnswer, parse_answer
from facemllm.evaluation.config import EvalConfig
from facemllm.evaluation.data import EvalData
from facemllm.evaluation.parsing import (
    MAX_AGE,
    AgeReading,
    normalize,
    parse_age,
    parse_letter,
    parse_letters,
    parse_yes_no,
    words,
)
from facemllm.evaluation.tasks import TASKS, VOCABULARIES, Judgement, judge
from facemllm.pipeline.config import RunConfig, load_config
from facemllm.pipeline.core.config import apply_overrides, load_yaml_config
from facemllm.pipeline.core.storage import Storage, StorageOptions, read_marker
from facemllm.pipeline.publishing.layout import read_manifest
from facemllm.pipeline.stages.reformat import ReformatConfig
from facemllm.pipeline.stages.select import load_sample_ids
from facemllm.reformatters.celeba import LAYOUTS as CELEBA_LAYOUTS
from facemllm.reformatters.celeba import CelebAReformatter
from facemllm.reformatters.celeba_attributes import CELEBA_ATTRIBUTES
from facemllm.reformatters.config import QAConfig
from facemllm.reformatters.demographics import AGE_BANDS
from facemllm.reformatters.fairface import FairFaceReformatter
from facemllm.reformatters.qa import ANSWER_STYLES
from facemllm.reformatters.rafdb import LABEL_FILES as RAFDB_LABEL_FILES
from facemllm.reformatters.rafdb import RAFDBReformatter
from facemllm.reformatters.utkface import UTKFaceReformatter
from facemllm.schemas import PublishedManifest, QASample, ReformatStatus
from facemllm.schemas.annotation import FaceResponse
from facemllm.schemas.vocab import FAIRFACE_GENDERS, FAIRFACE_RACES, OPTION_LETTERS
from facemllm.training.data import Shard, expand_shards

REPO = Path(__file__).resolve().parent.parent

# --- profiles ------------------------------------------------------------------------------------

# max_examples of a profile is the budget of a test of weight 1 (see ``budget``).
settings.register_profile(
    "ci",
    max_examples=150,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    max_examples=3000,
    derandomize=False,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("FACEMLLM_FUZZ_PROFILE", "ci"))


def budget(weight: float, deadline_ms: int) -> settings:
    """``weight`` times the profile's example count; ``deadline_ms`` per example (a hang fails)."""
    return settings(max_examples=max(1, round(settings().max_examples * weight)), deadline=deadline_ms)


# Errors a caller is documented to catch. ValueError covers pydantic's ValidationError, IdListError,
# InvalidAnswer, JSONDecodeError, UnicodeDecodeError and pyarrow's ArrowInvalid.
FILE_ERRORS = (ValueError, OSError)

# --- shared strategies ---------------------------------------------------------------------------

LINE_ENDS = st.sampled_from(["\n", "\r\n", "\r"])
ODD_TOKENS = [
    "",
    "x",
    "0",
    "-0",
    "+1",
    "1.0",
    "\uff11",
    "\u2212" + "1",
    "NaN",
    "\x00",
    "\ufeff",
    "é",
    "\u2028",
]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)


def json_containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4))


json_values = st.recursive(json_scalars, json_containers, max_leaves=12)


@st.composite
def mutated(draw, base: object) -> object:
    """``base`` (a JSON-like tree) with a few leaves replaced, keys dropped or added."""
    value = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(0, 3))):
        node, path = value, []
        while isinstance(node, dict | list) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            path.append((node, key))
            node = node[key]
        if not path:
            if isinstance(value, dict):
                value[draw(st.text(max_size=8))] = draw(json_values)
            continue
        parent, key = path[-1]
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "replace":
            parent[key] = draw(json_values)
        elif action == "drop" and isinstance(parent, dict):
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
        else:
            parent.append(draw(json_values))
    return value


@st.composite
def text_mutation(draw, text: str) -> str:
    """``text`` with a few characters inserted, deleted or replaced."""
    chars = list(text)
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(chars)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.one_of(st.sampled_from(list(":-[]{}&*!'\"#\t\n |>%@`,")), st.text(max_size=2)))
        if action == "insert" or not chars:
            chars[at:at] = list(piece)
        elif action == "delete":
            del chars[min(at, len(chars) - 1)]
        else:
            chars[min(at, len(chars) - 1)] = piece
    return "".join(chars)


def encode(text: str, draw_encoding: str) -> bytes:
    return text.encode(draw_encoding, errors="replace")


encodings = st.sampled_from(["utf-8", "utf-8", "utf-8", "latin-1", "utf-16", "utf-8-sig"])


@functools.cache
def attribute_names() -> tuple[str, ...]:
    return tuple(CELEBA_ATTRIBUTES)


@st.composite
def qa_configs(draw) -> QAConfig:
    """Valid QA configurations, the defaults most often: options reach more builder branches."""
    if draw(st.booleans()):
        return QAConfig()
    train, val, test = draw(
        st.sampled_from([(0.8, 0.1, 0.1), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.5, 0.0), (0.4, 0.3, 0.3)])
    )
    return QAConfig(
        seed=draw(st.integers(-(2**40), 2**40)),
        answer_styles=draw(st.lists(st.sampled_from(ANSWER_STYLES), min_size=1, max_size=3, unique=True)),
        styles_per_task=draw(st.integers(1, 3)),
        choices=draw(st.integers(2, 26)),
        celeba={
            "attribute_questions": draw(st.integers(0, 40)),
            "selection_options": draw(st.integers(2, 26)),
            "zero_shot_attributes": draw(
                st.lists(st.sampled_from(attribute_names()), unique=True, max_size=10)
            ),
            "zero_shot_from": draw(st.sampled_from(["train", "val", "test"])),
        },
        utkface={"train": train, "val": val, "test": test},
    )


def fake_image(path: Path) -> bytes:
    return b"\xff\xd8\xff\xe0 not decoded here \xff\xd9"


def check_reformatter(reformatter) -> list[QASample]:
    """The reformatter contract on whatever its files hold: every row accepted or rejected with a
    named reason, rows numbered in order, status rows and samples that serialise (as the stage
    writes them), never an exception."""
    rows = reformatter.rows
    assert [row.row for row in rows] == list(range(len(rows)))
    reformatter.listing_digest()
    samples = []
    for row in rows:
        result = reformatter.reformat_row(row, fake_image)
        ReformatStatus.model_validate_json(result.status.model_dump_json())
        assert (result.status.status == "ok") == (row.rejection is None)
        for sample in result.samples:
            sample.model_dump_json()
            assert sample.image == row.image
        samples += result.samples
    accepted = sum(row.rejection is None for row in rows)
    event(f"{reformatter.dataset}: {'some' if accepted else 'no'} rows accepted")
    for reason in {row.rejection.reason for row in rows if row.rejection is not None}:
        event(f"{reformatter.dataset}: rejected as {reason}")
    return samples


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# --- 1. face datasets: label files and file names ------------------------------------------------


def celeba_name(number: int) -> str:
    return f"{number:06d}.jpg"


ODD_NAMES = ["../000001.jpg", "/000001.jpg", "a/000001.jpg", "a\\b.jpg", "000001.jpg\x00", "ü.jpg", "."]


@st.composite
def celeba_files(draw) -> tuple[int, bytes, bytes | None]:
    """(layout index, list_attr_celeba.txt, list_eval_partition.txt or None)."""
    layout = draw(st.integers(0, len(CELEBA_LAYOUTS) - 1))
    if draw(st.integers(0, 9)) == 0:  # raw bytes
        return layout, draw(st.binary(max_size=300)), draw(st.one_of(st.none(), st.binary(max_size=100)))
    names = list(attribute_names())
    header = list(names)
    header_kind = draw(st.integers(0, 9))
    if header_kind == 7:
        header = draw(st.permutations(names))  # a reordered header is still CelebA's 40
    elif header_kind == 8:
        del header[draw(st.integers(0, len(header) - 1))]
    elif header_kind == 9:
        header.insert(draw(st.integers(0, len(header))), draw(st.sampled_from([*names, "Extra", ""])))
    numbers = draw(st.lists(st.integers(1, 12), max_size=6))
    lines = []
    count = draw(st.sampled_from(["real", "none", "wrong", "odd"]))
    if count != "none":
        lines.append(
            {"real": str(len(numbers)), "wrong": "202599", "odd": draw(st.sampled_from(ODD_TOKENS))}[count]
        )
    lines.append(" ".join(header))
    for number in numbers:
        name = celeba_name(number) if draw(st.integers(0, 7)) else draw(st.sampled_from(ODD_NAMES))
        values = [draw(st.sampled_from(["1", "-1"])) for _ in header]
        kind = draw(st.integers(0, 9))
        if kind == 7 and values:
            values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from(ODD_TOKENS))
        elif kind == 8 and values:
            del values[draw(st.integers(0, len(values) - 1))]
        elif kind == 9:
            values.append(draw(st.sampled_from(["1", "-1"])))
        sep = draw(st.sampled_from([" ", "  ", "\t"]))
        lines.append(name + " " + sep.join(f"{v:>2}" if sep == " " else v for v in values))
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.text(max_size=20)))
    end = draw(LINE_ENDS)
    attr = encode(end.join(lines) + draw(st.sampled_from(["", end])), draw(encodings))
    if draw(st.integers(0, 9)) == 0:
        return layout, attr, None
    partition = []
    for number in numbers + draw(st.lists(st.integers(1, 12), max_size=2)):
        split = draw(st.sampled_from(["0", "1", "2", "0", "1", "2", "3", "x", "", "0 0"]))
        partition.append(f"{celeba_name(number)} {split}")
    return layout, attr, encode(end.join(partition), draw(encodings))


@budget(1, 3000)
@given(files=celeba_files(), config=qa_configs())
@example(files=(2, b"", b""), config=QAConfig())
@example(files=(0, b"3\n", None), config=QAConfig())
def test_celeba_label_files(files, config):
    layout, attr, partition = files
    attr_file, partition_file, _ = CELEBA_LAYOUTS[layout]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_file(root / attr_file, attr)
        if partition is not None:
            write_file(root / partition_file, partition)
        try:
            reformatter = CelebAReformatter(root, config)
        except FileNotFoundError as err:
            assert partition is None, err
            return
        check_reformatter(reformatter)


@st.composite
def rafdb_files(draw) -> tuple[str, bytes, bool]:
    """(label file name, its bytes, whether Image/aligned exists)."""
    label_file = draw(st.sampled_from(RAFDB_LABEL_FILES))
    aligned = draw(st.booleans())
    if draw(st.integers(0, 9)) == 0:
        return label_file, draw(st.binary(max_size=300)), aligned
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        prefix = draw(
            st.sampled_from(["train_", "test_", "train_", "test_", "val_", "", "Train_", "../train_"])
        )
        number = draw(st.integers(0, 99999))
        name = (
            f"{prefix}{number:05d}{draw(st.sampled_from(['.jpg', '.jpg', '', '.png', '.jpg.jpg', '/x.jpg']))}"
        )
        code = draw(st.sampled_from(["1", "2", "3", "4", "5", "6", "7", "0", "8", "07", "-1", "x", "\u0661"]))
        fields = [name, code]
        kind = draw(st.integers(0, 9))
        if kind == 8:
            fields = fields[:1]
        elif kind == 9:
            fields.append(draw(st.sampled_from(["1", "x", "#"])))
        lines.append(draw(st.sampled_from([" ", "\t", "  "])).join(fields))
    if draw(st.integers(0, 3)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(st.text(max_size=20)))
    return label_file, encode(draw(LINE_ENDS).join(lines), draw(encodings)), aligned


@budget(1, 3000)
@given(files=rafdb_files(), config=qa_configs())
@example(
    files=("EmoLabel/list_patition_label.txt", b"train_00001.jpg 5\ntrain_00001.jpg 5", True),
    config=QAConfig(),
)
def test_rafdb_label_file(files, config):
    label_file, content, aligned = files
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_file(root / label_file, content)
        if aligned:
            (root / "Image" / "aligned").mkdir(parents=True)
        check_reformatter(RAFDBReformatter(root, config))


DATE = "20170116174525125"


@st.composite
def utkface_name(draw) -> bytes:
    """A file name: UTKFace's scheme with mutations (the known malformed ones among them), or bytes."""
    if draw(st.integers(0, 7)) == 0:
        raw = draw(st.binary(min_size=1, max_size=40))
        return raw.replace(b"/", b"_").replace(b"\x00", b"_").lstrip(b".") or b"x"
    age = draw(st.sampled_from(["0", "1", "25", "116", "117", "999", "0025", "١٢", "9" * 30]))
    gender = draw(st.sampled_from(["0", "1", "2", "00"]))
    race = draw(st.sampled_from(["0", "1", "2", "3", "4", "5", "04"]))
    date = draw(st.sampled_from([DATE, DATE[:10], "", "x"]))
    fields = [age, gender, race, date]
    kind = draw(st.integers(0, 9))
    if kind == 7:
        del fields[2]  # the known missing race field
    elif kind == 8:
        fields.append("1")
    suffix = draw(
        st.sampled_from([".jpg", ".jpg.chip.jpg", ".jpg.chip.jpg", " .jpg", "jpg", ".png", ".JPG", ""])
    )
    return ("_".join(fields) + suffix).encode()


@st.composite
def utkface_trees(draw) -> list[bytes]:
    """Relative file paths (bytes: folders may have names that are not UTF-8)."""
    folders = st.sampled_from(
        [b"", b"", b"UTKFace/", b"part1/", b"crop_part1/sub/", b"caf\xe9/", b"\xff\xfe/"]
    )
    return draw(st.lists(st.builds(lambda f, n: f + n, folders, utkface_name()), max_size=10, unique=True))


@budget(1, 3000)
@given(paths=utkface_trees(), config=qa_configs())
@example(paths=[b"39_1_20170116174525125.jpg.chip.jpg", b"25_0_2_20170116174525125 .jpg"], config=QAConfig())
@example(
    paths=[b"\xff\xfe/25_0_2_20170116174525125.jpg.chip.jpg"], config=QAConfig()
)  # was UnicodeEncodeError
@example(paths=[b"caf\xe9/39_1_20170116174525125.jpg"], config=QAConfig())  # status row did not encode
def test_utkface_file_names(paths, config):
    with tempfile.TemporaryDirectory() as tmp:
        root = os.fsencode(tmp)
        for path in paths:
            full = os.path.join(root, path)
            try:
                os.makedirs(os.path.dirname(full), exist_ok=True)
                open(full, "wb").close()
            except OSError:  # a file and a folder of the same name: keep the first
                continue
        check_reformatter(UTKFaceReformatter(Path(tmp), config))


FAIRFACE_HEADER = ["file", "age", "gender", "race", "service_test"]


@st.composite
def fairface_files(draw) -> dict[str, bytes]:
    """split -> the bytes of fairface_label_{split}.csv."""
    files = {}
    for split in draw(st.sampled_from([["train"], ["val"], ["train", "val"]])):
        if draw(st.integers(0, 9)) == 0:
            files[split] = draw(st.binary(max_size=300))
            continue
        header = list(FAIRFACE_HEADER)
        kind = draw(st.integers(0, 9))
        if kind == 6:
            header = draw(st.permutations(header))
        elif kind == 7:
            del header[draw(st.integers(0, len(header) - 1))]
        elif kind == 8:
            header = [f" {column} " for column in header]
        elif kind == 9:
            header[0] = draw(st.sampled_from(["File", "\ufefffile", "", "file,"]))
        rows = [header]
        for _ in range(draw(st.integers(0, 6))):
            record = {
                "file": draw(
                    st.sampled_from(
                        [f"{split}/{draw(st.integers(1, 9))}.jpg"] * 3
                        + ["../1.jpg", "/1.jpg", "a\\1.jpg", "", " train/1.jpg "]
                    )
                ),
                "age": draw(st.sampled_from([*AGE_BANDS.values, "70+", "0-3", "", "10-19 "])),
                "gender": draw(st.sampled_from([*FAIRFACE_GENDERS, "male", "M", ""])),
                "race": draw(st.sampled_from([*FAIRFACE_RACES, "Latino", "east asian", ""])),
                "service_test": draw(st.sampled_from(["True", "False", ""])),
            }
            row = [record.get(column.strip(), "x") for column in header]
            extra = draw(st.integers(0, 9))
            if extra == 8 and row:
                row.pop()
            elif extra == 9:
                row.append(draw(st.text(max_size=5)))
            rows.append(row)
        out = io.StringIO()
        quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
        csv.writer(out, quoting=quoting, lineterminator=draw(LINE_ENDS)).writerows(rows)
        text = out.getvalue()
        if draw(st.integers(0, 4)) == 0:
            text = draw(text_mutation(text))
        bom = "\ufeff" if draw(st.integers(0, 4)) == 0 else ""  # Excel writes one
        files[split] = encode(bom + text, draw(encodings))
    return files


HUGE_FIELD = b'file,age,gender,race,service_test\ntrain/1.jpg,"' + b"x" * 200_000 + b'",Male,White,True\n'


@budget(1, 3000)
@given(files=fairface_files(), config=qa_configs())
@example(files={"train": HUGE_FIELD}, config=QAConfig())  # was csv.Error: field larger than field limit
@example(files={"val": "\ufefffile,age,gender,race\nval/1.jpg,3-9,Male,White\n".encode()}, config=QAConfig())
def test_fairface_csv(files, config):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for split, data in files.items():
            write_file(root / f"fairface_label_{split}.csv", data)
        reformatter = FairFaceReformatter(root, config)
        try:
            check_reformatter(reformatter)
        except ValueError as err:  # an unreadable CSV stops the dataset, naming the file and line
            assert "fairface_label_" in str(err), err


def test_fairface_csv_with_a_bom_is_read(tmp_path):
    header = "file,age,gender,race,service_test\n"
    (tmp_path / "fairface_label_val.csv").write_bytes(
        ("\ufeff" + header + "val/1.jpg,3-9,Male,White,True\n").encode()
    )
    rows = FairFaceReformatter(tmp_path, QAConfig()).rows
    assert [row.rejection for row in rows] == [None]


# --- 2. the evaluator's answer parsers -----------------------------------------------------------

REPLY_FRAGMENTS = [
    "yes", "Yes", "no", "No.", "yeah", "nope", "true", "incorrect", "or", "and", "/", "Answer:",
    "The answer is", "I would say", "**", "_", "`", '"', "\u201c", "(", ")", "A", "b", "C.", "(d)",
    "z", "Option", "choice", "letter", ":", "-", ",", ";", "&", "none", "None of the above", "happy",
    "not", "n't", "unhappy", "southeast asian", "east asian", "woman", "male", "Latino_Hispanic",
    "thirty", "thirty-four", "twenties", "mid", "late", "30s", "\u0663" + "0s", "months", "month",
    "over", "more than", "at least", "+", "to", "between", "25", "0", "120", "121", "1.5", "9" * 30,
    "9" * 400, "\u0661\u0662", "\uff22", "\u2013", "\u2014", "\u00a0", "\n", "years old", "about",
    ".", "!", "70+", "0-2", "neutral expression", "\x00", "\u0301",
]  # fmt: skip


@st.composite
def replies(draw) -> str:
    if draw(st.integers(0, 3)) == 0:
        return draw(st.text(max_size=200))
    pieces = draw(
        st.lists(
            st.tuples(
                st.one_of(st.sampled_from(REPLY_FRAGMENTS), st.text(max_size=4)),
                st.sampled_from(["", " ", " ", ", ", "-", "\n", ". "]),
            ),
            max_size=10,
        )
    )
    return "".join(a + b for a, b in pieces)


VOCABULARY_KEYS = sorted(VOCABULARIES)


def check_age(reading: AgeReading | None) -> None:
    if reading is not None:
        assert 0 <= reading.low <= reading.high, reading
        assert reading.low <= MAX_AGE and (math.isinf(reading.high) or reading.high <= MAX_AGE), reading
        assert math.isfinite(reading.point)


@budget(4, 1000)
@given(reply=replies(), key=st.sampled_from(VOCABULARY_KEYS), data=st.data())
@example(reply="9" * 400 + " months", key=VOCABULARY_KEYS[0], data=None)  # was AgeReading(inf, inf)
@example(reply="99999 months", key=VOCABULARY_KEYS[0], data=None)  # was a reading of 8333 years
def test_answer_parsers(reply, key, data):
    """They never raise: an unreadable reply is None (unparsed), a read one is in range."""
    normalize(reply)
    words(reply)
    said = parse_yes_no(reply)
    assert said in (True, False, None)
    reading = parse_age(reply)
    check_age(reading)
    event(f"yes/no {'parsed' if said is not None else 'unparsed'}, age {'parsed' if reading else 'unparsed'}")
    vocabulary = VOCABULARIES[key]
    values = list(vocabulary.names)
    options = (
        values
        if data is None
        else data.draw(st.permutations(values))[: data.draw(st.integers(1, len(values)))]
    )
    index = parse_letter(reply, options, vocabulary)
    assert index is None or 0 <= index < len(options)
    assert vocabulary.match(reply) in (None, *values)
    count = 5 if data is None else data.draw(st.integers(1, 26))
    chosen = parse_letters(reply, [f"option {i}" for i in range(count)])
    assert chosen is None or chosen <= set(range(count))


@functools.cache
def sample_pool() -> tuple[QASample, ...]:
    """Real QA samples of every task the evaluator scores, from tiny datasets in native formats."""
    config = QAConfig(styles_per_task=3)
    names = attribute_names()
    samples: list[QASample] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        celeba, rafdb, utkface, fairface = (
            root / name for name in ("celeba", "rafdb", "utkface", "fairface")
        )
        attr = [str(4), " ".join(names)]
        attr += [
            f"{celeba_name(n)} " + " ".join("1" if (i + n) % 3 else "-1" for i in range(40))
            for n in (1, 2, 3, 4)
        ]
        write_file(celeba / "list_attr_celeba.txt", "\n".join(attr).encode())
        write_file(
            celeba / "list_eval_partition.txt", b"000001.jpg 0\n000002.jpg 1\n000003.jpg 2\n000004.jpg 2\n"
        )
        write_file(
            rafdb / RAFDB_LABEL_FILES[0], "\n".join(f"test_{n:04d}.jpg {n}" for n in range(1, 8)).encode()
        )
        for age in (0, 2, 9, 34, 65, 90, 116):
            write_file(utkface / f"{age}_{age % 2}_{age % 5}_{DATE}.jpg.chip.jpg", b"")
        lines = ["file,age,gender,race,service_test"]
        lines += [
            f"val/{i}.jpg,{band},{('Male', 'Female')[i % 2]},{FAIRFACE_RACES[i % 7]},True"
            for i, band in enumerate(AGE_BANDS.values)
        ]
        write_file(fairface / "fairface_label_val.csv", "\n".join(lines).encode())
        for cls, folder in ((CelebAReformatter, celeba), (RAFDBReformatter, rafdb), (UTKFaceReformatter, utkface), (FairFaceReformatter, fairface)):  # fmt: skip
            reformatter = cls(folder, config)
            for row in reformatter.rows:
                if row.rejection is None:
                    # one QASample per question (``question_samples`` once a shard sample holds an
                    # image's questions together, ``samples`` before)
                    samples += getattr(reformatter, "question_samples", reformatter.samples)(row)
    scored = tuple(s for s in samples if any(spec.accepts(s) for spec in TASKS.values()))
    assert {(s.dataset, s.task, s.answer_style) for s in scored} >= {
        ("celeba", "attribute", "yes_no"),
        ("celeba", "attribute_selection", "multiple_choice"),
        ("utkface", "age", "open"),
        ("fairface", "age_band", "multiple_choice"),
    }
    return scored


@pytest.fixture(scope="module")
def pool() -> tuple[QASample, ...]:
    return sample_pool()  # built before the examples run: its time is no example's


@st.composite
def near_replies(draw, sample: QASample) -> str:
    """A reply built from the sample's own answer, options and letters, dressed and mutated."""
    label = sample.label
    lettered = [f"{letter}. {option}" for letter, option in zip(OPTION_LETTERS, label.options, strict=False)]
    others = [label.answer.lower(), *label.truth, *label.options, *lettered, "Yes", "No", "None"]
    core = draw(st.sampled_from([*others, *OPTION_LETTERS[: len(label.options) + 1]]))
    core = label.answer if draw(st.booleans()) else core
    if draw(st.booleans()):
        return core
    lead = draw(
        st.sampled_from(["", "Answer: ", "**", "The answer is ", "I would say ", "(", "Option ", "not "])
    )
    tail = draw(st.sampled_from(["", ".", "**", ")", " or no", ", not happy", " and B", " years", "+", "!"]))
    text = lead + core + tail
    return draw(text_mutation(text)) if draw(st.integers(0, 3)) == 0 else text


@budget(4, 1000)
@given(data=st.data())
@example(data=None)  # regression: "9" * 400 + " months" to an age question was OverflowError
def test_judge_any_reply(pool, data):
    """``judge`` (what the evaluator calls per reply) on real samples of every scored task."""
    if data is None:
        cases = [(s, "9" * 400 + " months") for s in pool if s.task == "age"]
    else:
        sample = data.draw(st.sampled_from(pool))
        cases = [(sample, data.draw(st.one_of(near_replies(sample), replies())))]
    for sample, reply in cases:
        judgement = judge(sample, reply)
        event(f"{sample.task} {sample.answer_style}: {judgement.status}")
        assert isinstance(judgement, Judgement) and judgement.status in ("parsed", "unparsed")
        assert judgement.abs_error is None or math.isfinite(judgement.abs_error)


# --- 3. the annotation JSON parser ---------------------------------------------------------------


@functools.cache
def response_schema() -> dict:
    return FaceResponse.model_json_schema()


def schema_values(schema: dict, defs: dict) -> st.SearchStrategy:
    """Values valid for a (FaceResponse) JSON Schema node."""
    if "$ref" in schema:
        return schema_values(defs[schema["$ref"].split("/")[-1]], defs)
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum", -100), schema.get("maximum", 100))
    if kind == "number":
        return st.floats(schema.get("minimum", -100), schema.get("maximum", 100))
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=40)
    return st.fixed_dictionaries(
        {name: schema_values(prop, defs) for name, prop in schema["properties"].items()}
    )


@st.composite
def model_replies(draw) -> str:
    """What a model might answer: prose, JSON of anything, or a valid answer mutated and wrapped."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.text(max_size=200))
    if kind == 1:
        return json.dumps(draw(json_values))
    schema = response_schema()
    answer = draw(schema_values(schema, schema["$defs"]))
    answer["caption"] = draw(
        st.one_of(st.text(max_size=80), st.sampled_from(["\x02\x03", " ", "A face.\x00\n"]))
    )
    if kind >= 3:
        answer = draw(mutated(answer))
    text = json.dumps(answer, indent=draw(st.sampled_from([None, 2])), ensure_ascii=draw(st.booleans()))
    if kind == 5:
        text = draw(text_mutation(text))
    before = draw(st.sampled_from(["", "```json\n", "```\n", "Here is the JSON:\n", "{", "}"]))
    after = draw(st.sampled_from(["", "\n```", "```", " Hope this helps!", "}", "{"]))
    return before + text + after


@budget(3, 1000)
@given(reply=model_replies(), caption_max_chars=st.integers(1, 500))
def test_annotation_parser(reply, caption_max_chars):
    try:
        response = parse_answer(reply, caption_max_chars)
    except InvalidAnswer as err:
        event(f"invalid: {str(err).split(':')[0]}")
        return
    event("valid")
    assert isinstance(response, FaceResponse)
    assert 1 <= len(response.caption) <= caption_max_chars


# --- 4. configs: YAML files and --set overrides --------------------------------------------------

SEED_CONFIGS = {
    RunConfig: "laion_face.yaml",
    ReformatConfig: "reformat_celeba.yaml",
    EvalConfig: "eval.yaml",
}
REQUIRED = {  # what the command line gives beside the file
    RunConfig: {},
    ReformatConfig: {"dataset": "celeba", "root": "/data/celeba", "out": "/data/out"},
    EvalConfig: {},
}
YAML_VALUES = [
    "5", "-1", "0", "1e999", ".inf", ".nan", "0x10", "0o17", "true", "null", "~", "", "[UNLIKELY]",
    "[0, 2, 5]", "{a: 1}", "[", "]", "{", "*x", "&a [*a]", "!!python/object/apply:os.system [ls]",
    "!!binary aGk=", "'", '"', "\t", "2001-12-14", "a: b: c", "- a", "|", "> x", "%YAML 1.1", "---",
    "...", "@x", "`x", "? x", "x" * 300, "\x00", "\udcff", "\u2028", "[" * 500,
]  # fmt: skip


@functools.cache
def config_paths(model: type) -> tuple[str, ...]:
    """Dotted paths of the seed config's keys and of the model's fields."""
    paths = set(model.model_fields)

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                paths.add(f"{prefix}{key}")
                walk(f"{prefix}{key}.", value)

    walk("", yaml.safe_load((REPO / "configs" / SEED_CONFIGS[model]).read_text()))
    return tuple(sorted(paths))


@st.composite
def overrides(draw, model: type) -> str:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.text(max_size=30))
    path = draw(st.one_of(st.sampled_from(config_paths(model)), st.text(max_size=10)))
    if draw(st.integers(0, 5)) == 0:
        path += "." + draw(st.sampled_from(["x", "", "0", "a.b"]))
    value = draw(st.one_of(st.sampled_from(YAML_VALUES), st.text(max_size=12)))
    return f"{path}{draw(st.sampled_from(['=', '=', '=', '==', ' = ', '']))}{value}"


@st.composite
def config_documents(draw, model: type) -> bytes | None:
    """None (no file), the seed config mutated as data or as text, YAML of anything, or bytes."""
    kind = draw(st.integers(0, 6))
    seed = (REPO / "configs" / SEED_CONFIGS[model]).read_text()
    if kind == 0:
        return None
    if kind == 1:
        return draw(st.binary(max_size=200))
    if kind == 2:
        return yaml.safe_dump(draw(json_values)).encode()
    if kind == 3:
        return draw(text_mutation(seed)).encode(errors="surrogatepass")
    if kind == 4:
        return draw(st.text(max_size=100)).encode(errors="surrogatepass")
    return yaml.safe_dump(draw(mutated(yaml.safe_load(seed))), allow_unicode=draw(st.booleans())).encode()


@budget(3, 3000)
@given(model=st.sampled_from(sorted(SEED_CONFIGS, key=lambda m: m.__name__)), data=st.data())
@example(model=RunConfig, data=(b"out: x\nselect: {metadata: [a], ids: b}\n", ["select.nsfw=[UNLIKELY"]))
@example(model=RunConfig, data=(b"out: [x\n", []))  # was yaml.ParserError, not a ValueError
@example(model=RunConfig, data=(b"[" * 500, []))  # was RecursionError
@example(model=RunConfig, data=(None, ["runner.runner=!!python/name:os.system"]))
def test_config_files_and_overrides(model, data):
    if isinstance(data, tuple):
        document, sets = data
    else:
        document = data.draw(config_documents(model))
        sets = data.draw(st.lists(overrides(model), max_size=4))
    with tempfile.TemporaryDirectory() as tmp:
        path = None
        if document is not None:
            path = Path(tmp) / "config.yaml"
            path.write_bytes(document)
        try:
            if model is RunConfig:
                config = load_config(path, sets)
            else:
                config = load_yaml_config(model, path, sets, REQUIRED[model])
        except ValueError as err:
            event(f"{model.__name__}: {type(err).__name__}")
            return
        event(f"{model.__name__}: valid")
        assert isinstance(config, model)
        if hasattr(config, "config_hash"):
            config.config_hash()


@budget(3, 1000)
@given(
    base=st.one_of(st.just({}), st.dictionaries(st.text(max_size=5), json_values, max_size=4)),
    sets=st.lists(overrides(RunConfig), max_size=5),
)
@example(base={}, sets=["a=[1"])  # was yaml.ParserError
@example(base={}, sets=["a=\t"])  # was yaml.ScannerError
@example(base={"a": 1}, sets=["a.b=1"])
def test_apply_overrides(base, sets):
    try:
        result = apply_overrides(base, sets)
    except ValueError as err:
        assert "override" in str(err), err
        return
    assert isinstance(result, dict)


# --- 5. the LAION-Face id list -------------------------------------------------------------------

ID_TEXT_LINES = ["1", "-5", "0", "9223372036854775807", "9223372036854775808", "99999999999999999999999",
                 "1.5", "1e3", "# comment", "", "  7  ", "1 2", "1,2", "0x10", "x", "\x00", "١٢"]  # fmt: skip


@st.composite
def id_text_files(draw) -> bytes:
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=100))
    lines = draw(
        st.lists(st.one_of(st.sampled_from(ID_TEXT_LINES), st.integers(-(2**64), 2**64).map(str)), max_size=8)
    )
    return encode(draw(LINE_ENDS).join(lines), draw(encodings))


tensor_dtypes = st.sampled_from(
    [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float32, torch.float64, torch.bfloat16,
     torch.float16, torch.complex64]
)  # fmt: skip
tensors = st.one_of(
    st.builds(
        lambda values, dtype: torch.tensor(values, dtype=torch.float64).to(dtype),
        st.lists(st.integers(0, 2**20), max_size=6),
        tensor_dtypes,
    ),
    st.sampled_from(
        [
            torch.tensor(5),
            torch.empty(0, 3, dtype=torch.int64),
            torch.arange(6).reshape(2, 3),
            torch.tensor([[0, 7], [3, 0]]).to_sparse(),
            torch.tensor([1.0, 2.0]).to(torch.float8_e4m3fn),
        ]
    ),
)
id_leaves = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=5), st.none(), st.booleans(), tensors
)


def id_collections(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.integers(-3, 40), st.text(max_size=3)), inner, max_size=4),
    )


id_containers = st.recursive(id_leaves, id_collections, max_leaves=10)


@st.composite
def id_objects(draw) -> object:
    """What ``torch.save`` might have written: LAION-Face's per-part layout with mutations, or anything."""
    if draw(st.booleans()):
        return draw(id_containers)
    parts = draw(st.lists(st.lists(st.integers(0, 2**40), max_size=5), max_size=4))
    kind = draw(st.integers(0, 4))
    if kind == 1:
        return {i: torch.tensor(p, dtype=torch.int64) for i, p in enumerate(parts)}
    if kind == 2:
        return [set(p) for p in parts]
    if kind == 3:
        return {
            **{i: p for i, p in enumerate(parts)},
            draw(st.sampled_from(["meta", 2.5, -1])): draw(id_leaves),
        }
    return parts


PARQUET_TYPES = {
    "int64": pa.int64(),
    "uint64": pa.uint64(),
    "int32": pa.int32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "string": pa.string(),
}


@st.composite
def parquet_tables(draw) -> pa.Table:
    """Id tables: SAMPLE_ID (or sample_id) and part columns of any type, with nulls, or neither."""
    n = draw(st.integers(0, 5))
    columns = {}
    names = st.sampled_from(["SAMPLE_ID", "sample_id", "part", "URL"])
    for name in draw(st.lists(names, min_size=1, max_size=3, unique=True)):
        kind = draw(st.sampled_from(["int64", "int64", *PARQUET_TYPES, "null", "list"]))
        values = draw(st.lists(st.one_of(st.none(), st.integers(0, 2**40)), min_size=n, max_size=n))
        if kind == "null":
            columns[name] = pa.nulls(n)
        elif kind == "list":
            columns[name] = pa.array([None if v is None else [v] for v in values])
        elif kind == "string":
            columns[name] = pa.array([None if v is None else str(v) if v % 2 else "x" for v in values])
        else:
            columns[name] = pa.array(values, type=pa.int64()).cast(PARQUET_TYPES[kind], safe=False)
    return pa.table(columns)


def torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@st.composite
def id_list_files(draw) -> tuple[str, bytes]:
    """(suffix, bytes): text lists, parquet tables, torch files of safe objects, truncations, noise."""
    suffix = draw(st.sampled_from([".txt", ".csv", ".ids", ".parquet", ".pth", ".pt", ".npy", ".TXT", ""]))
    if suffix in (".parquet",):
        buffer = io.BytesIO()
        pq.write_table(draw(parquet_tables()), buffer)
        data = buffer.getvalue()
    elif suffix in (".pth", ".pt"):
        data = draw(id_objects())  # saved by the test: failures then show the object
    else:
        data = draw(id_text_files())
    cut = draw(st.integers(0, 5))
    if cut == 0:
        data = data if isinstance(data, bytes) else torch_bytes(data)
        data = data[: draw(st.integers(0, len(data)))]
    elif cut == 1:
        data = draw(st.binary(max_size=100))
    return suffix, data


@pytest.mark.filterwarnings("ignore:loadtxt:UserWarning")  # an empty list
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # a NaN id
@pytest.mark.filterwarnings("ignore:Casting complex values")  # a complex tensor
@budget(3, 3000)
@given(file=id_list_files(), parts=st.one_of(st.none(), st.lists(st.integers(-2, 40), max_size=3)))
@example(file=(".pth", [2**70]), parts=None)  # was OverflowError
@example(file=(".pth", {1: [1], "a": [2]}), parts=None)  # was TypeError: '<' between str and int
@example(file=(".pth", torch.tensor([1, 2], dtype=torch.bfloat16)), parts=None)  # was TypeError
@example(file=(".pth", [torch.tensor([1]), torch.tensor([2, 3]).to_sparse()]), parts=None)
@example(file=(".pth", ["1", 2]), parts=None)
@example(file=(".pth", [[]]), parts=[-2])  # was IndexError (and -1 chose the last part)
def test_load_sample_ids(file, parts):
    """``(suffix, bytes or an object torch.save writes)``; the id list, or a clear error."""
    suffix, data = file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"ids{suffix}"
        path.write_bytes(data if isinstance(data, bytes) else torch_bytes(data))
        try:
            ids = load_sample_ids(path, parts)  # never trust_pickle: arbitrary pickles are not loaded
        except FILE_ERRORS as err:
            event(f"{suffix}: {type(err).__name__}")
            return
    event(f"{suffix}: {'some' if len(ids) else 'no'} ids")
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64 and ids.ndim == 1
    assert (ids[1:] > ids[:-1]).all()


# --- 6. manifests, completion markers, sizes.json ------------------------------------------------


def shard_info(url: str) -> dict:
    return {"url": url, "sha256": "0" * 64, "nsamples": 4, "bytes": 1024}


VALID_MANIFEST = {
    "schema_version": 1,
    "config_hash": "0123456789abcdef",
    "package_versions": {"facemllm": "0.1.0"},
    "stages": {
        "qa/celeba/test": {"schema_version": 1, "stage": "qa/celeba/test", "shards": [shard_info("qa/celeba/test/00000.tar")], "counts": {"ok": 4, "task_attribute": 2}},
        "images": {"schema_version": 1, "stage": "images", "shards": [shard_info("images/00000.tar")], "counts": {}},
    },
    "version": 2,
    "parent": 1,
    "removal": None,
}  # fmt: skip


@st.composite
def json_documents(draw, valid: object) -> bytes:
    """A valid document mutated, JSON of anything, a torn document, or bytes."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return json.dumps(draw(json_values)).encode()
    text = json.dumps(draw(mutated(valid)) if kind >= 3 else valid, indent=2)
    if kind == 5:
        text = draw(text_mutation(text))
    if kind == 2:
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode(draw(st.sampled_from(["utf-8", "utf-8", "utf-16", "utf-32"])), errors="surrogatepass")


@budget(2, 3000)
@given(document=json_documents(VALID_MANIFEST))
@example(document=json.dumps(VALID_MANIFEST).encode())
def test_manifest_readers(document):
    """``read_manifest`` (publish, verify, remove) and ``EvalData`` (the evaluator) on any manifest."""
    with tempfile.TemporaryDirectory() as tmp:
        write_file(Path(tmp) / "manifest.json", document)
        write_file(Path(tmp) / "celeba" / "manifest.json", document)
        try:
            manifest = read_manifest(Storage(tmp, StorageOptions(progress=False, attempts=1)))
        except FILE_ERRORS as err:
            event(f"read_manifest: {type(err).__name__}")
        else:
            event("read_manifest: valid")
            assert isinstance(manifest, PublishedManifest)
        try:
            data = EvalData(tmp, StorageOptions(progress=False, attempts=1))
        except FILE_ERRORS:
            return
        for dataset in ("celeba", "rafdb"):
            for split in ("test", "val"):
                data.shards(dataset, split)
                data.task_count(dataset, split, "attribute")


VALID_MARKER = {"input": "part-00000.parquet", "input_index": 0, "shards": [0, 1], "counts": {"selected": 3}}


@budget(1, 1000)
@given(document=json_documents(VALID_MARKER))
def test_marker_reader(document):
    """``read_marker`` returns what the file holds or raises a clear error."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "_select-00000.json"
        path.write_bytes(document)
        with contextlib.suppress(FILE_ERRORS):
            read_marker(path)
        assert read_marker(Path(tmp) / "absent.json") is None


def expand_with_sizes(document: bytes) -> list[Shard]:
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("00000.tar", "00001.tar"):
            (Path(tmp) / name).write_bytes(b"")
        (Path(tmp) / "sizes.json").write_bytes(document)
        shards = expand_shards([tmp], StorageOptions(progress=False))
    assert [Path(s.url).name for s in shards] == ["00000.tar", "00001.tar"]
    assert all(s.nsamples is None or isinstance(s.nsamples, int) for s in shards)
    return shards


def is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


sizes_values = st.one_of(
    st.integers(0, 10**6), st.integers(0, 10**6).map(str), st.floats(0, 1e6), st.text(max_size=5)
)


@budget(1, 3000)
@given(document=st.one_of(
    st.binary(max_size=100).filter(lambda data: not is_json(data)),
    st.dictionaries(st.sampled_from(["00000.tar", "00001.tar", "x"]), sizes_values).map(lambda d: json.dumps(d).encode()),
))  # fmt: skip
def test_sizes_json_reader_on_objects_of_counts(document):
    """The trainer's ``sizes.json`` reader: garbage, and objects of counts (numbers, strings)."""
    expand_with_sizes(document)


# --- crashes the fuzzing found, fixed: their regression tests ----------------------------------


@budget(1, 3000)
@given(document=json_documents({"00000.tar": 4, "00001.tar": 4}))
@example(document=b"[]")
def test_sizes_json_reader_on_any_json(document):
    expand_with_sizes(document)


def test_read_marker_returns_an_object_or_refuses(tmp_path):
    path = tmp_path / "_select-00000.json"
    path.write_text("[]")
    try:
        stats = read_marker(path)
    except ValueError:
        return
    assert isinstance(stats, dict), stats


DEEP_JSON = "[" * 100_000 + "]" * 100_000


def _deep_answer() -> None:
    parse_answer('{"caption": "x", "attributes": ' + DEEP_JSON + "}", 100)


def _deep_marker(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text(DEEP_JSON)
    read_marker(tmp_path / "m.json")


def _deep_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(DEEP_JSON)
    read_manifest(Storage(str(tmp_path), StorageOptions(progress=False, attempts=1)))


def _deep_sizes(tmp_path: Path) -> None:
    expand_with_sizes(DEEP_JSON.encode())


@pytest.mark.parametrize("read", ["answer", "marker", "manifest", "sizes"])
def test_deeply_nested_json(read, tmp_path):
    if read == "answer":
        try:
            _deep_answer()
        except InvalidAnswer:
            return
    else:
        reader = {"marker": _deep_marker, "manifest": _deep_manifest, "sizes": _deep_sizes}[read]
        try:
            reader(tmp_path)
        except FILE_ERRORS:
            return


def test_eval_data_refuses_deeply_nested_manifests(tmp_path):
    """pydantic's own JSON parser bounds its depth: the evaluator's manifest reader is safe."""
    (tmp_path / "manifest.json").write_text(DEEP_JSON)
    with pytest.raises(ValidationError):
        EvalData(str(tmp_path), StorageOptions(progress=False, attempts=1))
