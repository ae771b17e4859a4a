"""The run configuration of ``facemllm run``: one section per stage, plus the runner.

Loaded from YAML and ``--set`` overrides by ``core.config``; a bad configuration stops the run
before any work, with pydantic's message naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, Field, model_validator

from facemllm.annotators.annotate_config import ANNOTATE_RUNTIME_FIELDS, AnnotateConfig
from facemllm.annotators.face_config import FaceConfig
from facemllm.pipeline.core.config import hash_config, load_yaml_config
from facemllm.pipeline.netguard import DestinationPolicy
from facemllm.schemas import StrictModel

ConfigModel = TypeVar("ConfigModel", bound=BaseModel)

Stage = Literal["select", "download", "faces", "annotate"]
ALL_STAGES: tuple[Stage, ...] = ("select", "download", "faces", "annotate")


class SelectConfig(StrictModel):
    """LAION-400M metadata + LAION-Face id list -> url shards."""

    metadata: list[str] = Field(description="LAION-400M metadata parquet files (globs allowed)")
    ids: str = Field(description="LAION-Face id list: .pth as published, .parquet (SAMPLE_ID) or .txt")
    id_parts: list[int] | None = Field(None, description="parts of the id list to use; None = all")
    trust_id_pickle: bool = Field(
        False, description="allow full unpickling of a .pth id list that torch's safe loader refuses"
    )
    min_width: int = Field(0, ge=0)
    min_height: int = Field(0, ge=0)
    nsfw: list[Literal["UNLIKELY", "UNSURE", "NSFW"]] | None = Field(
        None, description="NSFW tags to keep; None keeps all"
    )
    min_similarity: float | None = None
    samples_per_shard: int = Field(10_000, gt=0, le=1_000_000)
    batch_rows: int = Field(65_536, gt=0, description="rows read per streamed batch")
    max_shards_per_input: int = Field(
        1_000, gt=0, description="shard ids are input_index * this + chunk: a bound, not a target"
    )


class DownloadConfig(StrictModel):
    """img2dataset's Downloader and Resizer settings (its own names where it has them)."""

    thread_count: int = Field(32, gt=0)
    timeout: float = Field(10.0, gt=0)
    retries: int = Field(0, ge=0)
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"] = "no"
    image_size: int = Field(256, gt=0)
    resize_only_if_bigger: bool = False
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=0, le=100)
    min_image_size: int = Field(0, ge=0)
    max_aspect_ratio: float = Field(float("inf"), gt=0)
    max_image_pixels: int = Field(
        8192 * 8192, gt=0, description="decompression-bomb bound applied before OpenCV decodes"
    )
    user_agent_token: str | None = "facemllm"
    disallowed_header_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]
    destinations: DestinationPolicy = DestinationPolicy()


class RunnerConfig(StrictModel):
    """Which Beam runner executes the stages; see README for Dataflow, Flink and Spark."""

    runner: Literal["direct", "portable", "dataflow", "flink", "spark"] = "direct"
    direct_num_workers: int = Field(2, ge=0, description="0 = one per core")
    direct_running_mode: Literal["in_memory", "multi_threading", "multi_processing"] = "multi_processing"
    job_endpoint: str | None = Field(None, description="portable/flink/spark job service host:port")
    environment_type: str | None = Field(None, description="LOOPBACK, EXTERNAL, PROCESS or DOCKER")
    environment_config: str | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("WARNING", description="Beam worker logs")
    options: list[str] = Field(default_factory=list, description="extra Beam pipeline options, verbatim")

    @model_validator(mode="after")
    def _portable_needs_endpoint(self) -> RunnerConfig:
        if self.runner == "portable" and not self.job_endpoint:
            raise ValueError("runner 'portable' needs runner.job_endpoint (e.g. localhost:8099)")
        return self


class RunConfig(StrictModel):
    out: str = Field(description="output folder of the run")
    stages: list[Stage] = list(ALL_STAGES)
    select: SelectConfig
    download: DownloadConfig = DownloadConfig()
    faces: FaceConfig = FaceConfig()
    annotate: AnnotateConfig = AnnotateConfig()
    runner: RunnerConfig = RunnerConfig()

    def config_hash(self) -> str:
        """Hash of what decides the output bytes: not where it goes, nor how parallel it runs."""
        return hash_config(
            self,
            exclude={
                "out": True,
                "runner": True,
                "download": {"thread_count"},
                "faces": {"intra_op_threads"},
                "annotate": ANNOTATE_RUNTIME_FIELDS,
            },
        )


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    return load_yaml_config(RunConfig, path, overrides, base=base)
