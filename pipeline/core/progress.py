"""Live progress of a run, read from the completion markers, so it works for local and object-store
outs and for any runner (the markers are what every worker writes last).

A thread on the driver polls the markers every second: per stage, units done out of those known,
items and failures so far, items/s and an ETA, drawn on the console with rich (unless
``--no-progress``) and appended as one JSON line per newly completed unit to
``OUT/logs/progress.jsonl``; the last line holds the totals.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from facemllm.pipeline.core.storage import RunStore
from facemllm.schemas.annotation import REQUEST_FAILURES

PROGRESS_LOG = Path("logs") / "progress.jsonl"


@dataclass(frozen=True)
class StageMarkers:
    """Where a stage's markers are and what one says: items processed and items failed."""

    folder: str
    pattern: str
    items: str
    failures: tuple[str, ...]


MARKERS = {
    "select": StageMarkers("urls", "_select-*.json", "counts.rows_read", ()),
    "download": StageMarkers("images", "*_stats.json", "count", ("failed_to_download", "failed_to_resize")),
    "faces": StageMarkers("faces", "*_stats.json", "images", ("status.failed_to_decode",)),
    "annotate": StageMarkers(
        "annotations",
        "*_stats.json",
        "faces",
        tuple(f"status.{outcome}" for outcome in REQUEST_FAILURES),
    ),
    "laion_face_qa": StageMarkers(
        "qa/_laion_face", "*_stats.json", "faces", ("status.bad_annotation", "status.no_image")
    ),
}


def _value(stats: dict, path: str) -> int:
    for part in path.split("."):
        stats = stats.get(part, 0) if isinstance(stats, dict) else 0
    return stats if isinstance(stats, int) else 0


@dataclass
class StageProgress:
    done: set[str] = field(default_factory=set)
    items: int = 0
    failures: int = 0


class ProgressMonitor:
    """``with ProgressMonitor(out, stages, totals, console=stream): run...`` (no table without a stream)."""

    def __init__(
        self,
        out: str,
        stages: list[str],
        total_inputs: int,
        console: TextIO | None = None,
        interval_s: float = 1.0,
    ):
        self.store = RunStore(out)
        self.stages = [s for s in stages if s in MARKERS]
        self.total_inputs = total_inputs  # metadata files (select's units), when select runs
        self.console = console
        self.interval_s = interval_s
        self.progress = {stage: StageProgress() for stage in self.stages}
        self.started = time.monotonic()
        self.log = self.store.local / PROGRESS_LOG
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="facemllm-progress", daemon=True)

    def __enter__(self) -> ProgressMonitor:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        totals = {
            s: {"units": len(p.done), "items": p.items, "failures": p.failures}
            for s, p in self.progress.items()
        }
        self._append({"totals": totals, "seconds": round(time.monotonic() - self.started, 2)})

    def _loop(self) -> None:
        live = None
        if self.console is not None:
            from rich.console import Console
            from rich.live import Live

            live = Live(
                self.table(), refresh_per_second=2, transient=True, console=Console(file=self.console)
            )
            live.start()
        try:
            while not self._stop.wait(self.interval_s):
                self.poll()
                if live is not None:
                    live.update(self.table())
        finally:
            if live is not None:
                live.stop()

    def markers(self, stage: str) -> list[Path]:
        spec = MARKERS[stage]
        return self.store.matching(f"{spec.folder}/{spec.pattern}")

    def total(self, stage: str) -> int | None:
        """Units a stage will do, as far as known now (select: the inputs; download: the url shards
        select made; later stages: the units of the stage before)."""
        if stage == "select":
            return self.total_inputs or None
        index = self.stages.index(stage)
        if index == 0:
            return None
        before = self.stages[index - 1]
        return (
            len(self.progress[before].done)
            if before != "select"
            else len(self.store.matching("urls/part-*.parquet")) or None
        )

    def poll(self) -> None:
        for stage in self.stages:
            spec, progress = MARKERS[stage], self.progress[stage]
            for marker in self.markers(stage):
                if marker.name in progress.done:
                    continue
                try:
                    stats = self.store.read_marker(marker)  # from the store when another machine wrote it
                except (OSError, ValueError):
                    continue  # a file seen half-way, or the store did not answer: read again next time
                if stats is None:
                    continue
                progress.done.add(marker.name)
                progress.items += _value(stats, spec.items)
                progress.failures += sum(_value(stats, name) for name in spec.failures)
                total, items_per_s, eta = self.rates(stage)
                self._append(
                    {
                        "stage": stage,
                        "unit": marker.name,
                        "done": len(progress.done),
                        "total": total,
                        "items": progress.items,
                        "failures": progress.failures,
                        "items_per_s": round(items_per_s, 2),
                        "eta_s": round(eta, 1) if eta is not None else None,
                    }
                )

    def rates(self, stage: str) -> tuple[int | None, float, float | None]:
        """(units known, items/s, seconds left at the units/s so far; None while unknown)."""
        progress = self.progress[stage]
        elapsed = max(time.monotonic() - self.started, 1e-6)
        total, done = self.total(stage), len(progress.done)
        eta = max(total - done, 0) / (done / elapsed) if total and done else None
        return total, progress.items / elapsed, eta

    def table(self):
        from rich.table import Table

        table = Table(title="facemllm run", expand=False)
        for column in ("stage", "shards", "items", "items/s", "failures", "ETA s"):
            table.add_column(column)
        for stage, progress in self.progress.items():
            total, items_per_s, eta = self.rates(stage)
            table.add_row(
                stage,
                f"{len(progress.done)}/{total if total is not None else '?'}",
                str(progress.items),
                f"{items_per_s:.1f}",
                str(progress.failures),
                f"{eta:.0f}" if eta is not None else "-",
            )
        return table

    def _append(self, line: dict) -> None:
        with open(self.log, "a") as handle:
            handle.write(json.dumps(line) + "\n")
