"""Small QA shards for the trainer's tests, and one build per session of the tiny models
(``facemllm.training.tiny_models``)."""

from __future__ import annotations

from pathlib import Path

from facemllm.training.tiny_models import build_idefics3, build_llava, build_llava_parts

# --- small QA shards ------------------------------------------------------------------------------

COLORS = {"red": (200, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 210), "yellow": (220, 200, 40)}
QUESTIONS = (
    "What color is the background of this face photo?",
    "Describe the face in the image.",
)


def color_image(color: str, size: int, rng) -> bytes:
    """A JPEG of one colour with a little noise: the answer is learnable from the pixels."""
    import io

    import numpy as np
    from PIL import Image

    base = np.array(COLORS[color], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-20, 21, size=(size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def qa_record(key: str, color: str, question: int = 0, turns: int = 1) -> dict:
    conversations = []
    for turn in range(turns):
        prefix = "<image>\n" if turn == 0 else ""
        conversations.append({"from": "human", "value": prefix + QUESTIONS[question]})
        conversations.append({"from": "gpt", "value": f"The background is {color}."})
    return {
        "key": key,
        "image": f"{key}.jpg",
        "conversations": conversations,
        "task": "color",
        "split": "train",
    }


def write_qa_shards(
    folder: Path, shards: int = 4, per_shard: int = 16, size: int = 32, seed: int = 0, prefix: str = "s"
) -> list[Path]:
    """``folder/NNNNN.tar`` QA shards (KEY.jpg + KEY.json) written with the project's ShardWriter,
    plus ``sizes.json``; colours cycle so every shard holds all of them."""
    import json

    import numpy as np

    from facemllm.pipeline.core.shards import ShardWriter

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    paths, sizes = [], {}
    for shard in range(shards):
        path = folder / f"{shard:05d}.tar"
        with ShardWriter(path) as writer:
            for i in range(per_shard):
                key = f"{prefix}{shard:03d}{i:04d}"
                color = names[(shard * per_shard + i) % len(names)]
                record = qa_record(key, color, question=0, turns=1 + (i % 3 == 0))
                writer.add(key, {"jpg": color_image(color, size, rng), "json": json.dumps(record).encode()})
        paths.append(path)
        sizes[path.name] = per_shard
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return paths


_BUILT: dict[str, Path] = {}


def cached_model(kind: str, tmp_path_factory) -> Path:
    """One build per test session: ``llava``, ``idefics3`` or ``llava_parts`` (a folder with
    ``vision/`` and ``lm/``)."""
    if kind not in _BUILT:
        folder = tmp_path_factory.mktemp(f"tiny-{kind}")
        builders = {"llava": build_llava, "idefics3": build_idefics3, "llava_parts": build_llava_parts}
        builders[kind](folder)
        _BUILT[kind] = folder
    return _BUILT[kind]
