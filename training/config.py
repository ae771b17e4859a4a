"""A training stage's configuration: pydantic models loaded from YAML, overridable with ``--set``.

One file describes one stage (``configs/stage1.yaml`` ...): where the model comes from, which of its
parts train, the shard mixture, the optimiser and the loop. A bad configuration stops the run before
any model or shard is touched, with pydantic's message naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from facemllm.pipeline.core.config import hash_config, load_yaml_config
from facemllm.pipeline.core.storage import StorageOptions
from facemllm.schemas import StrictModel

PartName = Literal["projector", "language_model", "vision_tower"]
STAGE_TRAINABLE: dict[int, list[PartName]] = {
    1: ["projector"],
    2: ["projector", "language_model"],
    3: ["projector", "language_model"],
}


class ModelConfig(StrictModel):
    """Where the model comes from: one whole VLM, or a LLaVA assembled from a vision tower and an LM.

    ``pretrained``: a Hugging Face id or folder of a complete image-text-to-text model (a previous
    stage's ``final/`` folder, ``HuggingFaceTB/SmolVLM-256M-Instruct``, ``llava-hf/llava-1.5-7b-hf``).
    Otherwise ``vision_tower`` and ``language_model`` give the two halves of a new LLaVA, each as an
    id/folder (pretrained weights) or as a config dict (random weights, e.g. for a throughput run);
    the MLP projector between them always starts from random weights.
    """

    pretrained: str | None = None
    vision_tower: str | dict[str, Any] | None = Field(
        None, description="CLIP or SigLIP: id/folder, or a vision config dict with model_type"
    )
    language_model: str | dict[str, Any] | None = Field(
        None, description="a causal LM: id/folder, or a config dict with model_type"
    )
    tokenizer: str | None = Field(
        None, description="default: the language model's (required for a config dict)"
    )
    image_processor: str | dict[str, Any] | None = Field(
        None,
        description="id/folder, or kwargs of the vision tower's PIL image processor; default: the tower's",
    )
    chat_template: str | None = Field(
        None,
        description="preset (llava, chatml, idefics3) or a Jinja template; default: the processor's own, "
        "else chatml when the tokenizer has <|im_start|>, else llava",
    )
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] | None = Field(
        None, description="default drops CLIP's CLS token; default: 'default' for CLIP, 'full' for SigLIP"
    )
    revision: str | None = None
    attn_implementation: str | None = Field(None, description="e.g. sdpa, eager, flash_attention_2")
    image_backend: Literal["auto", "pil", "torchvision"] = Field(
        "auto", description="image processor backend; auto = torchvision when importable, else PIL"
    )
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        parts = self.vision_tower is not None or self.language_model is not None
        if self.pretrained and parts:
            raise ValueError(
                "model: give either pretrained (a whole VLM) or vision_tower + language_model "
                "(a LLaVA to assemble), not both"
            )
        if not self.pretrained and (self.vision_tower is None or self.language_model is None):
            raise ValueError("model: set pretrained, or both vision_tower and language_model")
        if isinstance(self.language_model, dict) and self.tokenizer is None:
            raise ValueError("model.tokenizer is required when language_model is a config dict")
        for name in ("vision_tower", "language_model"):
            value = getattr(self, name)
            if isinstance(value, dict) and "model_type" not in value:
                raise ValueError(
                    f"model.{name}: a config dict needs a model_type (e.g. clip_vision_model, llama)"
                )
        return self


class LoraSettings(StrictModel):
    """LoRA on the language model (peft); merged into the weights when the stage's model is saved."""

    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TuneConfig(StrictModel):
    """What trains. Default by stage: 1 = projector; 2 and 3 = projector + language model."""

    trainable: list[PartName] | None = None
    lora: LoraSettings = LoraSettings()


class SourceConfig(StrictModel):
    """One shard set: QA shards (KEY.jpg + KEY.json with LLaVA ``conversations``)."""

    name: str
    urls: list[str] = Field(
        description="shard URLs or folders, local or fsspec (s3://, gs://); {00000..00099} ranges and globs expand"
    )
    weight: float = Field(1.0, gt=0, description="mixing weight (relative)")

    @field_validator("urls", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("urls")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("urls must name at least one shard or folder")
        return value


class DataConfig(StrictModel):
    sources: list[SourceConfig] = Field(min_length=1)
    resampled: bool | None = Field(
        None,
        description="draw shards with replacement (infinite streams, for mixtures); default: true for "
        "more than one source, else epochs over a shuffled shard list",
    )
    batch_size: int = Field(8, gt=0, description="samples per micro-batch and device")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per device")
    prefetch_factor: int = Field(4, gt=0)
    shuffle_buffer: int = Field(1000, ge=1, description="samples; 1 = no shuffling")
    segment_samples: int = Field(
        4096,
        gt=0,
        description="a worker's stream is cut into segments of this many samples; buffers drain at "
        "segment ends, so a resume replays at most one segment (its images are not decoded)",
    )
    group_by_length: int = Field(
        16, ge=1, description="batches per length-sorting window (1 = no length grouping)"
    )
    max_length: int = Field(2048, gt=0, description="longer samples are skipped (counted)")
    pad_to_multiple_of: int = Field(8, ge=1)
    max_image_pixels: int = Field(8192 * 8192, gt=0, description="refuse larger images before decoding")
    storage: StorageOptions = StorageOptions(progress=False)

    @model_validator(mode="after")
    def _segment_fits(self) -> DataConfig:
        if self.segment_samples < self.batch_size:
            raise ValueError("data.segment_samples must be at least data.batch_size")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources: names must be unique, got {names}")
        return self

    @property
    def is_resampled(self) -> bool:
        return len(self.sources) > 1 if self.resampled is None else self.resampled


class OptimConfig(StrictModel):
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor, as a fraction of lr")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0, description="overrides warmup_ratio")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = Field(1.0, gt=0, description="None = no clipping")


class LoopConfig(StrictModel):
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; or give epochs")
    epochs: float | None = Field(
        None, gt=0, description="passes over the data (one source; needs sizes.json); sets max_steps"
    )
    grad_accum: int = Field(1, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    seed: int = 0
    log_every: int = Field(10, gt=0)
    save_every: int | None = Field(500, gt=0, description="training checkpoint every N steps")
    keep_last: int = Field(2, gt=0, description="training checkpoints kept")
    resume: str = Field(
        "auto", description="auto (latest checkpoint in output_dir), never, or a checkpoint folder"
    )
    stop_at_step: int | None = Field(
        None, gt=0, description="stop after this step as if interrupted (time-boxed jobs, tests)"
    )
    tensorboard: bool = False
    log_sample_keys: bool = Field(
        False, description="write the keys each rank trained on to samples-rankN.txt"
    )
    ddp_find_unused_parameters: bool = True
    save_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 if trained in bf16"
    )

    @model_validator(mode="after")
    def _steps(self) -> LoopConfig:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("loop: set exactly one of max_steps and epochs")
        return self


class TrainRunConfig(StrictModel):
    output_dir: str = Field(description="checkpoints/, final/ (the stage's model), metrics.jsonl")
    stage: Literal[1, 2, 3]
    model: ModelConfig
    tune: TuneConfig = TuneConfig()
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    loop: LoopConfig

    @model_validator(mode="after")
    def _coherent(self) -> TrainRunConfig:
        if self.loop.epochs is not None and self.data.is_resampled:
            raise ValueError(
                "loop.epochs needs one source read in epochs (data.resampled false): use max_steps"
            )
        if self.tune.lora.enabled and "language_model" not in self.trainable_parts:
            raise ValueError("tune.lora.enabled needs language_model among tune.trainable")
        return self

    @property
    def trainable_parts(self) -> list[PartName]:
        return list(self.tune.trainable or STAGE_TRAINABLE[self.stage])

    def config_hash(self) -> str:
        """What decides the training trajectory (not where it is written, nor how it is logged)."""
        return hash_config(
            self,
            exclude={
                "output_dir": True,
                "loop": {"log_every", "save_every", "keep_last", "resume", "stop_at_step", "tensorboard"},
            },
        )


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainRunConfig:
    return load_yaml_config(TrainRunConfig, path, overrides)
