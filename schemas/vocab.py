"""Label vocabularies: the values each label may take, defined once for every stage.

The annotation schema, the reformatters that write QA samples and the evaluation that scores
replies all name labels by these strings; a value defined twice could drift and quietly turn right
answers wrong. Which values exist, and in which order, is decided here; how a value reads in a
question (option text, phrase, synonyms) is left to the stage that words it. Orders are part of the
contract: options and distractors are drawn in these orders and the JSON Schema lists enums in
them, so reordering a vocabulary changes samples.
"""

from __future__ import annotations

from typing import Literal, get_args

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
"""Multiple-choice options are lettered in this order; a choice question's answer is the letter."""

# --- expression ----------------------------------------------------------------------------------

BasicExpression = Literal["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger"]
BASIC_EXPRESSIONS: tuple[str, ...] = get_args(BasicExpression)
"""The seven basic expressions (RAF-DB's set), in the annotation schema's order."""

RAFDB_EXPRESSION_IDS: dict[str, BasicExpression] = {
    "1": "surprise",
    "2": "fear",
    "3": "disgust",
    "4": "happiness",
    "5": "sadness",
    "6": "anger",
    "7": "neutral",
}
"""RAF-DB's label ids (``list_patition_label.txt``) -> expression; RAF-DB's questions use this order."""

# --- age -----------------------------------------------------------------------------------------

AGE_BAND_BOUNDS: tuple[tuple[int, int], ...] = (
    (0, 2),
    (3, 9),
    (10, 19),
    (20, 29),
    (30, 39),
    (40, 49),
    (50, 59),
    (60, 69),
)
"""Closed year ranges of FairFace's age bins, bar the oldest, which holds every age from 70 on."""
OLDEST_AGE_BAND = "more than 70"  # FairFace's wording; it holds 70 itself
AGE_BANDS: tuple[str, ...] = (*(f"{lo}-{hi}" for lo, hi in AGE_BAND_BOUNDS), OLDEST_AGE_BAND)
"""FairFace's 9 age bins as its label files spell them; UTKFace's ages are binned into them."""

ANNOTATION_AGE_BANDS: tuple[str, ...] = (*AGE_BANDS[:-1], "70+")
"""The same bins as the annotate stage spells them, the oldest as "70+": stored annotations, the
MLLM's JSON Schema and the LAION-Face questions built from them use this spelling."""
AgeBand = Literal[ANNOTATION_AGE_BANDS]  # the annotation schema's type, built from the one vocabulary


def age_band(years: int) -> str:
    """The FairFace bin (``AGE_BANDS`` spelling) holding an age in years."""
    for lo, hi in AGE_BAND_BOUNDS:
        if lo <= years <= hi:
            return f"{lo}-{hi}"
    return OLDEST_AGE_BAND


# --- gender --------------------------------------------------------------------------------------

GENDERS: tuple[str, ...] = ("male", "female")
"""Perceived gender in the classic datasets' samples (UTKFace, FairFace), in option order."""
UTKFACE_GENDER_IDS = {"0": "male", "1": "female"}
"""UTKFace's gender field (in its file names) -> gender."""
FAIRFACE_GENDERS = {"Male": "male", "Female": "female"}
"""FairFace's gender column -> gender."""
PerceivedGender = Literal["female", "male", "unclear"]
"""The annotation schema's perceived gender (its JSON Schema order); "unclear" when the crop doesn't tell."""

# --- race ----------------------------------------------------------------------------------------

FAIRFACE_RACES: tuple[str, ...] = (
    "White",
    "Black",
    "Latino_Hispanic",
    "East Asian",
    "Southeast Asian",
    "Indian",
    "Middle Eastern",
)
"""FairFace's 7 race categories, spelled as in its label files (samples keep FairFace's own)."""
UTKFACE_RACE_IDS = {"0": "white", "1": "black", "2": "asian", "3": "indian", "4": "other"}
"""UTKFace's 5 race codes (in its file names) -> race; kept apart from FairFace's: the sets differ."""

# --- face shape ----------------------------------------------------------------------------------

FaceShapeName = Literal["oval", "round", "square", "heart", "long", "diamond", "triangle"]
FACE_SHAPES: tuple[str, ...] = get_args(FaceShapeName)
"""Overall face shapes the annotate stage chooses from (not a dataset's: the annotation taxonomy's)."""
