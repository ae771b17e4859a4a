"""Select: id lists in every published container, streaming, filters and counted drops."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from facemllm.pipeline.core.files import sha256_file
from facemllm.pipeline.core.storage import Storage
from facemllm.pipeline.stages.framework import execute_unit
from facemllm.pipeline.stages.select import (
    LAION_COLUMNS,
    URL_SHARD_SCHEMA,
    IdListError,
    SelectConfig,
    SelectStage,
    expand_inputs,
    load_sample_ids,
    url_shard_path,
)
from facemllm.schemas import LaionRow

NSFW_TAGS = ["UNLIKELY", "UNSURE", "NSFW"]


def laion_metadata(path, n=100, row_group_size=7):
    """A LAION-400M-style metadata file (the published column names and types)."""
    table = pa.table(
        {
            "SAMPLE_ID": pa.array(np.arange(1000, 1000 + n), pa.int64()),
            "URL": [f"http://example.test/{i}.jpg" for i in range(n)],
            "TEXT": [f"photo {i}" for i in range(n)],
            "HEIGHT": pa.array([100 + i for i in range(n)], pa.int32()),
            "WIDTH": pa.array([50 + 2 * i for i in range(n)], pa.int32()),
            "LICENSE": ["?"] * n,
            "NSFW": [NSFW_TAGS[i % 3] for i in range(n)],
            "similarity": [0.2 + (i % 10) / 50 for i in range(n)],
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_url_shard_columns_match_laion_row():
    assert URL_SHARD_SCHEMA.names == [name for name in LaionRow.model_fields if name != "schema_version"]


@pytest.mark.parametrize(
    "container",
    [
        [torch.tensor([5, 3]), torch.tensor([9])],
        [[5, 3], [9]],
        [np.array([5, 3]), np.array([9])],
        ({5, 3}, {9}),
        {0: [5, 3], 1: torch.tensor([9])},
        torch.tensor([9, 5, 3]),
        {5: None, 3: None, 9: None},
    ],
    ids=[
        "list-of-tensors",
        "list-of-lists",
        "list-of-numpy",
        "tuple-of-sets",
        "dict-of-parts",
        "flat-tensor",
        "dict-by-id",
    ],
)
def test_pth_containers(tmp_path, container):
    path = tmp_path / "ids.pth"
    torch.save(container, path)
    if isinstance(container, list) and isinstance(
        container[0], np.ndarray
    ):  # numpy is not in torch's safe-load allowlist
        with pytest.raises(IdListError, match="trust_id_pickle"):
            load_sample_ids(path)
        assert load_sample_ids(path, trust_pickle=True).tolist() == [3, 5, 9]
    else:
        assert load_sample_ids(path).tolist() == [3, 5, 9]


def test_pth_parts_select_subset(tmp_path):
    path = tmp_path / "ids.pth"
    torch.save([torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([4])], path)
    assert load_sample_ids(path, parts=[0, 2]).tolist() == [1, 2, 4]


def test_text_and_parquet_lists(tmp_path):
    (tmp_path / "ids.txt").write_text("# laion face\n7\n3\n7\n")
    assert load_sample_ids(tmp_path / "ids.txt").tolist() == [3, 7]
    pq.write_table(pa.table({"SAMPLE_ID": [4, 2], "part": [0, 1]}), tmp_path / "ids.parquet")
    assert load_sample_ids(tmp_path / "ids.parquet").tolist() == [2, 4]
    assert load_sample_ids(tmp_path / "ids.parquet", parts=[1]).tolist() == [2]
    (tmp_path / "bad.txt").write_text("12\nnot-a-number\n")
    with pytest.raises(IdListError):
        load_sample_ids(tmp_path / "bad.txt")


def select(tmp_path, ids, **overrides):
    metadata = laion_metadata(tmp_path / "meta.parquet")
    config = SelectConfig(
        metadata=[str(metadata)], ids="unused", batch_rows=5, samples_per_shard=8, **overrides
    )
    stage = SelectStage(config, ["input 0", "input 1", "input 2", str(metadata)]).bind(tmp_path)
    stage.sample_ids = np.unique(np.asarray(ids, np.int64))  # setup() would load config.ids
    return stage, execute_unit(stage, 3)[0]


def test_selects_members_in_order_and_shards(tmp_path):
    ids = [*range(1000, 1100, 5), 5, 99999]  # 20 members + 2 absent from the metadata
    _, result = select(tmp_path, ids)
    assert result["counts"] == {"rows_read": 100, "not_in_id_list": 80, "selected": 20}
    assert result["shards"] == [3000, 3001, 3002]  # input 3, chunks of 8: 8 + 8 + 4
    rows = [
        row
        for shard in result["shards"]
        for row in pq.read_table(url_shard_path(tmp_path / "urls", shard)).to_pylist()
    ]
    assert [row["sample_id"] for row in rows] == list(range(1000, 1100, 5))
    for row in rows:
        LaionRow.model_validate(row)
    assert rows[0]["url"] == "http://example.test/0.jpg" and rows[0]["text"] == "photo 0"


def test_filters_count_each_reason(tmp_path):
    _, result = select(tmp_path, range(1000, 1100), min_width=100, nsfw=["UNLIKELY"], min_similarity=0.3)
    counts = result["counts"]
    assert counts["rows_read"] == 100 and counts["not_in_id_list"] == 0
    assert counts["filtered_size"] == 25  # width 50 + 2i < 100 for i < 25
    kept = [i for i in range(25, 100) if i % 3 == 0 and 0.2 + (i % 10) / 50 >= 0.3]
    assert counts["selected"] == len(kept)
    assert (
        counts["filtered_size"] + counts["filtered_nsfw"] + counts["filtered_similarity"] + counts["selected"]
        == 100
    )


def test_rerun_trusts_marker(tmp_path):
    stage, first = select(tmp_path, range(1000, 1010))
    shard = url_shard_path(tmp_path / "urls", first["shards"][0])
    before = shard.stat().st_mtime_ns
    stage.metadata_files[3] = "ignored-because-done"
    assert execute_unit(stage, 3) == (first, True)
    assert shard.stat().st_mtime_ns == before


def test_too_many_shards_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="max_shards_per_input"):
        select(tmp_path, range(1000, 1100), max_shards_per_input=2)


def test_rejects_non_laion_parquet(tmp_path):
    pq.write_table(pa.table({"url": ["x"]}), tmp_path / "other.parquet")
    config = SelectConfig(metadata=[str(tmp_path / "other.parquet")], ids="unused")
    stage = SelectStage(config, config.metadata).bind(tmp_path)
    stage.sample_ids = np.array([1])
    with pytest.raises(ValueError, match="missing columns"):
        execute_unit(stage, 0)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong_type"])
def test_a_corrupt_metadata_parquet_is_named_in_the_error(damage, tmp_path):
    path = tmp_path / "part-00003.parquet"
    if damage == "wrong_type":  # a LAION schema whose SAMPLE_ID does not cast to int64
        pq.write_table(pa.table({name: ["not a number"] for name in LAION_COLUMNS}), path)
    else:
        pq.write_table(pa.table({"x": list(range(1000))}), path)
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2] if damage == "truncated" else b"PAR1" + bytes(64))
    config = SelectConfig(metadata=[str(path)], ids="unused")
    stage = SelectStage(config, config.metadata).bind(tmp_path)
    stage.sample_ids = np.array([1])
    with pytest.raises(ValueError, match=f"select.metadata {path}"):
        execute_unit(stage, 0)


def test_metadata_globs_and_id_lists_on_s3_select_what_local_files_do(tmp_path, s3_bucket):
    """select.metadata (a glob) and select.ids at s3:// URLs, read with the storage layer's
    endpoint and credentials: the same url shards as from local files."""
    local = laion_metadata(tmp_path / "part-00000.parquet")
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(str(i) for i in range(1000, 1100, 3)) + "\n")
    store = Storage(f"{s3_bucket}/laion")
    store.put(local, "meta/part-00000.parquet", sha256_file(local))
    store.put(ids, "face_ids.txt", sha256_file(ids))
    torch.save([torch.tensor(list(range(1000, 1100, 3)))], tmp_path / "ids.pth")
    store.put(tmp_path / "ids.pth", "face_ids.pth", sha256_file(tmp_path / "ids.pth"))

    remote = expand_inputs([f"{s3_bucket}/laion/meta/part-*.parquet"])
    assert remote == [f"{s3_bucket}/laion/meta/part-00000.parquet"]
    expected = load_sample_ids(ids)
    assert np.array_equal(load_sample_ids(f"{s3_bucket}/laion/face_ids.txt"), expected)
    assert np.array_equal(load_sample_ids(f"{s3_bucket}/laion/face_ids.pth"), expected)

    def shards(metadata: str, folder: Path) -> list[dict]:
        config = SelectConfig(metadata=[metadata], ids="unused", samples_per_shard=50)
        stage = SelectStage(config, [metadata]).bind(folder)
        stage.sample_ids = expected
        stats, _ = execute_unit(stage, 0)
        return [
            row
            for shard in stats["shards"]
            for row in pq.read_table(url_shard_path(folder / "urls", shard)).to_pylist()
        ]

    assert shards(remote[0], tmp_path / "from-s3") == shards(str(local), tmp_path / "from-disk")
