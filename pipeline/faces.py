"""Faces stage: ``images/NNNNN.tar`` -> ``faces/NNNNN.tar .parquet _stats.json``.

The detection and cropping live in ``annotators.faces.FaceCropper``; this module reads an image
shard, writes one face sample per kept face (``KEY.jpg`` context crop, ``KEY.aligned.jpg``
112x112 ArcFace crop, ``KEY.json`` FaceRecord) and a status row per input image, then the stats
file last as the completion marker. Face shard N comes from image shard N, so a retried shard
rewrites the same file with the same bytes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa

from facemllm.annotators.faces import FaceConfig, FaceCropper
from facemllm.pipeline.core.files import write_json_atomic, write_parquet_atomic
from facemllm.pipeline.core.shards import ShardWriter, iter_tar_samples, shard_paths

IMAGE_META_FIELDS = {
    "url": "url",
    "sample_id": "SAMPLE_ID",
    "caption": "caption",
    "license": "LICENSE",
    "nsfw": "NSFW",
    "similarity": "similarity",
}


class FaceShardProcessor:
    """Crops the faces of one image shard, atomically and idempotently (plain class, no Beam)."""

    def __init__(self, config: FaceConfig, faces_dir: Path):
        self.cropper = FaceCropper(config)
        self.faces_dir = Path(faces_dir)

    def is_done(self, shard_id: int) -> bool:
        return shard_paths(self.faces_dir, shard_id)["stats"].exists()

    def process(self, shard_id: int, image_tar: Path) -> dict:
        final = shard_paths(self.faces_dir, shard_id)
        if final["stats"].exists():
            return json.loads(final["stats"].read_text())
        statuses: list[dict] = []
        with ShardWriter(final["tar"]) as writer:  # image keys are sorted, face keys extend them
            for source_key, sample in iter_tar_samples(image_tar):
                meta = json.loads(sample.get("json", b"{}"))
                source = {field: meta.get(name) for field, name in IMAGE_META_FIELDS.items()}
                result = self.cropper.process(sample.get("jpg", b""), source_key, source)
                for face in result.faces:
                    writer.add(
                        face.record.key,
                        {
                            "jpg": face.context_jpg,
                            "aligned.jpg": face.aligned_jpg,
                            "json": face.record.model_dump_json().encode(),
                        },
                    )
                statuses.append(result.status.model_dump(mode="json"))
        write_parquet_atomic(final["parquet"], statuses, FACE_STATUS_SCHEMA)
        stats = summarize_face_statuses(shard_id, statuses, faces=writer.count)
        write_json_atomic(final["stats"], stats)  # completion marker, last
        return stats


def summarize_face_statuses(shard_id: int, statuses: list[dict], faces: int) -> dict:
    counts = Counter(row["status"] for row in statuses)
    dropped = {
        reason: sum(row[reason] for row in statuses)
        for reason in ("dropped_small", "dropped_low_score", "dropped_over_max")
    }
    return {"shard_id": shard_id, "images": len(statuses), "faces": faces, "status": dict(counts), **dropped}


# One column per FaceStatus field; a test checks the two stay in step.
FACE_STATUS_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int64()),
        ("source_key", pa.string()),
        ("url", pa.string()),
        ("sample_id", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("faces_detected", pa.int64()),
        ("faces_kept", pa.int64()),
        ("dropped_small", pa.int64()),
        ("dropped_low_score", pa.int64()),
        ("dropped_over_max", pa.int64()),
    ]
)
