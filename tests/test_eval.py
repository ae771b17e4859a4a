"""The evaluator's parts without a model: answer parsing over a table of tricky replies, metrics
against hand-computed values, the bootstrap, configs, the command line and the reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facemllm.evaluation.config import EvalConfig, ModelSpec
from facemllm.evaluation.metrics import Bootstrap, score_task
from facemllm.evaluation.report import write_comparison, write_model_report
from facemllm.evaluation.tasks import TASKS, judge
from facemllm.pipeline.cli import main
from facemllm.schemas import QALabel, QASample, Turn
from facemllm.schemas.evaluation import DataInfo, EvalResult, ModelInfo, Prediction

EXPRESSION_OPTIONS = ["happiness", "fear", "anger", "neutral"]
SELECTION_OPTIONS = ["Bald", "Smiling", "Eyeglasses", "Male", "Young"]


def sample(dataset, task, style, truth, options=(), asked="") -> QASample:
    return QASample(
        key="k",
        image="i.jpg",
        dataset=dataset,
        split="test",
        task=task,
        answer_style=style,
        template_id=f"{task}/{style}/0",
        conversations=[Turn(speaker="human", value="<image>\nQ?"), Turn(speaker="gpt", value="A")],
        label=QALabel(answer="A", truth=list(truth), asked=asked, options=list(options)),
    )


YES_NO = sample("celeba", "attribute", "yes_no", ["Smiling"], asked="Smiling")
ONE_LETTER = sample("rafdb", "expression", "multiple_choice", ["fear"], EXPRESSION_OPTIONS)
LETTERS = sample("celeba", "attribute_selection", "multiple_choice", ["Smiling", "Male"], SELECTION_OPTIONS)
EXPRESSION = sample("rafdb", "expression", "open", ["happiness"])
RACE = sample("fairface", "race", "open", ["Southeast Asian"])
GENDER = sample("utkface", "gender", "open", ["female"])
AGE = sample("utkface", "age", "open", ["34"])
AGE_BAND = sample("utkface", "age_band", "open", ["20-29"])

# (sample, reply, what the parser must read ('' = unparsed), whether it is right)
TRICKY_REPLIES = [
    (YES_NO, "Yes", "yes", True),
    (YES_NO, "yes.", "yes", True),
    (YES_NO, "Yes, the person is smiling.", "yes", True),
    (YES_NO, "**No**", "no", False),
    (YES_NO, "Answer: no", "no", False),
    (YES_NO, "The answer is yes", "yes", True),
    (YES_NO, "True", "yes", True),
    (YES_NO, "Nope", "no", False),
    (YES_NO, "Yes or no", "", False),
    (YES_NO, "I think so", "", False),
    (YES_NO, "Not sure", "", False),
    (YES_NO, "", "", False),
    (ONE_LETTER, "B", "B", True),
    (ONE_LETTER, "(b)", "B", True),
    (ONE_LETTER, "B.", "B", True),
    (ONE_LETTER, "Option B", "B", True),
    (ONE_LETTER, "Answer: B", "B", True),
    (ONE_LETTER, "B. Fear", "B", True),
    (ONE_LETTER, "b) fear", "B", True),
    (ONE_LETTER, "B. Happiness", "", False),  # the letter and its text disagree
    (ONE_LETTER, "A person with a calm face", "D", False),  # not option A: it names neutral
    (ONE_LETTER, "A person", "", False),
    (ONE_LETTER, "E", "", False),  # no option E
    (ONE_LETTER, "Happy", "A", False),
    (ONE_LETTER, "scared", "B", True),
    (ONE_LETTER, "fear or anger", "", False),
    (LETTERS, "B, D", "B, D", True),
    (LETTERS, "D and B", "B, D", True),
    (LETTERS, "b d", "B, D", True),
    (LETTERS, "B", "B", False),
    (LETTERS, "None", "None", False),
    (LETTERS, "B, Z", "", False),
    (LETTERS, "A person smiling", "", False),
    (EXPRESSION, "The facial expression shows happiness.", "happiness", True),
    (EXPRESSION, "happy", "happiness", True),
    (EXPRESSION, "Joy", "happiness", True),
    (EXPRESSION, "unhappy", "sadness", False),
    (EXPRESSION, "not happy", "", False),
    (EXPRESSION, "happy or sad", "", False),
    (EXPRESSION, "I can't tell", "", False),
    (EXPRESSION, "A neutral expression", "neutral", False),
    (RACE, "Southeast Asian", "Southeast Asian", True),
    (RACE, "The person appears to be East Asian.", "East Asian", False),
    (RACE, "Asian", "", False),  # FairFace has no plain Asian
    (RACE, "latino", "Latino_Hispanic", False),
    (GENDER, "a woman", "female", True),
    (GENDER, "Female.", "female", True),
    (GENDER, "male", "male", False),
    (GENDER, "man or woman", "", False),
    (AGE, "34", "34", True),
    (AGE, "The person appears to be about 30 years old.", "30", True),
    (AGE, "25-35", "30", True),
    (AGE, "thirty-four", "34", True),
    (AGE, "in their thirties", "34.5", True),
    (AGE, "about 40", "40", False),
    (AGE, "30 or 40", "", False),
    (AGE, "not sure", "", False),
    (AGE, "6 months old", "0.5", False),
    (AGE_BAND, "between 20 and 29 years old", "20-29", True),
    (AGE_BAND, "25", "20-29", True),
    (AGE_BAND, "in their twenties", "20-29", True),
    (AGE_BAND, "25-35", "", False),  # spans two bands
    (AGE_BAND, "more than 70", "more than 70", False),
    (AGE_BAND, "over 60", "", False),
]


@pytest.mark.parametrize(("qa", "reply", "parsed", "correct"), TRICKY_REPLIES)
def test_parser_reads_only_stated_answers(qa, reply, parsed, correct):
    verdict = judge(qa, reply)
    assert verdict.parsed == parsed
    assert verdict.status == ("parsed" if parsed else "unparsed")
    assert verdict.correct is correct


def test_age_error_is_measured_from_the_middle_of_a_range():
    assert judge(AGE, "25-35").abs_error == 4
    assert judge(AGE, "in their thirties").abs_error == 0.5
    assert judge(AGE_BAND, "25").abs_error is None


# --- metrics ---------------------------------------------------------------------------------------


def prediction(key, task, qa_task, style, truth, correct, status="parsed", **fields) -> Prediction:
    dataset = {"expression": "rafdb", "celeba_attributes": "celeba", "gender": "utkface", "age": "utkface"}[
        task
    ]
    values = dict(
        key=key,
        task=task,
        dataset=dataset,
        split="test",
        qa_task=qa_task,
        answer_style=style,
        image=fields.pop("image", f"{key}.jpg"),
        shard=f"{dataset}/test/00000.tar",
        question="Q?",
        expected="A",
        truth=truth,
        reply=None if status == "failed_request" else "reply",
        status=status,
        correct=correct,
    )
    return Prediction(**{**values, **fields})


def score(task, predictions, resamples=200, seed=0):
    return score_task(TASKS[task], predictions, resamples, 0.95, seed, worst=3)


def test_expression_accuracy_per_class_style_and_confusion_by_hand():
    predictions = [
        prediction("a", "expression", "expression", "open", ["happiness"], True, predicted=["happiness"]),
        prediction("b", "expression", "expression", "multiple_choice", ["fear"], False, predicted=["anger"]),
        prediction("c", "expression", "expression", "open", ["fear"], False, status="unparsed"),
        prediction("d1", "expression", "expression", "yes_no", ["neutral"], True, image="d.jpg"),
        prediction("d2", "expression", "expression", "yes_no", ["neutral"], False, image="d.jpg"),
    ]
    result = score("expression", predictions)
    assert result.metrics["accuracy"].value == pytest.approx(2 / 5)
    assert result.metrics["unparsed_rate"].value == pytest.approx(1 / 5)
    assert {k: v.value for k, v in result.per_class.items()} == {
        "fear": 0.0,
        "happiness": 1.0,
        "neutral": 0.5,
    }
    assert {k: v.value for k, v in result.by_style.items()} == {
        "multiple_choice": 0.0,
        "open": 0.5,
        "yes_no": 0.5,
    }
    assert result.samples == 5 and result.unparsed == 1
    (matrix,) = result.confusion
    rows = dict(zip(matrix.labels, matrix.counts, strict=True))
    columns = [*matrix.labels, "unparsed"]
    assert rows["happiness"][columns.index("happiness")] == 1
    assert rows["fear"][columns.index("anger")] == 1 and rows["fear"][columns.index("unparsed")] == 1
    assert sum(map(sum, matrix.counts)) == 3  # yes/no replies name no class
    assert [w.key for w in result.worst] == ["c", "b", "d2"]  # unparsed first, then wrong ones


def test_celeba_mean_accuracy_counts_yes_no_and_selection_decisions():
    predictions = [
        prediction(
            "y1",
            "celeba_attributes",
            "attribute",
            "yes_no",
            ["Smiling"],
            True,
            asked="Smiling",
            image="p.jpg",
        ),
        prediction("y2", "celeba_attributes", "attribute", "yes_no", [], False, asked="Bald", image="p.jpg"),
        prediction(
            "s1",
            "celeba_attributes",
            "attribute_selection",
            "multiple_choice",
            ["Male"],
            False,
            options=["Smiling", "Male", "Young"],
            predicted=["Male", "Young"],
            image="q.jpg",
        ),
        prediction(
            "s2",
            "celeba_attributes",
            "attribute_selection",
            "multiple_choice",
            ["Bald"],
            False,
            status="unparsed",
            options=["Bald", "Young"],
            image="r.jpg",
        ),
    ]
    result = score("celeba_attributes", predictions)
    # Smiling 2/2, Bald 0/2 (a wrong yes; the unparsed selection), Male 1/1, Young 0/2
    assert {k: v.value for k, v in result.per_class.items()} == {
        "Bald": 0.0,
        "Male": 1.0,
        "Smiling": 1.0,
        "Young": 0.0,
    }
    assert result.metrics["mean_accuracy"].value == pytest.approx(0.5)
    assert result.metrics["mean_accuracy"].n == 7
    assert result.metrics["accuracy"].value == pytest.approx(1 / 4)
    assert result.confusion == []


def test_age_mae_band_accuracy_and_groups_by_hand():
    predictions = [
        prediction("a", "age", "age", "open", ["34"], True, abs_error=4.0, groups={"gender": "male"}),
        prediction("b", "age", "age", "open", ["20"], False, abs_error=15.0, groups={"gender": "female"}),
        prediction("c", "age", "age", "open", ["50"], False, status="unparsed", groups={"gender": "female"}),
        prediction(
            "d", "age", "age_band", "open", ["20-29"], True, predicted=["20-29"], groups={"gender": "female"}
        ),
    ]
    result = score("age", predictions)
    assert result.headline == "mae"
    assert result.metrics["mae"].value == pytest.approx(9.5) and result.metrics["mae"].n == 2
    assert result.metrics["band_accuracy"].value == pytest.approx(0.5)
    assert result.metrics["unparsed_rate"].value == pytest.approx(0.25)
    assert {k: v.value for k, v in result.by_group["gender"].items()} == {
        "female": pytest.approx(1 / 3),
        "male": 1.0,
    }
    assert result.per_class["30-39"].value == 1.0 and result.per_class["20-29"].value == 0.5
    assert result.worst[0].key == "c" and result.worst[1].why.startswith("off by 15 years")


def test_failed_requests_count_as_wrong_and_are_reported():
    predictions = [
        prediction("a", "gender", "gender", "open", ["male"], True, predicted=["male"]),
        prediction(
            "b", "gender", "gender", "open", ["male"], False, status="failed_request", error="server_error"
        ),
    ]
    result = score("gender", predictions)
    assert result.metrics["accuracy"].value == 0.5 and result.failed_requests == 1
    assert result.worst[0].why.startswith("request failed")


def test_bootstrap_interval_matches_the_binomial_width_and_resamples_images():
    rng = np.random.default_rng(1)
    outcomes = rng.random(400) < 0.5
    independent = Bootstrap([str(i) for i in range(400)], 2000, 0.95, seed=0)
    independent.add("accuracy", outcomes.astype(float), [True] * 400)
    estimate = independent.estimates()["accuracy"]
    assert estimate.low < estimate.value < estimate.high
    expected_width = 2 * 1.96 * np.sqrt(0.25 / 400)  # about 0.098
    assert 0.8 * expected_width < estimate.high - estimate.low < 1.2 * expected_width
    # the same outcomes as 200 images asked twice each (the two answers agree): a wider interval
    clustered = Bootstrap([str(i // 2) for i in range(400)], 2000, 0.95, seed=0)
    clustered.add("accuracy", np.repeat(outcomes[:200], 2).astype(float), [True] * 400)
    wide = clustered.estimates()["accuracy"]
    assert (wide.high - wide.low) > 1.25 * (estimate.high - estimate.low)
    # seeded: the same seed gives the same interval
    again = Bootstrap([str(i) for i in range(400)], 2000, 0.95, seed=0)
    again.add("accuracy", outcomes.astype(float), [True] * 400)
    assert again.estimates()["accuracy"] == estimate


def test_bootstrap_of_one_image_is_a_point_and_of_nothing_is_none():
    single = Bootstrap(["a", "a"], 100, 0.95, seed=0)
    single.add("accuracy", [1.0, 0.0], [True, True])
    single.add("empty", [1.0, 0.0], [False, False])
    found = single.estimates()
    assert (found["accuracy"].value, found["accuracy"].low, found["accuracy"].high) == (0.5, 0.5, 0.5)
    assert found["empty"].value is None and found["empty"].n == 0


# --- config, command line, reports -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "label", "checkpoint", "endpoint", "model"),
    [
        ("/runs/stage3/final", "stage3-final", "/runs/stage3/final", None, None),
        ("mine=/runs/x", "mine", "/runs/x", None, None),
        (
            "http://gpu:8000/v1#Qwen/Qwen2-VL-7B",
            "Qwen_Qwen2-VL-7B",
            None,
            "http://gpu:8000/v1",
            "Qwen/Qwen2-VL-7B",
        ),
        ("served=http://gpu:8000/v1", "served", None, "http://gpu:8000/v1", None),
    ],
)
def test_model_specs(spec, label, checkpoint, endpoint, model):
    parsed = ModelSpec.parse(spec)
    assert (parsed.label, parsed.checkpoint, parsed.endpoint, parsed.model) == (
        label,
        checkpoint,
        endpoint,
        model,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "D", "--out", "O"], "models"),
        (["--model", "/m", "--data", "D", "--out", "O", "--tasks", "celeba,mood"], "tasks"),
        (["--model", "a=/m", "--model", "a=/n", "--data", "D", "--out", "O"], "share a label"),
        (["--model", "/m", "--data", "D", "--out", "s3://bucket/results"], "local folder"),
        (["--model", "/m", "--data", "{tmp}", "--out", "O"], "none of the tasks"),
    ],
)
def test_bad_eval_settings_stop_before_any_work(args, message, tmp_path, capsys):
    assert main(["eval", *(a.format(tmp=tmp_path) for a in args)]) == 2
    assert message in capsys.readouterr().err


def test_eval_config_reads_all_and_comma_lists():
    common = dict(data="D", out="O", models=[ModelSpec.parse("/m")])
    assert EvalConfig(tasks="all", **common).tasks == list(TASKS)
    assert EvalConfig(tasks="age,gender", **common).tasks == ["age", "gender"]


def result_for(label: str, data_hash: str, predictions: list[Prediction]) -> EvalResult:
    return EvalResult(
        model=ModelInfo(label=label, kind="checkpoint", target="/m", identity="x"),
        data=DataInfo(root="D", splits=["utkface/test"], manifests={}, data_hash=data_hash, seed=0),
        generation={"do_sample": False},
        bootstrap={"resamples": 50, "confidence": 0.9},
        parser_version="1",
        tasks={"gender": score("gender", predictions, resamples=50)},
    )


def test_reports_and_a_comparison_that_keeps_other_data_apart(tmp_path):
    predictions = [
        prediction("a", "gender", "gender", "open", ["male"], True, predicted=["male"]),
        prediction("b", "gender", "gender", "multiple_choice", ["female"], False, predicted=["male"]),
    ]
    for label, data_hash in (("one", "h1"), ("two", "h1"), ("three", "h2")):
        result = result_for(label, data_hash, predictions)
        (tmp_path / label).mkdir()
        (tmp_path / label / "result.json").write_text(result.model_dump_json())
    write_model_report(tmp_path / "one", result_for("one", "h1", predictions), predictions, {})
    assert "| gender | accuracy | 0.500 [" in (tmp_path / "one" / "results.md").read_text()
    page = (tmp_path / "one" / "report.html").read_text()
    assert "confusion" in page and "worst examples" in page and "b (utkface/test" in page
    write_comparison(tmp_path)
    comparison = (tmp_path / "comparison.md").read_text()
    assert comparison.count("| task | metric |") == 2
    assert "| task | metric | one | two |" in comparison and "| task | metric | three |" in comparison
    assert "90% bootstrap" in comparison
    assert set(json.loads((tmp_path / "comparison.json").read_text())) == {"h1", "h2"}


def test_example_config_is_valid():
    from facemllm.evaluation.config import load_eval_config
    from tests.eval_fixture import REPO

    config = load_eval_config(REPO / "configs" / "eval.yaml", ["max_samples_per_task=100"])
    assert [m.label for m in config.models] == ["ours-stage3", "general-mllm"]
    assert config.max_samples_per_task == 100 and config.client.concurrency == 16
