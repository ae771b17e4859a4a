"""The reformat stage: a dataset in its native layout -> ``OUT/<dataset>/<split>/NNNNN.tar`` QA shards.

The dataset's rows (label-file lines or image files, in a stable order) are cut into chunks of
``rows_per_chunk``; chunk N writes shard ``NNNNN.tar`` of every split it has samples for, its
status rows and, with ``llava``, its part of the LLaVA export, then its marker
``_chunks/NNNNN_stats.json`` last. Beam spreads the chunks over workers (``QAChunkWriter`` does the
work, ``ReformatChunkDoFn`` adapts it); when all are done the driver writes ``status.parquet``,
``sizes.json`` per split, the LLaVA JSON files and ``manifest.json``, the commit point.

A chunk's output depends only on its rows and the configuration, so a retried bundle, a rerun and
a run with another runner or parallelism give the same bytes; a rerun skips finished chunks.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from contextlib import ExitStack
from functools import cached_property
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from pydantic import Field

from facemllm.annotators.face_config import FaceConfig
from facemllm.pipeline.config import RunnerConfig
from facemllm.pipeline.core.config import load_yaml_config
from facemllm.pipeline.core.files import atomic_path, write_bytes_atomic, write_json_atomic
from facemllm.pipeline.core.manifest import package_versions
from facemllm.pipeline.core.shards import ShardWriter, shard_info, shard_paths, write_sizes
from facemllm.pipeline.runners import make_runner, pipeline_options
from facemllm.reformatters import DatasetReformatter, QAConfig, make_reformatter
from facemllm.reformatters.base import ImageLoad, ImageLoader, RowRejected
from facemllm.schemas import (
    QASample,
    RunManifest,
    ShardInfo,
    ShardManifest,
    SourceDataset,
    StrictModel,
)

METRICS_NAMESPACE = "facemllm"
CHUNKS_DIR = "_chunks"
LLAVA_DIR = "llava"


class ReformatConfig(StrictModel):
    """One dataset's reformat run (``facemllm reformat``)."""

    dataset: SourceDataset
    root: str = Field(description="the dataset in its native layout")
    out: str = Field(description="QA output folder; this dataset's files go to OUT/<dataset>/")
    llava: bool = Field(False, description="also write LLaVA's JSON conversation lists and an image folder")
    rows_per_chunk: int = Field(2_000, gt=0, description="input rows per parallel unit and per shard")
    max_image_pixels: int = Field(8192 * 8192, gt=0, description="refuse larger images before decoding them")
    jpeg_quality: int = Field(95, ge=1, le=100, description="for images re-encoded to JPEG (PNG inputs)")
    crop_faces: bool = Field(
        False, description="re-detect the face with SCRFD and keep the largest face's context crop"
    )
    faces: FaceConfig = FaceConfig()
    qa: QAConfig = QAConfig()
    runner: RunnerConfig = RunnerConfig()

    def config_hash(self) -> str:
        """Hash of what decides the output bytes: not where inputs and outputs are, nor the runner."""
        exclude: dict[str, Any] = {"root": True, "out": True, "runner": True, "faces": {"intra_op_threads"}}
        if not self.crop_faces:
            exclude["faces"] = True
        payload = self.model_dump(mode="json", exclude=exclude)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_reformat_config(path: str | Path | None, overrides: list[str] = (), **given: Any) -> ReformatConfig:
    return load_yaml_config(ReformatConfig, path, overrides, given)


class FaceCropLoader:
    """For unaligned images: the loaded image's largest face, as the face stage crops it."""

    def __init__(self, load: ImageLoader, faces: FaceConfig):
        from facemllm.annotators.faces import FaceCropper

        self.load = load
        self.cropper = FaceCropper(faces)

    def __call__(self, path: Path) -> bytes:
        result = self.cropper.process(self.load(path), "source", {})
        if not result.faces:
            raise RowRejected(
                "no_face", f"face stage: {result.status.status} {result.status.error or ''}".strip()
            )
        return result.faces[0].context_jpg


class ChunkMarker(StrictModel):
    """``_chunks/NNNNN_stats.json``: what a finished chunk wrote; its existence marks it complete."""

    chunk: int
    fingerprint: str = Field(description="configuration and input listing it was written from")
    rows: int
    status: dict[str, int] = Field(description="status -> rows")
    shards: dict[str, ShardInfo] = Field(description="split -> the chunk's shard of that split")
    tasks: dict[str, dict[str, int]] = Field(description="split -> task -> samples")


class QAChunkWriter:
    """Writes the shards, status rows and LLaVA part of one chunk of rows (plain class, no Beam)."""

    def __init__(self, config: ReformatConfig, reformatter: DatasetReformatter | None = None):
        self.config = config
        self.reformatter = reformatter or make_reformatter(config.dataset, config.root, config.qa)
        self.dataset_dir = Path(config.out) / config.dataset
        self.chunks_dir = self.dataset_dir / CHUNKS_DIR

    @cached_property
    def fingerprint(self) -> str:
        """Configuration and input listing together: a finished chunk is reused only if both match."""
        return f"{self.config.config_hash()}-{self.reformatter.listing_digest()}"

    @cached_property
    def load_image(self) -> ImageLoad:
        load = ImageLoader(self.config.max_image_pixels, self.config.jpeg_quality)
        return FaceCropLoader(load, self.config.faces) if self.config.crop_faces else load

    def chunk_ids(self) -> range:
        return range(math.ceil(len(self.reformatter.rows) / self.config.rows_per_chunk))

    def marker(self, chunk_id: int) -> ChunkMarker | None:
        path = shard_paths(self.chunks_dir, chunk_id)["stats"]
        return ChunkMarker.model_validate_json(path.read_text()) if path.exists() else None

    def is_done(self, chunk_id: int) -> bool:
        marker = self.marker(chunk_id)
        return marker is not None and marker.fingerprint == self.fingerprint

    def process(self, chunk_id: int) -> ChunkMarker:
        if self.is_done(chunk_id):
            return self.marker(chunk_id)
        start = chunk_id * self.config.rows_per_chunk
        statuses: list[dict] = []
        llava: dict[str, list[dict]] = defaultdict(list)
        tasks: dict[str, Counter[str]] = defaultdict(Counter)
        writers: dict[str, ShardWriter] = {}
        with ExitStack() as open_shards:  # an exception aborts every shard of the chunk
            for row in self.reformatter.rows[start : start + self.config.rows_per_chunk]:
                result = self.reformatter.reformat_row(row, self.load_image)
                statuses.append(result.status.model_dump(mode="json"))
                image_name = f"images/{self.config.dataset}_{row.row:08d}.jpg"
                if self.config.llava and result.samples:
                    write_bytes_atomic(self.dataset_dir / LLAVA_DIR / image_name, result.image)
                for sample in result.samples:
                    if sample.split not in writers:
                        tar = shard_paths(self.dataset_dir / sample.split, chunk_id)["tar"]
                        writers[sample.split] = open_shards.enter_context(ShardWriter(tar))
                    json_bytes = sample.model_dump_json().encode()
                    writers[sample.split].add(sample.key, {"jpg": result.image, "json": json_bytes})
                    tasks[sample.split][sample.task] += 1
                    if self.config.llava:
                        llava[sample.split].append(llava_record(sample, image_name))
        paths = shard_paths(self.chunks_dir, chunk_id)
        write_parquet(paths["parquet"], statuses)
        if self.config.llava:
            write_json_atomic(llava_part(self.chunks_dir, chunk_id), llava)
        marker = ChunkMarker(
            chunk=chunk_id,
            fingerprint=self.fingerprint,
            rows=len(statuses),
            status=dict(sorted(Counter(s["status"] for s in statuses).items())),
            shards={
                split: shard_info(writer.path, writer.count, url=f"{split}/{writer.path.name}")
                for split, writer in sorted(writers.items())
            },
            tasks={split: dict(sorted(counts.items())) for split, counts in sorted(tasks.items())},
        )
        write_json_atomic(paths["stats"], marker.model_dump(mode="json"))  # completion marker, last
        return marker


def llava_record(sample: QASample, image: str) -> dict:
    """One entry of LLaVA's training list; ``image`` is relative to the ``llava/`` folder."""
    return {
        "id": sample.key,
        "image": image,
        "conversations": [turn.model_dump() for turn in sample.conversations],
    }


def llava_part(chunks_dir: Path, chunk_id: int) -> Path:
    return chunks_dir / f"{chunk_id:05d}_llava.json"


# One column per ReformatStatus field; a test checks the two stay in step.
REFORMAT_STATUS_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int64()),
        ("dataset", pa.string()),
        ("row", pa.int64()),
        ("source", pa.string()),
        ("image", pa.string()),
        ("split", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("samples", pa.int64()),
    ]
)


def write_parquet(path: Path, rows: list[dict] | pa.Table) -> None:
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=REFORMAT_STATUS_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


class ReformatChunkDoFn(beam.DoFn):
    def __init__(self, config: ReformatConfig):
        self.config = config

    def setup(self):
        self.writer = QAChunkWriter(self.config)

    def process(self, chunk_id: int):
        skipped = self.writer.is_done(chunk_id)
        marker = self.writer.process(chunk_id)
        if not skipped:
            for status, count in marker.status.items():
                Metrics.counter(METRICS_NAMESPACE, f"reformat_{status}").inc(count)
        Metrics.counter(METRICS_NAMESPACE, "reformat_chunks_skipped" if skipped else "reformat_chunks").inc()
        yield chunk_id


def check_reusable(writer: QAChunkWriter) -> None:
    """Refuse to mix chunks of another configuration or input listing into this run's output."""
    for marker_path in sorted(writer.chunks_dir.glob("*_stats.json")):
        if ChunkMarker.model_validate_json(marker_path.read_text()).fingerprint != writer.fingerprint:
            raise ValueError(
                f"{writer.dataset_dir} holds output of another configuration or other input files "
                f"({marker_path.name}); remove that folder or choose another --out"
            )


def clean_stale_temporaries(dataset_dir: Path) -> None:
    """What killed workers left half-written; only the driver calls this, before any worker."""
    for stray in dataset_dir.rglob(".*.tmp-*"):
        stray.unlink(missing_ok=True)


def finalize(writer: QAChunkWriter) -> RunManifest:
    """Status table, sizes, LLaVA lists, then the manifest (the commit point), from the chunk markers."""
    config, dataset_dir = writer.config, writer.dataset_dir
    markers = []
    for chunk_id in writer.chunk_ids():
        if not writer.is_done(chunk_id):
            raise RuntimeError(f"chunk {chunk_id} of {config.dataset} did not complete; rerun to finish it")
        markers.append(writer.marker(chunk_id))
    chunk_tables = [pq.read_table(shard_paths(writer.chunks_dir, m.chunk)["parquet"]) for m in markers]
    write_parquet(
        dataset_dir / "status.parquet",
        pa.concat_tables([REFORMAT_STATUS_SCHEMA.empty_table(), *chunk_tables]),
    )

    status_counts: Counter[str] = Counter({"rows": sum(m.rows for m in markers)})
    shards: dict[str, list[ShardInfo]] = defaultdict(list)
    split_counts: dict[str, Counter[str]] = defaultdict(Counter)
    for marker in markers:
        status_counts.update(marker.status)
        for split, info in marker.shards.items():
            shards[split].append(info)
        for split, counts in marker.tasks.items():
            split_counts[split].update({f"task_{task}": n for task, n in counts.items()})
    stages = {
        f"qa/{config.dataset}": ShardManifest(
            stage=f"qa/{config.dataset}", shards=[], counts=dict(sorted(status_counts.items()))
        )
    }
    for split in sorted(shards):
        write_sizes(dataset_dir / split, shards[split])
        counts = {"samples": sum(s.nsamples for s in shards[split]), **split_counts[split]}
        stages[f"qa/{config.dataset}/{split}"] = ShardManifest(
            stage=f"qa/{config.dataset}/{split}", shards=shards[split], counts=dict(sorted(counts.items()))
        )
    if config.llava:
        parts = [json.loads(llava_part(writer.chunks_dir, m.chunk).read_text()) for m in markers]
        for split in sorted(shards):
            records = [record for part in parts for record in part.get(split, [])]
            write_json_atomic(dataset_dir / LLAVA_DIR / f"{split}.json", records)
    manifest = RunManifest(
        config_hash=config.config_hash(), package_versions=package_versions(), stages=stages
    )
    write_json_atomic(dataset_dir / "manifest.json", manifest.model_dump(mode="json"))  # commit point, last
    return manifest


def run_reformat(config: ReformatConfig) -> RunManifest:
    """Reformat one dataset on the configured Beam runner, then write the manifest; returns it."""
    writer = QAChunkWriter(config)  # lists the inputs: a missing file or folder stops here, before any work
    check_reusable(writer)
    writer.dataset_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(writer.dataset_dir)
    with beam.Pipeline(
        runner=make_runner(config.runner), options=pipeline_options(config.runner)
    ) as pipeline:
        (
            pipeline
            | "Chunks" >> beam.Create(list(writer.chunk_ids()))
            | "SpreadChunks" >> beam.Reshuffle()
            | "Reformat" >> beam.ParDo(ReformatChunkDoFn(config))
        )
    clean_stale_temporaries(writer.dataset_dir)
    return finalize(writer)
