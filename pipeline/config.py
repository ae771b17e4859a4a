"""The run configuration of ``facemllm run``: one section per stage, plus the runner.

Loaded from YAML and ``--set`` overrides by ``core.config``; a bad configuration stops the run
before any work, with pydantic's message naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from facemllm.annotators.annotate_config import ANNOTATE_RUNTIME_FIELDS, AnnotateConfig
from facemllm.annotators.face_config import FaceConfig
from facemllm.pipeline.core.config import hash_config, load_yaml_config
from facemllm.pipeline.runners import RunnerConfig
from facemllm.pipeline.stages.dedup import DedupConfig
from facemllm.pipeline.stages.download import DownloadConfig
from facemllm.pipeline.stages.laion_face_qa import LaionFaceQAConfig
from facemllm.pipeline.stages.select import SelectConfig
from facemllm.schemas import StrictModel

Stage = Literal["select", "download", "faces", "annotate", "laion_face_qa"]
ACQUISITION_STAGES: tuple[Stage, ...] = ("select", "download", "faces", "annotate")


class RunConfig(StrictModel):
    """``facemllm run``: which stages, one section of settings per stage, and the Beam runner."""

    out: str = Field(description="output folder of the run")
    stages: list[Stage] = list(ACQUISITION_STAGES)
    select: SelectConfig
    download: DownloadConfig = DownloadConfig()
    faces: FaceConfig = FaceConfig()
    annotate: AnnotateConfig = AnnotateConfig()
    laion_face_qa: LaionFaceQAConfig = LaionFaceQAConfig()
    dedup: DedupConfig = DedupConfig()
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
