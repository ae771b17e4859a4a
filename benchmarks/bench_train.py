"""Trainer vs a bare PyTorch loop on the same tiny model and batches; data loader vs what the trainer eats.

    python -m benchmarks.bench_train [--steps 40] [--warmup 5] [--batch-size 8] [--workers 1] [--threads 1]

Input: QA shards (``KEY.jpg`` 32 px + ``KEY.json`` conversations, via ``core.shards.ShardWriter``)
and the tiny LLaVA of the tests (CLIP tower hidden 64, Llama hidden 128, 2 layers each), stage 2
(projector and LM train, the tower is frozen). Three sides, each in its own fresh process:

- **trainer**: ``training.loop.train`` for ``warmup + steps`` optimizer steps, streaming the shards
  through its DataLoader (``--workers`` processes): answer-only loss, AdamW, cosine schedule, grad
  clipping, per-step all-reduce of the counters, metrics logging. Throughput is taken from its own
  per-step timings after the warm-up steps.
- **bare**: the anchor. The same batches, collated beforehand by the trainer's own pipeline (so the
  shapes are identical) and held in memory; then ``model(**batch, labels=labels)``, ``backward``,
  ``AdamW.step``, ``zero_grad``: nothing else.
- **loader**: the trainer's DataLoader alone (same config and workers), iterated as fast as it goes.

The training processes of both sides use ``--threads`` torch threads (default 1), so that on a small
machine the trainer's loader worker has a core of its own, as it would beside a GPU.

Printed: samples/s and tokens/s of each side, trainer/bare (the trainer's overhead: 1.0 is none; it
can exceed 1 because its loss projects only answer tokens onto the vocabulary), the same ratio with
the time the trainer blocks on its DataLoader left out (what remains is the step itself; the rest is
the loader's inter-process hand-over, which the bare loop, fed from memory, never pays), loader/trainer (the
loader's headroom: it must stay above 1, i.e. the loader is never the bottleneck) and the share of
the trainer's step time spent waiting for data. Ratios, not absolute times, are what carry over
between machines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._common import DEFAULT_OUT, machine_info, median_run, print_table, run_isolated, write_result


def _data_config(shards: Path, batch_size: int, workers: int) -> dict:
    return {
        "sources": [{"name": "qa", "urls": [str(shards)]}],
        "batch_size": batch_size,
        "num_workers": workers,
        "segment_samples": 512,
        "shuffle_buffer": 64,
    }


def side_trainer(
    model: str, shards: str, out: str, steps: int, warmup: int, batch_size: int, workers: int, threads: int
) -> dict:
    import torch

    from facemllm.training.config import TrainRunConfig
    from facemllm.training.loop import train

    torch.set_num_threads(threads)
    config = TrainRunConfig.model_validate(
        {
            "output_dir": out,
            "stage": 2,
            "model": {"pretrained": model},
            # the worker may run ahead by every batch of the run: once it has made them it idles, so
            # the measured steps see the trainer's own cost, not a core shared with image decoding
            "data": _data_config(Path(shards), batch_size, workers) | {"prefetch_factor": warmup + steps},
            "optim": {"lr": 1e-3},
            "loop": {"max_steps": warmup + steps, "log_every": 10_000, "save_every": None},
        }
    )
    train(config)
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()][warmup:]
    seconds = sum(r["step_s"] for r in rows)
    compute = sum(r["step_s"] - r["data_wait_s"] for r in rows)
    return {
        "samples_per_s": sum(r["samples"] for r in rows) / seconds,
        "compute_samples_per_s": sum(r["samples"] for r in rows) / compute,
        "tokens_per_s": sum(r["tokens"] for r in rows) / seconds,
        "data_wait_share": sum(r["data_wait_s"] for r in rows) / seconds,
        "final_loss": rows[-1]["loss"],
    }


def _batches(model: str, shards: str, count: int, batch_size: int) -> list[dict]:
    from facemllm.training.config import DataConfig, ModelConfig
    from facemllm.training.data import ShardBatches, resolve_sources
    from facemllm.training.model import build_model

    loaded = build_model(ModelConfig(pretrained=model))
    data = DataConfig.model_validate(_data_config(Path(shards), batch_size, 0))
    dataset = ShardBatches(data, resolve_sources(data), loaded.processor, loaded.family, 0, 0, 1)
    iterator = iter(dataset)
    return [next(iterator) for _ in range(count)]


def side_bare(model: str, shards: str, steps: int, warmup: int, batch_size: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(threads)
    batches = _batches(model, shards, warmup + steps, batch_size)
    net = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32)
    for name, param in net.named_parameters():
        param.requires_grad_(not name.startswith("model.vision_tower."))
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    net.train()
    samples = tokens = 0
    started = None
    for i, batch in enumerate(batches):
        if i == warmup:
            started = time.perf_counter()
        inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        loss = net(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            samples += batch["meta"]["n_samples"]
            tokens += batch["meta"]["n_tokens"]
    seconds = time.perf_counter() - started
    return {
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "final_loss": float(loss.detach()),
    }


def side_loader(model: str, shards: str, batches: int, batch_size: int, workers: int) -> dict:
    from facemllm.training.config import DataConfig, ModelConfig
    from facemllm.training.data import ShardBatches, make_loader, resolve_sources
    from facemllm.training.model import build_model

    loaded = build_model(ModelConfig(pretrained=model))
    data = DataConfig.model_validate(_data_config(Path(shards), batch_size, workers))
    dataset = ShardBatches(data, resolve_sources(data), loaded.processor, loaded.family, 0, 0, 1)
    iterator = iter(make_loader(dataset, pin_memory=False))
    for _ in range(max(2, workers)):  # workers started and warm
        next(iterator)
    samples = tokens = 0
    started = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        samples += batch["meta"]["n_samples"]
        tokens += batch["meta"]["n_tokens"]
    seconds = time.perf_counter() - started
    return {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds}


def prepare(folder: Path, shards: int, per_shard: int) -> tuple[Path, Path]:
    from facemllm.training.tiny_models import build_llava
    from tests.tiny_models import write_qa_shards

    model = build_llava(folder / "model")
    write_qa_shards(folder / "shards", shards=shards, per_shard=per_shard, size=32)
    return model, folder / "shards"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the training process (leave cores to the loader)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        model, shards = prepare(work, shards=8, per_shard=64)
        runs: dict[str, list[dict]] = {"trainer": [], "bare": [], "loader": []}
        for repeat in range(args.repeats):
            order = ["trainer", "bare", "loader"] if repeat % 2 == 0 else ["bare", "loader", "trainer"]
            for side in order:
                if side == "trainer":
                    out = work / f"run-{repeat}"
                    result = run_isolated(
                        side_trainer,
                        model=str(model),
                        shards=str(shards),
                        out=str(out),
                        steps=args.steps,
                        warmup=args.warmup,
                        batch_size=args.batch_size,
                        workers=args.workers,
                        threads=args.threads,
                    )
                elif side == "bare":
                    result = run_isolated(
                        side_bare,
                        model=str(model),
                        shards=str(shards),
                        steps=args.steps,
                        warmup=args.warmup,
                        batch_size=args.batch_size,
                        threads=args.threads,
                    )
                else:
                    result = run_isolated(
                        side_loader,
                        model=str(model),
                        shards=str(shards),
                        batches=args.steps,
                        batch_size=args.batch_size,
                        workers=args.workers,
                    )
                runs[side].append(result)
        medians = {
            side: {k: median_run(r, k) for k in ("samples_per_s", "tokens_per_s")} for side, r in runs.items()
        }
        wait = median_run(runs["trainer"], "data_wait_share")
        result = {
            "machine": machine_info(),
            "settings": vars(args) | {"out": str(args.out)},
            "runs": runs,
            "medians": medians,
            "trainer_over_bare": medians["trainer"]["samples_per_s"] / medians["bare"]["samples_per_s"],
            "trainer_compute_over_bare": median_run(runs["trainer"], "compute_samples_per_s")
            / medians["bare"]["samples_per_s"],
            "loader_over_trainer": medians["loader"]["samples_per_s"] / medians["trainer"]["samples_per_s"],
            "trainer_data_wait_share": wait,
        }
        print_table(
            ["side", "samples/s", "tokens/s", "peak RSS MiB"],
            [
                (
                    side,
                    medians[side]["samples_per_s"],
                    medians[side]["tokens_per_s"],
                    median_run(runs[side], "peak_rss_self_mb"),
                )
                for side in ("trainer", "bare", "loader")
            ],
        )
        print(
            f"\ntrainer / bare loop: {result['trainer_over_bare']:.2f} "
            f"(not counting the time it waits for its loader: {result['trainer_compute_over_bare']:.2f})   "
            f"loader / trainer: {result['loader_over_trainer']:.2f}   "
            f"trainer waits for data {100 * wait:.1f}% of its step time"
        )
        print(write_result(args.out, "bench_train", result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
