"""Perceived age, gender and race: the label spaces and questions UTKFace and FairFace share.

Age bands are FairFace's bins for both datasets (UTKFace's ages in years are binned into them),
so an ``age_band`` answer means the same thing whichever dataset it came from. Race categories
stay each dataset's own. Every question and answer speaks of how a person appears.
"""

from __future__ import annotations

from dataclasses import dataclass

from facemllm.reformatters.qa import Category, LabelSpace, QABuilder, QAPair
from facemllm.schemas import vocab

AGE_BANDS = LabelSpace(
    [
        *(
            Category(band, band, f"between {lo} and {hi} years old")
            for band, (lo, hi) in zip(vocab.AGE_BANDS[:-1], vocab.AGE_BAND_BOUNDS, strict=True)
        ),
        Category(vocab.OLDEST_AGE_BAND, vocab.OLDEST_AGE_BAND, "more than 70 years old"),
    ]
)
GENDERS = LabelSpace(Category(gender, gender.capitalize(), gender) for gender in vocab.GENDERS)


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
