"""What the QA samples look like: seed, answer styles, and per-dataset choices (pydantic, strict)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from facemllm.reformatters.celeba_attributes import CELEBA_ATTRIBUTES
from facemllm.schemas import AnswerStyle, StrictModel


class CelebAOptions(StrictModel):
    attribute_questions: int = Field(
        4, ge=0, le=40, description="yes/no attribute questions per image, half about present attributes"
    )
    selection_options: int = Field(
        5, ge=2, le=26, description='options of each "which of these are present" question'
    )
    zero_shot_attributes: list[str] = Field(
        ["Bags_Under_Eyes", "Double_Chin", "Eyeglasses", "Rosy_Cheeks", "Wearing_Hat"],
        description="attributes never asked, listed or described in train/val/test; asked in split zeroshot",
    )
    zero_shot_from: Literal["train", "val", "test"] = Field(
        "test", description="the official partition whose images the zeroshot split asks about"
    )

    @field_validator("zero_shot_attributes")
    @classmethod
    def _known_attributes(cls, names: list[str]) -> list[str]:
        unknown = sorted(set(names) - set(CELEBA_ATTRIBUTES))
        if unknown:
            raise ValueError(f"unknown CelebA attributes {unknown}; names are as in list_attr_celeba.txt")
        if len(set(names)) != len(names):
            raise ValueError("zero_shot_attributes lists an attribute twice")
        return sorted(names, key=list(CELEBA_ATTRIBUTES).index)

    @model_validator(mode="after")
    def _enough_seen_attributes(self) -> CelebAOptions:
        seen = len(CELEBA_ATTRIBUTES) - len(self.zero_shot_attributes)
        if seen < self.selection_options:
            raise ValueError(
                f"only {seen} attributes are left for training, fewer than selection_options="
                f"{self.selection_options}: hold out fewer attributes"
            )
        return self


class UTKFaceOptions(StrictModel):
    """UTKFace has no official split: a seeded split stratified by age band, gender and race."""

    train: float = Field(0.8, ge=0, le=1)
    val: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> UTKFaceOptions:
        if not math.isclose(self.train + self.val + self.test, 1.0, abs_tol=1e-9):
            raise ValueError(f"train + val + test must be 1, got {self.train + self.val + self.test}")
        return self


class QAConfig(StrictModel):
    seed: int = Field(0, description="the same seed and inputs always give the same samples")
    answer_styles: list[AnswerStyle] = Field(
        ["open", "multiple_choice", "yes_no"],
        description="styles to produce; a task none of whose styles is listed is skipped",
    )
    styles_per_task: int = Field(
        1, ge=1, le=3, description="questions (each in a different style) per image and category task"
    )
    choices: int = Field(4, ge=2, le=26, description="options of a multiple-choice question, at most")
    celeba: CelebAOptions = CelebAOptions()
    utkface: UTKFaceOptions = UTKFaceOptions()

    @field_validator("answer_styles")
    @classmethod
    def _styles_listed_once(cls, styles: list[AnswerStyle]) -> list[AnswerStyle]:
        if not styles or len(set(styles)) != len(styles):
            raise ValueError("answer_styles must list at least one style, each once")
        return styles
