"""Duplicates across the whole run: the same photo under many urls, and near copies of one face.

Between ``faces`` and ``annotate``. Every kept face is hashed twice: its source image's sha256
(img2dataset records it) with its face index, for exact copies, and the 64-bit perceptual hash of
its aligned crop (``FaceRecord.quality.phash``), for near copies (resized, recompressed, slightly
cropped). Candidate pairs come from a Beam ``GroupByKey`` over hash bands: the phash is cut into
``bands`` slices and faces sharing any slice land in one bucket (a pair within ``bands - 1`` bits
always shares one; farther pairs usually do), so it works across every shard and worker and
never holds every hash in one place. Pairs within ``max_distance`` bits are duplicates;
connected groups keep one face, the one with the lowest SAMPLE_ID (then the lowest key), so the
keeper never depends on order, workers or reruns.

The decisions go to ``faces/_dedup/duplicates.parquet`` (``DuplicateFace``: each duplicate, its keeper, why);
the annotate stage drops those faces with a ``duplicate`` status naming the keeper, or, with
``dedup.action: flag``, annotates them and records ``duplicate_of``.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import apache_beam as beam
import pyarrow.parquet as pq
from pydantic import Field

from facemllm.pipeline.core.files import write_parquet_atomic
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


class LinkedFace(NamedTuple):
    """What pairing and grouping need of a face. It crosses the shuffle as a plain tuple, which
    Beam encodes natively in a few dozen bytes (a dataclass or named tuple is pickled with its
    class); every face is in ``bands + 1`` buckets, and the local runner holds them in the driver."""

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


def apply_dedup(face_units: beam.PCollection, out: str, config: DedupConfig) -> beam.pvalue.AsSingleton:
    """The decisions over every face shard in ``face_units``, as a side input whose readiness
    means every decision is written (the annotate stage waits on it)."""

    def hashes(unit: int) -> Iterator[tuple]:
        store = RunStore(out)
        for path in (
            shard_paths(store.local / "faces", unit)["tar"],
            shard_paths(store.local / "images", unit)["parquet"],
        ):
            store.fetch(path)
        for face in face_hashes(store.local, unit):
            linked = tuple(face.linked())  # plain tuples across the shuffle (see LinkedFace)
            for bucket in bucket_keys(face, config.bands):
                yield bucket, linked

    def links(item: tuple) -> Iterator[tuple]:
        for a, b, reason, distance in close_pairs(item[0], item[1], config):
            yield tuple(a), tuple(b), reason, distance

    decisions = (
        face_units
        | "DedupHashes" >> beam.FlatMap(hashes)
        | "DedupBuckets" >> beam.GroupByKey()
        | "DedupPairs" >> beam.FlatMap(links)
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
