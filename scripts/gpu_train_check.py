"""GPU check of the trainer: a LLaVA-style model of about 0.6B parameters, bf16, synthetic shards.

    python scripts/gpu_train_check.py                    # on a GPU: ~0.6B model, 300 steps
    python scripts/gpu_train_check.py --tiny --steps 4   # anywhere: the same path with a tiny model

Nothing is downloaded: the model is built from configs (random weights) through the trainer's own
assembly path (``model.vision_tower`` / ``model.language_model`` as config dicts), the tokenizer is
trained here, and the shards are written here (random-noise JPEGs at the tower's resolution, a
question and a ~60-word answer each). The run is the real trainer: WebDataset streaming with
DataLoader workers, answer-only loss, AdamW, cosine schedule, bf16 autocast.

Reported (stdout, and ``OUT/report.json``): samples/s and tokens/s over the steps after warm-up,
the share of step time spent waiting for data, peak GPU memory, and an MFU estimate:
model FLOPs per step = 6 x (trainable LM + projector parameters) x tokens + 12 x layers x hidden x
sequence length x tokens (attention, forward and backward) + 2 x vision parameters x image patches
(frozen tower: forward only), against the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s; set
``--peak-tflops`` for others).

Needs the project's Python dependencies (``pip install -e .``; peft is not used here).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from checkout_imports import use_checkout

use_checkout()

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
WORDS_TEXT = (
    "face eyes nose mouth smile hair brown black blond gray short long wavy straight beard glasses "
    "light dark frontal profile left right young old woman man expression happy neutral surprised "
    "calm bright soft shadow skin cheek brow forehead chin jaw lips teeth ear neck hat earring"
)
WORDS = WORDS_TEXT.split()

SIZES = {
    # ~0.6B: a ViT-B/14-style tower at 224 px (256 patches) and a 24-layer, 1280-wide Llama
    "full": {
        "vision": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=14,
        ),
        "text": dict(
            hidden_size=1280,
            intermediate_size=3584,
            num_hidden_layers=24,
            num_attention_heads=20,
            num_key_value_heads=5,
            head_dim=64,
            vocab_size=32000,
        ),
        "image": 224,
    },
    "tiny": {
        "vision": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        "text": dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=64,
            vocab_size=1024,
        ),
        "image": 32,
    },
}


def build_tokenizer(folder: Path):
    """The tiny models' tokenizer trainer (training/tiny_models.py) on this script's words."""
    from facemllm.training.templates import LLAVA_TEMPLATE
    from facemllm.training.tiny_models import LLAVA_SPECIAL, train_tokenizer

    words = [" ".join(WORDS) + " USER: ASSISTANT: Describe the face."]
    return train_tokenizer(
        folder, LLAVA_SPECIAL, "<s>", "</s>", "<pad>", LLAVA_TEMPLATE, words, vocab_size=400
    )


def write_shards(
    folder: Path, samples: int, per_shard: int, image_size: int, answer_words: int, seed: int = 0
) -> None:
    import io

    import numpy as np
    from PIL import Image

    from facemllm.pipeline.core.shards import ShardWriter

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for shard in range(-(-samples // per_shard)):
        path = folder / f"{shard:05d}.tar"
        count = min(per_shard, samples - shard * per_shard)
        with ShardWriter(path) as writer:
            for i in range(count):
                pixels = rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
                length = int(rng.integers(answer_words // 2, answer_words * 3 // 2))
                answer = " ".join(rng.choice(WORDS, size=length))
                record = {
                    "conversations": [
                        {"from": "human", "value": "<image>\nDescribe the face."},
                        {"from": "gpt", "value": answer},
                    ]
                }
                writer.add(
                    f"{shard:05d}{i:05d}", {"jpg": buffer.getvalue(), "json": json.dumps(record).encode()}
                )
        sizes[path.name] = count
    (folder / "sizes.json").write_text(json.dumps(sizes))


def model_flops_per_step(
    summary: dict, size: dict, image_tokens: int, tokens: float, samples: float, seq_len: float
) -> float:
    counts = summary["parameters"]
    trainable = sum(c["trainable"] for part, c in counts.items() if part != "vision_tower")
    vision = counts.get("vision_tower", {}).get("total", 0)
    text = size["text"]
    attention = (
        12 * text["num_hidden_layers"] * text["num_attention_heads"] * text["head_dim"] * seq_len * tokens
    )
    return 6 * trainable * tokens + attention + 2 * vision * image_tokens * samples


def run(args: argparse.Namespace) -> dict:
    import torch

    from facemllm.training.config import TrainRunConfig
    from facemllm.training.loop import train

    size = SIZES["tiny" if args.tiny else "full"]
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    build_tokenizer(out / "tokenizer")
    started = time.perf_counter()
    write_shards(out / "shards", args.samples, 256, size["image"], args.answer_words)
    shard_s = time.perf_counter() - started
    config = TrainRunConfig.model_validate(
        {
            "output_dir": str(out / "run"),
            "stage": 2,
            "model": {
                "vision_tower": {"model_type": "clip_vision_model", **size["vision"]},
                "language_model": {
                    "model_type": "llama",
                    "max_position_embeddings": 4096,
                    "tie_word_embeddings": False,
                    **size["text"],
                },
                "tokenizer": str(out / "tokenizer"),
                "gradient_checkpointing": args.gradient_checkpointing,
            },
            "data": {
                "sources": [{"name": "synthetic", "urls": [str(out / "shards")]}],
                "batch_size": args.batch_size,
                "num_workers": args.workers,
                "shuffle_buffer": 256,
                "segment_samples": 2048,
                "max_length": 1024,
            },
            "optim": {"lr": 1e-4, "warmup_ratio": 0.03},
            "loop": {
                "max_steps": args.steps,
                "precision": args.precision,
                "log_every": max(1, args.steps // 10),
                "save_every": None,
                "save_dtype": "bf16" if torch.cuda.is_available() else "fp32",
            },
        }
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    summary = train(config)
    steps = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = steps[min(len(steps) - 1, max(1, len(steps) // 10)) :]  # after warm-up
    seconds = sum(s["step_s"] for s in measured)
    samples = sum(s["samples"] for s in measured)
    tokens = sum(s["tokens"] for s in measured)
    patches = (size["vision"]["image_size"] // size["vision"]["patch_size"]) ** 2
    seq_len = tokens / max(samples, 1)
    flops = model_flops_per_step(summary, size, patches, tokens, samples, seq_len) / max(len(measured), 1)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device), None)
    achieved = flops * len(measured) / max(seconds, 1e-9)
    report = {
        "device": device,
        "parameters": sum(c["total"] for c in summary["parameters"].values()),
        "trainable_parameters": sum(c["trainable"] for c in summary["parameters"].values()),
        "precision": args.precision,
        "steps": len(steps),
        "measured_steps": len(measured),
        "batch_size": args.batch_size,
        "mean_sequence_tokens": seq_len,
        "samples_per_s": samples / max(seconds, 1e-9),
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "data_wait_share": sum(s["data_wait_s"] for s in measured) / max(seconds, 1e-9),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "model_tflops_per_s": achieved / 1e12,
        "mfu": achieved / (peak * 1e12) if peak else None,
        "first_loss": steps[0]["loss"],
        "last_loss": steps[-1]["loss"],
        "shard_write_s": shard_s,
        "wall_s": summary["wall_s"],
        "final": summary.get("final"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke run)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--samples", type=int, default=4096, help="synthetic samples written")
    parser.add_argument("--answer-words", type=int, default=60)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the table")
    parser.add_argument("--out", default="gpu-train-check")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    report = run(parse_args(argv))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
