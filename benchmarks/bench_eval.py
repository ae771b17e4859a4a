"""``facemllm eval`` on a checkpoint vs a bare transformers generate loop over the same questions.

    python -m benchmarks.bench_eval [--celeba-rows 2000] [--repeats 3] [--batch-size 16] [--max-new-tokens 16]
                                    [--threads 1]

Input: a synthetic CelebA of ``--celeba-rows`` rows (``bench_reformat``'s: CelebA's layout, real
photos; its test split gives yes/no, selection and zero-shot questions) and the test suite's
RAF-DB, UTKFace and FairFace fixtures, reformatted with three questions per image and task, one
shard per split as in production (``tests.eval_fixture.build_qa``); and the tests' tiny random Idefics3 (it rarely stops early, so
both sides generate about ``--max-new-tokens`` tokens per question). Each side runs in a fresh
process and is timed from start to end, model loading included (imports are not: both sides
import torch and transformers before the clock starts):

- **ours**: ``evaluation.run.evaluate`` with every task: manifests, shard reading, prompt rendering
  with the trainer's conversion, batched greedy ``generate``, each reply appended to the replies
  file, judging, bootstrap intervals (1000 resamples), ``predictions.jsonl``, ``result.json``, the
  markdown and HTML reports (thumbnails) and the comparison.
- **bare** (the anchor): read the same shards with ``tarfile``, keep the same questions, render
  each with ``apply_chat_template``, ``generate`` in batches of the same size in file order,
  decode; nothing parsed, scored or written.

Printed: questions/s of each side (medians over ``--repeats``, the sides alternating which goes
first) and ours/bare. 1.0 means the evaluator costs nothing beyond generation.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks._common import DEFAULT_OUT, machine_info, median_run, print_table, run_isolated, write_result

NOT_SCORED = {"attribute_description"}
BARE_SPLITS = ("celeba/test", "celeba/zeroshot", "rafdb/test", "utkface/test", "fairface/val")


def run_ours(qa: str, model: str, out: str, batch_size: int, max_new_tokens: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: F401 - imported before the clock, as the bare side does

    from facemllm.evaluation.config import EvalConfig, ModelSpec
    from facemllm.evaluation.run import evaluate

    torch.set_num_threads(threads)
    started = time.perf_counter()
    config = EvalConfig(
        data=qa,
        out=out,
        models=[ModelSpec(label="tiny", checkpoint=model)],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    (result,) = evaluate(config)
    seconds = time.perf_counter() - started
    questions = sum(task.samples for task in result.tasks.values())
    return {"questions": questions, "seconds": seconds, "questions_per_s": questions / seconds}


def run_bare(qa: str, model: str, batch_size: int, max_new_tokens: int, threads: int) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(threads)
    started = time.perf_counter()
    network = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model)
    processor.tokenizer.padding_side = "left"
    questions = []
    for split in BARE_SPLITS:
        for shard in sorted((Path(qa) / split).glob("*.tar")):
            with tarfile.open(shard) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name, payload in sorted(members.items()):
                if not name.endswith(".json"):
                    continue
                sample = json.loads(payload)
                if sample["task"] in NOT_SCORED:
                    continue
                text = sample["conversations"][0]["value"].replace("<image>", "").strip()
                image = members[name.removesuffix(".json") + ".jpg"]
                questions.append((text, image))
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        prompts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                add_generation_prompt=True,
            )
            for text, _ in batch
        ]
        images = [[Image.open(io.BytesIO(image)).convert("RGB")] for _, image in batch]
        inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
        with torch.inference_mode():
            output = network.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    seconds = time.perf_counter() - started
    return {"questions": len(questions), "seconds": seconds, "questions_per_s": len(questions) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--celeba-rows", type=int, default=2000, help="10%% of them are test images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    from benchmarks.bench_reformat import build_synthetic_celeba
    from facemllm.pipeline.stages.reformat import load_reformat_config, run_reformat
    from facemllm.training.tiny_models import build_idefics3
    from tests.eval_fixture import QA_SETTINGS, build_qa

    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    try:
        qa = build_qa(work, rows_per_chunk=100_000)
        shutil.rmtree(qa / "celeba")
        celeba = build_synthetic_celeba(work / "synthetic-celeba", args.celeba_rows)
        settings = [*QA_SETTINGS, "rows_per_chunk=100000"]
        run_reformat(load_reformat_config(None, settings, dataset="celeba", root=str(celeba), out=str(qa)))
        qa = str(qa)
        model = str(build_idefics3(work / "tiny-idefics3"))
        common = dict(
            qa=qa,
            model=model,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            threads=args.threads,
        )
        ours, bare = [], []
        for repeat in range(args.repeats):
            order = ("ours", "bare") if repeat % 2 == 0 else ("bare", "ours")
            for side in order:
                if side == "ours":
                    ours.append(run_isolated(run_ours, out=str(work / f"results-{repeat}"), **common))
                else:
                    bare.append(run_isolated(run_bare, **common))
        assert ours[0]["questions"] == bare[0]["questions"], (ours[0]["questions"], bare[0]["questions"])
        ratio = median_run(ours, "questions_per_s") / median_run(bare, "questions_per_s")
        print_table(
            ["side", "questions", "questions/s", "peak RSS MiB"],
            [
                [
                    "ours (facemllm eval)",
                    ours[0]["questions"],
                    median_run(ours, "questions_per_s"),
                    median_run(ours, "peak_rss_self_mb"),
                ],
                [
                    "bare generate loop",
                    bare[0]["questions"],
                    median_run(bare, "questions_per_s"),
                    median_run(bare, "peak_rss_self_mb"),
                ],
            ],
        )
        print(f"ours/bare: {ratio:.2f}")
        path = write_result(
            args.out,
            "eval",
            {
                "machine": machine_info(),
                "args": vars(args) | {"out": str(args.out)},
                "ours": ours,
                "bare": bare,
                "ratio": ratio,
            },
        )
        print(f"written: {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
