"""``EvalConfig``: what ``facemllm eval`` scores, with which models, and how (YAML + ``--set``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from facemllm.annotators.annotate_config import ClientSettings
from facemllm.pipeline.core.config import load_yaml_config
from facemllm.pipeline.core.storage import StorageOptions, is_remote
from facemllm.schemas import SourceDataset, StrictModel
from facemllm.schemas.evaluation import EVAL_TASKS, EvalTask

DEFAULT_SPLITS: dict[SourceDataset, str] = {
    "celeba": "test",
    "rafdb": "test",
    "utkface": "test",
    "fairface": "val",
}


class ModelSpec(StrictModel):
    """A checkpoint folder scored in-process, or a served model scored over HTTP."""

    label: str = Field(description="name in reports and the results folder")
    checkpoint: str | None = Field(
        None, description="a transformers checkpoint folder (e.g. a stage's final/)"
    )
    endpoint: str | None = Field(None, description="OpenAI-compatible base URL, e.g. http://gpu:8000/v1")
    model: str | None = Field(None, description="served model name; default: the one the endpoint serves")

    @model_validator(mode="after")
    def _one_target(self) -> ModelSpec:
        if bool(self.checkpoint) == bool(self.endpoint):
            raise ValueError(f"model {self.label!r}: give either checkpoint or endpoint")
        if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*", self.label):
            raise ValueError(f"model label {self.label!r}: use letters, digits, '.', '_' and '-' only")
        return self

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        """``[LABEL=]FOLDER`` or ``[LABEL=]URL[#MODEL]``, as given to ``--model``."""
        label, sep, target = spec.partition("=")
        if not sep or "/" in label or ":" in label:
            label, target = "", spec
        if target.startswith(("http://", "https://")):
            url, _, model = target.partition("#")
            return cls(
                label=label or model.replace("/", "_") or "endpoint", endpoint=url, model=model or None
            )
        path = Path(target)
        default = f"{path.parent.name}-{path.name}" if path.name == "final" else path.name
        return cls(label=label or default or "checkpoint", checkpoint=target)


class EvalConfig(StrictModel):
    data: str = Field(description="the QA data folder (OUT/qa) holding <dataset>/manifest.json")
    out: str = Field(description="results folder: one sub-folder per model, and the comparison")
    models: list[ModelSpec] = Field(min_length=1)
    tasks: list[EvalTask] = Field(list(EVAL_TASKS), description="tasks to score (default all)")
    splits: dict[SourceDataset, str] = Field(
        default_factory=lambda: dict(DEFAULT_SPLITS), description="the split scored per dataset"
    )
    max_samples_per_task: int | None = Field(
        None, gt=0, description="score about this many samples per task, chosen by a seeded hash of the key"
    )
    seed: int = Field(0, description="seeds the sample selection and the bootstrap")
    bootstrap_resamples: int = Field(1000, ge=0)
    confidence: float = Field(0.95, gt=0, lt=1)
    max_new_tokens: int = Field(32, gt=0, description="reply length limit; the answers are a few words")
    batch_size: int = Field(16, gt=0, description="questions per generate() call (checkpoints)")
    device: str = Field("auto", description="checkpoints: auto (cuda if available), cpu, cuda, cuda:1")
    dtype: str = Field("auto", pattern="^(auto|float32|bfloat16|float16)$")
    client: ClientSettings = Field(
        ClientSettings(concurrency=16),
        description="endpoints: concurrency, timeouts, retries, API key variable",
    )
    storage: StorageOptions = StorageOptions(progress=False)
    worst_examples: int = Field(8, ge=0, description="worst examples shown per task in the HTML report")

    @field_validator("tasks", mode="before")
    @classmethod
    def _all(cls, value: Any) -> Any:
        if value == "all" or value == ["all"]:
            return list(EVAL_TASKS)
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @model_validator(mode="after")
    def _coherent(self) -> EvalConfig:
        labels = [m.label for m in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"models: two models share a label ({labels}); name them LABEL=TARGET")
        if is_remote(self.out):
            raise ValueError("out: results are written to a local folder (publish it afterwards)")
        return self


def load_eval_config(path: str | Path | None, overrides: list[str] = (), **given: Any) -> EvalConfig:
    return load_yaml_config(EvalConfig, path, overrides, given)
