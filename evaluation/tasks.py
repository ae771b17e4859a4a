"""The face perception tasks: which QA samples each one scores, and how one reply is judged.

| task | samples (dataset: QA tasks) | headline |
|---|---|---|
| ``celeba_attributes`` | CelebA test: ``attribute`` (yes/no), ``attribute_selection`` (letters) | mean accuracy over attributes |
| ``expression`` | RAF-DB test: ``expression`` | accuracy |
| ``age`` | UTKFace test: ``age`` (years), ``age_band``; FairFace val: ``age_band`` | MAE (years) |
| ``gender`` | UTKFace test, FairFace val: ``gender`` | accuracy |
| ``race`` | UTKFace test, FairFace val: ``race`` (each dataset's categories) | accuracy |
| ``zeroshot_attributes`` | CelebA zeroshot: ``attribute`` about held-out attributes | mean accuracy over attributes |

CelebA's attribute accuracy counts *decisions*: a yes/no reply decides one attribute, a "which
are present" reply decides every listed option (a letter listed = present). CelebA's free-form
descriptions (``attribute_description``) are not scored: a sentence's omissions are not decisions.
The label spaces come from the reformatters that wrote the samples, so the parser knows every
option text the questions show; synonyms are added here.
"""

from __future__ import annotations

from dataclasses import dataclass

from facemllm.evaluation.parsing import (
    AgeReading,
    Vocabulary,
    parse_age,
    parse_letter,
    parse_letters,
    parse_yes_no,
)
from facemllm.reformatters.demographics import AGE_BANDS, GENDERS
from facemllm.reformatters.fairface import RACES as FAIRFACE_RACES
from facemllm.reformatters.qa import LabelSpace
from facemllm.reformatters.rafdb import EXPRESSIONS
from facemllm.reformatters.utkface import RACES as UTKFACE_RACES
from facemllm.schemas import QASample, QATask, SourceDataset
from facemllm.schemas.evaluation import EvalTask, ParseStatus
from facemllm.schemas.vocab import AGE_BAND_BOUNDS, OLDEST_AGE_BAND, OPTION_LETTERS, age_band

ZERO_SHOT_SPLIT = "zeroshot"  # CelebA's split of questions about held-out attributes


@dataclass(frozen=True)
class TaskSpec:
    name: EvalTask
    title: str
    sources: tuple[tuple[SourceDataset, tuple[QATask, ...]], ...]
    headline: str
    zero_shot: bool = False  # reads CelebA's zeroshot split instead of its evaluation split
    notes: tuple[str, ...] = ()

    def accepts(self, sample: QASample) -> bool:
        return any(sample.dataset == d and sample.task in tasks for d, tasks in self.sources)


TASKS: dict[EvalTask, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "celeba_attributes",
            "CelebA attribute recognition",
            (("celeba", ("attribute", "attribute_selection")),),
            "mean_accuracy",
            notes=(
                "mean_accuracy: per attribute, the share of right decisions (a yes/no reply decides the "
                "asked attribute, a selection reply each listed option), averaged over attributes",
                "attribute_description samples (free-form descriptions) are not scored",
                "the attributes held out of training (qa.celeba.zero_shot_attributes) are never asked in "
                "train/val/test: they are scored by zeroshot_attributes",
            ),
        ),
        TaskSpec("expression", "RAF-DB expression recognition", (("rafdb", ("expression",)),), "accuracy"),
        TaskSpec(
            "age",
            "Age estimation (UTKFace years; UTKFace and FairFace bands)",
            (("utkface", ("age", "age_band")), ("fairface", ("age_band",))),
            "mae",
            notes=(
                "mae: mean |predicted - true| years over parsed replies to age questions (unparsed "
                "replies are left out of it and counted in unparsed_rate)",
                "band_accuracy: the reply's age band (FairFace's bins) is the true one, over age and "
                "age band questions; unparsed replies count as wrong",
            ),
        ),
        TaskSpec(
            "gender",
            "Gender recognition (perceived)",
            (("utkface", ("gender",)), ("fairface", ("gender",))),
            "accuracy",
        ),
        TaskSpec(
            "race",
            "Race recognition (perceived)",
            (("utkface", ("race",)), ("fairface", ("race",))),
            "accuracy",
        ),
        TaskSpec(
            "zeroshot_attributes",
            "Zero-shot facial attribute analysis (held-out CelebA attributes)",
            (("celeba", ("attribute",)),),
            "mean_accuracy",
            zero_shot=True,
        ),
    )
}


def _vocabulary(space: LabelSpace, synonyms: dict[str, tuple[str, ...]]) -> Vocabulary:
    return Vocabulary(
        {
            c.value: (c.value, c.option, c.phrase, *synonyms.get(c.value, ()))
            for c in space.categories.values()
        }
    )


EXPRESSION_SYNONYMS = {
    "surprise": ("surprised", "astonished", "astonishment", "amazed", "shocked", "shock"),
    "fear": ("fearful", "afraid", "scared", "frightened", "terrified", "fright"),
    "disgust": ("disgusted", "revulsion", "repulsed"),
    "happiness": ("happy", "joy", "joyful", "smiling", "smile", "cheerful", "delighted"),
    "sadness": ("sad", "unhappy", "sorrow", "sorrowful", "upset"),
    "anger": ("angry", "mad", "furious", "rage", "annoyed"),
    "neutral": ("neutral expression", "no expression", "expressionless", "calm", "blank expression"),
}
GENDER_SYNONYMS = {
    "male": ("man", "men", "boy", "masculine", "guy", "gentleman"),
    "female": ("woman", "women", "girl", "feminine", "lady"),
}
UTKFACE_RACE_SYNONYMS = {
    "white": ("caucasian", "european"),
    "black": ("african", "african american"),
    "asian": ("east asian", "southeast asian", "south east asian"),
    "indian": ("south asian",),
    "other": ("another race", "other race", "hispanic", "latino", "middle eastern"),
}
FAIRFACE_RACE_SYNONYMS = {
    "White": ("caucasian", "european"),
    "Black": ("african", "african american"),
    "Latino_Hispanic": ("latino", "latina", "hispanic", "latinx"),
    "East Asian": ("east-asian",),
    "Southeast Asian": ("south east asian", "south-east asian"),
    "Indian": ("south asian",),
    "Middle Eastern": ("arab", "middle-eastern"),
}

VOCABULARIES: dict[tuple[SourceDataset, QATask], Vocabulary] = {
    ("rafdb", "expression"): _vocabulary(EXPRESSIONS, EXPRESSION_SYNONYMS),
    ("utkface", "gender"): _vocabulary(GENDERS, GENDER_SYNONYMS),
    ("fairface", "gender"): _vocabulary(GENDERS, GENDER_SYNONYMS),
    ("utkface", "race"): _vocabulary(UTKFACE_RACES, UTKFACE_RACE_SYNONYMS),
    ("fairface", "race"): _vocabulary(FAIRFACE_RACES, FAIRFACE_RACE_SYNONYMS),
    ("utkface", "age_band"): _vocabulary(AGE_BANDS, {}),
    ("fairface", "age_band"): _vocabulary(AGE_BANDS, {}),
}


def label_class(qa_task: QATask, truth: list[str]) -> str:
    """The class a label names: its value, or for an age in years its band."""
    return age_band(int(truth[0])) if qa_task == "age" else truth[0]


def band_of(reading: AgeReading) -> str | None:
    """The age band holding the whole interval, or None when it spans bands."""
    low_band = age_band(int(reading.low))
    if reading.high == float("inf"):
        return OLDEST_AGE_BAND if reading.low >= AGE_BAND_BOUNDS[-1][1] + 1 else None
    return low_band if age_band(int(reading.high)) == low_band else None


@dataclass(frozen=True)
class Judgement:
    """What one reply means for its sample."""

    status: ParseStatus
    parsed: str = ""
    predicted: tuple[str, ...] = ()  # label values the reply stands for
    correct: bool = False
    abs_error: float | None = None


UNPARSED = Judgement("unparsed")


def judge(sample: QASample, reply: str) -> Judgement:
    """Parse ``reply`` by the sample's answer style and task, and score it against the sample's label."""
    label = sample.label
    truth = set(label.truth)
    if sample.answer_style == "yes_no":
        said = parse_yes_no(reply)
        if said is None:
            return UNPARSED
        return Judgement(
            "parsed", "yes" if said else "no", (label.asked,) if said else (), said == (label.asked in truth)
        )
    if sample.answer_style == "multiple_choice" and sample.task == "attribute_selection":
        chosen = parse_letters(reply, label.options)
        if chosen is None:
            return UNPARSED
        values = tuple(label.options[i] for i in sorted(chosen))
        parsed = ", ".join(OPTION_LETTERS[i] for i in sorted(chosen)) or "None"
        return Judgement("parsed", parsed, values, set(values) == truth)
    if sample.task != "age" and (sample.dataset, sample.task) not in VOCABULARIES:
        raise ValueError(f"no parser for {sample.answer_style} {sample.task} questions of {sample.dataset}")
    vocabulary = VOCABULARIES.get((sample.dataset, sample.task))
    if sample.answer_style == "multiple_choice":
        index = parse_letter(reply, label.options, vocabulary)
        if index is None:
            return UNPARSED
        value = label.options[index]
        return Judgement("parsed", OPTION_LETTERS[index], (value,), value in truth)
    if sample.task in ("age", "age_band"):
        reading = parse_age(reply)
        if reading is None:
            return UNPARSED
        if sample.task == "age_band":
            band = band_of(reading)
            if band is None:
                return UNPARSED
            return Judgement("parsed", band, (band,), band in truth)
        years = float(label.truth[0])
        predicted = age_band(int(reading.point))
        return Judgement(
            "parsed",
            f"{reading.point:g}",
            (predicted,),
            predicted == age_band(int(years)),
            abs(reading.point - years),
        )
    value = vocabulary.match(reply)
    if value is None:
        return UNPARSED
    return Judgement("parsed", value, (value,), value in truth)


def class_order(dataset: SourceDataset, spec: TaskSpec) -> list[str]:
    """The classes of a task in one dataset, in the label space's order (confusion matrix rows)."""
    if spec.name == "age":
        return list(AGE_BANDS.values)
    qa_task = next(tasks[0] for d, tasks in spec.sources if d == dataset)
    return list(VOCABULARIES[(dataset, qa_task)].names)
