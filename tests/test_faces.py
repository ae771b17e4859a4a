"""Face detection and crops on real photos with the real SCRFD model: no mocks."""

from __future__ import annotations

import io
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from benchmarks._common import peak_rss_mb, reset_peak_rss
from facemllm.annotators.faces import (
    FaceConfig,
    FaceCropper,
    FaceResult,
    decode_image,
    detect_paths,
    execution_providers,
)
from facemllm.annotators.model_store import (
    COMPLETE_MARKER,
    SCRFD_MODEL_SHA256,
    _safe_extract,
    default_detector_path,
    ensure_scrfd_package,
)
from facemllm.pipeline.core.files import sha256_file
from facemllm.schemas import FaceRecord
from tests.photos import insightface_masks, insightface_t1, scrfd_photo, scrfd_truth_faces, skimage_photo

SOLVAY_FACES = 29  # asserted by the scrfd package's own test

# insightface's norm_crop calls skimage 0.26's deprecated SimilarityTransform.estimate


@pytest.fixture(scope="module")
def cropper() -> FaceCropper:
    return FaceCropper(FaceConfig())


@pytest.fixture(scope="module")
def all_faces_cropper() -> FaceCropper:
    """No filter left active, so counts can be checked against what the detector found."""
    return FaceCropper(FaceConfig(min_score=0, min_face_size=0, max_faces=99))


@pytest.fixture(scope="module")
def solvay() -> bytes:
    return scrfd_photo("solvay_conference_1927.jpg").read_bytes()


@pytest.fixture(scope="module")
def solvay_all(all_faces_cropper: FaceCropper, solvay: bytes) -> FaceResult:
    return all_faces_cropper.process(solvay, "solvay", {})


def decoded(jpg: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)


def area(record: FaceRecord) -> float:
    x1, y1, x2, y2 = record.detection.bbox
    return (x2 - x1) * (y2 - y1)


def test_model_store_is_pinned_and_idempotent():
    folder = ensure_scrfd_package()
    assert ensure_scrfd_package() == folder
    assert (folder / COMPLETE_MARKER).is_file()
    assert default_detector_path() == folder / "models" / "scrfd.onnx"
    assert sha256_file(default_detector_path()) == SCRFD_MODEL_SHA256


@pytest.mark.parametrize("bad_name", ["/etc/passwd", "scrfd-0.3.0/../../escape", "elsewhere/file"])
def test_model_store_rejects_unsafe_archive_members(tmp_path: Path, bad_name: str):
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        member = tarfile.TarInfo(bad_name)
        member.size = 1
        tar.addfile(member, io.BytesIO(b"x"))
    with pytest.raises(RuntimeError, match="unsafe member"):
        _safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_solvay_has_29_faces(cropper: FaceCropper, solvay: bytes, solvay_all: FaceResult):
    status = cropper.process(solvay, "solvay", {}).status
    assert (status.status, status.faces_detected) == ("success", SOLVAY_FACES)
    assert (status.faces_kept, status.dropped_over_max) == (10, SOLVAY_FACES - 10)  # default max_faces=10
    assert status.dropped_small == status.dropped_low_score == 0
    assert solvay_all.status.faces_kept == SOLVAY_FACES
    for face in solvay_all.faces:  # the scrfd test's own check: landmarks lie inside their box
        x1, y1, x2, y2 = face.record.detection.bbox
        assert all(x1 <= x <= x2 and y1 <= y <= y2 for x, y in face.record.detection.landmarks)


@pytest.mark.parametrize("name", ["newton.png", "gauss.png"])
def test_newton_and_gauss_match_scrfd_truth(cropper: FaceCropper, name: str):
    image = cv2.imread(str(scrfd_photo(name)))
    faces = cropper.detect(image)
    (truth,) = scrfd_truth_faces()[name]
    assert len(faces) == 1
    # The truth is truncated to whole pixels from a NEAREST resize; insightface resizes bilinearly.
    np.testing.assert_allclose(faces[0].bbox, truth.bbox, atol=2.0)
    np.testing.assert_allclose(faces[0].landmarks, truth.landmarks, atol=2.0)
    assert faces[0].score == pytest.approx(truth.probability, abs=0.03)
    assert (faces[0].image_width, faces[0].image_height) == (image.shape[1], image.shape[0])


@pytest.mark.parametrize("path", [insightface_t1(), skimage_photo("astronaut.png")], ids=lambda p: p.name)
def test_other_shipped_photos(cropper: FaceCropper, path: Path):
    expected = {"t1.jpg": 6, "astronaut.png": 1}[path.name]
    result = cropper.process(path.read_bytes(), "photo", {})
    assert (result.status.status, result.status.faces_kept) == ("success", expected)


@pytest.mark.parametrize("path", insightface_masks(), ids=lambda p: p.name)
def test_masks_alone_are_no_face(cropper: FaceCropper, path: Path):
    result = cropper.process(path.read_bytes(), "mask", {})
    assert (result.status.status, result.status.faces_detected, result.faces) == ("no_face", 0, [])


def with_declared_size(fmt: str, side: int) -> bytes:
    """A small valid image whose header claims ``side`` x ``side`` pixels (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, fmt)
    data = bytearray(buffer.getvalue())
    if fmt == "PNG":  # IHDR data starts at byte 16: width, height, then a CRC over type and data
        data[16:24] = struct.pack(">II", side, side)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    else:  # JPEG baseline SOF0: FFC0, length, precision, height, width
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


@pytest.mark.parametrize(
    ("case", "make"),
    [
        ("empty", lambda solvay: b""),
        ("random", lambda solvay: np.random.default_rng(0).bytes(4096)),
        ("truncated_jpeg", lambda solvay: solvay[: len(solvay) // 2]),
        ("jpeg_missing_last_bytes", lambda solvay: solvay[:-100]),
        ("png_20000px", lambda solvay: with_declared_size("PNG", 20000)),  # over PIL's own cap too
        ("jpeg_20000px", lambda solvay: with_declared_size("JPEG", 20000)),
        ("png_9000px", lambda solvay: with_declared_size("PNG", 9000)),  # over ours only
    ],
)
def test_bad_bytes_fail_to_decode_without_raising(cropper: FaceCropper, solvay: bytes, case: str, make):
    reset_peak_rss()  # the peak measured below is this decode's, not an earlier test's
    rss_before = peak_rss_mb()
    result = cropper.process(make(solvay), "bad", {"url": "http://example.com/x.jpg", "sample_id": 7})
    status = result.status
    assert (status.status, result.faces, status.faces_detected) == ("failed_to_decode", [], 0)
    assert (status.url, status.sample_id) == ("http://example.com/x.jpg", 7) and status.error
    if case.endswith("px"):
        assert status.error.startswith("image too large")
    if case == "png_9000px":
        assert "9000x9000 pixels exceeds max_image_pixels" in status.error
    # a 20000x20000 BGR image would be 1.2 GB
    assert peak_rss_mb() - rss_before < 200


def test_grayscale_and_alpha_decode_to_bgr():
    gray = scrfd_photo("solvay_conference_1927.jpg").read_bytes()  # a one-component JPEG
    assert decode_image(gray, 10**8).shape == (2171, 3000, 3)
    buffer = io.BytesIO()
    Image.open(scrfd_photo("newton.png")).convert("RGBA").save(buffer, "PNG")
    assert decode_image(buffer.getvalue(), 10**8).shape == (432, 768, 3)


def test_max_faces_keeps_the_largest(solvay: bytes, solvay_all: FaceResult):
    result = FaceCropper(FaceConfig(max_faces=3)).process(solvay, "solvay", {})
    assert (result.status.faces_kept, result.status.dropped_over_max) == (3, SOLVAY_FACES - 3)
    largest = sorted((area(face.record) for face in solvay_all.faces), reverse=True)[:3]
    assert [area(face.record) for face in result.faces] == largest
    assert [face.record.detection.face_index for face in result.faces] == [0, 1, 2]


def test_size_and_score_filters_count_each_face_once(solvay: bytes, solvay_all: FaceResult):
    detections = [face.record.detection for face in solvay_all.faces]
    low_score = sum(d.score < 0.8 for d in detections)
    small = sum(d.score >= 0.8 and min(d.bbox[2] - d.bbox[0], d.bbox[3] - d.bbox[1]) < 90 for d in detections)
    assert low_score and small, "thresholds should exercise both filters"
    config = FaceConfig(min_score=0.8, min_face_size=90, max_faces=99)
    status = FaceCropper(config).process(solvay, "solvay", {}).status
    assert (status.dropped_low_score, status.dropped_small, status.dropped_over_max) == (low_score, small, 0)
    assert status.faces_kept == SOLVAY_FACES - low_score - small


def test_all_faces_filtered_is_not_no_face():
    newton = scrfd_photo("newton.png").read_bytes()
    status = FaceCropper(FaceConfig(min_score=0.99)).process(newton, "newton", {}).status
    assert (status.status, status.faces_detected, status.dropped_low_score) == ("all_faces_filtered", 1, 1)


def test_crops_records_and_keys(cropper: FaceCropper):
    meta = {
        "url": "http://example.com/t1.jpg",
        "sample_id": 42,
        "caption": "friends",
        "license": "?",
        "nsfw": "UNLIKELY",
        "similarity": 0.31,
    }
    result = cropper.process(insightface_t1().read_bytes(), "000000042", meta)
    assert [face.record.key for face in result.faces] == [f"000000042_{i:02d}" for i in range(6)]
    for face in result.faces:
        record = face.record
        assert "." not in record.key
        assert FaceRecord.model_validate_json(record.model_dump_json()) == record
        assert (record.url, record.sample_id, record.caption, record.similarity) == (
            meta["url"],
            42,
            "friends",
            0.31,
        )
        assert decoded(face.context_jpg).shape == (384, 384, 3)
        assert decoded(face.aligned_jpg).shape == (112, 112, 3)
        x1, y1, x2, y2 = record.crop.context_box
        assert (
            x2 - x1
            == y2 - y1
            == round(
                2
                * max(
                    record.detection.bbox[2] - record.detection.bbox[0],
                    record.detection.bbox[3] - record.detection.bbox[1],
                )
            )
        )


def test_context_crop_pads_outside_the_image_with_black(cropper: FaceCropper):
    # newton's face spans rows 89-232; cut 70 rows off the top and its context box leaves the image
    newton = cv2.imread(str(scrfd_photo("newton.png")))[70:]
    (face,) = cropper.process(cv2.imencode(".png", newton)[1].tobytes(), "newton", {}).faces
    top = face.record.crop.context_box[1]
    assert top < -40
    rows_above = int(-top * 384 / (face.record.crop.context_box[3] - top)) - 2  # minus JPEG ringing
    assert decoded(face.context_jpg)[:rows_above].max() <= 8


def test_output_is_deterministic(cropper: FaceCropper, solvay: bytes):
    fresh = FaceCropper(FaceConfig())
    for data in (solvay, insightface_t1().read_bytes()):
        first, second = cropper.process(data, "k", {}), fresh.process(data, "k", {})
        assert first.status == second.status
        assert [(f.record, f.context_jpg, f.aligned_jpg) for f in first.faces] == [
            (f.record, f.context_jpg, f.aligned_jpg) for f in second.faces
        ]


def test_model_pack_folder_loads_its_detector(tmp_path: Path):
    pack = tmp_path / "buffalo_test"
    pack.mkdir()
    with pytest.raises(FileNotFoundError, match="det_"):
        FaceCropper(FaceConfig(model_pack=pack))
    shutil.copy(default_detector_path(), pack / "det_500m.onnx")
    newton = cv2.imread(str(scrfd_photo("newton.png")))
    assert len(FaceCropper(FaceConfig(model_pack=pack)).detect(newton)) == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"det_size": 100},
        {"min_score": 1.5},
        {"aligned_size": 100},
        {"context_size": 0},
        {"model": "a.onnx", "model_pack": "b"},
        {"unknown": 1},
    ],
)
def test_bad_config_is_rejected(bad: dict):
    with pytest.raises(ValidationError):
        FaceConfig.model_validate(bad)


def test_detect_paths_reports_every_path(tmp_path: Path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    lines = list(detect_paths([scrfd_photo("newton.png"), broken, tmp_path / "missing.jpg"]))
    assert [line["path"] for line in lines] == [
        str(scrfd_photo("newton.png")),
        str(broken),
        str(tmp_path / "missing.jpg"),
    ]
    assert (lines[0]["width"], lines[0]["height"], len(lines[0]["faces"])) == (768, 432, 1)
    assert set(lines[0]["faces"][0]) == {"bbox", "landmarks", "score"} and "error" not in lines[0]
    assert all(line["error"] and line["faces"] == [] for line in lines[1:])


def faces_by_centre(result: FaceResult, mirror_width: int | None = None) -> dict[tuple[int, int], FaceRecord]:
    """Kept faces by their bbox centre (mirrored when ``mirror_width`` is given), rounded to 10 px."""
    found = {}
    for face in result.faces:
        x1, y1, x2, y2 = face.record.detection.bbox
        x = (x1 + x2) / 2 if mirror_width is None else mirror_width - (x1 + x2) / 2
        found[(round(x / 10), round((y1 + y2) / 20))] = face.record
    return found


def encoded(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def test_quality_measures_on_real_photos(solvay: bytes, all_faces_cropper: FaceCropper):
    """A blurred copy is less sharp, face by face; a mirrored face has the opposite yaw and roll."""
    image = decoded(solvay)
    original = faces_by_centre(all_faces_cropper.process(encoded(image), "k", {}))
    blurred = faces_by_centre(
        all_faces_cropper.process(encoded(cv2.GaussianBlur(image, (0, 0), 2.5)), "k", {})
    )
    mirrored = faces_by_centre(
        all_faces_cropper.process(encoded(cv2.flip(image, 1)), "k", {}), image.shape[1]
    )
    common = original.keys() & blurred.keys()
    assert len(common) >= 10
    assert all(blurred[c].quality.sharpness < original[c].quality.sharpness for c in common)
    turned = [c for c in original.keys() & mirrored.keys() if abs(original[c].quality.yaw) > 5]
    assert len(turned) >= 5
    for centre in turned:
        face, flipped = original[centre].quality, mirrored[centre].quality
        assert np.sign(face.yaw) == -np.sign(flipped.yaw) and abs(face.yaw + flipped.yaw) < 8
        assert abs(face.roll + flipped.roll) < 6  # the detector is not exactly mirror-symmetric
    for record in original.values():
        quality = record.quality
        assert 0 < quality.brightness < 255 and quality.contrast > 0
        left_eye, right_eye = record.detection.landmarks[:2]
        assert quality.inter_ocular_px == pytest.approx(np.hypot(*np.subtract(right_eye, left_eye)), abs=0.02)


def test_quality_filters_drop_and_count_by_reason(solvay: bytes, solvay_all: FaceResult):
    yaws = sorted(abs(face.record.quality.yaw) for face in solvay_all.faces)
    bound = yaws[len(yaws) // 2]  # about half the faces are turned further than this
    strict = FaceCropper(FaceConfig(max_faces=99, quality={"max_abs_yaw": bound, "min_sharpness": 0}))
    status = strict.process(solvay, "k", {}).status
    assert status.dropped_pose == sum(y > bound for y in yaws) > 0
    assert status.faces_kept + status.dropped_pose == solvay_all.status.faces_kept
    assert status.dropped_blurry == status.dropped_exposure == status.dropped_eyes_close == 0


def test_execution_providers_resolve_or_fail_loudly(cropper: FaceCropper, solvay: bytes):
    """``faces.providers``: auto takes CUDA only where onnxruntime has it (here: the CPU); an explicit
    provider this onnxruntime lacks is an error naming what it has, never a silent CPU run."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    assert execution_providers(FaceConfig()) == [
        p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available
    ]
    assert cropper.detector.session.get_providers() == execution_providers(FaceConfig())
    explicit = FaceCropper(FaceConfig(providers=["CPUExecutionProvider"]))
    assert explicit.detector.session.get_providers() == ["CPUExecutionProvider"]
    assert [f.record.detection.bbox for f in explicit.process(solvay, "s", {}).faces] == [
        f.record.detection.bbox for f in cropper.process(solvay, "s", {}).faces
    ]
    if "CUDAExecutionProvider" not in available:
        with pytest.raises(ValueError, match="CUDAExecutionProvider needs the onnxruntime-gpu"):
            FaceCropper(FaceConfig(providers=["CUDAExecutionProvider", "CPUExecutionProvider"]))
