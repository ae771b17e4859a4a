"""Records passed between stages.

Every JSON member written into a shard is ``model_dump_json()`` of one of these, and every status
parquet row validates against one of them, so a stage's output is a contract the next stage can
check instead of guess.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

BBox = tuple[float, float, float, float]
Point = tuple[float, float]


class StrictModel(BaseModel):
    """Base of every record and config: an unknown field is an error, never silently dropped."""

    model_config = ConfigDict(extra="forbid")


class Record(StrictModel):
    """Base of every record: the schema version travels with the data."""

    schema_version: int = SCHEMA_VERSION


class LaionRow(Record):
    """One LAION-400M metadata row selected by the LAION-Face id list."""

    sample_id: int = Field(description="LAION-400M SAMPLE_ID")
    url: str
    text: str | None = Field(None, description="alt text (LAION caption)")
    width: int | None = None
    height: int | None = None
    license: str | None = None
    nsfw: str | None = Field(None, description="LAION NSFW tag: UNLIKELY, UNSURE or NSFW")
    similarity: float | None = Field(None, description="CLIP image-text similarity")


DownloadOutcome = Literal["success", "failed_to_download", "failed_to_resize", "blocklisted"]


class DownloadStatus(Record):
    """The fate of one url row: img2dataset's status parquet row, typed."""

    key: str
    sample_id: int | None = None
    url: str
    status: DownloadOutcome
    error: str | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None


class FaceDetection(Record):
    """One detected face in source-image pixels (SCRFD output)."""

    bbox: BBox = Field(description="x1, y1, x2, y2 in source pixels")
    landmarks: tuple[Point, Point, Point, Point, Point] = Field(
        description="left eye, right eye, nose, left mouth corner, right mouth corner"
    )
    score: float
    face_index: int = Field(description="rank of the face in its image, 0 = largest kept")
    image_width: int
    image_height: int


class CropGeometry(Record):
    """How the context crop was cut, so a consumer can map crop pixels back to the source."""

    context_box: BBox = Field(description="square box in source pixels; may extend past the image (padded)")
    context_size: int = Field(description="side of the context crop in pixels")
    margin: float = Field(description="context box side = (1 + 2 * margin) * longest face side")
    aligned_size: int = 112


class DuplicateFace(Record):
    """A face that duplicates another face of the run: a row of ``faces/_dedup/duplicates.parquet``."""

    key: str = Field(description="the duplicate face's key")
    keeper: str = Field(description="the face kept for its group (lowest SAMPLE_ID, then lowest key)")
    reason: Literal["exact", "near"] = Field(
        description="exact: same image bytes; near: phash within max_distance"
    )
    distance: int = Field(description="phash bits between this face and its closest group member")
    shard: int | None = Field(None, description="the face shard holding the duplicate")
    keeper_shard: int | None = Field(None, description="the face shard holding the keeper")


class DuplicateExample(StrictModel):
    """One duplicate group the run report shows: its keeper and some of the faces it replaced."""

    keeper: str
    keeper_shard: int | None = None
    duplicates: list[DuplicateFace]


class ReportData(Record):
    """``OUT/report.json``: what the run report draws besides the manifest's counts and a few face
    crops: the merged per-shard profiles (``pipeline/core/profile.py``) and the duplicates."""

    profile: dict = Field(description="counts by group and category, histograms by measure")
    duplicates: dict[str, int] = Field(default_factory=dict, description="dedup reason -> faces")
    duplicate_examples: list[DuplicateExample] = Field(default_factory=list)


class BlockedRow(Record):
    """A LAION row a blocklist removed before download: a row of ``urls/_blocked-NNNNN.parquet``."""

    sample_id: int | None = None
    url: str | None = None
    blocklist: str = Field(description="the list that matched, as kind:path")


class FaceQuality(StrictModel):
    """Quality measures of one face, from its aligned crop and its five landmarks.

    Pose angles are estimates from the landmarks alone (no 3D model): yaw from the nose's offset
    from the eyes' midpoint, pitch from its height between the eye line and the mouth line, both
    relative to the ArcFace template's frontal face; roll is the eye line's angle. Positive yaw:
    the nose points to the image's right; positive roll: the eye line tilts clockwise."""

    sharpness: float = Field(description="variance of the Laplacian of the aligned crop's grayscale")
    brightness: float = Field(description="mean grayscale of the aligned crop, 0-255")
    contrast: float = Field(description="standard deviation of the aligned crop's grayscale")
    yaw: float = Field(description="degrees, estimated from the landmarks")
    pitch: float = Field(description="degrees, estimated from the landmarks (positive: looking up)")
    roll: float = Field(description="degrees, the eye line's angle")
    inter_ocular_px: float = Field(description="distance between the eye landmarks in source pixels")
    phash: str = Field(description="imagehash.phash of the aligned crop, 16 hex digits (64 bits)")


class FaceRecord(Record):
    """One face crop and where it came from; the ``.json`` member of a face shard sample."""

    key: str
    source_key: str
    url: str
    sample_id: int | None = None
    caption: str | None = Field(None, description="LAION alt text of the source image")
    license: str | None = None
    nsfw: str | None = None
    similarity: float | None = None
    detection: FaceDetection
    crop: CropGeometry
    quality: FaceQuality | None = Field(None, description="None in face shards written before it existed")


FaceOutcome = Literal["success", "no_face", "all_faces_filtered", "failed_to_decode"]


class FaceStatus(Record):
    """The fate of one downloaded image in the face stage: a row of ``faces/NNNNN.parquet``."""

    source_key: str
    url: str | None = None
    sample_id: int | None = None
    status: FaceOutcome
    error: str | None = None
    faces_detected: int = 0
    faces_kept: int = 0
    dropped_small: int = Field(0, description="faces under the minimum face size")
    dropped_low_score: int = Field(0, description="faces under the minimum detection score")
    dropped_over_max: int = Field(0, description="faces beyond the maximum faces per image")
    dropped_blurry: int = Field(0, description="faces under faces.quality.min_sharpness")
    dropped_exposure: int = Field(0, description="faces outside the brightness and contrast bounds")
    dropped_pose: int = Field(0, description="faces turned, tilted or pitched beyond the pose bounds")
    dropped_eyes_close: int = Field(0, description="faces under faces.quality.min_inter_ocular_px")
    dropped_blocklisted: int = Field(0, description="faces whose aligned crop's phash is on a blocklist")
    blocklist: str | None = Field(None, description="the phash list that matched the last dropped face")


class ShardInfo(StrictModel):
    """One tar shard as a reader needs to find and verify it."""

    url: str = Field(description="path relative to the run folder (or absolute URL)")
    sha256: str
    nsamples: int
    bytes: int


class ShardManifest(Record):
    """The shards of one stage and the status counts of its inputs."""

    stage: str
    shards: list[ShardInfo]
    counts: dict[str, int] = Field(default_factory=dict, description="status -> number of input elements")


class RunManifest(Record):
    """``manifest.json``: written last, the commit point of a run."""

    config_hash: str
    package_versions: dict[str, str]
    stages: dict[str, ShardManifest]


class RemovalSummary(Record):
    """What a removal took out, without repeating the requested ids or urls in public."""

    request_sha256: str = Field(description="sha256 of the sorted, de-duplicated request entries")
    requested: int = Field(description="distinct SAMPLE_IDs and urls in the request")
    matched: int = Field(description="request entries that matched at least one sample")
    removed: dict[str, int] = Field(description="stage -> samples removed")


class PublishedManifest(RunManifest):
    """``manifest.vN.json`` (immutable) and ``manifest.json`` (the current version) of a published run.

    Shard urls are relative to the published prefix. A plain run manifest reads as version 1.
    """

    version: int = Field(1, ge=1)
    parent: int | None = Field(None, description="the version this one was derived from")
    removal: RemovalSummary | None = Field(None, description="set on versions made by a removal")


ALL_RECORDS: tuple[type[BaseModel], ...] = (
    LaionRow,
    BlockedRow,
    DuplicateFace,
    DuplicateExample,
    ReportData,
    DownloadStatus,
    FaceDetection,
    CropGeometry,
    FaceQuality,
    FaceRecord,
    FaceStatus,
    ShardInfo,
    ShardManifest,
    RunManifest,
    RemovalSummary,
    PublishedManifest,
)
