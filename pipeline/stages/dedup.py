"""Duplicates across the whole run: the same photo under many urls, and near copies of one face.

Between ``faces`` and ``annotate``. Every kept face is hashed twice: its source image's sha256
(img2dataset records it) with its face index, for exact copies, and the 64-bit perceptual hash of
its aligned crop (``FaceRecord.quality.phash``), for near copies (resized, recompressed, slightly
cropped). Candidate pairs come from buckets over hash bands: the phash is cut into ``bands``
slices and faces sharing any slice land in one bucket (a pair within ``bands - 1`` bits always
shares one; farther pairs usually do). Pairs within ``max_distance`` bits are duplicates;
connected groups keep one face, the one with the lowest SAMPLE_ID (then the lowest key), so the
keeper never depends on order, workers or reruns.

The buckets are shuffled through files in the run store, not through the runner: each face shard
writes its bucket entries into ``partitions`` files by a hash of the bucket (``faces/_dedup/
buckets-b{bands}-p{partitions}/pNNNN/SHARD.parquet``, then ``SHARD.json`` as its completion
marker), and one task per partition groups its files' entries and pairs each bucket. So it works
across every shard and worker, holds no more than a partition in one place, and a local runner's
driver holds none of it (Beam's FnApiRunner keeps a ``GroupByKey``'s data in the driver); only the
pairs found cross the runner. A rerun reuses the shards' bucket files.

The decisions go to ``faces/_dedup/duplicates.parquet`` (``DuplicateFace``: each duplicate, its keeper, why);
the annotate stage drops those faces with a ``duplicate`` status naming the keeper, or, with
``dedup.action: flag``, annotates them and records ``duplicate_of``.
"""

from __future__ import annotations

import itertools
import json
import logging
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from facemllm.pipeline.core.files import write_json_atomic, write_parquet_atomic
from facemllm.pipeline.core.shards import iter_tar_samples, shard_paths
from facemllm.pipeline.core.storage import RunStore
from facemllm.schemas import DuplicateFace, StrictModel
from facemllm.schemas.tables import arrow_schema

BESIDE_FACES = (
    Path("_dedup") / "duplicates.parquet"
)  # in the face shards' folder, apart from their status tables
DECISIONS = Path("faces") / BESIDE_FACES
log = logging.getLogger(__name__)
HASH_BITS = 64


class DedupConfig(StrictModel):
    enabled: bool = True
    max_distance: int = Field(
        8,
        ge=0,
        le=32,
        description="phash bits two aligned crops may differ by and still be one face (8: precision "
        "1.00, recall 0.89 on benchmarks/bench_dedup.py's labelled set)",
    )
    bands: int = Field(
        8,
        ge=1,
        le=64,
        description="phash slices for candidate buckets (more: finds farther pairs, bigger buckets)",
    )
    action: Literal["drop", "flag"] = Field(
        "drop", description="drop: duplicates are not annotated (status duplicate); flag: annotated, marked"
    )
    max_bucket: int = Field(
        20_000, gt=1, description="a bucket larger than this (a degenerate hash) compares exact phashes only"
    )
    partitions: int = Field(
        32,
        ge=1,
        le=65_536,
        description="bucket files per face shard, and tasks that pair them: each task holds about "
        "(bands + 1) x faces / partitions entries (for 50M faces, 4096)",
    )

    def buckets_folder(self) -> Path:
        """Where the face shards' bucket files go; named by what decides their content."""
        return Path("faces") / "_dedup" / f"buckets-b{self.bands}-p{self.partitions}"


class LinkedFace(NamedTuple):
    """What pairing and grouping need of a face: a row of the bucket files, and in the pairs that
    cross the runner a plain tuple, which Beam encodes natively in a few dozen bytes (a dataclass
    or named tuple is pickled with its class)."""

    key: str
    sample_id: int | None
    phash: int
    shard: int

    @property
    def rank(self) -> tuple:
        """Lower ranks keep: the lowest SAMPLE_ID, then the lowest key."""
        return (self.sample_id is None, self.sample_id or 0, self.key)


@dataclass(frozen=True)
class FaceHashes:
    key: str
    sample_id: int | None
    phash: int
    image_sha256: str | None
    face_index: int
    shard: int

    def linked(self) -> LinkedFace:
        return LinkedFace(self.key, self.sample_id, self.phash, self.shard)


def face_hashes(root: Path, unit: int) -> Iterator[FaceHashes]:
    """The hashes of every face of face shard ``unit`` (the image sha256 from ``images/``)."""
    image_status = shard_paths(root / "images", unit)["parquet"]
    sha256 = {}
    if image_status.exists():
        table = pq.read_table(image_status, columns=["key", "sha256"])
        sha256 = dict(zip(table["key"].to_pylist(), table["sha256"].to_pylist(), strict=True))
    for key, sample in iter_tar_samples(shard_paths(root / "faces", unit)["tar"]):
        record = json.loads(sample["json"])
        quality = record.get("quality") or {}
        if "phash" not in quality:
            continue  # a face shard written before phashes existed: not deduplicated
        yield FaceHashes(
            key=key,
            sample_id=record.get("sample_id"),
            phash=int(quality["phash"], 16),
            image_sha256=sha256.get(record["source_key"]),
            face_index=record["detection"]["face_index"],
            shard=unit,
        )


def bucket_keys(face: FaceHashes, bands: int) -> Iterator[tuple]:
    """The buckets a face goes to: its image's sha256 and face index, and each phash band."""
    if face.image_sha256:
        yield ("sha256", face.image_sha256, face.face_index)
    width = HASH_BITS // bands
    for band in range(bands):
        low = band * width
        high = HASH_BITS if band == bands - 1 else low + width
        yield ("band", band, (face.phash >> low) & ((1 << (high - low)) - 1))


def close_pairs(bucket: tuple, faces: Iterable[tuple], config: DedupConfig) -> Iterator[tuple]:
    """``(face, face, reason, distance)`` links of one bucket, enough to connect every group in it:
    a star (each face to the bucket's lowest rank) for faces with the same image bytes or the same
    phash, and every near pair between distinct phashes. A photo served under n urls gives n - 1
    links, not n(n - 1)/2: the groups, their keepers and each face's closest link are the same."""
    faces = sorted({LinkedFace(*face) for face in faces}, key=lambda f: f.rank)
    if bucket[0] == "sha256":
        for face in faces[1:]:
            yield faces[0], face, "exact", 0
        return
    by_hash: dict[int, list[LinkedFace]] = {}
    for face in faces:
        by_hash.setdefault(face.phash, []).append(face)
    heads = []
    for same in by_hash.values():
        heads.append(same[0])
        for face in same[1:]:
            yield same[0], face, "near", 0
    if len(heads) > config.max_bucket:  # a crowded band value: only identical hashes pair up
        log.warning(
            "dedup bucket %s holds %d distinct phashes (> dedup.max_bucket): near pairs in it are "
            "found only when identical; more faces than this run's bands suit: use fewer, wider bands",
            bucket[:2],
            len(heads),
        )
        return
    for a, b in itertools.combinations(heads, 2):
        distance = (a.phash ^ b.phash).bit_count()
        if distance <= config.max_distance:
            yield a, b, "near", distance


class Keepers(beam.CombineFn):
    """Links -> one ``DuplicateFace`` per face that is not its group's keeper. The accumulator
    holds each linked pair once (a pair met in several buckets is kept with its closest link)."""

    def create_accumulator(self) -> dict:
        return {}

    def add_input(self, links: dict, link: tuple) -> dict:
        a, b = LinkedFace(*link[0]), LinkedFace(*link[1])
        pair = (a.key, b.key) if a.key < b.key else (b.key, a.key)
        known = links.get(pair)
        if known is None or _strength(link) < _strength(known):
            links[pair] = link
        return links

    def merge_accumulators(self, accumulators: Iterable[dict]) -> dict:
        merged: dict = {}
        for links in accumulators:
            for link in links.values():
                self.add_input(merged, link)
        return merged

    def extract_output(self, links: dict) -> list[dict]:
        return duplicate_rows(links.values())


def _strength(link: tuple) -> tuple[int, int]:
    """Lower is closer: exact before near, then fewer phash bits."""
    return (0 if link[2] == "exact" else 1, link[3])


def duplicate_rows(pairs: Iterable[tuple]) -> list[dict]:
    """Union the pairs into groups; every face but the keeper (lowest rank) points at the keeper,
    with the closest link it has into the group (exact before near)."""
    parent: dict[str, LinkedFace] = {}

    def root(face: LinkedFace) -> LinkedFace:
        while parent.setdefault(face.key, face).key != face.key:
            face = parent[face.key]
        return face

    best: dict[str, tuple[int, int]] = {}
    shards: dict[str, int] = {}
    for link in pairs:
        a, b = LinkedFace(*link[0]), LinkedFace(*link[1])
        shards[a.key], shards[b.key] = a.shard, b.shard
        ra, rb = root(a), root(b)
        if ra.key != rb.key:
            low, high = sorted((ra, rb), key=lambda f: f.rank)
            parent[high.key] = low
        for face in (a, b):
            best[face.key] = min(best.get(face.key, _strength(link)), _strength(link))
    rows = []
    for key in sorted(parent):
        keeper = root(parent[key])
        if keeper.key != key:
            kind, distance = best[key]
            rows.append(
                DuplicateFace(
                    key=key,
                    keeper=keeper.key,
                    reason="exact" if kind == 0 else "near",
                    distance=distance,
                    shard=shards[key],
                    keeper_shard=keeper.shard,
                ).model_dump(mode="json")
            )
    return rows


class WriteDecisions(beam.DoFn):
    """Writes ``faces/_dedup/duplicates.parquet`` (uploaded to an object-store run); yields its path."""

    def __init__(self, out: str):
        self.out = out

    def process(self, rows: list[dict]) -> Iterator[str]:
        store = RunStore(self.out)
        path = store.local / DECISIONS
        write_parquet_atomic(path, sorted(rows, key=lambda row: row["key"]), arrow_schema(DuplicateFace))
        store.push(path)
        yield str(DECISIONS)


BUCKET_SCHEMA = pa.schema(
    [
        ("bucket", pa.string()),
        ("key", pa.string()),
        ("sample_id", pa.int64()),
        ("phash", pa.uint64()),
        ("shard", pa.int64()),
    ]
)


def bucket_name(bucket: tuple) -> str:
    """A bucket as one string (``sha256:HEX:INDEX``, ``band:BAND:VALUE``): none of its parts holds ':'."""
    return ":".join(str(part) for part in bucket)


def partition_of(bucket: str, partitions: int) -> int:
    """The same partition for a bucket on every worker and run (Python's ``hash`` is salted)."""
    return zlib.crc32(bucket.encode()) % partitions


def write_bucket_files(store: RunStore, unit: int, config: DedupConfig) -> None:
    """Face shard ``unit``'s bucket entries, one file per partition it has entries in, then the
    marker; a shard whose marker is already there (a rerun) is left as it is."""
    folder = store.local / config.buckets_folder()
    marker = folder / f"{unit:05d}.json"
    if marker.exists() or store.in_store((config.buckets_folder() / marker.name).as_posix()):
        return
    for path in (
        shard_paths(store.local / "faces", unit)["tar"],
        shard_paths(store.local / "images", unit)["parquet"],
    ):
        store.fetch(path)
    rows: dict[int, list[dict]] = defaultdict(list)
    for face in face_hashes(store.local, unit):
        for bucket in map(bucket_name, bucket_keys(face, config.bands)):
            rows[partition_of(bucket, config.partitions)].append(
                {"bucket": bucket, **face.linked()._asdict()}
            )
    files = {partition: folder / f"p{partition:04d}" / f"{unit:05d}.parquet" for partition in sorted(rows)}
    for partition, path in files.items():
        write_parquet_atomic(path, rows[partition], BUCKET_SCHEMA)
    write_json_atomic(marker, {"files": [path.relative_to(folder).as_posix() for path in files.values()]})
    store.push_completed(marker, *files.values())


def partition_links(store: RunStore, partition: int, config: DedupConfig) -> Iterator[tuple]:
    """The links of every bucket in ``partition``, from every face shard's file for it."""
    buckets: dict[str, list[LinkedFace]] = defaultdict(list)
    for path in store.matching((config.buckets_folder() / f"p{partition:04d}" / "*.parquet").as_posix()):
        store.fetch(path)
        table = pq.read_table(path, schema=BUCKET_SCHEMA)
        for bucket, *face in zip(*(table[name].to_pylist() for name in BUCKET_SCHEMA.names), strict=True):
            buckets[bucket].append(LinkedFace(*face))
    for bucket in sorted(buckets):
        yield from close_pairs(tuple(bucket.split(":")), buckets.pop(bucket), config)


def apply_dedup(face_units: beam.PCollection, out: str, config: DedupConfig) -> beam.pvalue.AsSingleton:
    """The decisions over every face shard in ``face_units``, as a side input whose readiness
    means every decision is written (the annotate stage waits on it)."""

    def hash_unit(unit: int) -> int:
        write_bucket_files(RunStore(out), unit, config)
        return unit

    def links(partition: int, _every_unit_hashed: list[int]) -> Iterator[tuple]:
        for a, b, reason, distance in partition_links(RunStore(out), partition, config):
            yield tuple(a), tuple(b), reason, distance  # plain tuples across the runner (see LinkedFace)

    hashed = face_units | "DedupHashes" >> beam.Map(hash_unit)
    decisions = (
        face_units.pipeline
        | "DedupPartitions" >> beam.Create(list(range(config.partitions)))
        | "SpreadDedupPartitions" >> beam.Reshuffle()
        | "DedupPairs" >> beam.FlatMap(links, beam.pvalue.AsList(hashed))
        | "DedupKeepers" >> beam.CombineGlobally(Keepers())
        | "DedupWrite" >> beam.ParDo(WriteDecisions(out))
    )
    return beam.pvalue.AsSingleton(decisions)


def read_decisions(faces_dir: Path, shard: int) -> dict[str, DuplicateFace]:
    """face key -> its decision, for the faces of one face shard, from ``_dedup/duplicates.parquet``
    beside the face shards ({} when absent): a worker holds its shard's decisions, not the run's."""
    path = faces_dir / BESIDE_FACES
    if not path.exists():
        return {}
    table = pq.read_table(path, filters=[("shard", "=", shard)])
    return {row["key"]: DuplicateFace.model_validate(row) for row in table.to_pylist()}
