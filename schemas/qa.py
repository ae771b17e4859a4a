"""Question-answer records: what the reformatters write into ``qa/<dataset>/<split>/`` shards.

A shard sample is one source image with all its questions (``QAImageSample``): the image is stored
once, its questions form one multi-turn LLaVA conversation that a trainer consumes whole, and each
question keeps the structured label an evaluator scores a reply against (``QAQuestion``). The
evaluator and reports see one question at a time (``QASample``, which is also how shards written
before this layout stored them: ``read_qa_samples`` reads both).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import from_json

from facemllm.schemas.records import Record, StrictModel

IMAGE_TOKEN = "<image>"  # LLaVA's placeholder for the image, leading the first human turn

SourceDataset = Literal["celeba", "rafdb", "utkface", "fairface"]

QATask = Literal[
    "attribute",  # CelebA: is one named attribute present (yes/no)
    "attribute_selection",  # CelebA: which of the listed attributes are present (letters)
    "attribute_description",  # CelebA: a sentence composed of the present attributes
    "expression",  # RAF-DB: one of the 7 basic expressions
    "age",  # UTKFace: perceived age in years
    "age_band",  # UTKFace, FairFace: perceived age band (FairFace's bins)
    "gender",  # UTKFace, FairFace: perceived gender
    "race",  # UTKFace, FairFace: perceived race (each dataset's own categories)
]

AnswerStyle = Literal["open", "multiple_choice", "yes_no"]

ReformatOutcome = Literal[
    "ok",
    "bad_header",  # the label file's header differs from the dataset's, so no column can be trusted
    "wrong_column_count",
    "unknown_label",  # a value outside the dataset's label space
    "bad_name",  # a file name that does not follow the dataset's naming scheme
    "duplicate",  # an image already listed on an earlier row
    "no_split",  # no official split for the image (e.g. absent from CelebA's partition file)
    "missing_image",
    "unreadable_image",
    "no_face",  # face re-detection was asked for and found none
]


class Turn(StrictModel):
    """One LLaVA conversation turn, serialised with LLaVA's own key ``from``."""

    model_config = ConfigDict(serialize_by_alias=True, validate_by_name=True)
    speaker: Literal["human", "gpt"] = Field(alias="from")
    value: str


LIST_SEPARATOR = "|"


def _split_joined(value: object) -> object:
    if isinstance(value, str):
        return value.split(LIST_SEPARATOR) if value else []
    return value


def _no_separator(values: list[str]) -> list[str]:
    if any(LIST_SEPARATOR in value for value in values):
        raise ValueError(f"label values cannot contain {LIST_SEPARATOR!r}: {values}")
    return values


JoinedList = Annotated[
    list[str],
    BeforeValidator(_split_joined),
    AfterValidator(_no_separator),
    PlainSerializer(LIST_SEPARATOR.join, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "description": f"values joined by {LIST_SEPARATOR!r}"}),
]
"""A list in Python, one ``|``-joined string in JSON: every sample's JSON then has the same types,
which Hugging Face's webdataset loader needs (it infers one schema from the first few samples, and
an empty list or a null there cannot hold the strings of a later sample)."""


class QALabel(StrictModel):
    """What an evaluator scores against. Every field has one type in every sample (see JoinedList).

    ``truth`` holds the label values that are true among those the question concerns: the one
    category (``["fear"]``, ``["20-29"]``), the age in years (``["34"]``), the present attributes
    (description, selection), or, for a yes/no attribute question, ``[attribute]`` or ``[]``.
    A yes/no answer is Yes exactly when ``asked`` is in ``truth``; a multiple-choice answer is the
    letters of the ``options`` that are in ``truth``.
    """

    answer: str = Field(description="the correct reply, exactly as in the gpt turn")
    truth: JoinedList = Field(description="true label values (dataset vocabulary); '|'-joined in JSON")
    asked: str = Field("", description="the attribute or category a yes/no question proposes, else ''")
    options: JoinedList = Field(
        default_factory=list, description="multiple-choice option values in letter order; '|'-joined in JSON"
    )


class QASample(Record):
    """One question about one face image, as the evaluator scores it (and as shards written before
    ``QAImageSample`` stored each question, image included)."""

    key: str
    image: str = Field(description="source image path, relative to the dataset's image base folder")
    dataset: SourceDataset
    split: str = Field(description="train, val, test, or zeroshot (CelebA's held-out attributes)")
    task: QATask
    answer_style: AnswerStyle
    template_id: str = Field(description="task/style/question index[-instruction index]")
    conversations: list[Turn]
    label: QALabel


class QAQuestion(StrictModel):
    """One question of a ``QAImageSample``: what scoring it needs besides its two turns."""

    key: str = Field(description="the question's own key, {image sample key}_{NN}")
    task: QATask
    answer_style: AnswerStyle
    template_id: str = Field(description="task/style/question index[-instruction index]")
    label: QALabel


def merge_turns(conversations: list[list[Turn]]) -> list[Turn]:
    """One-question conversations (``<image>`` + question, answer) -> one multi-turn conversation
    in which ``<image>`` leads only the first question."""
    merged: list[Turn] = []
    for i, (question, answer) in enumerate(conversations):
        text = question.value if i == 0 else question.value.removeprefix(f"{IMAGE_TOKEN}\n")
        merged += [Turn(speaker="human", value=text), answer]
    return merged


def split_turns(conversations: list[Turn]) -> list[list[Turn]]:
    """The inverse of ``merge_turns``: each question with its answer, led by ``<image>``."""
    pairs = []
    for i in range(0, len(conversations), 2):
        question, answer = conversations[i : i + 2]
        text = question.value if i == 0 else f"{IMAGE_TOKEN}\n{question.value}"
        pairs.append([Turn(speaker="human", value=text), answer])
    return pairs


class GroupedSample(Record):
    """Every question about one image as one sample: the image is stored once, ``conversations``
    is LLaVA's multi-turn list (question i is turn 2i, the first one led by ``<image>``, its answer
    turn 2i+1) and ``questions[i]`` what scoring question i needs.

    A subclass names its one-question record (``single``); the fields it shares with it are the
    image's, the fields of its question type are each question's, so ``group`` and
    ``question_samples`` are exact inverses."""

    single: ClassVar[type[Record]]
    key: str
    conversations: list[Turn]
    questions: list

    @model_validator(mode="after")
    def _two_turns_per_question(self) -> GroupedSample:
        speakers = [turn.speaker for turn in self.conversations]
        if not self.questions or speakers != ["human", "gpt"] * len(self.questions):
            raise ValueError("conversations must be one human and one gpt turn per question")
        if any(turn.value.count(IMAGE_TOKEN) != (i == 0) for i, turn in enumerate(self.conversations)):
            raise ValueError(f"only the first turn holds {IMAGE_TOKEN}, once")
        return self

    @classmethod
    def _question_type(cls) -> type[StrictModel]:
        return cls.model_fields["questions"].annotation.__args__[0]

    @classmethod
    def _shared(cls) -> list[str]:
        return [
            name
            for name in cls.model_fields
            if name not in ("schema_version", "key", "conversations", "questions")
        ]

    @classmethod
    def group(cls, key: str, samples: list) -> GroupedSample:
        """One image's one-question samples (in order) as one sample."""
        question_type = cls._question_type()
        return cls(
            key=key,
            conversations=merge_turns([sample.conversations for sample in samples]),
            questions=[
                question_type(**{name: getattr(s, name) for name in question_type.model_fields})
                for s in samples
            ],
            **{name: getattr(samples[0], name) for name in cls._shared()},
        )

    def question_samples(self) -> list:
        """Each question on its own, exactly as ``group`` received it."""
        shared = {name: getattr(self, name) for name in self._shared()}
        return [
            self.single(**shared, **dict(question), conversations=turns)
            for question, turns in zip(self.questions, split_turns(self.conversations), strict=True)
        ]


class QAImageSample(GroupedSample):
    """Every question about one source image in one split: the ``.json`` member of a QA shard sample."""

    single: ClassVar[type[Record]] = QASample
    key: str = Field(description="{dataset}_{split}_{row:08d}")
    image: str = Field(description="source image path, relative to the dataset's image base folder")
    dataset: SourceDataset
    split: str = Field(description="train, val, test, or zeroshot (CelebA's held-out attributes)")
    conversations: list[Turn]
    questions: list[QAQuestion]


def read_qa_samples(payload: bytes | str) -> list[QASample]:
    """The questions of a QA shard sample's JSON: an image sample's, or one stored question (the
    layout before ``QAImageSample``), so datasets published either way stay readable."""
    data = from_json(payload)  # pydantic's parser: deep nesting is a ValueError, not a RecursionError
    if isinstance(data, dict) and "questions" in data:
        return QAImageSample.model_validate(data).question_samples()
    return [QASample.model_validate(data)]


class ReformatStatus(Record):
    """The fate of one input row (or file): a row of ``qa/<dataset>/status.parquet``."""

    dataset: SourceDataset
    row: int = Field(description="position in the dataset's listing; orders keys and chunks")
    source: str = Field(description="where the row came from: label file and line, or the image file")
    image: str | None = None
    split: str | None = None
    status: ReformatOutcome
    error: str | None = None
    samples: int = Field(0, description="questions written for this row (one shard sample per split)")


LaionFaceQAOutcome = Literal["success", "bad_annotation", "no_image"]


class LaionFaceQAStatus(Record):
    """The fate of one annotated face in the LAION-Face QA stage: a row of
    ``qa/_laion_face/NNNNN.parquet``."""

    key: str
    url: str | None = None
    sample_id: int | None = None
    status: LaionFaceQAOutcome
    error: str | None = None
    captions: int = Field(0, description="stage-1 caption samples written (0 or 1)")
    questions: int = Field(0, description="stage-2 VQA samples written")


QA_RECORDS: tuple[type[BaseModel], ...] = (
    Turn,
    QALabel,
    QASample,
    QAQuestion,
    QAImageSample,
    ReformatStatus,
    LaionFaceQAStatus,
)
