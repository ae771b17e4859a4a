"""Duplicates across a whole run, with real photos, a real server, SCRFD and Beam, the buckets
shuffled through files in the run store.

The sample serves each photo once and the first photos again under a second url (exact copies),
plus a rescaled and a recompressed copy of one photo (near copies) and unrelated photos.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from pathlib import Path

import cv2
import pyarrow.parquet as pq
import pytest

from facemllm.pipeline.core.shards import completed_shards
from facemllm.pipeline.core.storage import RunStore
from facemllm.pipeline.demo.run import demo_config
from facemllm.pipeline.demo.sample import build_demo_sample, package_photos
from facemllm.pipeline.demo.server import SampleServer
from facemllm.pipeline.run import run
from facemllm.pipeline.stages.dedup import (
    DECISIONS,
    DedupConfig,
    FaceHashes,
    Keepers,
    LinkedFace,
    bucket_keys,
    bucket_name,
    close_pairs,
    duplicate_rows,
    face_hashes,
    partition_links,
    partition_of,
    write_bucket_files,
)

pytestmark = pytest.mark.slow
ORIGINAL = "t1.jpg"  # six faces


def face(key: str, sample_id: int | None, phash: int = 0) -> LinkedFace:
    return LinkedFace(key=key, sample_id=sample_id, phash=phash, shard=0)


def test_the_keeper_is_the_lowest_sample_id_whatever_the_order_of_pairs():
    a, b, c, d = face("k3", 30), face("k1", 10), face("k2", None), face("k4", 10)
    pairs = [(a, b, "near", 2), (c, a, "near", 1), (d, b, "exact", 0)]
    expected = duplicate_rows(pairs)
    for seed in range(5):
        random.Random(seed).shuffle(pairs)
        assert duplicate_rows(pairs) == expected
    assert [(row["key"], row["keeper"], row["reason"]) for row in expected] == [
        ("k2", "k1", "near"),
        ("k3", "k1", "near"),
        ("k4", "k1", "exact"),  # the same SAMPLE_ID: the lower key keeps
    ]


def all_pairs_reference(faces: list[FaceHashes], config: DedupConfig) -> list[dict]:
    """Every pair of every bucket, the quadratic way: what the links must reproduce."""
    buckets: dict = {}
    for f in faces:
        for bucket in bucket_keys(f, config.bands):
            buckets.setdefault(bucket, set()).add(f.linked())
    pairs = []
    for bucket, members in buckets.items():
        for a, b in itertools.combinations(sorted(members, key=lambda f: f.key), 2):
            if bucket[0] == "sha256":
                pairs.append((a, b, "exact", 0))
            elif (distance := (a.phash ^ b.phash).bit_count()) <= config.max_distance:
                pairs.append((a, b, "near", distance))
    return duplicate_rows(pairs)


def test_links_give_the_groups_of_all_pairs_in_linear_links_per_copy():
    """A photo under many urls: as many links as copies (not their square), and the same
    duplicates, keepers, reasons and distances as comparing every pair of every bucket."""
    rng = random.Random(7)
    config = DedupConfig()
    photos = [rng.getrandbits(64) for _ in range(6)]
    faces = []
    for copy in range(60):
        for index, phash in enumerate(photos):
            near = phash ^ (1 << rng.randrange(64)) if copy % 7 == 3 else phash  # some recompressed
            faces.append(
                FaceHashes(
                    key=f"{copy:03d}{index}_00",
                    sample_id=rng.randrange(10**6),
                    phash=near,
                    image_sha256=f"sha-{index}" if copy % 2 else None,
                    face_index=0,
                    shard=copy // 10,
                )
            )
    buckets: dict = {}
    for f in faces:
        for bucket in bucket_keys(f, config.bands):
            buckets.setdefault(bucket, []).append(tuple(f.linked()))  # as across the shuffle
    keepers = Keepers()
    accumulator = keepers.create_accumulator()
    links = 0
    for bucket, members in buckets.items():
        for link in close_pairs(bucket, members, config):
            accumulator = keepers.add_input(accumulator, link)
            links += 1
    assert links < 20 * len(faces)  # all pairs would be about 9 x 60 x 59 / 2 per photo
    rows = keepers.extract_output(keepers.merge_accumulators([accumulator, keepers.create_accumulator()]))
    assert rows == all_pairs_reference(faces, config)
    assert len({row["keeper"] for row in rows}) == len(photos) and len(rows) == len(faces) - len(photos)


@pytest.fixture(scope="module")
def photos(scrfd_dir, tmp_path_factory) -> dict[str, Path]:
    """The package photos, plus a rescaled and a recompressed copy of t1.jpg."""
    photos = package_photos(scrfd_dir)
    folder = tmp_path_factory.mktemp("copies")
    image = cv2.imread(str(photos[ORIGINAL]))
    smaller = cv2.resize(image, None, fx=0.7, fy=0.7, interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(folder / "t1_rescaled.jpg"), smaller, [cv2.IMWRITE_JPEG_QUALITY, 90])
    cv2.imwrite(str(folder / "t1_recompressed.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 35])
    return {
        **photos,
        "t1_rescaled.jpg": folder / "t1_rescaled.jpg",
        "t1_recompressed.jpg": folder / "t1_recompressed.jpg",
    }


def dedup_run(photos: dict[str, Path], out: Path, *overrides: str) -> tuple[list[dict], list[dict], dict]:
    with SampleServer(photos) as server:
        sample = build_demo_sample(out.parent / f"{out.name}-sample", server.base_url, photos)
        run(demo_config(sample, out, ["stages=[select, download, faces, annotate]", *overrides]))
    decisions = pq.read_table(out / DECISIONS).to_pylist()
    annotations = [
        row for p in sorted((out / "annotations").glob("*.parquet")) for row in pq.read_table(p).to_pylist()
    ]
    sources = {}
    for path in sorted((out / "images").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            sources[row["key"]] = row["url"].rsplit("/", 1)[-1]
    return decisions, annotations, sources


@pytest.fixture(scope="module")
def default_run(photos, tmp_path_factory) -> tuple[Path, list[dict], list[dict], dict]:
    """The sample through dedup and annotate with the default settings: (out, decisions, ...)."""
    out = tmp_path_factory.mktemp("dedup") / "one"
    return out, *dedup_run(photos, out)


def test_exact_and_near_copies_are_found_across_shards_with_stable_keepers(photos, default_run, tmp_path):
    _, decisions, annotations, sources = default_run
    photo_of = {row["key"]: sources[row["key"].split("_")[0]] for row in decisions}
    keeper_photo = {row["key"]: sources[row["keeper"].split("_")[0]] for row in decisions}
    exact = Counter(photo_of[r["key"]] for r in decisions if r["reason"] == "exact")
    near = Counter(photo_of[r["key"]] for r in decisions if r["reason"] == "near")
    # every second url of a photo is an exact copy of its first, face by face
    assert all(name.endswith("?size=large") for name in exact) and exact["t1.jpg?size=large"] == 6
    # the rescaled and recompressed copies of t1.jpg are near copies of its faces, and nothing else is
    assert set(near) == {"t1_rescaled.jpg", "t1_recompressed.jpg"} and near["t1_recompressed.jpg"] == 6
    assert {keeper_photo[r["key"]].split("?")[0] for r in decisions if r["reason"] == "near"} <= {
        ORIGINAL,
        "t1_rescaled.jpg",
        "t1_recompressed.jpg",
    }
    by_key = {row["key"]: row for row in annotations}
    for row in decisions:  # dropped, naming the keeper; the keeper itself annotated
        assert by_key[row["key"]]["status"] == "duplicate" and row["keeper"] in by_key[row["key"]]["error"]
        assert by_key[row["keeper"]]["status"] == "success"

    again, _, _ = dedup_run(photos, tmp_path / "two", "runner.direct_num_workers=2")
    assert [(r["key"], r["keeper"], r["reason"]) for r in again] == [
        (r["key"], r["keeper"], r["reason"]) for r in decisions
    ]


def test_bucket_files_hold_each_face_once_per_bucket_and_any_partition_count_decides_alike(default_run):
    out, decisions, _, _ = default_run
    config, store, units = DedupConfig(), RunStore(str(out)), completed_shards(out / "faces")
    folder = out / config.buckets_folder()
    assert sorted(int(marker.stem) for marker in folder.glob("*.json")) == units
    stored = []
    for path in sorted(folder.glob("p*/*.parquet")):
        for row in pq.read_table(path).to_pylist():
            assert partition_of(row["bucket"], config.partitions) == int(path.parent.name[1:])
            stored.append((row["bucket"], row["key"], row["sample_id"], row["phash"], row["shard"]))
    expected = [
        (bucket_name(bucket), f.key, f.sample_id, f.phash, f.shard)
        for unit in units
        for f in face_hashes(out, unit)
        for bucket in bucket_keys(f, config.bands)
    ]
    assert sorted(stored) == sorted(expected) and len(stored) > 9 * len(decisions)

    written = {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}
    for unit in units:  # a rerun: every shard's marker is there
        write_bucket_files(store, unit, config)
    assert {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()} == written

    one = DedupConfig(partitions=1)
    for unit in units:
        write_bucket_files(store, unit, one)
    keepers = Keepers()
    links = keepers.create_accumulator()
    for link in partition_links(store, 0, one):
        links = keepers.add_input(links, link)
    assert keepers.extract_output(links) == decisions


def test_flag_annotates_duplicates_and_marks_them(photos, tmp_path):
    decisions, annotations, _ = dedup_run(photos, tmp_path / "flag", "dedup.action=flag")
    by_key = {row["key"]: row for row in annotations}
    assert decisions and all(by_key[r["key"]]["status"] == "success" for r in decisions)
    assert all(by_key[r["key"]]["duplicate_of"] == r["keeper"] for r in decisions)


def test_a_face_crosses_the_shuffle_as_a_plain_tuple_in_a_quarter_of_the_bytes():
    """The pairs cross the runner (a local one holds them in its driver) as plain tuples."""
    from apache_beam.coders import FastPrimitivesCoder

    hashes = FaceHashes(
        key="000012345_00",
        sample_id=123456789,
        phash=2**63 + 5,
        image_sha256="ab" * 32,
        face_index=0,
        shard=12,
    )
    coder, bucket = FastPrimitivesCoder(), ("band", 3, 255)
    shuffled = coder.encode((bucket, tuple(hashes.linked())))
    assert len(shuffled) * 3 < len(coder.encode((bucket, hashes)))
    assert LinkedFace(*coder.decode(shuffled)[1]) == hashes.linked()
