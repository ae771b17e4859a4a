"""Perceived age, gender and race: the label spaces and questions UTKFace and FairFace share.

Age bands are FairFace's bins for both datasets (UTKFace's ages in years are binned into them),
so an ``age_band`` answer means the same thing whichever dataset it came from. Race categories
stay each dataset's own. Every question and answer speaks of how a person appears.
"""

from __future__ import annotations

from dataclasses import dataclass

from facemllm.reformatters.qa import Category, LabelSpace, QABuilder, QAPair

AGE_BAND_BOUNDS = ((0, 2), (3, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69))
OLDEST_BAND = "more than 70"  # FairFace's wording; it holds 70 itself


def _age_band_categories() -> list[Category]:
    categories = [
        Category(f"{lo}-{hi}", f"{lo}-{hi}", f"between {lo} and {hi} years old") for lo, hi in AGE_BAND_BOUNDS
    ]
    return [*categories, Category(OLDEST_BAND, OLDEST_BAND, "more than 70 years old")]


AGE_BANDS = LabelSpace(_age_band_categories())
GENDERS = LabelSpace([Category("male", "Male", "male"), Category("female", "Female", "female")])


def age_band(years: int) -> str:
    for lo, hi in AGE_BAND_BOUNDS:
        if lo <= years <= hi:
            return f"{lo}-{hi}"
    return OLDEST_BAND


@dataclass(frozen=True)
class PerceivedDemographics:
    """One face's demographic labels; ``age`` in years when the dataset has it (UTKFace)."""

    age_band: str
    gender: str
    race: str
    age: int | None = None


def demographic_pairs(
    builder: QABuilder, image: str, labels: PerceivedDemographics, races: LabelSpace
) -> list[QAPair]:
    pairs = []
    if labels.age is not None and builder.allows("open"):
        years = f"{labels.age} year" if labels.age == 1 else f"{labels.age} years"
        pairs.append(builder.open(builder.rng(image, "age"), "age", [str(labels.age)], years))
    pairs += builder.categorical(image, "age_band", labels.age_band, AGE_BANDS)
    pairs += builder.categorical(image, "gender", labels.gender, GENDERS)
    pairs += builder.categorical(image, "race", labels.race, races)
    return pairs
