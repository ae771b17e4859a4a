"""``facemllm eval``: ask each model every selected question, judge the replies, score, report.

For each model, shard by shard: the questions whose reply is not yet recorded go to the model; each
reply is appended to ``RESULTS/<model>/replies/<dataset>/<split>/NNNNN.jsonl`` the moment it
arrives (keyed by a hash of the model's identity, the decoding settings, the prompt and the image),
so a killed run resumes where it stopped and a rerun asks nothing again. Replies are judged at
scoring time, so a parser change re-scores recorded replies without asking the model. A failed
request is not recorded: the next run asks it again.

Outputs per model: ``predictions.jsonl`` (one ``Prediction`` per question), ``result.json``
(``EvalResult``), ``results.md`` and ``report.html``; across the models of the folder:
``comparison.md``, ``comparison.html`` and ``comparison.json``.
"""

from __future__ import annotations

import hashlib
import sys
from collections import defaultdict
from pathlib import Path

from facemllm.annotators.request_cache import RequestCache
from facemllm.evaluation.clients import (
    CheckpointModel,
    EndpointModel,
    ModelClient,
    Question,
    request_identity,
)
from facemllm.evaluation.config import EvalConfig, ModelSpec
from facemllm.evaluation.data import EvalData, QAItem, ShardRef
from facemllm.evaluation.metrics import score_task
from facemllm.evaluation.parsing import PARSER_VERSION
from facemllm.evaluation.report import fmt, write_comparison, write_model_report
from facemllm.evaluation.tasks import TASKS, ZERO_SHOT_SPLIT, TaskSpec, judge, label_class
from facemllm.pipeline.core.files import write_bytes_atomic
from facemllm.pipeline.core.manifest import package_versions
from facemllm.schemas.evaluation import DataInfo, EvalResult, Prediction

# the labels an image's accuracy is broken down by: gender, race, age band (an age counts as its band)
GROUP_LABELS = {"gender": "gender", "race": "race", "age_band": "age_band", "age": "age_band"}


class TaskPlan:
    """Which (dataset, split) each selected task reads, and which tasks were left out and why."""

    def __init__(self, config: EvalConfig, data: EvalData):
        self.sources: dict[str, list[tuple[str, str]]] = {}
        self.skipped: dict[str, str] = {}
        for name in config.tasks:
            spec = TASKS[name]
            found, missing = [], []
            for dataset, _ in spec.sources:
                split = ZERO_SHOT_SPLIT if spec.zero_shot else config.splits[dataset]
                (found if data.has_split(dataset, split) else missing).append((dataset, split))
            if found:
                self.sources[name] = found
            if missing:
                self.skipped[name] = "no finished reformat output for " + ", ".join(
                    f"{d}/{s}" for d, s in missing
                )
        if not self.sources:
            raise FileNotFoundError(
                f"{config.data}: none of the tasks {config.tasks} has data (expected <dataset>/manifest.json "
                "from `facemllm reformat`, or a published manifest.json with qa/ stages; "
                + "; ".join(f"{t}: {why}" for t, why in self.skipped.items())
                + ")"
            )

    def tasks_reading(self, dataset: str, split: str) -> list[TaskSpec]:
        return [TASKS[name] for name, pairs in self.sources.items() if (dataset, split) in pairs]

    def shards(self, data: EvalData) -> list[ShardRef]:
        pairs = sorted({pair for pairs in self.sources.values() for pair in pairs})
        return [shard for dataset, split in pairs for shard in data.shards(dataset, split)]


class Selection:
    """Which samples a task scores: all, or about ``max_samples_per_task`` chosen by a seeded hash."""

    def __init__(self, config: EvalConfig, plan: TaskPlan, data: EvalData):
        self.seed = config.seed
        self.fraction: dict[str, float] = {}
        for name, pairs in plan.sources.items():
            spec = TASKS[name]
            total = sum(
                data.task_count(dataset, split, qa_task)
                for dataset, split in pairs
                for source, qa_tasks in spec.sources
                if source == dataset
                for qa_task in qa_tasks
            )
            limit = config.max_samples_per_task
            self.fraction[name] = 1.0 if limit is None or total <= limit else limit / total

    def keeps(self, task: str, key: str) -> bool:
        fraction = self.fraction[task]
        if fraction >= 1.0:
            return True
        digest = hashlib.sha256(f"{self.seed}\x1f{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def image_groups(items: list[QAItem]) -> dict[tuple[str, str], dict[str, str]]:
    """Perceived gender, race and age band of each image, from its samples' labels."""
    groups: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for item in items:
        sample = item.sample
        if sample.task in GROUP_LABELS and sample.label.truth:
            group = GROUP_LABELS[sample.task]
            groups[(sample.dataset, sample.image)][group] = label_class(sample.task, sample.label.truth)
    return groups


def open_client(spec: ModelSpec, config: EvalConfig) -> ModelClient:
    if spec.checkpoint:
        return CheckpointModel(
            spec.label, spec.checkpoint, config.max_new_tokens, config.batch_size, config.device, config.dtype
        )
    return EndpointModel(spec.label, spec.endpoint, spec.model, config.max_new_tokens, config.client)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def predict_shard(
    client: ModelClient, shard: ShardRef, data: EvalData, plan: TaskPlan, selection: Selection, folder: Path
) -> list[Prediction]:
    """Every selected question of one shard, answered (or taken from the replies file) and judged."""
    items = list(data.items(shard))
    groups = image_groups(items)
    specs = plan.tasks_reading(shard.dataset, shard.split)
    chosen: list[tuple[TaskSpec, QAItem, Question, str]] = []
    for item in items:
        spec = next((s for s in specs if s.accepts(item.sample)), None)
        if spec is not None and selection.keeps(spec.name, item.sample.key):
            question = Question.from_sample(item.sample, item.image)
            chosen.append((spec, item, question, request_identity(client.info, client.generation, question)))
    replies_path = folder / "replies" / shard.rel.removesuffix(".tar")
    failures: dict[str, str] = {}
    with RequestCache(replies_path.with_suffix(".jsonl")) as cache:
        asking = [question for _, _, question, rid in chosen if rid not in cache]
        ids = {question.key: rid for _, _, question, rid in chosen}
        progress(
            f"[{client.info.label}] {shard.rel}: {len(chosen)} questions, {len(chosen) - len(asking)} answered before"
        )
        for question, reply in client.answer(asking) if asking else ():
            if reply.text is None:
                failures[question.key] = reply.error or "no reply"
            else:
                cache.put(ids[question.key], {"key": question.key, "reply": reply.text})
        predictions = []
        for spec, item, question, rid in chosen:
            recorded = cache.get(rid)
            predictions.append(
                judged(
                    spec,
                    item,
                    question,
                    recorded["reply"] if recorded else None,
                    failures.get(question.key),
                    groups,
                )
            )
    return predictions


def judged(
    spec: TaskSpec,
    item: QAItem,
    question: Question,
    reply: str | None,
    error: str | None,
    groups: dict[tuple[str, str], dict[str, str]],
) -> Prediction:
    sample = item.sample
    fields = dict(
        key=sample.key,
        task=spec.name,
        dataset=sample.dataset,
        split=sample.split,
        qa_task=sample.task,
        answer_style=sample.answer_style,
        image=sample.image,
        shard=item.shard.rel,
        question=question.text,
        expected=sample.label.answer,
        truth=sample.label.truth,
        asked=sample.label.asked,
        options=sample.label.options,
        groups=groups.get((sample.dataset, sample.image), {}),
        reply=reply,
    )
    if reply is None:
        return Prediction(**fields, error=error or "no reply", status="failed_request", correct=False)
    verdict = judge(sample, reply)
    return Prediction(
        **fields,
        status=verdict.status,
        parsed=verdict.parsed,
        predicted=list(verdict.predicted),
        correct=verdict.correct,
        abs_error=verdict.abs_error,
    )


def task_seed(seed: int, task: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\x1f{task}".encode()).digest()[:4], "big")


def evaluate_model(
    spec: ModelSpec, config: EvalConfig, data: EvalData, plan: TaskPlan, selection: Selection, info: DataInfo
) -> EvalResult:
    folder = Path(config.out) / spec.label
    shards = plan.shards(data)
    client = open_client(spec, config)
    try:
        predictions = [
            p for shard in shards for p in predict_shard(client, shard, data, plan, selection, folder)
        ]
    finally:
        client.close()
    predictions.sort(key=lambda p: (p.task, p.key))
    by_task: dict[str, list[Prediction]] = defaultdict(list)
    for prediction in predictions:
        by_task[prediction.task].append(prediction)
    tasks = {}
    for name in plan.sources:
        result = score_task(
            TASKS[name],
            by_task[name],
            config.bootstrap_resamples,
            config.confidence,
            task_seed(config.seed, name),
            config.worst_examples,
        )
        if name in plan.skipped:
            result.notes.append(f"partial: {plan.skipped[name]}")
        tasks[name] = result
    result = EvalResult(
        model=client.info,
        data=info,
        generation=client.generation,
        bootstrap={
            "resamples": config.bootstrap_resamples,
            "confidence": config.confidence,
            "seed": config.seed,
            "unit": "image",
            "interval": "percentile",
        },
        parser_version=PARSER_VERSION,
        tasks=tasks,
        package_versions=package_versions(),
    )
    lines = "".join(p.model_dump_json() + "\n" for p in predictions)
    write_bytes_atomic(folder / "predictions.jsonl", lines.encode())
    write_bytes_atomic(folder / "result.json", (result.model_dump_json(indent=2) + "\n").encode())
    write_model_report(folder, result, predictions, worst_images(data, shards, result, predictions))
    return result


def worst_images(
    data: EvalData, shards: list[ShardRef], result: EvalResult, predictions: list[Prediction]
) -> dict[str, bytes]:
    """The images of the worst examples, read back from the few shards that hold them."""
    wanted = {w.key for task in result.tasks.values() for w in task.worst}
    holding = {p.shard for p in predictions if p.key in wanted}
    images = {}
    for shard in shards:
        if shard.rel in holding:
            images |= {i.sample.key: i.image for i in data.items(shard) if i.sample.key in wanted}
    return images


def evaluate(config: EvalConfig) -> list[EvalResult]:
    """Score every configured model; returns their results (also written under ``config.out``)."""
    data = EvalData(config.data, config.storage)
    plan = TaskPlan(config, data)
    selection = Selection(config, plan, data)
    for task, why in plan.skipped.items():
        progress(f"note: {task}: {why}")
    used = sorted({pair for pairs in plan.sources.values() for pair in pairs})
    # which samples each task scores: the pairs read and the QA tasks taken from each dataset
    chosen = {
        "pairs": [list(p) for p in used],
        "tasks": {name: [[d, list(qa)] for d, qa in TASKS[name].sources] for name in sorted(plan.sources)},
    }
    if config.max_samples_per_task is not None:
        chosen |= {"max_samples_per_task": config.max_samples_per_task, "seed": config.seed}
    datasets = sorted({d for d, _ in used})
    info = DataInfo(
        root=config.data,
        splits=[f"{d}/{s}" for d, s in used],
        manifests={d: data.manifest_sha256[d] for d in datasets},
        data_hash=data.data_hash(datasets, chosen),
        max_samples_per_task=config.max_samples_per_task,
        seed=config.seed,
    )
    results = [evaluate_model(spec, config, data, plan, selection, info) for spec in config.models]
    write_comparison(Path(config.out))
    return results


def summary_lines(results: list[EvalResult]) -> list[str]:
    """One line per model and task: the headline metric with its interval and the unparsed rate."""
    lines = []
    for result in results:
        for task in result.tasks.values():
            unparsed = task.metrics["unparsed_rate"].value
            lines.append(
                f"{result.model.label:<24} {task.task:<20} {task.headline} {fmt(task.metrics[task.headline])}  "
                f"n={task.samples}  unparsed {unparsed or 0:.1%}"
            )
    return lines
