"""Metrics of one task from its scored predictions, with percentile bootstrap confidence intervals.

Every metric here is a mean of ratios: accuracy is (correct / asked), MAE is (|error| / parsed),
a mean accuracy over attributes is the mean over attributes of (correct / decided). The bootstrap
resamples *images* with replacement (the questions about one image are not independent), all
metrics of a task from the same replicates: each metric's sums per image go into one matrix, and
a replicate is a multinomial weight vector over images, so a replicate costs one matrix product
whatever the number of questions.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from facemllm.evaluation.tasks import TaskSpec, class_order, label_class
from facemllm.schemas.evaluation import ConfusionMatrix, Estimate, Prediction, TaskResult, WorstExample

UNPARSED_COLUMN = "unparsed"
REPLICATES_PER_BLOCK = 100


@dataclass
class Bootstrap:
    """Collects ratio metrics over items grouped into clusters (images), then estimates them all."""

    clusters: Sequence[str]  # the cluster of each item
    resamples: int
    confidence: float
    seed: int
    numerators: list[np.ndarray] = field(default_factory=list)
    denominators: list[np.ndarray] = field(default_factory=list)
    # metric -> its columns, one per group; the metric is the mean of the groups' ratios
    metrics: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = sorted(set(self.clusters))
        index = {name: i for i, name in enumerate(names)}
        self.cluster_of = np.array([index[c] for c in self.clusters], dtype=np.int64)
        self.n_clusters = len(names)

    def add(
        self, name: str, values: Sequence[float], counted: Sequence[bool], groups: Sequence[str] | None = None
    ):
        """Metric ``name`` = mean over groups of sum(values) / count, over the items where ``counted``."""
        values_arr = np.asarray(values, dtype=np.float64)
        counted_arr = np.asarray(counted, dtype=bool)
        group_names = (
            [""] if groups is None else sorted({g for g, c in zip(groups, counted, strict=True) if c})
        )
        groups_arr = None if groups is None else np.asarray(groups)
        columns = []
        for group in group_names:
            mask = counted_arr if groups_arr is None else counted_arr & (groups_arr == group)
            self.numerators.append(
                np.bincount(
                    self.cluster_of, weights=np.where(mask, values_arr, 0.0), minlength=self.n_clusters
                )
            )
            self.denominators.append(
                np.bincount(self.cluster_of, weights=mask.astype(np.float64), minlength=self.n_clusters)
            )
            columns.append(len(self.numerators) - 1)
        self.metrics[name] = columns

    def estimates(self) -> dict[str, Estimate]:
        if not self.metrics:
            return {}
        numerators = np.stack(self.numerators, axis=1)  # clusters x columns
        denominators = np.stack(self.denominators, axis=1)
        replicates = []
        rng = np.random.default_rng(self.seed)
        uniform = np.full(self.n_clusters, 1.0 / max(self.n_clusters, 1))
        for start in range(0, self.resamples, REPLICATES_PER_BLOCK):
            size = min(REPLICATES_PER_BLOCK, self.resamples - start)
            weights = rng.multinomial(self.n_clusters, uniform, size=size).astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                replicates.append((weights @ numerators) / (weights @ denominators))
        ratios = np.concatenate(replicates) if replicates else np.empty((0, numerators.shape[1]))
        tail = (1 - self.confidence) / 2 * 100
        results = {}
        for name, columns in self.metrics.items():
            num, den = numerators[:, columns].sum(0), denominators[:, columns].sum(0)
            n = int(den.sum())
            if n == 0:
                results[name] = Estimate(value=None, n=0)
                continue
            with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a replicate that drew no item of a group
                value = float(np.nanmean(num / den))
                per_replicate = np.nanmean(ratios[:, columns], axis=1)
            per_replicate = per_replicate[~np.isnan(per_replicate)]
            low, high = (
                (float(np.percentile(per_replicate, tail)), float(np.percentile(per_replicate, 100 - tail)))
                if per_replicate.size
                else (None, None)
            )
            results[name] = Estimate(value=value, low=low, high=high, n=n)
        return results


@dataclass(frozen=True)
class Row:
    """One scored unit: a whole sample, or (CelebA) one attribute decision within a sample."""

    prediction: Prediction
    correct: bool
    decision: str | None = None  # the attribute decided; None for a sample row

    @property
    def cluster(self) -> str:
        return f"{self.prediction.dataset}/{self.prediction.image}"


def attribute_decisions(prediction: Prediction) -> list[Row]:
    """A yes/no reply decides the asked attribute; a selection reply decides each listed option
    (present when its letter was given). An unparsed or failed reply decides each one wrongly."""
    if prediction.answer_style == "yes_no":
        return [Row(prediction, prediction.correct, prediction.asked)]
    parsed = prediction.status == "parsed"
    truth, chosen = set(prediction.truth), set(prediction.predicted)
    return [
        Row(prediction, parsed and ((option in chosen) == (option in truth)), option)
        for option in prediction.options
    ]


def true_class(prediction: Prediction) -> str:
    return label_class(prediction.qa_task, prediction.truth)


def score_task(
    spec: TaskSpec,
    predictions: Sequence[Prediction],
    resamples: int,
    confidence: float,
    seed: int,
    worst: int,
) -> TaskResult:
    samples = [Row(p, p.correct) for p in predictions]
    decisions = (
        [row for p in predictions for row in attribute_decisions(p)]
        if spec.headline == "mean_accuracy"
        else []
    )
    rows = samples + decisions
    is_sample = [row.decision is None for row in rows]
    boot = Bootstrap([row.cluster for row in rows], resamples, confidence, seed)
    correct = [float(row.correct) for row in rows]
    styles = [row.prediction.answer_style for row in rows]
    datasets = [row.prediction.dataset for row in rows]

    accuracy = "band_accuracy" if spec.name == "age" else "accuracy"
    boot.add(accuracy, correct, is_sample)
    boot.add("unparsed_rate", [float(row.prediction.status != "parsed") for row in rows], is_sample)
    for style in sorted(set(styles)):
        boot.add(
            f"style/{style}", correct, [s and st == style for s, st in zip(is_sample, styles, strict=True)]
        )
    for dataset in sorted(set(datasets)):
        boot.add(
            f"dataset/{dataset}",
            correct,
            [s and d == dataset for s, d in zip(is_sample, datasets, strict=True)],
        )

    if decisions:
        is_decision = [not s for s in is_sample]
        attributes = [row.decision or "" for row in rows]
        boot.add("mean_accuracy", correct, is_decision, groups=attributes)
        for attribute in sorted({row.decision for row in decisions}):
            boot.add(f"class/{attribute}", correct, [a == attribute for a in attributes])
    else:
        classes = [true_class(row.prediction) for row in rows]
        for name in sorted(set(classes)):
            boot.add(f"class/{name}", correct, [c == name for c in classes])
        for group_name in GROUPS.get(spec.name, ()):
            values = [_group_value(row.prediction, group_name) for row in rows]
            for value in sorted({v for v in values if v}):
                boot.add(f"group/{group_name}/{value}", correct, [v == value for v in values])
    if spec.name == "age":
        years = [row.prediction.qa_task == "age" and row.prediction.status == "parsed" for row in rows]
        boot.add("mae", [row.prediction.abs_error or 0.0 for row in rows], years)

    found = boot.estimates()
    headline = spec.headline
    order = [
        headline,
        *(n for n in found if "/" not in n and n not in (headline, "unparsed_rate")),
        "unparsed_rate",
    ]
    metrics = {name: found[name] for name in order}  # the headline first, the unparsed rate last
    return TaskResult(
        task=spec.name,
        title=spec.title,
        headline=headline,
        samples=len(predictions),
        unparsed=sum(p.status == "unparsed" for p in predictions),
        failed_requests=sum(p.status == "failed_request" for p in predictions),
        metrics=metrics,
        by_style=_section(found, "style/"),
        by_dataset=_section(found, "dataset/"),
        per_class=_section(found, "class/"),
        by_group={
            group: section
            for group in GROUPS.get(spec.name, ())
            if (section := _section(found, f"group/{group}/"))
        },
        confusion=confusion_matrices(spec, predictions),
        worst=worst_examples(predictions, worst),
        notes=list(spec.notes),
    )


# perceived groups of the same image that a task's accuracy is broken down by (fairness checks)
GROUPS: dict[str, tuple[str, ...]] = {
    "gender": ("race", "age_band"),
    "race": ("gender", "age_band"),
    "age": ("gender", "race"),
    "expression": (),
}


def _group_value(prediction: Prediction, group: str) -> str:
    """The image's perceived group; race categories differ between datasets, so they carry its name."""
    value = prediction.groups.get(group, "")
    return f"{prediction.dataset}:{value}" if value and group == "race" else value


def _section(found: dict[str, Estimate], prefix: str) -> dict[str, Estimate]:
    return {name.removeprefix(prefix): value for name, value in found.items() if name.startswith(prefix)}


def confusion_matrices(spec: TaskSpec, predictions: Sequence[Prediction]) -> list[ConfusionMatrix]:
    """True class x predicted class (plus unparsed), one per dataset, from the replies that name a
    class (open and single-choice questions; yes/no replies name none)."""
    if spec.headline == "mean_accuracy":
        return []
    matrices = []
    for dataset in sorted({p.dataset for p in predictions}):
        naming = [p for p in predictions if p.dataset == dataset and p.answer_style != "yes_no"]
        if not naming:
            continue
        labels = class_order(dataset, spec)
        counts = Counter(
            (true_class(p), p.predicted[0] if p.status == "parsed" and p.predicted else UNPARSED_COLUMN)
            for p in naming
        )
        columns = [*labels, UNPARSED_COLUMN]
        matrices.append(
            ConfusionMatrix(
                title=f"{dataset} ({len(naming)} replies naming a class)",
                labels=labels,
                counts=[[counts[(truth, predicted)] for predicted in columns] for truth in labels],
            )
        )
    return matrices


def worst_examples(predictions: Sequence[Prediction], limit: int) -> list[WorstExample]:
    """Failed requests, then unparsed replies, then wrong ones (largest age errors first)."""
    order = {"failed_request": 0, "unparsed": 1, "parsed": 2}
    bad = [p for p in predictions if not p.correct or p.status != "parsed"]
    bad.sort(key=lambda p: (order[p.status], -(p.abs_error or 0.0), p.key))
    chosen = []
    for p in bad[:limit]:
        why = {"failed_request": f"request failed: {p.error}", "unparsed": "unparsed reply"}.get(
            p.status, "wrong"
        )
        if p.abs_error is not None:
            why = f"off by {p.abs_error:g} years" + ("" if p.correct else ", wrong band")
        chosen.append(WorstExample(key=p.key, why=why))
    return chosen
