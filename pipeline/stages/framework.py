"""The stage contract and the one executor that runs every stage.

A stage (``select.py``, ``download.py``, ``faces.py``, ``annotate.py``, ``reformat.py``,
``laion_face_qa.py``) says only what is particular to it: its config, which files one unit of work
(a shard, an input file, a chunk: an int id) reads and writes, and how to process one unit. What
every stage needs is here, once, in the spirit of datatrove's ``PipelineStep`` and NeMo Curator's
stages:

- ``execute_unit``: skip a unit whose completion marker exists (and is current), bring a unit
  another worker completed in an object-store run into the local mirror, fetch the unit's inputs,
  process it, write its status table, write its marker last, upload the unit with its marker last.
  Stages write their own data files through ``core`` (temporary name, then rename), so a unit is
  either complete with its marker, or redone by the next run.
- ``StageDoFn``: the one Beam adapter: ``setup``/``teardown`` once per worker (models, servers),
  one unit per element, Beam counters from the unit's stats, the downstream units as output.
- ``run_stage``: a single stage over a list of units on any Beam runner (``facemllm annotate``,
  ``reformat`` and ``laion-face-qa``); ``facemllm run`` chains stages in ``pipeline/run.py``.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics
from pydantic import BaseModel

from facemllm.pipeline.core.files import remove_stale_temporaries, write_json_atomic, write_parquet_atomic
from facemllm.pipeline.core.manifest import SHARD_RECORD, shard_record
from facemllm.pipeline.core.shards import ShardWriter, shard_paths
from facemllm.pipeline.core.storage import RunStore, read_marker
from facemllm.pipeline.runners import IN_PROCESS_WORKER, RunnerConfig, beam_pipeline
from facemllm.schemas.tables import arrow_schema

METRICS_NAMESPACE = "facemllm"


@dataclass
class UnitResult:
    """What processing one unit produced, besides the data files the stage wrote itself: the
    completion marker's content (JSON, written last) and one status row per input element."""

    stats: dict
    statuses: list[dict] | pa.Table | None = None


class StageMetrics:
    """Where a stage reports live counts; the Beam adapter replaces the default (which drops them)."""

    def count(self, name: str, value: int = 1) -> None:
        """Add ``value`` to the counter ``name``."""

    def observe(self, name: str, value: int) -> None:
        """Record one value of the distribution ``name``."""


class BeamMetrics(StageMetrics):
    def count(self, name: str, value: int = 1) -> None:
        Metrics.counter(METRICS_NAMESPACE, name).inc(value)

    def observe(self, name: str, value: int) -> None:
        Metrics.distribution(METRICS_NAMESPACE, name).update(value)


class Stage(ABC):
    """One step of the DAG: unit of work (an int id) -> files under the run's ``root``.

    The object is built on the driver (cheap, picklable: configs and names only). ``bind`` gives
    it the folder it works in (on a worker: its local mirror of an object-store run); ``setup``
    then loads what is heavy, once per worker.
    """

    name: ClassVar[str]  # counters are "<name>_<what>"
    status_record: ClassVar[type[BaseModel] | None] = None  # the status table's row, if it has one

    root: Path
    metrics: StageMetrics = StageMetrics()

    def bind(self, root: Path) -> Stage:
        self.root = Path(root)
        return self

    def setup(self) -> None:
        """Once per worker, before any unit: load models, start servers."""
        return None

    def teardown(self) -> None:
        """Once per worker, after the last unit (stop servers)."""
        return None

    @abstractmethod
    def marker(self, unit: int) -> Path:
        """The completion marker: its existence says the unit's outputs are complete."""

    def status_table(self, unit: int) -> Path | None:
        """Where the unit's status rows go (None: the stage has no status table)."""
        return None

    def outputs(self, unit: int, stats: dict) -> list[Path]:
        """Every file the marker vouches for (uploaded before it, fetched before it)."""
        table = self.status_table(unit)
        return [table] if table is not None else []

    def inputs(self, unit: int) -> list[Path]:
        """Files the unit reads that another worker may have written (fetched from the run store)."""
        return []

    def is_current(self, stats: dict) -> bool:
        """Whether a completed unit was made with this configuration (else it is redone)."""
        return True

    def recorded_outputs(self, unit: int, result: UnitResult) -> dict:
        """What the completion marker records about the unit's outputs besides the stage's stats,
        for readers that must not open the outputs themselves (default: nothing)."""
        return {}

    @abstractmethod
    def process(self, unit: int) -> UnitResult:
        """Do the unit's work: write its data files atomically, return its stats and status rows."""

    def counters(self, stats: dict) -> dict[str, int]:
        """Beam counters for a unit just processed (not for a skipped one)."""
        return {}

    def downstream(self, unit: int, stats: dict) -> list[int]:
        """The units this one feeds in the next stage (default: the same id)."""
        return [unit]

    @abstractmethod
    def folders(self) -> list[Path]:
        """The folders this stage writes in, and nothing else: what ``clean_run`` may clean."""

    def clean(self) -> None:
        """Driver only, before and after a run: remove what killed workers left half-written
        beyond the temporary files ``clean_run`` removes (a stage's own work folders)."""
        return None


def clean_run(stages: Iterable[Stage], run_folder: Path | None = None) -> None:
    """Driver only, before and after a run, when no worker runs: every temporary file (at any
    depth) under ``run_folder`` (``facemllm run``'s own output folder, where the driver writes
    too), else under each stage's own folders only; then every stage's own leftovers."""
    stages = list(stages)
    folders = [run_folder] if run_folder is not None else [f for stage in stages for f in stage.folders()]
    for folder in folders:
        remove_stale_temporaries(folder)
    for stage in stages:
        stage.clean()


class ShardOutputStage(Stage):
    """A stage whose unit N writes shard N of ``output_dir``: ``NNNNN.tar``, ``NNNNN.parquet`` (a
    status row per input element) and ``NNNNN_stats.json``, img2dataset's layout."""

    output_dir: str

    def paths(self, unit: int) -> dict[str, Path]:
        return shard_paths(self.root / self.output_dir, unit)

    def folders(self) -> list[Path]:
        return [self.root / self.output_dir]

    def marker(self, unit: int) -> Path:
        return self.paths(unit)["stats"]

    def status_table(self, unit: int) -> Path:
        return self.paths(unit)["parquet"]

    def outputs(self, unit: int, stats: dict) -> list[Path]:
        return [self.paths(unit)["tar"], self.status_table(unit)]

    def recorded_outputs(self, unit: int, result: UnitResult) -> dict:
        """The shard's sha256, samples and bytes and its status counts: the run manifest is built
        from the markers alone."""
        return shard_record(self.paths(unit)["tar"], result.statuses)

    def is_current(self, stats: dict) -> bool:
        return SHARD_RECORD in stats  # a marker from before shards were recorded is redone


class ShardStage(ShardOutputStage):
    """The common shape: shard N of ``input_dir`` -> shard N of ``output_dir``, its samples
    written through one ``ShardWriter``."""

    input_dir: str

    def input_tar(self, unit: int) -> Path:
        return shard_paths(self.root / self.input_dir, unit)["tar"]

    def inputs(self, unit: int) -> list[Path]:
        return [self.input_tar(unit)]

    def process(self, unit: int) -> UnitResult:
        with ShardWriter(self.paths(unit)["tar"]) as writer:
            return self.process_shard(unit, self.input_tar(unit), writer)

    @abstractmethod
    def process_shard(self, unit: int, source: Path, writer: ShardWriter) -> UnitResult:
        """Read ``source``, add this shard's samples to ``writer`` in key order."""


def completed_stats(stage: Stage, unit: int, store: RunStore | None = None) -> dict | None:
    """The unit's marker content when it is complete and current, else None. With a run store,
    a unit another worker completed is fetched, and one this mirror completed that the store
    lacks (its worker killed before the upload, on a machine only this worker sees) is uploaded."""
    marker = stage.marker(unit)
    in_mirror = marker.exists()
    if store is not None and not in_mirror:
        store.fetch_completed(marker, lambda stats: stage.outputs(unit, stats))
    stats = read_marker(marker)
    if stats is None or not stage.is_current(stats):
        return None
    if store is not None and in_mirror:
        store.push_completed(marker, *stage.outputs(unit, stats))
    return stats


def execute_unit(
    stage: Stage, unit: int, store: RunStore | None = None, process: Callable[[], UnitResult] | None = None
) -> tuple[dict, bool]:
    """Run one unit to completion unless it is complete; returns (its stats, whether it was skipped).
    ``process``: how to produce the unit when not ``stage.process`` (its inputs then come from
    elsewhere than the store)."""
    stats = completed_stats(stage, unit, store)
    if stats is not None:
        return stats, True
    marker = stage.marker(unit)
    if process is None:
        for path in stage.inputs(unit) if store is not None else ():
            store.fetch(path)
        process = functools.partial(stage.process, unit)
    result = process()
    table = stage.status_table(unit)
    if table is not None:
        schema = arrow_schema(stage.status_record) if stage.status_record is not None else None
        write_parquet_atomic(table, result.statuses, schema)
    stats = {**result.stats, **stage.recorded_outputs(unit, result)}
    write_json_atomic(marker, stats)  # the completion marker, last
    if store is not None:
        store.push_completed(marker, *stage.outputs(unit, stats))
    return stats, False


class StreamingSource(Stage):
    """A stage that can hand each sample to the next stage as it writes it (``on_sample(key,
    data, meta)``), so that the next stage works while this one waits on the network."""

    @abstractmethod
    def process(self, unit: int, on_sample: Callable[[str, bytes, dict], None] | None = None) -> UnitResult:
        """``Stage.process``, calling ``on_sample`` for each sample its output will hold."""


class StreamingSink(Stage):
    """A stage that can take its input unit's samples as they are made, in any order."""

    @abstractmethod
    def process_stream(self, unit: int, samples: Iterable[tuple[str, bytes, dict]]) -> UnitResult:
        """``Stage.process`` over ``samples`` instead of the input files: the same files, the same bytes."""


_END_OF_UNIT = object()
STREAM_BUFFER = 64  # samples between a source and its sink; beyond, the source waits for the sink


def execute_streamed(
    source: StreamingSource,
    sink: StreamingSink,
    unit: int,
    store: RunStore | None = None,
    buffer: int = STREAM_BUFFER,
) -> list[tuple[dict, bool]]:
    """Unit ``unit`` of ``source``, then the same unit of ``sink``, the sink consuming each sample
    while the source is still producing the rest (download I/O overlaps face detection); returns
    ``execute_unit``'s result for each. Where either is already complete, they run one after the
    other. At most ``buffer`` samples wait between them. The sink's marker is written only after
    the source's, and never when the source failed; a failed sink lets the source finish alone."""
    if (produced := completed_stats(source, unit, store)) is not None:
        return [(produced, True), execute_unit(sink, unit, store)]
    if (sunk := completed_stats(sink, unit, store)) is not None:
        return [execute_unit(source, unit, store), (sunk, True)]
    samples: queue.Queue = queue.Queue(maxsize=buffer)
    abandoned = threading.Event()  # the sink failed: nobody reads the queue any more

    def hand_over(item) -> None:
        while not abandoned.is_set():
            try:
                return samples.put(item, timeout=0.1)
            except queue.Full:
                continue

    def produce() -> tuple[dict, bool]:
        try:
            return execute_unit(source, unit, store, lambda: source.process(unit, lambda *s: hand_over(s)))
        finally:
            hand_over(_END_OF_UNIT)

    with ThreadPoolExecutor(1, thread_name_prefix=f"{source.name}-{unit}") as pool:
        produced = pool.submit(produce)

        def consume() -> Iterator[tuple[str, bytes, dict]]:
            yield from iter(samples.get, _END_OF_UNIT)
            produced.result()  # the source's failure, raised before the sink writes anything

        try:
            sunk = execute_unit(sink, unit, store, lambda: sink.process_stream(unit, consume()))
        except BaseException:
            abandoned.set()
            raise
        return [produced.result(), sunk]


class StageDoFn(beam.DoFn):
    """Unit id in; the downstream unit ids out once the unit is complete. ``out``: the run's
    folder or object-store URL (each worker works in its own local mirror of it). With
    ``streams_to``, each unit then goes through that next stage too, streamed (``execute_streamed``)."""

    def __init__(self, stage: Stage, out: str, streams_to: StreamingSink | None = None):
        self.stage = stage
        self.out = out
        self.streams_to = streams_to

    def stages(self) -> list[Stage]:
        return [self.stage] if self.streams_to is None else [self.stage, self.streams_to]

    def setup(self):
        self.store = RunStore(self.out)
        for stage in self.stages():
            stage.metrics = BeamMetrics()
            stage.bind(self.store.local).setup()

    def process(self, unit: int) -> Iterator[int]:
        if self.streams_to is None:
            results = [execute_unit(self.stage, unit, self.store)]
        else:
            results = execute_streamed(self.stage, self.streams_to, unit, self.store)
        for stage, (stats, skipped) in zip(self.stages(), results, strict=True):
            if not skipped:
                for counter, value in stage.counters(stats).items():
                    stage.metrics.count(f"{stage.name}_{counter}", value)
            stage.metrics.count(f"{stage.name}_units_skipped" if skipped else f"{stage.name}_units")
        last_stats, _ = results[-1]
        yield from self.stages()[-1].downstream(unit, last_stats)

    def teardown(self):
        for stage in self.stages():
            stage.teardown()


def apply_stage(
    units: beam.PCollection, label: str, stage: Stage, out: str, streams_to: StreamingSink | None = None
) -> beam.PCollection:
    """``units`` spread over workers, then processed by ``stage`` (and by ``streams_to`` after it,
    unit for unit); returns the downstream units."""
    return (
        units | f"Spread{label}" >> beam.Reshuffle() | label >> beam.ParDo(StageDoFn(stage, out, streams_to))
    )


def run_stage_on_folders(
    make_stage: Callable[[str, str], Stage],
    source: Path,
    dest: Path,
    units: Iterable[int],
    runner: RunnerConfig | None,
    label: str,
) -> Stage:
    """A stage that reads ``source`` and writes ``dest`` (``facemllm annotate``, ``laion-face-qa``),
    run alone over ``units``: both folders relative to their common parent, the run's root; one
    in-process worker by default. Returns the stage,
    bound to that root, for the driver's finishing step."""
    source, dest = Path(source).resolve(), Path(dest).resolve()
    root = Path(os.path.commonpath([source, dest]))
    stage = make_stage(str(source.relative_to(root)), str(dest.relative_to(root)))
    runner = runner or IN_PROCESS_WORKER
    run_stage(stage, units, str(root), runner, label)
    return stage.bind(root)


def run_stage(stage: Stage, units: Iterable[int], out: str, runner: RunnerConfig, label: str) -> None:
    """One stage over ``units`` on the configured Beam runner (the single-stage commands)."""
    root = RunStore(out).local
    clean_run([stage.bind(root)])  # what killed workers of an earlier run left
    with beam_pipeline(runner) as pipeline:
        apply_stage(pipeline | f"{label}Units" >> beam.Create(list(units)), label, stage, out)
    clean_run([stage])
