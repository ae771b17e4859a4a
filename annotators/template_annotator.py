"""The template annotator: a caption composed from detection geometry and the LAION alt text.

What it is: a deterministic, offline stand-in for the MLLM, so the pipeline runs end to end on a
laptop with no server (``make demo``) and the annotate stage's plumbing (shards, status tables,
manifest) can be tested byte for byte. Every caption starts with ``[template]`` and every record
says ``annotator: template``, ``model: template``.

What it is not: an annotation of the face. Nothing looks at the pixels. The caption restates where
the detector found the face, how large it is, how the landmarks say the head is turned and tilted,
the detector's score, and the source image's alt text (which describes the photo, not the face, and
may be wrong). ``attributes`` stays empty (None): never train attribute heads on template output.
"""

from __future__ import annotations

import hashlib
import math

from facemllm.schemas.annotation import Provenance
from facemllm.schemas.records import FaceRecord

TEMPLATE_VERSION = "template-v1"
TEMPLATE = (
    "[template] Composed from face-detection geometry and the source image's alt text; no model "
    "looked at this face. A face of {width}x{height} pixels ({share}% of the image width) in the "
    "{where} of a {image_width}x{image_height} photo, {yaw}, {roll}, detection score {score:.2f}, "
    "face {rank} of its image by size. {alt}"
)
ALT_MAX_CHARS = 300
TEMPLATE_SHA256 = hashlib.sha256(f"{TEMPLATE_VERSION}\n{TEMPLATE}".encode()).hexdigest()


def _where(cx: float, cy: float, width: int, height: int) -> str:
    column = ("left", "center", "right")[min(2, int(3 * cx / max(width, 1)))]
    row = ("upper", "middle", "lower")[min(2, int(3 * cy / max(height, 1)))]
    if row == "middle" and column == "center":
        return "center"
    return f"{row} {column}"


def _yaw(landmarks) -> str:
    (lx, ly), (rx, ry), (nx, _), _, _ = landmarks
    interocular = math.hypot(rx - lx, ry - ly)
    if interocular <= 0:
        return "head turn unknown"
    offset = (nx - (lx + rx) / 2) / interocular
    side = "image left" if offset < 0 else "image right"
    if abs(offset) < 0.15:
        return "roughly frontal"
    if abs(offset) < 0.4:
        return f"turned slightly toward the {side}"
    return f"turned strongly toward the {side}"


def _roll(landmarks) -> str:
    (lx, ly), (rx, ry) = landmarks[0], landmarks[1]
    degrees = round(math.degrees(math.atan2(ry - ly, rx - lx)))
    if abs(degrees) < 3:
        return "head upright"
    return f"head tilted {abs(degrees)} degrees {'clockwise' if degrees > 0 else 'counterclockwise'}"


def _alt(text: str | None) -> str:
    if not text or not text.strip():
        return "The source image has no alt text."
    text = " ".join(text.split())
    if len(text) > ALT_MAX_CHARS:
        text = text[: ALT_MAX_CHARS - 3].rstrip() + "..."
    return f'The source image\'s alt text reads: "{text}".'


class TemplateAnnotator:
    """``caption(record)`` is a pure function of the FaceRecord: same record, same caption."""

    annotator_kind = "template"
    model = "template"

    def __init__(self) -> None:
        self.provenance = Provenance(
            annotator="template",
            model="template",
            prompt_version=TEMPLATE_VERSION,
            prompt_sha256=TEMPLATE_SHA256,
            sampling={},
            server=None,
            latency_s=0.0,
            attempts=0,
        )

    def caption(self, record: FaceRecord) -> str:
        detection = record.detection
        x1, y1, x2, y2 = detection.bbox
        width, height = max(0, round(x2 - x1)), max(0, round(y2 - y1))
        return TEMPLATE.format(
            width=width,
            height=height,
            share=round(100 * (x2 - x1) / max(detection.image_width, 1)),
            where=_where((x1 + x2) / 2, (y1 + y2) / 2, detection.image_width, detection.image_height),
            image_width=detection.image_width,
            image_height=detection.image_height,
            yaw=_yaw(detection.landmarks),
            roll=_roll(detection.landmarks),
            score=detection.score,
            rank=detection.face_index + 1,
            alt=_alt(record.caption),
        )
