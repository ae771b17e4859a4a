"""What the annotate stage writes: the facial attribute taxonomy and one face's annotation.

``FaceAttributes`` is what the MLLM fills in. Its JSON Schema (``model_json_schema()``) is sent to
the server as a structured-output constraint, so every field is required, every value is a boolean,
an enum or a bounded integer, and there are no arrays or free strings: a constrained decoder can
then only produce valid objects, whatever the model. It covers CelebA's 40 binary attributes
(grouped; ``celeba()`` returns them under CelebA's own names, in CelebA's order), perceived age
(years and FairFace's bands), perceived gender, the seven basic expressions (RAF-DB's), head pose,
occlusion, image quality and lighting. Everything about a person is a *perceived* impression of the
crop, never a fact about who they are: the prompts ask for no identity and the schema has no slot
for one.

``FaceAnnotation`` is the ``.json`` member of an annotation shard sample: the caption, the
attributes, and the provenance of the answer (model, prompt version, sampling parameters, server
host, latency, token usage, a hash of the raw response). ``AnnotationStatus`` is a row of the
stage's status table: one per input face, success or a named reason.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, Field

from facemllm.schemas.records import Record, StrictModel
from facemllm.schemas.vocab import AgeBand, BasicExpression, FaceShapeName, PerceivedGender


class _Group(StrictModel):
    """Attribute groups: closed objects whose every field is required (so the JSON Schema lists
    each one in ``required`` and a constrained decoder must emit it)."""


def _flag(description: str) -> Any:
    return Field(description=description)


class Hair(_Group):
    bald: bool = _flag("CelebA Bald")
    bangs: bool = _flag("CelebA Bangs")
    black_hair: bool = _flag("CelebA Black_Hair")
    blond_hair: bool = _flag("CelebA Blond_Hair")
    brown_hair: bool = _flag("CelebA Brown_Hair")
    gray_hair: bool = _flag("CelebA Gray_Hair")
    receding_hairline: bool = _flag("CelebA Receding_Hairline")
    straight_hair: bool = _flag("CelebA Straight_Hair")
    wavy_hair: bool = _flag("CelebA Wavy_Hair")


class FacialHair(_Group):
    five_o_clock_shadow: bool = _flag("CelebA 5_o_Clock_Shadow")
    goatee: bool = _flag("CelebA Goatee")
    mustache: bool = _flag("CelebA Mustache")
    no_beard: bool = _flag("CelebA No_Beard")
    sideburns: bool = _flag("CelebA Sideburns")


class Accessories(_Group):
    eyeglasses: bool = _flag("CelebA Eyeglasses")
    earrings: bool = _flag("CelebA Wearing_Earrings")
    hat: bool = _flag("CelebA Wearing_Hat")
    necklace: bool = _flag("CelebA Wearing_Necklace")
    necktie: bool = _flag("CelebA Wearing_Necktie")


class Makeup(_Group):
    heavy_makeup: bool = _flag("CelebA Heavy_Makeup")
    lipstick: bool = _flag("CelebA Wearing_Lipstick")
    rosy_cheeks: bool = _flag("CelebA Rosy_Cheeks")


class FaceShape(_Group):
    shape: FaceShapeName = Field(description="overall face shape")
    oval_face: bool = _flag("CelebA Oval_Face")
    chubby: bool = _flag("CelebA Chubby")
    double_chin: bool = _flag("CelebA Double_Chin")
    high_cheekbones: bool = _flag("CelebA High_Cheekbones")
    arched_eyebrows: bool = _flag("CelebA Arched_Eyebrows")
    bushy_eyebrows: bool = _flag("CelebA Bushy_Eyebrows")
    narrow_eyes: bool = _flag("CelebA Narrow_Eyes")
    bags_under_eyes: bool = _flag("CelebA Bags_Under_Eyes")
    big_nose: bool = _flag("CelebA Big_Nose")
    pointy_nose: bool = _flag("CelebA Pointy_Nose")
    big_lips: bool = _flag("CelebA Big_Lips")
    pale_skin: bool = _flag("CelebA Pale_Skin")


class Expression(_Group):
    basic: BasicExpression = Field(description="the dominant of the seven basic expressions (RAF-DB's set)")
    smiling: bool = _flag("CelebA Smiling")
    mouth_slightly_open: bool = _flag("CelebA Mouth_Slightly_Open")


class Perceived(_Group):
    """Impressions from the crop alone, labelled as perceived: not facts about the person."""

    age_years: int = Field(ge=0, le=100, description="perceived age in years")
    age_band: AgeBand = Field(description="perceived age band (FairFace's bins)")
    gender: PerceivedGender = Field(description="perceived gender presentation")
    young: bool = _flag("CelebA Young (perceived)")
    male: bool = _flag("CelebA Male (perceived)")
    attractive: bool = _flag("CelebA Attractive (a subjective CelebA label, kept for compatibility)")


class HeadPose(_Group):
    yaw: Literal["frontal", "slight_left", "slight_right", "profile_left", "profile_right"]
    pitch: Literal["level", "up", "down"]
    roll: Literal["upright", "tilted_left", "tilted_right"]


class Occlusion(_Group):
    level: Literal["none", "partial", "heavy"]
    eyes: bool = _flag("eyes covered (sunglasses, hair, hand)")
    nose: bool = _flag("nose covered")
    mouth: bool = _flag("mouth covered (mask, hand, microphone)")
    forehead: bool = _flag("forehead covered (hat, hair)")
    chin: bool = _flag("chin or jaw covered")


class Quality(_Group):
    overall: Literal["high", "medium", "low"]
    blurry: bool = _flag("CelebA Blurry")
    low_resolution: bool
    noisy: bool
    compression_artifacts: bool


class Lighting(_Group):
    brightness: Literal["dark", "normal", "bright"]
    direction: Literal["front", "side", "back", "top", "diffuse"]
    harsh_shadows: bool


class FaceAttributes(_Group):
    """The attribute taxonomy an MLLM fills in for one face crop (every field required)."""

    hair: Hair
    facial_hair: FacialHair
    accessories: Accessories
    makeup: Makeup
    face: FaceShape
    expression: Expression
    perceived: Perceived
    head_pose: HeadPose
    occlusion: Occlusion
    quality: Quality
    lighting: Lighting

    def celeba(self) -> dict[str, bool]:
        """The 40 CelebA attributes under CelebA's names, in ``list_attr_celeba.txt`` order."""
        return {name: getattr(getattr(self, group), field) for name, (group, field) in CELEBA_FIELDS.items()}


# CelebA attribute name (list_attr_celeba.txt order) -> (group, field) in FaceAttributes.
CELEBA_FIELDS: dict[str, tuple[str, str]] = {
    "5_o_Clock_Shadow": ("facial_hair", "five_o_clock_shadow"),
    "Arched_Eyebrows": ("face", "arched_eyebrows"),
    "Attractive": ("perceived", "attractive"),
    "Bags_Under_Eyes": ("face", "bags_under_eyes"),
    "Bald": ("hair", "bald"),
    "Bangs": ("hair", "bangs"),
    "Big_Lips": ("face", "big_lips"),
    "Big_Nose": ("face", "big_nose"),
    "Black_Hair": ("hair", "black_hair"),
    "Blond_Hair": ("hair", "blond_hair"),
    "Blurry": ("quality", "blurry"),
    "Brown_Hair": ("hair", "brown_hair"),
    "Bushy_Eyebrows": ("face", "bushy_eyebrows"),
    "Chubby": ("face", "chubby"),
    "Double_Chin": ("face", "double_chin"),
    "Eyeglasses": ("accessories", "eyeglasses"),
    "Goatee": ("facial_hair", "goatee"),
    "Gray_Hair": ("hair", "gray_hair"),
    "Heavy_Makeup": ("makeup", "heavy_makeup"),
    "High_Cheekbones": ("face", "high_cheekbones"),
    "Male": ("perceived", "male"),
    "Mouth_Slightly_Open": ("expression", "mouth_slightly_open"),
    "Mustache": ("facial_hair", "mustache"),
    "Narrow_Eyes": ("face", "narrow_eyes"),
    "No_Beard": ("facial_hair", "no_beard"),
    "Oval_Face": ("face", "oval_face"),
    "Pale_Skin": ("face", "pale_skin"),
    "Pointy_Nose": ("face", "pointy_nose"),
    "Receding_Hairline": ("hair", "receding_hairline"),
    "Rosy_Cheeks": ("makeup", "rosy_cheeks"),
    "Sideburns": ("facial_hair", "sideburns"),
    "Smiling": ("expression", "smiling"),
    "Straight_Hair": ("hair", "straight_hair"),
    "Wavy_Hair": ("hair", "wavy_hair"),
    "Wearing_Earrings": ("accessories", "earrings"),
    "Wearing_Hat": ("accessories", "hat"),
    "Wearing_Lipstick": ("makeup", "lipstick"),
    "Wearing_Necklace": ("accessories", "necklace"),
    "Wearing_Necktie": ("accessories", "necktie"),
    "Young": ("perceived", "young"),
}


class FaceResponse(StrictModel):
    """What the MLLM is asked to return for one face: the caption and the attributes, as one JSON
    object (one request per face, the image encoded once)."""

    caption: str = Field(min_length=1, description="fine-grained description of the face")
    attributes: FaceAttributes


MAX_USAGE_TOKENS = 1 << 26  # more tokens than any context holds: such a count is refused, not summed


class TokenUsage(StrictModel):
    """Tokens a server reported; bounded, so a hostile reply cannot overflow a counter or a column."""

    prompt_tokens: int = Field(0, ge=0, le=MAX_USAGE_TOKENS)
    completion_tokens: int = Field(0, ge=0, le=MAX_USAGE_TOKENS)
    total_tokens: int = Field(0, ge=0, le=MAX_USAGE_TOKENS)


class Provenance(StrictModel):
    """Where an annotation came from: enough to reproduce or discard it, never a credential."""

    annotator: Literal["mllm", "template"] = Field(
        description="'mllm': a served model answered; 'template': composed offline, no model looked at the face"
    )
    model: str = Field(description="served model name, or 'template'")
    prompt_version: str = Field(description="prompt file version, e.g. 'face-v1'")
    prompt_sha256: str = Field(description="sha256 of the prompt file's text (catches edits without a bump)")
    sampling: dict[str, Any] = Field(default_factory=dict, description="temperature, top_p, max_tokens, seed")
    server: str | None = Field(None, description="scheme://host:port of the server, without credentials")
    latency_s: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="wall time of the successful request (all attempts)"
    )
    attempts: int = Field(
        1, ge=0, le=1 << 20, description="HTTP requests made for this answer (retries and repair included)"
    )
    repaired: bool = Field(False, description="the first answer was invalid and a repair request fixed it")
    usage: TokenUsage = TokenUsage()
    raw_response_sha256: str | None = Field(None, description="sha256 of the model's raw message content")


class FaceAnnotation(Record):
    """One face's annotation: the ``.json`` member of ``annotations/NNNNN.tar``."""

    key: str = Field(description="face key (the face shard's)")
    source_key: str
    url: str
    sample_id: int | None = None
    license: str | None = None
    caption: str = Field(description="fine-grained caption (also the sample's .txt member)")
    attributes: FaceAttributes | None = Field(None, description="None for the template annotator")
    provenance: Provenance
    duplicate_of: str | None = Field(None, description="dedup.action flag: the face this one duplicates")


AnnotationOutcome = Literal[
    "success",
    "timeout",
    "connection_error",
    "rate_limited",
    "server_error",
    "client_error",
    "malformed_response",
    "invalid_output",
    "bad_input",
    "duplicate",  # another face of the run is the same face (dedup.action: drop); error names it
]


# Faces never sent to the server (a bad input sample, a duplicate dedup dropped), and the outcomes
# of faces sent that got no valid annotation: what annotate.max_failure_rate and progress count.
NOT_SENT: tuple[str, ...] = ("bad_input", "duplicate")
REQUEST_FAILURES: tuple[str, ...] = tuple(
    o for o in get_args(AnnotationOutcome) if o not in ("success", *NOT_SENT)
)


class AnnotationStatus(Record):
    """The fate of one face in the annotate stage: a row of ``annotations/NNNNN.parquet``."""

    key: str
    source_key: str | None = None
    url: str | None = None
    status: AnnotationOutcome
    error: str | None = None
    model: str | None = None
    prompt_version: str | None = None
    attempts: int = 0
    latency_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached: bool = False
    duplicate_of: str | None = Field(
        None, description="the keeper's face key when dedup found this face a duplicate"
    )


ANNOTATION_RECORDS: tuple[type[BaseModel], ...] = (
    FaceAttributes,
    FaceResponse,
    FaceAnnotation,
    AnnotationStatus,
)
