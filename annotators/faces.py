"""Face detection, filtering, context crops and ArcFace-aligned crops (plain Python, no Beam).

One ``FaceCropper`` per worker loads an SCRFD detector once through insightface's own API and
turns image bytes into face records plus two JPEGs per kept face: a square context crop sized for a
vision tower and a 112x112 crop aligned to the ArcFace template. Bad input bytes never raise: they
become a ``failed_to_decode`` status, so one broken download cannot stop a shard.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import cv2
import imagehash
import numpy as np
import onnxruntime
from insightface.model_zoo import SCRFD, get_model
from insightface.utils.face_align import norm_crop
from PIL import Image

from facemllm.annotators.face_config import FILTER_DROPS, FaceConfig, QualityFilters
from facemllm.annotators.model_store import default_detector_path
from facemllm.pipeline.core.blocklist import Blocklists
from facemllm.schemas import CropGeometry, FaceDetection, FaceQuality, FaceRecord, FaceStatus

DETECTOR_FILE_PREFIXES = ("det_", "scrfd")


class SourceMeta(TypedDict, total=False):
    """What is known about the source image; every field may be missing or None."""

    url: str | None
    sample_id: int | None
    caption: str | None
    license: str | None
    nsfw: str | None
    similarity: float | None


@dataclass(frozen=True, slots=True)
class CroppedFace:
    record: FaceRecord
    context_jpg: bytes
    aligned_jpg: bytes


@dataclass(frozen=True, slots=True)
class FaceResult:
    status: FaceStatus
    faces: list[CroppedFace]


class ImageDecodeError(ValueError):
    """The bytes are not an image this stage accepts (unreadable, truncated, empty or too large)."""


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode to a 3-channel BGR array, checking the header size first so a bomb is never allocated."""
    if not data:
        raise ImageDecodeError("empty image bytes")
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            width, height = header.size
    except Image.DecompressionBombError as err:  # PIL's own cap (~179 Mpx) can fire before ours
        raise ImageDecodeError(f"image too large: {err}") from err
    except Exception as err:  # PIL raises many types for garbage input
        raise ImageDecodeError(f"unreadable image header: {type(err).__name__}: {err}") from err
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image too large: {width}x{height} pixels exceeds max_image_pixels={max_pixels}"
        )
    # IMREAD_COLOR turns grayscale into 3 channels, drops alpha and applies EXIF orientation.
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageDecodeError("OpenCV could not decode the image (truncated or unsupported)")
    return image


def _detector_model_path(config: FaceConfig) -> Path:
    if config.model is not None:
        path = config.model.expanduser()
    elif config.model_pack is not None:
        pack = config.model_pack.expanduser()
        if not pack.is_dir():
            raise FileNotFoundError(f"faces.model_pack {pack} is not a folder")
        candidates = sorted(p for p in pack.glob("*.onnx") if p.name.startswith(DETECTOR_FILE_PREFIXES))
        if len(candidates) != 1:
            raise FileNotFoundError(
                f"faces.model_pack {pack} must hold exactly one det_*.onnx or scrfd*.onnx, found "
                f"{[p.name for p in candidates]}"
            )
        path = candidates[0]
    else:
        path = default_detector_path()
    if not path.is_file():
        raise FileNotFoundError(f"face detection model {path} does not exist")
    return path


AUTO_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def execution_providers(config: FaceConfig) -> list[str]:
    """``faces.providers`` resolved against what the installed onnxruntime can run."""
    available = onnxruntime.get_available_providers()
    if config.providers == "auto":
        return [p for p in AUTO_PROVIDERS if p in available]
    missing = [p for p in config.providers if p not in available]
    if missing or not config.providers:
        raise ValueError(
            f"faces.providers {config.providers}: this onnxruntime has only {available} "
            "(CUDAExecutionProvider needs the onnxruntime-gpu package and a GPU)"
        )
    return list(config.providers)


def _load_detector(config: FaceConfig) -> SCRFD:
    """Load through ``model_zoo.get_model`` with a file path, which never downloads anything."""
    path = _detector_model_path(config)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = 1
    providers = execution_providers(config)
    detector = get_model(str(path), providers=providers, sess_options=options)
    if not isinstance(detector, SCRFD) or not detector.use_kps:
        raise ValueError(f"{path} is not an SCRFD face detector with landmarks (needed for alignment)")
    gpu = 0 if "CUDAExecutionProvider" in providers else -1  # insightface: -1 forces the CPU provider
    detector.prepare(ctx_id=gpu, input_size=(config.det_size, config.det_size), det_thresh=config.det_thresh)
    return detector


# The ArcFace template's five points in its 112x112 crop: a frontal face, the pose reference.
ARCFACE_POINTS = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def pose_from_landmarks(points: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from five landmarks (eyes, nose, mouth corners, image order).

    Roll is the eye line's angle. In the frame that levels the eye line, yaw is the nose's offset
    from the eyes' midpoint over half the eye distance, and pitch is how far the nose sits above
    its frontal height between the eye and mouth lines (the ArcFace template's), read as sines.
    Rough, but monotonic and symmetric: a mirrored face has the opposite yaw and roll."""
    points = np.asarray(points, dtype=np.float64)
    dx, dy = points[1] - points[0]
    roll = np.degrees(np.arctan2(dy, dx))
    level = _level(points, roll)
    frontal = _level(ARCFACE_POINTS, 0.0)
    yaw_sine = (level["nose"][0] - level["eyes"][0]) / (level["eye_distance"] / 2)
    pitch_sine = 2 * (frontal["nose_height"] - level["nose_height"])
    yaw = np.degrees(np.arcsin(np.clip(yaw_sine, -1, 1)))
    pitch = np.degrees(np.arcsin(np.clip(pitch_sine, -1, 1)))
    return float(yaw), float(pitch), float(roll)


def _level(points: np.ndarray, roll: float) -> dict:
    """The landmarks rotated by ``-roll`` (eye line level): eyes' midpoint, nose, eye distance, and
    the nose's height between the eye line (0) and the mouth line (1)."""
    cos, sin = np.cos(np.radians(roll)), np.sin(np.radians(roll))
    level = (points - points[0]) @ np.array([[cos, -sin], [sin, cos]])
    eyes, mouth = (level[0] + level[1]) / 2, (level[3] + level[4]) / 2
    return {
        "eyes": eyes,
        "nose": level[2],
        "eye_distance": max(float(np.linalg.norm(level[1] - level[0])), 1e-6),
        "nose_height": (level[2][1] - eyes[1]) / max(mouth[1] - eyes[1], 1e-6),
    }


def face_quality(aligned_bgr: np.ndarray, landmarks: np.ndarray) -> FaceQuality:
    """Sharpness, exposure, pose and perceptual hash of one face (its aligned crop and landmarks)."""
    gray = cv2.cvtColor(aligned_bgr, cv2.COLOR_BGR2GRAY)
    yaw, pitch, roll = pose_from_landmarks(landmarks)
    return FaceQuality(
        sharpness=round(float(cv2.Laplacian(gray, cv2.CV_64F).var()), 2),
        brightness=round(float(gray.mean()), 2),
        contrast=round(float(gray.std()), 2),
        yaw=round(yaw, 2),
        pitch=round(pitch, 2),
        roll=round(roll, 2),
        inter_ocular_px=round(float(np.linalg.norm(np.subtract(landmarks[1], landmarks[0]))), 2),
        phash=str(imagehash.phash(Image.fromarray(aligned_bgr[:, :, ::-1]))),
    )


def quality_rejection(quality: FaceQuality, bounds: QualityFilters) -> str | None:
    """The status-table counter a face's quality drops it under, or None when it passes."""
    checks = (
        ("dropped_blurry", bounds.min_sharpness, lambda v: quality.sharpness < v),
        ("dropped_exposure", bounds.min_brightness, lambda v: quality.brightness < v),
        ("dropped_exposure", bounds.max_brightness, lambda v: quality.brightness > v),
        ("dropped_exposure", bounds.min_contrast, lambda v: quality.contrast < v),
        ("dropped_pose", bounds.max_abs_yaw, lambda v: abs(quality.yaw) > v),
        ("dropped_pose", bounds.max_abs_pitch, lambda v: abs(quality.pitch) > v),
        ("dropped_pose", bounds.max_abs_roll, lambda v: abs(quality.roll) > v),
        ("dropped_eyes_close", bounds.min_inter_ocular_px, lambda v: quality.inter_ocular_px < v),
    )
    return next((reason for reason, bound, fails in checks if bound is not None and fails(bound)), None)


@dataclass
class _Candidate:
    detection: FaceDetection
    aligned: np.ndarray
    quality: FaceQuality


@dataclass
class _Filtered:
    kept: list[_Candidate]
    detected: int = 0
    dropped_small: int = 0
    dropped_low_score: int = 0
    dropped_over_max: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTER_DROPS, 0))
    blocklist: str | None = None  # the phash list that matched a dropped face


class FaceCropper:
    """Detects, filters and crops faces; build once per worker (loading the model costs ~0.1 s)."""

    def __init__(self, config: FaceConfig | None = None, blocklists: Blocklists | None = None):
        self.config = config or FaceConfig()
        self.detector = _load_detector(self.config)
        self.blocklists = blocklists  # phash lists: a matching face is dropped

    def detect(self, image_bgr: np.ndarray) -> list[FaceDetection]:
        """The faces that pass the filters, largest first, ``face_index`` = rank."""
        return [candidate.detection for candidate in self._detect_and_filter(image_bgr).kept]

    def process(self, image_bytes: bytes, source_key: str, meta: SourceMeta | dict[str, Any]) -> FaceResult:
        """One image in, its status row and one ``CroppedFace`` per kept face out; never raises on bad bytes."""
        if "." in source_key:
            raise ValueError(f"source key {source_key!r} contains a dot; WebDataset keys cannot")
        source = {name: meta.get(name) for name in SourceMeta.__annotations__}
        status_fields = {"source_key": source_key, "url": source["url"], "sample_id": source["sample_id"]}
        try:
            image = decode_image(image_bytes, self.config.max_image_pixels)
        except ImageDecodeError as err:
            return FaceResult(FaceStatus(**status_fields, status="failed_to_decode", error=str(err)), [])

        found = self._detect_and_filter(image)
        counts = {
            "faces_detected": found.detected,
            "faces_kept": len(found.kept),
            "dropped_small": found.dropped_small,
            "dropped_low_score": found.dropped_low_score,
            "dropped_over_max": found.dropped_over_max,
            **found.dropped,
            "blocklist": found.blocklist,
        }
        if found.detected == 0:
            outcome = "no_face"
        elif not found.kept:
            outcome = "all_faces_filtered"
        else:
            outcome = "success"
        faces = [self._crop(image, candidate, source_key, source) for candidate in found.kept]
        return FaceResult(FaceStatus(**status_fields, status=outcome, **counts), faces)

    def _detect_and_filter(self, image: np.ndarray) -> _Filtered:
        height, width = image.shape[:2]
        # insightface resizes the long side to det_size; a short side that rounds to 0 pixels would
        # crash cv2.resize, and such a sliver holds no face anyway.
        if min(height, width) * self.config.det_size < max(height, width):
            return _Filtered(kept=[])
        boxes, landmarks = self.detector.detect(image)
        result = _Filtered(kept=[], detected=len(boxes))
        candidates = []
        for (x1, y1, x2, y2, score), points in zip(boxes.tolist(), landmarks.tolist(), strict=True):
            if score < self.config.min_score:
                result.dropped_low_score += 1
            elif min(x2 - x1, y2 - y1) < self.config.min_face_size:
                result.dropped_small += 1
            else:
                aligned = self._align(image, points)
                quality = face_quality(aligned, np.asarray(points))
                listed = self.blocklists.match_phash(int(quality.phash, 16)) if self.blocklists else None
                if listed is not None:
                    result.dropped["dropped_blocklisted"] += 1
                    result.blocklist = listed
                elif (reason := quality_rejection(quality, self.config.quality)) is not None:
                    result.dropped[reason] += 1
                else:
                    candidates.append(((x1, y1, x2, y2), points, score, aligned, quality))
        # Largest first; score and position break ties so the order never depends on NMS internals.
        candidates.sort(key=lambda c: (-(c[0][2] - c[0][0]) * (c[0][3] - c[0][1]), -c[2], c[0][0], c[0][1]))
        result.dropped_over_max = max(0, len(candidates) - self.config.max_faces)
        for index, (box, points, score, aligned, quality) in enumerate(candidates[: self.config.max_faces]):
            detection = FaceDetection(
                bbox=tuple(round(v, 2) for v in box),
                landmarks=tuple((round(x, 2), round(y, 2)) for x, y in points),
                score=round(score, 4),
                face_index=index,
                image_width=width,
                image_height=height,
            )
            result.kept.append(_Candidate(detection, aligned, quality))
        return result

    def _align(self, image: np.ndarray, points: list) -> np.ndarray:
        with warnings.catch_warnings():
            # insightface 2.1 calls a scikit-image method deprecated in 0.26; the result is the same
            warnings.filterwarnings("ignore", "`estimate` is deprecated", FutureWarning)
            return norm_crop(image, np.asarray(points, dtype=np.float32), self.config.aligned_size)

    def _crop(self, image: np.ndarray, candidate: _Candidate, source_key: str, source: dict) -> CroppedFace:
        detection = candidate.detection
        context_box = self._context_box(detection.bbox)
        context = _cut_square(image, context_box, self.config.context_size)
        record = FaceRecord(
            key=f"{source_key}_{detection.face_index:02d}",
            source_key=source_key,
            url=source["url"] or "",
            sample_id=source["sample_id"],
            caption=source["caption"],
            license=source["license"],
            nsfw=source["nsfw"],
            similarity=source["similarity"],
            detection=detection,
            crop=CropGeometry(
                context_box=context_box,
                context_size=self.config.context_size,
                margin=self.config.context_margin,
                aligned_size=self.config.aligned_size,
            ),
            quality=candidate.quality,
        )
        return CroppedFace(record, self._encode_jpeg(context), self._encode_jpeg(candidate.aligned))

    def _context_box(self, bbox: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A square on whole pixels centred on the face: crop pixel p maps back to left + p * side / size."""
        x1, y1, x2, y2 = bbox
        side = max(1, round((1 + 2 * self.config.context_margin) * max(x2 - x1, y2 - y1)))
        left = round((x1 + x2 - side) / 2)
        top = round((y1 + y2 - side) / 2)
        return (float(left), float(top), float(left + side), float(top + side))

    def _encode_jpeg(self, image: np.ndarray) -> bytes:
        ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.config.jpeg_quality])
        if not ok:
            raise RuntimeError("OpenCV failed to encode a JPEG")
        return buffer.tobytes()


def _cut_square(image: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Resize the part of ``box`` inside the image onto a black ``size`` square.

    Only the visible part is resized, never a padded full-resolution copy, so a face filling a huge
    image costs no more memory than the image itself.
    """
    left, top, right, bottom = (int(v) for v in box)
    height, width = image.shape[:2]
    scale = size / (right - left)
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    visible_left, visible_top = max(left, 0), max(top, 0)
    visible_right, visible_bottom = min(right, width), min(bottom, height)
    out_left, out_top = round((visible_left - left) * scale), round((visible_top - top) * scale)
    out_right, out_bottom = round((visible_right - left) * scale), round((visible_bottom - top) * scale)
    if out_right <= out_left or out_bottom <= out_top:
        return canvas  # less than one output pixel of the box lies inside the image
    visible = image[visible_top:visible_bottom, visible_left:visible_right]
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    canvas[out_top:out_bottom, out_left:out_right] = cv2.resize(
        visible, (out_right - out_left, out_bottom - out_top), interpolation=interpolation
    )
    return canvas


def detect_paths(paths: Iterable[str | Path], config: FaceConfig | None = None) -> Iterator[dict[str, Any]]:
    """One JSON-able dict per image file (the ``facemllm detect`` output); errors are reported, not raised."""
    cropper = FaceCropper(config)
    for path in paths:
        line: dict[str, Any] = {"path": str(path), "width": None, "height": None, "faces": []}
        try:
            image = decode_image(Path(path).read_bytes(), cropper.config.max_image_pixels)
        except (OSError, ImageDecodeError) as err:
            line["error"] = str(err)
            yield line
            continue
        line["height"], line["width"] = image.shape[:2]
        line["faces"] = [
            face.model_dump(mode="json", include={"bbox", "landmarks", "score"})
            for face in cropper.detect(image)
        ]
        yield line
