"""LAION-Face annotation shards -> stage-1 caption samples and stage-2 VQA samples.

Input: ``OUT/annotations/NNNNN.tar`` (per face ``KEY.jpg``, ``KEY.txt`` caption, ``KEY.json``
``FaceAnnotation``). Output, one shard per input shard and split:

- ``OUT/qa/laion_face_caption/<split>/NNNNN.tar``: one sample per face, "describe this face" ->
  the annotator's fine-grained caption (stage 1, vision-language alignment);
- ``OUT/qa/laion_face_vqa/<split>/NNNNN.tar``: one sample per face (``LaionFaceVQASample``: the crop
  once, a multi-turn conversation) of ``vqa_per_face`` questions built from the
  attribute labels (expression, perceived age and gender, hair, accessories, facial hair, head
  pose, occlusion, image quality, lighting, face shape), in open, multiple-choice and yes/no
  styles (stage 2, basic VQA). Faces annotated by the template annotator (no attributes) give
  captions only.

Each sample is ``KEY.jpg`` + ``KEY.json``: a ``LaionFaceQASample`` (caption) or ``LaionFaceVQASample``
with LLaVA ``conversations`` (what the trainer reads), the structured labels (``schemas.qa.QALabel``)
and the face's source url, licence and LAION ``SAMPLE_ID`` carried through. The split (``train`` or ``val``) is a seeded hash
of the face key, so a face and all its questions land in the same split. Randomness (question
paraphrase, tasks, styles, options) comes from a sha256 of (seed, key, purpose), never from global
state: the same inputs always give the same bytes.

The stage that writes these samples into shards, with a status row per face, completion markers
and a manifest per dataset, is ``pipeline/stages/laion_face_qa.py``.
"""

from __future__ import annotations

import hashlib
import random
from typing import ClassVar, Literal, get_args

from pydantic import Field

from facemllm.pipeline.core.config import hash_config
from facemllm.reformatters.qa import lettered
from facemllm.reformatters.templates import NO, SINGLE_CHOICE_INSTRUCTIONS, YES
from facemllm.schemas import StrictModel
from facemllm.schemas.annotation import FaceAnnotation, FaceAttributes
from facemllm.schemas.qa import IMAGE_TOKEN, AnswerStyle, GroupedSample, QALabel, Turn
from facemllm.schemas.records import Record
from facemllm.schemas.vocab import (
    AGE_BAND_BOUNDS,
    ANNOTATION_AGE_BANDS,
    BASIC_EXPRESSIONS,
    FACE_SHAPES,
    OPTION_LETTERS,
    PerceivedGender,
)

CAPTION_DATASET = "laion_face_caption"
VQA_DATASET = "laion_face_vqa"
MARKERS = "_laion_face"
Split = Literal["train", "val"]
STYLES: tuple[AnswerStyle, ...] = ("open", "multiple_choice", "yes_no")


class LaionFaceQAConfig(StrictModel):
    seed: int = 0
    vqa_per_face: int = Field(4, ge=0, le=16, description="attribute questions per face (distinct tasks)")
    answer_styles: list[AnswerStyle] = Field(list(STYLES), min_length=1)
    choices: int = Field(4, ge=2, le=8, description="options of a multiple-choice question, at most")
    val_fraction: float = Field(0.01, ge=0, le=0.5, description="faces held out (by a hash of the key)")
    min_caption_chars: int = Field(8, ge=1, description="shorter captions are skipped (counted)")

    def config_hash(self) -> str:
        return hash_config(self)


class LaionFaceQASample(Record):
    """One caption or question about one annotated LAION-Face crop (the ``.json`` member)."""

    key: str
    face_key: str = Field(description="the annotation shard's key (the face)")
    dataset: Literal["laion_face_caption", "laion_face_vqa"]
    split: Split
    task: str = Field(description="caption, or the attribute family a question asks about")
    answer_style: Literal["caption", "open", "multiple_choice", "yes_no"]
    template_id: str
    conversations: list[Turn]
    label: QALabel = Field(description="for a caption: the caption as answer, truth empty")
    url: str = Field(description="source image url")
    license: str = Field("", description="'' when unknown (one JSON type in every sample)")
    sample_id: int = Field(-1, description="LAION SAMPLE_ID, -1 when unknown")
    annotator: str = Field(description="model that wrote the caption and labels, or 'template'")


class LaionFaceQuestion(StrictModel):
    """One question of a ``LaionFaceVQASample``: what scoring it needs besides its two turns."""

    key: str = Field(description="the question's own key, {face key}-qNN")
    task: str
    answer_style: Literal["open", "multiple_choice", "yes_no"]
    template_id: str
    label: QALabel


class LaionFaceVQASample(GroupedSample):
    """Every stage-2 question about one annotated face: the ``.json`` member of a VQA shard sample
    (the crop stored once; a multi-turn conversation; a label per question)."""

    single: ClassVar[type[Record]] = LaionFaceQASample
    key: str = Field(description="the face key (the annotation shard's)")
    face_key: str
    dataset: Literal["laion_face_vqa"]
    split: Split
    conversations: list[Turn]
    questions: list[LaionFaceQuestion]
    url: str = Field(description="source image url")
    license: str = Field("", description="'' when unknown (one JSON type in every sample)")
    sample_id: int = Field(-1, description="LAION SAMPLE_ID, -1 when unknown")
    annotator: str = Field(description="model that wrote the labels")


CAPTION_PROMPTS = (
    "Describe this face in detail.",
    "Give a detailed description of the person's face in this image.",
    "What does this face look like? Describe it.",
    "Write a fine-grained description of the face shown.",
    "Describe the facial features, expression and appearance of this person.",
    "Provide a detailed caption for this face image.",
)


class Task:
    """A categorical question family: how to read the value, ask for it, and phrase it."""

    def __init__(
        self, name: str, ask: tuple[str, ...], yes_no: tuple[str, ...], answer: str, phrases: dict[str, str]
    ):
        self.name, self.ask, self.yes_no, self.answer, self.phrases = name, ask, yes_no, answer, phrases


# the phrases questions and answers use for each value of a vocabulary
EXPRESSION_PHRASES = {e: "a neutral expression" if e == "neutral" else e for e in BASIC_EXPRESSIONS}
AGE_BAND_PHRASES = dict(
    zip(
        ANNOTATION_AGE_BANDS,
        [*(f"{lo} to {hi} years old" for lo, hi in AGE_BAND_BOUNDS), "70 years old or older"],
        strict=True,
    )
)
GENDER_PHRASES = {g: g for g in get_args(PerceivedGender) if g != "unclear"}  # "unclear" is never asked about
CATEGORICAL: dict[str, Task] = {
    "expression": Task(
        "expression",
        ("What facial expression does this person show?", "Which emotion does this face express?"),
        ("Does this face show {phrase}? Answer yes or no.",),
        "The face shows {phrase}.",
        EXPRESSION_PHRASES,
    ),
    "age_band": Task(
        "age_band",
        ("How old does this person appear to be?", "Which age range does this person appear to fall into?"),
        ("Does this person appear to be {phrase}? Answer yes or no.",),
        "The person appears to be {phrase}.",
        AGE_BAND_PHRASES,
    ),
    "gender": Task(
        "gender",
        (
            "What gender does this person appear to present as?",
            "How would you describe the perceived gender of this person?",
        ),
        ("Does this person appear to present as {phrase}? Answer yes or no.",),
        "The person appears to present as {phrase}.",
        GENDER_PHRASES,
    ),
    "hair_color": Task(
        "hair_color",
        ("What color is this person's hair?", "Describe the hair color of the person shown."),
        ("Does this person have {phrase}? Answer yes or no.",),
        "The person has {phrase}.",
        {"black": "black hair", "blond": "blond hair", "brown": "brown hair", "gray": "gray hair"},
    ),
    "head_pose": Task(
        "head_pose",
        ("Which way is this person's head turned?", "Describe the head pose of the person in the image."),
        ("Is the person {phrase}? Answer yes or no.",),
        "The person is {phrase}.",
        {
            "frontal": "facing the camera",
            "slight_left": "turned slightly to the left",
            "slight_right": "turned slightly to the right",
            "profile_left": "in left profile",
            "profile_right": "in right profile",
        },
    ),
    "occlusion": Task(
        "occlusion",
        ("How much of this face is occluded?", "Is the face covered or occluded, and how much?"),
        ("Is the face {phrase}? Answer yes or no.",),
        "The face is {phrase}.",
        {"none": "not occluded", "partial": "partially occluded", "heavy": "heavily occluded"},
    ),
    "image_quality": Task(
        "image_quality",
        ("What is the image quality of this face photo?", "How good is the quality of this face image?"),
        ("Is this a {phrase} image? Answer yes or no.",),
        "It is a {phrase} image.",
        {"high": "high-quality", "medium": "medium-quality", "low": "low-quality"},
    ),
    "lighting": Task(
        "lighting",
        ("How is this face lit?", "Describe the brightness of the lighting on this face."),
        ("Is the lighting {phrase}? Answer yes or no.",),
        "The lighting is {phrase}.",
        {"dark": "dark", "normal": "normal", "bright": "bright"},
    ),
    "face_shape": Task(
        "face_shape",
        ("What is the shape of this person's face?", "Describe the overall face shape of the person shown."),
        ("Does this person have {phrase}? Answer yes or no.",),
        "The person has {phrase}.",
        {s: f"a {s} face" for s in FACE_SHAPES},
    ),
}
# binary attributes: (group, field) -> the predicate a yes/no question asks about
BINARY: dict[str, tuple[str, str, str]] = {
    "eyeglasses": ("accessories", "eyeglasses", "wearing eyeglasses"),
    "hat": ("accessories", "hat", "wearing a hat"),
    "earrings": ("accessories", "earrings", "wearing earrings"),
    "smiling": ("expression", "smiling", "smiling"),
    "mustache": ("facial_hair", "mustache", "wearing a mustache"),
    "bangs": ("hair", "bangs", "wearing bangs"),
    "bald": ("hair", "bald", "bald"),
    "lipstick": ("makeup", "lipstick", "wearing lipstick"),
}
BINARY_QUESTIONS = (
    "Is the person {predicate}? Answer yes or no.",
    "Would you say this person is {predicate}? Reply yes or no.",
)


def categorical_values(attributes: FaceAttributes) -> dict[str, str]:
    """The value of every categorical task these attributes answer (ambiguous ones left out)."""
    values = {
        "expression": attributes.expression.basic,
        "age_band": attributes.perceived.age_band,
        "head_pose": attributes.head_pose.yaw,
        "occlusion": attributes.occlusion.level,
        "image_quality": attributes.quality.overall,
        "lighting": attributes.lighting.brightness,
        "face_shape": attributes.face.shape,
    }
    if attributes.perceived.gender != "unclear":
        values["gender"] = attributes.perceived.gender
    hair = attributes.hair
    colors = [
        c
        for c, on in (
            ("black", hair.black_hair),
            ("blond", hair.blond_hair),
            ("brown", hair.brown_hair),
            ("gray", hair.gray_hair),
        )
        if on
    ]
    if len(colors) == 1 and not hair.bald:
        values["hair_color"] = colors[0]
    return values


class LaionFaceQABuilder:
    """One annotation -> its caption sample and its VQA samples (deterministic per key)."""

    def __init__(self, config: LaionFaceQAConfig):
        self.config = config

    def rng(self, key: str, purpose: str) -> random.Random:
        digest = hashlib.sha256(f"{self.config.seed}\x1f{key}\x1f{purpose}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def split(self, key: str) -> Split:
        return "val" if self.rng(key, "split").random() < self.config.val_fraction else "train"

    def caption(self, annotation: FaceAnnotation, split: Split) -> LaionFaceQASample:
        index = self.rng(annotation.key, "caption").randrange(len(CAPTION_PROMPTS))
        caption = annotation.caption.strip()
        return self._sample(
            annotation,
            key=f"{annotation.key}-cap",
            dataset=CAPTION_DATASET,
            split=split,
            task="caption",
            style="caption",
            template_id=f"caption/{index}",
            question=CAPTION_PROMPTS[index],
            label=QALabel(truth=[], answer=caption),
        )

    def questions(self, annotation: FaceAnnotation, split: Split) -> list[LaionFaceQASample]:
        attributes = annotation.attributes
        if attributes is None or self.config.vqa_per_face == 0:
            return []
        rng = self.rng(annotation.key, "vqa")
        values = categorical_values(attributes)
        tasks = [*sorted(values), "age", *sorted(BINARY)]
        chosen = rng.sample(tasks, min(self.config.vqa_per_face, len(tasks)))
        samples = []
        for i, task in enumerate(chosen):
            style, template_id, question, _, label = self._question(rng, task, values, attributes)
            samples.append(
                self._sample(
                    annotation,
                    key=f"{annotation.key}-q{i:02d}",
                    dataset=VQA_DATASET,
                    split=split,
                    task=task,
                    style=style,
                    template_id=template_id,
                    question=question,
                    label=label,
                )
            )
        return samples

    def _question(self, rng: random.Random, task: str, values: dict[str, str], attributes: FaceAttributes):
        allowed = self.config.answer_styles
        if task == "age":
            years = attributes.perceived.age_years
            answer = f"The person appears to be about {years} years old."
            return (
                "open",
                "age/open/0",
                "About how many years old does this person look?",
                answer,
                QALabel(truth=[str(years)], answer=answer),
            )
        if task in BINARY:
            group, field, predicate = BINARY[task]
            holds = bool(getattr(getattr(attributes, group), field))
            index = rng.randrange(len(BINARY_QUESTIONS))
            answer = YES if holds else NO
            label = QALabel(truth=[field] if holds else [], asked=field, answer=answer)
            return (
                "yes_no",
                f"{task}/yes_no/{index}",
                BINARY_QUESTIONS[index].format(predicate=predicate),
                answer,
                label,
            )
        spec, truth = CATEGORICAL[task], values[task]
        style = rng.choice([s for s in STYLES if s in allowed])
        if style == "open":
            index = rng.randrange(len(spec.ask))
            answer = spec.answer.format(phrase=spec.phrases[truth])
            return (
                "open",
                f"{task}/open/{index}",
                spec.ask[index],
                answer,
                QALabel(truth=[truth], answer=answer),
            )
        if style == "multiple_choice":
            others = [v for v in spec.phrases if v != truth]
            options = [truth, *rng.sample(others, min(self.config.choices - 1, len(others)))]
            rng.shuffle(options)
            index = rng.randrange(len(spec.ask))
            instruction = rng.randrange(len(SINGLE_CHOICE_INSTRUCTIONS))
            question = f"{spec.ask[index]}\n{lettered([spec.phrases[o] for o in options])}\n{SINGLE_CHOICE_INSTRUCTIONS[instruction]}"
            answer = OPTION_LETTERS[options.index(truth)]
            label = QALabel(truth=[truth], options=options, answer=answer)
            return "multiple_choice", f"{task}/multiple_choice/{index}-{instruction}", question, answer, label
        candidate = truth if rng.random() < 0.5 else rng.choice([v for v in spec.phrases if v != truth])
        index = rng.randrange(len(spec.yes_no))
        answer = YES if candidate == truth else NO
        question = spec.yes_no[index].format(phrase=spec.phrases[candidate])
        return (
            "yes_no",
            f"{task}/yes_no/{index}",
            question,
            answer,
            QALabel(truth=[truth], asked=candidate, answer=answer),
        )

    def _sample(
        self,
        annotation: FaceAnnotation,
        *,
        key: str,
        dataset: str,
        split: Split,
        task: str,
        style: str,
        template_id: str,
        question: str,
        label: QALabel,
    ) -> LaionFaceQASample:
        """The sample's reply is ``label.answer``, so the gpt turn and the label can never disagree."""
        return LaionFaceQASample(
            key=key,
            face_key=annotation.key,
            dataset=dataset,
            split=split,
            task=task,
            answer_style=style,
            template_id=template_id,
            conversations=[
                Turn(speaker="human", value=f"{IMAGE_TOKEN}\n{question}"),
                Turn(speaker="gpt", value=label.answer),
            ],
            label=label,
            url=annotation.url,
            license=annotation.license or "",
            sample_id=-1 if annotation.sample_id is None else annotation.sample_id,
            annotator=annotation.provenance.model,
        )
