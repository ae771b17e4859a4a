"""Per-shard statistics for the run report: category counts and fixed-bin histograms that merge
by addition.

Each stage adds one ``profile`` to its completion marker (a few kilobytes per shard), so the report
of a 50M-row run reads one small JSON per shard instead of re-reading images or status tables.
The bin edges are fixed here, once for every shard and every run, which is what makes two shards'
histograms addable.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

OTHER = "(other)"
TOP_PER_SHARD = 200  # categories kept per group and shard (failure reasons, domains); the rest: OTHER
MAX_REASON_CHARS = 80


@dataclass(frozen=True)
class Measure:
    """A distribution the report draws: its axis title and its fixed bin edges."""

    title: str
    edges: tuple[float, ...]
    log: bool = False


def _linear(low: float, high: float, step: float) -> tuple[float, ...]:
    return tuple(float(x) for x in np.arange(low, high + step / 2, step))


def _geometric(low: float, high: float, bins: int) -> tuple[float, ...]:
    return tuple(float(x) for x in np.geomspace(low, high, bins + 1))


MEASURES: dict[str, Measure] = {
    "image_width": Measure("image width (px, as served)", _geometric(16, 16384, 30), log=True),
    "image_height": Measure("image height (px, as served)", _geometric(16, 16384, 30), log=True),
    "faces_per_image": Measure("faces kept per image", _linear(0, 20, 1)),
    "face_size_px": Measure("face size: longest box side (px)", _geometric(8, 4096, 27), log=True),
    "detector_score": Measure("detector score", _linear(0, 1, 0.025)),
    "yaw": Measure("yaw (degrees, from landmarks)", _linear(-90, 90, 5)),
    "pitch": Measure("pitch (degrees, from landmarks)", _linear(-90, 90, 5)),
    "roll": Measure("roll (degrees)", _linear(-90, 90, 5)),
    "sharpness": Measure("sharpness (variance of the Laplacian)", _geometric(1, 100000, 30), log=True),
    "brightness": Measure("brightness (mean gray)", _linear(0, 256, 8)),
    "inter_ocular_px": Measure("inter-ocular distance (px)", _geometric(2, 2048, 30), log=True),
    "caption_words": Measure("caption length (words)", _linear(0, 200, 5)),
    "age_years": Measure("perceived age (years)", _linear(0, 100, 5)),
}


def domain(url: str | None) -> str:
    """The host of a url (lower case), or ``(none)``."""
    try:
        return (urlsplit(url or "").hostname or "(none)").lower()
    except ValueError:
        return "(invalid url)"


def reason(error: str | None) -> str:
    """A failure message as a category: its first line, cut short (messages embed urls and sizes)."""
    message = (error or "").strip()
    return message.splitlines()[0][:MAX_REASON_CHARS] if message else "(no message)"


class ProfileBuilder:
    """Collects one shard's counts and values; ``build`` turns them into the marker's ``profile``."""

    def __init__(self) -> None:
        self.counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.values: defaultdict[str, list[float]] = defaultdict(list)

    def count(self, group: str, category: str | None, n: int = 1) -> None:
        if category is not None and n:
            self.counts[group][str(category)] += n

    def observe(self, measure: str, value: float | None) -> None:
        if measure not in MEASURES:
            raise KeyError(f"no measure {measure!r} in MEASURES")
        if value is not None and np.isfinite(value):
            self.values[measure].append(float(value))

    def build(self) -> dict:
        counts = {}
        for group, counter in sorted(self.counts.items()):
            top = dict(counter.most_common(TOP_PER_SHARD))
            rest = sum(counter.values()) - sum(top.values())
            counts[group] = {**top, OTHER: rest} if rest else top
        histograms = {}
        for measure, values in sorted(self.values.items()):
            edges = np.asarray(MEASURES[measure].edges)
            clipped = np.clip(np.asarray(values), edges[0], edges[-1])  # out of range: the edge bins
            histograms[measure] = np.histogram(clipped, bins=edges)[0].tolist()
        return {"counts": counts, "histograms": histograms}


def merge_profiles(profiles: Iterable[dict | None]) -> dict:
    """The sum of shard profiles (a shard without one, from before profiles existed, adds nothing)."""
    counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
    histograms: dict[str, np.ndarray] = {}
    for profile in profiles:
        if not isinstance(profile, dict):
            continue
        for group, counter in profile.get("counts", {}).items():
            counts[group].update({k: int(v) for k, v in counter.items()})
        for measure, bins in profile.get("histograms", {}).items():
            if measure in MEASURES and len(bins) == len(MEASURES[measure].edges) - 1:
                histograms[measure] = histograms.get(measure, 0) + np.asarray(bins, dtype=np.int64)
    return {
        "counts": {group: dict(counter.most_common()) for group, counter in sorted(counts.items())},
        "histograms": {measure: bins.tolist() for measure, bins in sorted(histograms.items())},
    }
