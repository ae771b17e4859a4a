"""Blocklists of every kind, from local files and from the S3 server: the right rows, images and
faces go, each named with the list that matched, and every input row still has one status."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from facemllm.annotators.faces import FaceConfig, FaceCropper
from facemllm.pipeline.core.blocklist import Blocklists, BlocklistSource
from facemllm.pipeline.core.shards import iter_tar_samples
from facemllm.pipeline.core.storage import Storage
from facemllm.pipeline.demo.run import demo_config, expected_counts
from facemllm.pipeline.run import run
from facemllm.pipeline.stages.framework import execute_unit
from facemllm.pipeline.stages.select import SelectConfig, SelectStage
from tests.photos import insightface_t1
from tests.test_select import laion_metadata


def write_list(path: Path, lines: list[str]) -> str:
    path.write_text("# a takedown list\n\n" + "\n".join(lines) + "\n")
    return str(path)


def test_lists_parse_match_and_refuse_bad_entries(tmp_path):
    sources = [
        BlocklistSource(kind="sample_id", path=write_list(tmp_path / "ids", ["17", "18  # opt-out"])),
        BlocklistSource(kind="url", path=write_list(tmp_path / "urls.txt", ["http://a.test/x.jpg"])),
        BlocklistSource(kind="domain", path=write_list(tmp_path / "domains.txt", ["Blocked.Test"])),
        BlocklistSource(kind="phash", path=write_list(tmp_path / "ph", ["ffff0000ffff0000"]), max_distance=2),
    ]
    lists = Blocklists(sources, ["sample_id", "url", "domain", "phash"])
    assert lists.match_row(18, "http://ok.test/1.jpg") == f"sample_id:{tmp_path / 'ids'}"
    assert lists.match_row(1, "http://a.test/x.jpg") == f"url:{tmp_path / 'urls.txt'}"
    assert lists.match_row(1, "https://cdn.blocked.test/y.jpg") == f"domain:{tmp_path / 'domains.txt'}"
    assert lists.match_row(1, "https://notblocked.test/y.jpg") is None
    assert lists.match_phash(0xFFFF0000FFFF0003) is not None and lists.match_phash(0xFFFF0000FFFF0007) is None
    with pytest.raises(ValueError, match=r"sha256.*bad entry .abc."):
        Blocklists([BlocklistSource(kind="sha256", path=write_list(tmp_path / "sha", ["abc"]))], ["sha256"])


def test_select_drops_listed_rows_with_their_list_from_local_and_s3_lists(tmp_path, s3_bucket):
    metadata = laion_metadata(tmp_path / "meta.parquet")
    remote = f"{s3_bucket}/blocklists/ids.txt"
    Storage(f"{s3_bucket}/blocklists").write_bytes("ids.txt", b"1003\n1004\n")
    blocklist = [
        BlocklistSource(kind="sample_id", path=remote),
        BlocklistSource(kind="url", path=write_list(tmp_path / "urls.txt", ["http://example.test/10.jpg"])),
        BlocklistSource(kind="domain", path=write_list(tmp_path / "domains.txt", ["nowhere.test"])),
    ]
    config = SelectConfig(metadata=[str(metadata)], ids="unused", samples_per_shard=50, blocklist=blocklist)
    stage = SelectStage(config, [str(metadata)]).bind(tmp_path)
    stage.sample_ids = np.arange(1000, 1020)
    stats, _ = execute_unit(stage, 0)
    counts = stats["counts"]
    assert counts["blocklisted"] == 3 and counts["selected"] == 17
    assert counts["rows_read"] == counts["selected"] + counts["not_in_id_list"] + counts["blocklisted"]
    blocked = pq.read_table(stage.status_table(0)).to_pylist()
    assert [(row["sample_id"], row["blocklist"].split(":")[0]) for row in blocked] == [
        (1003, "sample_id"),
        (1004, "sample_id"),
        (1010, "url"),
    ]
    assert blocked[0]["blocklist"] == f"sample_id:{remote}"


def test_download_never_keeps_a_listed_image_and_faces_drop_a_listed_face(served_sample, tmp_path):
    """A sha256 list removes every url serving that photo after download (its bytes never reach a
    shard); a phash list drops a face by its aligned crop; each named in the status tables."""
    _, sample = served_sample
    reference = run(demo_config(sample, tmp_path / "reference", ["stages=[select, download, faces]"]))
    downloads = [
        row
        for p in sorted((tmp_path / "reference" / "images").glob("*.parquet"))
        for row in pq.read_table(p).to_pylist()
    ]
    by_hash = Counter(row["sha256"] for row in downloads if row["status"] == "success")
    listed_hash = next(digest for digest, n in by_hash.items() if n > 1)  # a photo served under two urls
    faces = [
        json.loads(s["json"])
        for p in sorted((tmp_path / "reference" / "faces").glob("*.tar"))
        for _, s in iter_tar_samples(p)
    ]
    listed_face = next(
        face
        for face in faces
        if face["source_key"] not in {r["key"] for r in downloads if r["sha256"] == listed_hash}
    )
    sha_list = write_list(tmp_path / "sha256.txt", [listed_hash.upper()])
    phash_list = write_list(tmp_path / "phash.txt", [listed_face["quality"]["phash"]])
    lists = json.dumps([{"kind": "sha256", "path": sha_list}, {"kind": "phash", "path": phash_list}])
    out = tmp_path / "blocked"
    manifest = run(
        demo_config(sample, out, ["stages=[select, download, faces]", f"select.blocklist={lists}"])
    )

    statuses = [
        row for p in sorted((out / "images").glob("*.parquet")) for row in pq.read_table(p).to_pylist()
    ]
    assert len(statuses) == expected_counts(sample)[("urls", "selected")]  # every row, one status
    blocked = [row for row in statuses if row["status"] == "blocklisted"]
    assert len(blocked) == by_hash[listed_hash] and all(
        row["error_message"] == f"blocklist sha256:{sha_list}" for row in blocked
    )
    stored = {key for p in sorted((out / "images").glob("*.tar")) for key, _ in iter_tar_samples(p)}
    assert not stored & {row["key"] for row in blocked}
    assert manifest.stages["images"].counts["blocklisted"] == len(blocked)
    assert manifest.stages["images"].counts["success"] == reference.stages["images"].counts["success"] - len(
        blocked
    )

    face_rows = [
        row for p in sorted((out / "faces").glob("*.parquet")) for row in pq.read_table(p).to_pylist()
    ]
    dropped = [row for row in face_rows if row["dropped_blocklisted"]]
    sha_blocked = {row["key"] for row in downloads if row["sha256"] == listed_hash}
    same_face = {f["source_key"] for f in faces if f["quality"]["phash"] == listed_face["quality"]["phash"]}
    assert [row["source_key"] for row in dropped] == sorted(same_face - sha_blocked)  # every copy of it
    assert dropped[0]["blocklist"] == f"phash:{phash_list}"
    kept = {
        json.loads(s["json"])["quality"]["phash"]
        for p in sorted((out / "faces").glob("*.tar"))
        for _, s in iter_tar_samples(p)
    }
    assert listed_face["quality"]["phash"] not in kept


def test_a_phash_list_matches_within_its_distance_on_a_recompressed_copy(tmp_path):
    import cv2

    cropper = FaceCropper(FaceConfig())
    photo = insightface_t1().read_bytes()
    first = cropper.process(photo, "k", {}).faces[0].record.quality.phash
    image = cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_COLOR)
    recompressed = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 40])[1].tobytes()
    source = BlocklistSource(kind="phash", path=write_list(tmp_path / "ph", [first]), max_distance=8)
    strict = FaceCropper(FaceConfig(), Blocklists([source], ["phash"]))
    status = strict.process(recompressed, "k", {}).status
    assert status.dropped_blocklisted == 1 and status.blocklist == source.name
