"""Faces stage: ``images/NNNNN.tar`` -> ``faces/NNNNN.tar .parquet _stats.json``.

The detection and cropping live in ``annotators.faces.FaceCropper``; this stage reads an image
shard and writes one face sample per kept face (``KEY.jpg`` context crop, ``KEY.aligned.jpg``
112x112 ArcFace crop, ``KEY.json`` FaceRecord) and a ``FaceStatus`` row per input image. Face
shard N comes from image shard N, so a retried shard rewrites the same file with the same bytes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from facemllm.annotators.face_config import FILTER_DROPS, FaceConfig
from facemllm.pipeline.core.blocklist import Blocklists, BlocklistSource
from facemllm.pipeline.core.profile import ProfileBuilder
from facemllm.pipeline.core.shards import ShardWriter, iter_tar_samples
from facemllm.pipeline.core.spill import KeyOrderSpill
from facemllm.pipeline.stages.framework import ShardStage, StreamingSink, UnitResult
from facemllm.schemas import FaceRecord, FaceStatus

if TYPE_CHECKING:  # the module loads cv2, which must wait for the decoder bound
    from facemllm.annotators.faces import FaceResult

IMAGE_META_FIELDS = {
    "url": "url",
    "sample_id": "SAMPLE_ID",
    "caption": "caption",
    "license": "LICENSE",
    "nsfw": "NSFW",
    "similarity": "similarity",
}
DROP_REASONS = ("dropped_small", "dropped_low_score", "dropped_over_max", *FILTER_DROPS)


class FaceStage(ShardStage, StreamingSink):
    """Crops the faces of one image shard."""

    name = "faces"
    status_record = FaceStatus

    def __init__(
        self,
        config: FaceConfig,
        input_dir: str = "images",
        output_dir: str = "faces",
        blocklist: list[BlocklistSource] = (),
    ):
        self.config = config
        self.input_dir = input_dir
        self.output_dir = output_dir
        self.blocklist = list(blocklist)

    def setup(self) -> None:
        from facemllm.annotators.faces import FaceCropper  # loads cv2: after the decoder bound is set

        self.cropper = FaceCropper(self.config, Blocklists(self.blocklist, ["phash"]))

    def process_shard(self, unit: int, source: Path, writer: ShardWriter) -> UnitResult:
        samples = iter_tar_samples(source)  # image keys are sorted, face keys extend them
        crops = (
            self.crop(key, sample.get("jpg", b""), json.loads(sample.get("json", b"{}")))
            for key, sample in samples
        )
        return self.write_faces(unit, crops, writer)

    def process_stream(self, unit: int, samples: Iterable[tuple[str, bytes, dict]]) -> UnitResult:
        """The images as the download stage writes them, in completion order: each is cropped as it
        comes, the faces written in key order at the end, byte for byte as from the image shard.
        Until then the crops wait in a ``KeyOrderSpill`` (a shard of 10,000 images holds hundreds
        of MB of crops)."""
        with KeyOrderSpill(self.root / self.output_dir) as spill:
            for sample in samples:
                spill.add(sample[0], self.crop(*sample))
            with ShardWriter(self.paths(unit)["tar"]) as writer:
                return self.write_faces(unit, spill.in_key_order(), writer)

    def crop(self, source_key: str, image: bytes, meta: dict) -> FaceResult:
        """One image with its download metadata (img2dataset's names) -> its status and faces."""
        return self.cropper.process(
            image, source_key, {field: meta.get(name) for field, name in IMAGE_META_FIELDS.items()}
        )

    def write_faces(self, unit: int, crops: Iterable[FaceResult], writer: ShardWriter) -> UnitResult:
        """The shard's faces into ``writer`` (``crops`` in key order), its status rows and stats."""
        statuses: list[dict] = []
        profile = ProfileBuilder()
        for result in crops:
            for face in result.faces:
                writer.add(
                    face.record.key,
                    {
                        "jpg": face.context_jpg,
                        "aligned.jpg": face.aligned_jpg,
                        "json": face.record.model_dump_json().encode(),
                    },
                )
                observe_face(profile, face.record)
            statuses.append(result.status.model_dump(mode="json"))
            profile.observe("faces_per_image", result.status.faces_kept)
            profile.count("blocked_faces_by_list", result.status.blocklist, result.status.dropped_blocklisted)
        counts = Counter(row["status"] for row in statuses)
        dropped = {reason: sum(row[reason] for row in statuses) for reason in DROP_REASONS}
        stats = {
            "shard_id": unit,
            "images": len(statuses),
            "faces": writer.count,
            "status": dict(counts),
            **dropped,
            "providers": self.cropper.detector.session.get_providers(),  # what onnxruntime ran it on
        }
        for status, n in counts.items():
            profile.count("face_status", status, n)
        for drop, n in dropped.items():
            profile.count("face_drops", drop.removeprefix("dropped_"), n)
        stats["profile"] = profile.build()
        return UnitResult(stats, statuses)

    def counters(self, stats: dict) -> dict[str, int]:
        return {"kept": stats["faces"], **{f"images_{status}": n for status, n in stats["status"].items()}}


def observe_face(profile: ProfileBuilder, record: FaceRecord) -> None:
    """A kept face's size, detector score and quality measures, for the report."""
    x1, y1, x2, y2 = record.detection.bbox
    profile.observe("face_size_px", max(x2 - x1, y2 - y1))
    profile.observe("detector_score", record.detection.score)
    if record.quality is not None:
        for measure in ("yaw", "pitch", "roll", "sharpness", "brightness", "inter_ocular_px"):
            profile.observe(measure, getattr(record.quality, measure))
