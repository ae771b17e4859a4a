"""Evaluation records: what ``facemllm eval`` writes for each model it scores.

A ``Prediction`` is one question answered by one model, with the reply as received and what the
parser made of it; an ``EvalResult`` holds every task's metrics with bootstrap confidence
intervals, the model's identity, the decoding settings and the hash of the data it was scored on,
so two results are comparable exactly when their ``data.data_hash`` values are equal.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from facemllm.schemas.qa import AnswerStyle, JoinedList, QATask, SourceDataset
from facemllm.schemas.records import Record, StrictModel

EvalTask = Literal["celeba_attributes", "expression", "age", "gender", "race", "zeroshot_attributes"]
EVAL_TASKS: tuple[EvalTask, ...] = (
    "celeba_attributes",
    "expression",
    "age",
    "gender",
    "race",
    "zeroshot_attributes",
)

ParseStatus = Literal[
    "parsed",
    "unparsed",  # the reply says nothing the parser can read as an answer: counted as wrong
    "failed_request",  # no reply (the server failed after retries): counted as wrong
]


class Prediction(Record):
    """One question, one model: a line of ``RESULTS/<model>/predictions.jsonl``."""

    key: str
    task: EvalTask
    dataset: SourceDataset
    split: str
    qa_task: QATask
    answer_style: AnswerStyle
    image: str = Field(description="the sample's source image, as in its QASample")
    shard: str = Field(description="the shard holding the sample, relative to the data folder")
    question: str
    expected: str = Field(description="the reference reply")
    truth: JoinedList = Field(description="the sample's label.truth; '|'-joined in JSON")
    asked: str = Field("", description="the sample's label.asked")
    options: JoinedList = Field(default_factory=list, description="the sample's label.options")
    groups: dict[str, str] = Field(
        default_factory=dict,
        description="perceived gender, race, age band of the image, from its other samples",
    )
    reply: str | None = Field(description="the model's reply as received; None when the request failed")
    error: str | None = None
    status: ParseStatus
    parsed: str = Field(
        "", description="the reply as the parser read it: yes/no, letters, a category, years; '' if unparsed"
    )
    predicted: JoinedList = Field(
        default_factory=list, description="the label values the parsed reply stands for; '|'-joined in JSON"
    )
    correct: bool
    abs_error: float | None = Field(None, description="age in years: |predicted - true|")


class Estimate(StrictModel):
    """A metric's value with a percentile bootstrap interval (images resampled with replacement)."""

    value: float | None = Field(description="None when nothing was scored")
    low: float | None = None
    high: float | None = None
    n: int = Field(description="samples (or attribute decisions) the value is computed from")


class ConfusionMatrix(StrictModel):
    title: str
    labels: list[str] = Field(description="true classes (rows); columns are these plus 'unparsed'")
    counts: list[list[int]]


class WorstExample(StrictModel):
    key: str
    why: str = Field(description="failed request, unparsed, wrong, or the age error")


class TaskResult(StrictModel):
    task: EvalTask
    title: str
    headline: str = Field(description="the name of the task's main metric in ``metrics``")
    samples: int
    unparsed: int
    failed_requests: int
    metrics: dict[str, Estimate]
    by_style: dict[str, Estimate] = Field(description="accuracy per answer style")
    by_dataset: dict[str, Estimate] = Field(description="accuracy per source dataset")
    per_class: dict[str, Estimate] = Field(description="accuracy per true class (per attribute for CelebA)")
    by_group: dict[str, dict[str, Estimate]] = Field(
        default_factory=dict, description="accuracy per perceived group of another label of the same image"
    )
    confusion: list[ConfusionMatrix] = Field(default_factory=list)
    worst: list[WorstExample] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class ModelInfo(StrictModel):
    label: str
    kind: Literal["checkpoint", "endpoint"]
    target: str = Field(description="checkpoint folder, or the endpoint as scheme://host:port")
    served_model: str | None = None
    identity: str = Field(
        description="hash of what decides the replies: weights and config, or server and name"
    )


class DataInfo(StrictModel):
    root: str
    splits: list[str] = Field(description="the dataset/split pairs scored, e.g. celeba/test, celeba/zeroshot")
    manifests: dict[str, str] = Field(description="dataset -> sha256 of its qa manifest.json")
    data_hash: str = Field(description="one hash of the manifests and the sample selection")
    max_samples_per_task: int | None = None
    seed: int


class EvalResult(Record):
    """``RESULTS/<model>/result.json``: one model's scores on the selected tasks."""

    model: ModelInfo
    data: DataInfo
    generation: dict[str, object] = Field(description="decoding settings every request used")
    bootstrap: dict[str, object] = Field(description="resamples, confidence, seed, unit")
    parser_version: str
    tasks: dict[str, TaskResult]
    package_versions: dict[str, str] = Field(default_factory=dict)


EVALUATION_RECORDS: tuple[type[BaseModel], ...] = (Prediction, EvalResult)
