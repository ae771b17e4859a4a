"""``FaceConfig`` on its own, free of OpenCV: the run config imports it, and OpenCV must not be
imported before the download stage has set its decoder bound (OPENCV_IO_MAX_IMAGE_PIXELS is read
once, when cv2 is imported)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from facemllm.schemas import StrictModel

# Detector input sides must be multiples of SCRFD's largest feature stride.
DETECTOR_STRIDE = 32


# The status-table counters of faces dropped by a quality bound (see ``QualityFilters``).
QUALITY_DROPS = ("dropped_blurry", "dropped_exposure", "dropped_pose", "dropped_eyes_close")
# Every counter of faces dropped after detection: the quality bounds and the phash blocklists.
FILTER_DROPS = (*QUALITY_DROPS, "dropped_blocklisted")


class QualityFilters(StrictModel):
    """Bounds on the quality measures (``schemas.FaceQuality``); each is off (None) by default.
    A face outside any bound is dropped and counted by reason in the status table."""

    model_config = ConfigDict(frozen=True)

    min_sharpness: float | None = Field(None, ge=0, description="variance of the Laplacian, e.g. 50")
    min_brightness: float | None = Field(None, ge=0, le=255, description="mean grayscale, e.g. 40")
    max_brightness: float | None = Field(None, ge=0, le=255, description="mean grayscale, e.g. 220")
    min_contrast: float | None = Field(None, ge=0, description="grayscale standard deviation, e.g. 15")
    max_abs_yaw: float | None = Field(None, ge=0, le=90, description="degrees, e.g. 45")
    max_abs_pitch: float | None = Field(None, ge=0, le=90, description="degrees")
    max_abs_roll: float | None = Field(None, ge=0, le=180, description="degrees")
    min_inter_ocular_px: float | None = Field(
        None, ge=0, description="eye distance in source pixels, e.g. 20"
    )


class FaceConfig(StrictModel):
    """How faces are detected, filtered and cropped. Defaults suit a 336-448 px vision tower."""

    model_config = ConfigDict(frozen=True)

    model: Path | None = Field(None, description="ONNX SCRFD model; default: the scrfd==0.3.0 package model")
    model_pack: Path | None = Field(
        None,
        description="insightface model pack folder (e.g. ~/.insightface/models/buffalo_l); uses its det_*.onnx",
    )
    det_size: int = Field(640, gt=0, description="detector input side in pixels (multiple of 32)")
    det_thresh: float = Field(0.3, gt=0, le=1, description="detector score threshold, before NMS")
    min_score: float = Field(0.5, ge=0, le=1, description="faces scoring below are dropped")
    min_face_size: int = Field(32, ge=0, description="faces whose shorter bbox side is below are dropped")
    max_faces: int = Field(
        10,
        gt=0,
        le=99,
        description="keep at most this many faces per image, largest first (keys hold 2 digits)",
    )
    context_size: int = Field(384, gt=0, description="side of the square context crop in pixels")
    context_margin: float = Field(
        0.5, ge=0, description="context box side = (1 + 2 * margin) * longest face side"
    )
    aligned_size: int = Field(
        112, gt=0, description="side of the ArcFace-aligned crop (multiple of 112 or 128)"
    )
    jpeg_quality: int = Field(95, ge=1, le=100)
    max_image_pixels: int = Field(8192 * 8192, gt=0, description="refuse larger images before decoding them")
    intra_op_threads: int = Field(1, gt=0, description="onnxruntime threads per detector")
    providers: list[str] | Literal["auto"] = Field(
        "auto",
        description="onnxruntime execution providers in order of preference; auto: CUDA when this "
        "onnxruntime has it (onnxruntime-gpu), else CPU. A provider named here that the installed "
        "onnxruntime lacks is an error, never a silent fall back to CPU",
    )
    quality: QualityFilters = QualityFilters()

    @field_validator("det_size")
    @classmethod
    def _det_size_fits_strides(cls, value: int) -> int:
        if value % DETECTOR_STRIDE:
            raise ValueError(f"det_size must be a multiple of {DETECTOR_STRIDE}, got {value}")
        return value

    @field_validator("aligned_size")
    @classmethod
    def _aligned_size_fits_template(cls, value: int) -> int:
        if value % 112 and value % 128:
            raise ValueError(f"aligned_size must be a multiple of 112 or 128 (ArcFace template), got {value}")
        return value

    @model_validator(mode="after")
    def _one_model_source(self) -> FaceConfig:
        if self.model is not None and self.model_pack is not None:
            raise ValueError("set either faces.model or faces.model_pack, not both")
        return self
