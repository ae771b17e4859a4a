"""Model assembly through transformers' image-text-to-text classes, what trains, and the export.

Two families are supported, by their module layout (transformers 5):

- ``llava``: ``model.vision_tower`` (CLIP or SigLIP), ``model.multi_modal_projector`` (the MLP
  projector), ``model.language_model`` + ``lm_head``. Built whole from a checkpoint, or assembled
  here from a vision tower and a causal LM (pretrained ids/folders or config dicts).
- ``idefics3`` (also SmolVLM): ``model.vision_model``, ``model.connector``, ``model.text_model`` +
  ``lm_head``. Built whole from a checkpoint (SmolVLM, or a previous stage's output).

Which parts train is set by the stage config; LoRA (peft) wraps the language model's linear
layers and is merged into the weights at export, so every stage's ``final/`` folder is a plain
transformers checkpoint (model, tokenizer, processor, chat template) that vLLM serves.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facemllm.training.config import ModelConfig, PartName, TuneConfig
from facemllm.training.templates import CHATML_TEMPLATE, IDEFICS3_TEMPLATE, LLAVA_TEMPLATE, resolve_template

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    name: str
    parts: dict[str, tuple[str, ...]]  # part -> parameter name prefixes (of the plain model)
    image_layout: str  # "flat": pixel_values (n_images, C, H, W); "per_sample": (B, n_max, C, H, W)
    lm_prefix: str  # where LoRA targets live
    default_template: str


FAMILIES: dict[str, Family] = {
    "llava": Family(
        "llava",
        {
            "projector": ("model.multi_modal_projector.",),
            "vision_tower": ("model.vision_tower.",),
            "language_model": ("model.language_model.", "lm_head."),
        },
        "flat",
        "model.language_model.",
        LLAVA_TEMPLATE,
    ),
    "idefics3": Family(
        "idefics3",
        {
            "projector": ("model.connector.",),
            "vision_tower": ("model.vision_model.",),
            "language_model": ("model.text_model.", "lm_head."),
        },
        "per_sample",
        "model.text_model.",
        IDEFICS3_TEMPLATE,
    ),
}
MODEL_TYPES = {"llava": "llava", "idefics3": "idefics3", "smolvlm": "idefics3"}


def family_of(model_type: str) -> Family:
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported by the trainer; supported: {sorted(MODEL_TYPES)}"
        )
    return FAMILIES[MODEL_TYPES[model_type]]


@dataclass
class LoadedModel:
    model: nn.Module  # what trains: the plain model, or its peft wrapper
    base: nn.Module  # the plain transformers model (LoRA layers injected in place when used)
    processor: Any
    family: Family

    @property
    def is_peft(self) -> bool:
        return self.model is not self.base


def resolve_backend(choice: str) -> str:
    if choice != "auto":
        return choice
    return "torchvision" if importlib.util.find_spec("torchvision") else "pil"


# --- loading and assembly -----------------------------------------------------------------------


def build_model(cfg: ModelConfig, seed: int = 0) -> LoadedModel:
    """The model and processor a stage starts from, in fp32, with random parts seeded by ``seed``."""
    torch.manual_seed(seed)
    if cfg.pretrained:
        model, processor = _load_pretrained(cfg)
    else:
        model, processor = _assemble_llava(cfg)
    family = family_of(model.config.model_type)
    _fix_generation_ids(model, processor.tokenizer)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return LoadedModel(model=model, base=model, processor=processor, family=family)


def _load_pretrained(cfg: ModelConfig):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(cfg.pretrained, revision=cfg.revision)
    family = family_of(config.model_type)
    kwargs: dict[str, Any] = {"dtype": torch.float32, "revision": cfg.revision}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(cfg.pretrained, **kwargs)
    processor = load_processor(cfg.pretrained, cfg.image_backend, cfg.revision)
    if cfg.chat_template:
        processor.chat_template = resolve_template(cfg.chat_template)
    elif not getattr(processor, "chat_template", None):
        processor.chat_template = family.default_template
    return model, processor


def load_processor(path: str | Path, backend: str = "auto", revision: str | None = None):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path), revision=revision, backend=resolve_backend(backend))


def _sub_config(spec: str | dict[str, Any], revision: str | None, vision: bool):
    from transformers import AutoConfig

    if isinstance(spec, dict):
        values = dict(spec)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    config = AutoConfig.from_pretrained(spec, revision=revision)
    if vision and hasattr(config, "vision_config"):  # a full CLIP/SigLIP checkpoint: keep its tower
        config = config.vision_config
    return config


def _image_processor(cfg: ModelConfig, vision_config, backend: str):
    from transformers import AutoImageProcessor

    source = cfg.image_processor
    if isinstance(source, str):
        return AutoImageProcessor.from_pretrained(source, revision=cfg.revision, backend=backend)
    if source is None and isinstance(cfg.vision_tower, str):
        return AutoImageProcessor.from_pretrained(cfg.vision_tower, revision=cfg.revision, backend=backend)
    kwargs = dict(source or {})
    size = vision_config.image_size
    if vision_config.model_type.startswith("siglip"):
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        return SiglipImageProcessorPil(**{"size": {"height": size, "width": size}, **kwargs})
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        **{"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}, **kwargs}
    )


def _assemble_llava(cfg: ModelConfig):
    """A new LLaVA: the given vision tower and LM, a random MLP projector between them."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    backend = resolve_backend(cfg.image_backend)
    vision_config = _sub_config(cfg.vision_tower, cfg.revision, vision=True)
    text_config = _sub_config(cfg.language_model, cfg.revision, vision=False)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.language_model, revision=cfg.revision)
    added = {}
    if tokenizer.pad_token is None:
        added["pad_token"] = "<pad>"
    if "<image>" not in tokenizer.get_vocab():
        added["additional_special_tokens"] = ["<image>"]
    if added:
        tokenizer.add_special_tokens(added, replace_extra_special_tokens=False)
    siglip = vision_config.model_type.startswith("siglip")
    strategy = cfg.vision_feature_select_strategy or ("full" if siglip else "default")
    extra_tokens = 0 if siglip else 1  # CLIP prepends a CLS token
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    image_seq_length = patches + extra_tokens - (1 if strategy == "default" else 0)
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act=cfg.projector_hidden_act,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=image_seq_length,
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
    )
    if cfg.attn_implementation:
        config._attn_implementation = cfg.attn_implementation
    model = LlavaForConditionalGeneration(config).float()
    if isinstance(cfg.vision_tower, str):
        tower = type(model.model.vision_tower).from_pretrained(
            cfg.vision_tower, revision=cfg.revision, dtype=torch.float32
        )
        model.model.vision_tower.load_state_dict(tower.state_dict())
        del tower
    if isinstance(cfg.language_model, str):
        lm = AutoModelForCausalLM.from_pretrained(
            cfg.language_model, revision=cfg.revision, dtype=torch.float32
        )
        model.model.language_model.load_state_dict(lm.get_decoder().state_dict())
        model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
        del lm
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.chat_template:
        template = resolve_template(cfg.chat_template)
    else:
        template = CHATML_TEMPLATE if "<|im_start|>" in tokenizer.get_vocab() else LLAVA_TEMPLATE
    tokenizer.chat_template = template
    processor = LlavaProcessor(
        image_processor=_image_processor(cfg, vision_config, backend),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra_tokens,
        chat_template=template,
    )
    return model, processor


def _fix_generation_ids(model: nn.Module, tokenizer) -> None:
    generation = getattr(model, "generation_config", None)
    if generation is None:
        return
    if generation.eos_token_id is None:
        generation.eos_token_id = tokenizer.eos_token_id
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    if generation.bos_token_id is None and tokenizer.bos_token_id is not None:
        generation.bos_token_id = tokenizer.bos_token_id


# --- what trains --------------------------------------------------------------------------------


def part_of(name: str, family: Family) -> str:
    """The part a parameter of the plain model belongs to (``other`` when none)."""
    for part, prefixes in family.parts.items():
        if name.startswith(prefixes):
            return part
    return "other"


def _plain_name(name: str) -> str:
    return name.removeprefix("base_model.model.")


def apply_tuning(loaded: LoadedModel, tune: TuneConfig, parts: list[PartName]) -> LoadedModel:
    """Freeze everything, then unfreeze ``parts``; with LoRA, the LM trains through adapters only."""
    family = loaded.family
    model = loaded.base
    for name, param in model.named_parameters():
        param.requires_grad_(part_of(name, family) in parts)
    if not tune.lora.enabled:
        return loaded
    from peft import LoraConfig, get_peft_model

    targets = "|".join(re.escape(t) for t in tune.lora.target_modules)
    lora = LoraConfig(
        r=tune.lora.r,
        lora_alpha=tune.lora.alpha,
        lora_dropout=tune.lora.dropout,
        target_modules=rf"^{re.escape(family.lm_prefix)}.*\.({targets})$",
        bias="none",
    )
    wrapped = get_peft_model(model, lora)  # freezes all but the adapters
    for name, param in wrapped.named_parameters():
        part = part_of(_plain_name(name), family)
        if "lora_" in name or (part in parts and part != "language_model"):
            param.requires_grad_(True)
    return LoadedModel(
        model=wrapped, base=wrapped.base_model.model, processor=loaded.processor, family=family
    )


def parameter_report(loaded: LoadedModel) -> tuple[dict[str, dict[str, int]], str]:
    """Trainable and total parameter counts per part, and a one-paragraph summary to print."""
    counts: dict[str, dict[str, int]] = {}
    for name, param in loaded.model.named_parameters():
        part = "lora" if "lora_" in name else part_of(_plain_name(name), loaded.family)
        entry = counts.setdefault(part, {"trainable": 0, "total": 0})
        entry["total"] += param.numel()
        if param.requires_grad:
            entry["trainable"] += param.numel()
    trainable = sum(c["trainable"] for c in counts.values())
    total = sum(c["total"] for c in counts.values())
    lines = [f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"]
    for part, entry in sorted(counts.items()):
        state = "frozen" if entry["trainable"] == 0 else f"{entry['trainable']:,} trainable"
        lines.append(f"  {part:<15} {entry['total']:>15,}  {state}")
    return counts, "\n".join(lines)


def trainable_state(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in loaded.model.named_parameters() if p.requires_grad}


def load_trainable_state(loaded: LoadedModel, state: dict[str, torch.Tensor]) -> None:
    params = dict(loaded.model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:5], sorted(set(state) - expected)[:5]
        raise ValueError(
            f"checkpoint's trainable tensors differ from this config's (missing {missing}, unexpected {extra}): "
            "resume with the config the checkpoint was written with"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


# --- the loss -----------------------------------------------------------------------------------


class AnswerLoss(nn.Module):
    """Summed next-token cross-entropy over answer tokens only.

    Runs the model's backbone (``model.model``) and applies ``lm_head`` to the hidden states of the
    labelled positions alone, so the full (batch x length x vocabulary) logits are never built:
    image and prompt tokens, most of a LLaVA sequence, cost no vocabulary projection. This module is
    what DDP wraps, so gradient synchronisation sees the whole forward.
    """

    def __init__(self, loaded: LoadedModel):
        super().__init__()
        self.trained = loaded.model  # registers the parameters (incl. LoRA) for DDP
        self.base = [loaded.base]  # a list: not registered twice

    def forward(self, input_ids, attention_mask, labels, **image_inputs):
        base = self.base[0]
        outputs = base.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **image_inputs
        )
        hidden = outputs.last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        mask = targets != -100
        logits = base.lm_head(hidden[mask])
        return nn.functional.cross_entropy(logits.float(), targets[mask], reduction="sum")


# --- export -------------------------------------------------------------------------------------

SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def export_model(loaded: LoadedModel, folder: Path, dtype: torch.dtype) -> None:
    """Save a plain transformers checkpoint: LoRA merged, weights in ``dtype``, processor and template.

    Call once, at the end: merging LoRA changes the model in place.
    """
    model = loaded.model.merge_and_unload() if loaded.is_peft else loaded.base
    model = model.to(dtype)
    model.config.use_cache = True
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    loaded.processor.save_pretrained(folder)
