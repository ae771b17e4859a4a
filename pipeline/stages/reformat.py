"""The reformat stage: a dataset in its native layout -> ``OUT/<dataset>/<split>/NNNNN.tar`` QA shards.

The dataset's rows (label-file lines or image files, in a stable order) are cut into chunks of
``rows_per_chunk``; chunk N writes shard ``NNNNN.tar`` of every split it has samples for, its
status rows and, with ``llava``, its part of the LLaVA export, then its marker
``_chunks/NNNNN_stats.json`` last. Unit of work: one chunk (``ReformatStage``); when all are done
the driver writes ``status.parquet``, ``sizes.json`` per split, the LLaVA JSON files and
``manifest.json``, the commit point (``finalize``).

A chunk's output depends only on its rows and the configuration, so a retried bundle, a rerun and
a run with another runner or parallelism give the same bytes; a rerun skips finished chunks.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from contextlib import ExitStack
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from facemllm.annotators.face_config import FaceConfig
from facemllm.pipeline.core.config import hash_config, load_yaml_config
from facemllm.pipeline.core.files import write_bytes_atomic, write_json_atomic, write_parquet_atomic
from facemllm.pipeline.core.manifest import write_dataset_manifest
from facemllm.pipeline.core.shards import ShardWriter, shard_info, shard_paths
from facemllm.pipeline.core.storage import read_marker
from facemllm.pipeline.runners import RunnerConfig
from facemllm.pipeline.stages.framework import Stage, UnitResult, run_stage
from facemllm.reformatters import DatasetReformatter, QAConfig, make_reformatter
from facemllm.reformatters.base import ImageLoad, ImageLoader, RowRejected
from facemllm.schemas import (
    QAImageSample,
    ReformatStatus,
    RunManifest,
    ShardInfo,
    SourceDataset,
    StrictModel,
)
from facemllm.schemas.tables import arrow_schema

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
        return hash_config(self, exclude)


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


class ReformatStage(Stage):
    """Writes the shards, status rows and LLaVA part of one chunk of rows."""

    name = "reformat"
    status_record = ReformatStatus

    def __init__(self, config: ReformatConfig, reformatter: DatasetReformatter | None = None):
        self.config = config
        if reformatter is not None:
            self.reformatter = reformatter

    def __getstate__(self) -> dict:
        """Workers list the dataset again in ``setup`` rather than receive the whole listing."""
        return {
            key: value for key, value in self.__dict__.items() if key not in ("reformatter", "load_image")
        }

    @cached_property
    def reformatter(self) -> DatasetReformatter:
        """Lists the inputs: a missing file or folder stops the run here, before any work."""
        return make_reformatter(self.config.dataset, self.config.root, self.config.qa)

    def fingerprint(self, unit: int) -> str:
        """Configuration and the chunk's input rows and image files: a finished chunk is reused only
        if both match, so a rerun redoes just the chunks whose inputs changed (a repaired image)."""
        return f"{self.config.config_hash()}-{self.reformatter.listing_digest(self.chunk_rows(unit))}"

    def chunk_rows(self, unit: int) -> list:
        start = unit * self.config.rows_per_chunk
        return self.reformatter.rows[start : start + self.config.rows_per_chunk]

    @cached_property
    def load_image(self) -> ImageLoad:
        load = ImageLoader(self.config.max_image_pixels, self.config.jpeg_quality)
        return FaceCropLoader(load, self.config.faces) if self.config.crop_faces else load

    def setup(self) -> None:
        self.load_image  # noqa: B018 - builds the face detector once per worker when crop_faces is on

    @property
    def dataset_dir(self) -> Path:
        return self.root / self.config.dataset

    @property
    def chunks_dir(self) -> Path:
        return self.dataset_dir / CHUNKS_DIR

    def folders(self) -> list[Path]:
        return [self.dataset_dir]

    def chunk_ids(self) -> range:
        return range(math.ceil(len(self.reformatter.rows) / self.config.rows_per_chunk))

    def marker(self, unit: int) -> Path:
        return shard_paths(self.chunks_dir, unit)["stats"]

    def status_table(self, unit: int) -> Path:
        return shard_paths(self.chunks_dir, unit)["parquet"]

    def outputs(self, unit: int, stats: dict) -> list[Path]:
        shards = [self.dataset_dir / info["url"] for info in stats["shards"].values()]
        llava = [llava_part(self.chunks_dir, unit)] if self.config.llava else []
        return [*shards, *llava, self.status_table(unit)]

    def is_current(self, stats: dict) -> bool:
        return stats.get("fingerprint") == self.fingerprint(stats.get("chunk", -1))

    def completed_marker(self, unit: int) -> ChunkMarker | None:
        stats = read_marker(self.marker(unit))
        return ChunkMarker.model_validate(stats) if stats is not None and self.is_current(stats) else None

    def process(self, unit: int) -> UnitResult:
        statuses: list[dict] = []
        llava: dict[str, list[dict]] = defaultdict(list)
        tasks: dict[str, Counter[str]] = defaultdict(Counter)
        writers: dict[str, ShardWriter] = {}
        with ExitStack() as open_shards:  # an exception aborts every shard of the chunk
            for row in self.chunk_rows(unit):
                result = self.reformatter.reformat_row(row, self.load_image)
                statuses.append(result.status.model_dump(mode="json"))
                image_name = f"images/{self.config.dataset}_{row.row:08d}.jpg"
                if self.config.llava and result.samples:
                    write_bytes_atomic(self.dataset_dir / LLAVA_DIR / image_name, result.image)
                for sample in result.samples:
                    if sample.split not in writers:
                        tar = shard_paths(self.dataset_dir / sample.split, unit)["tar"]
                        writers[sample.split] = open_shards.enter_context(ShardWriter(tar))
                    json_bytes = sample.model_dump_json().encode()
                    writers[sample.split].add(sample.key, {"jpg": result.image, "json": json_bytes})
                    tasks[sample.split].update(question.task for question in sample.questions)
                    if self.config.llava:
                        llava[sample.split].append(llava_record(sample, image_name))
        if self.config.llava:
            write_json_atomic(llava_part(self.chunks_dir, unit), llava)
        marker = ChunkMarker(
            chunk=unit,
            fingerprint=self.fingerprint(unit),
            rows=len(statuses),
            status=dict(sorted(Counter(s["status"] for s in statuses).items())),
            shards={
                split: shard_info(writer.path, writer.count, url=f"{split}/{writer.path.name}")
                for split, writer in sorted(writers.items())
            },
            tasks={split: dict(sorted(counts.items())) for split, counts in sorted(tasks.items())},
        )
        return UnitResult(marker.model_dump(mode="json"), statuses)

    def counters(self, stats: dict) -> dict[str, int]:
        return stats["status"]


def llava_record(sample: QAImageSample, image: str) -> dict:
    """One entry of LLaVA's training list (an image's multi-turn conversation); ``image`` is
    relative to the ``llava/`` folder."""
    return {
        "id": sample.key,
        "image": image,
        "conversations": [turn.model_dump() for turn in sample.conversations],
    }


def llava_part(chunks_dir: Path, chunk_id: int) -> Path:
    return chunks_dir / f"{chunk_id:05d}_llava.json"


def check_reusable(stage: ReformatStage) -> None:
    """Refuse to mix chunks of another configuration into this run's output (chunks of changed
    inputs are simply redone)."""
    config_hash = stage.config.config_hash()
    for marker_path in sorted(stage.chunks_dir.glob("*_stats.json")):
        if not str(json.loads(marker_path.read_text()).get("fingerprint", "")).startswith(f"{config_hash}-"):
            raise ValueError(
                f"{stage.dataset_dir} holds output of another configuration ({marker_path.name}); "
                "remove that folder or choose another --out"
            )


def finalize(stage: ReformatStage) -> RunManifest:
    """Status table, sizes, LLaVA lists, then the manifest (the commit point), from the chunk markers."""
    config, dataset_dir = stage.config, stage.dataset_dir
    markers = []
    for chunk_id in stage.chunk_ids():
        marker = stage.completed_marker(chunk_id)
        if marker is None:
            raise RuntimeError(f"chunk {chunk_id} of {config.dataset} did not complete; rerun to finish it")
        markers.append(marker)
    chunk_tables = [pq.read_table(stage.status_table(m.chunk)) for m in markers]
    write_parquet_atomic(
        dataset_dir / "status.parquet",
        pa.concat_tables([arrow_schema(ReformatStatus).empty_table(), *chunk_tables]),
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
    if config.llava:
        parts = [json.loads(llava_part(stage.chunks_dir, m.chunk).read_text()) for m in markers]
        for split in sorted(shards):
            records = [record for part in parts for record in part.get(split, [])]
            write_json_atomic(dataset_dir / LLAVA_DIR / f"{split}.json", records)
    return write_dataset_manifest(dataset_dir, status_counts, shards, split_counts, config.config_hash())


def check_label_files(reformatter: DatasetReformatter) -> None:
    """A label file none of whose rows passed its header check is the wrong file or format: stop
    before any work, naming it (rather than finish with every row ``bad_header`` and exit 0)."""
    by_file: dict[str, list] = defaultdict(list)
    for row in reformatter.rows:
        by_file[row.source.rsplit(":", 1)[0]].append(row)
    for name, rows in by_file.items():
        if all(row.rejection is not None and row.rejection.reason == "bad_header" for row in rows):
            raise ValueError(
                f"{reformatter.root / name}: all {len(rows)} rows fail the header check: {rows[0].rejection.detail}"
            )


def run_reformat(config: ReformatConfig) -> RunManifest:
    """Reformat one dataset on the configured Beam runner, then write the manifest; returns it."""
    stage = ReformatStage(config).bind(Path(config.out))
    check_label_files(stage.reformatter)
    check_reusable(stage)
    run_stage(stage, stage.chunk_ids(), config.out, config.runner, "Reformat")
    return finalize(stage)
