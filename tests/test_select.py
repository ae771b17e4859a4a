"""Select: id lists in every published container, their sorted index (per part, as published; flat
otherwise), streaming, filters and counted drops."""

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from facemllm.pipeline.core.files import sha256_file
from facemllm.pipeline.core.storage import STAGING_ENV, RunStore, Storage
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
from tests.conftest import subprocess_env

NSFW_TAGS = ["UNLIKELY", "UNSURE", "NSFW"]


def laion_metadata(path, n=100, row_group_size=7, sample_ids=None):
    """A LAION-400M-style metadata file (the published column names and types); SAMPLE_IDs 1000,
    1001, ... unless given."""
    sample_ids = np.arange(1000, 1000 + n) if sample_ids is None else np.asarray(sample_ids)
    n = len(sample_ids)
    table = pa.table(
        {
            "SAMPLE_ID": pa.array(sample_ids, pa.int64()),
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


def write_id_list(path: Path, ids) -> Path:
    """A flat id list in the format its suffix names."""
    ids = [int(i) for i in ids]
    if path.suffix == ".txt":
        path.write_text("".join(f"{i}\n" for i in ids))
    elif path.suffix == ".parquet":
        pq.write_table(pa.table({"SAMPLE_ID": pa.array(ids, pa.int64())}), path)
    else:
        torch.save(torch.tensor(ids, dtype=torch.int64), path)
    return path


def select(tmp_path, ids, suffix=".txt", **overrides):
    """Unit 3 of four inputs, through the flat index of a flat id list the worker builds itself."""
    metadata = laion_metadata(tmp_path / "meta.parquet")
    ids_path = write_id_list(tmp_path / f"ids{suffix}", ids)
    config = SelectConfig(
        metadata=[str(metadata)], ids=str(ids_path), batch_rows=5, samples_per_shard=8, **overrides
    )
    stage = SelectStage(config, ["input 0", "input 1", "input 2", str(metadata)]).bind(tmp_path)
    return stage, execute_unit(stage, 3)[0]


@pytest.mark.parametrize("suffix", [".txt", ".parquet", ".pth"])
def test_selects_members_in_order_and_shards(tmp_path, suffix):
    ids = [99999, *range(1095, 999, -5), 1000, 5]  # 20 members, unsorted, one twice + 2 absent
    stage, result = select(tmp_path, ids, suffix)
    assert not stage.index.per_part and stage.index.counts == {"all.npy": 22}
    assert stage.inputs(3) == [stage.index.key.folder(tmp_path) / "all.npy"]
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

    def shards(metadata: str, ids: str, folder: Path) -> list[dict]:
        config = SelectConfig(metadata=[metadata], ids=ids, samples_per_shard=50)
        stage = SelectStage(config, [metadata]).bind(folder)
        stats, _ = execute_unit(stage, 0)
        return [
            row
            for shard in stats["shards"]
            for row in pq.read_table(url_shard_path(folder / "urls", shard)).to_pylist()
        ]

    from_s3 = shards(remote[0], f"{s3_bucket}/laion/face_ids.pth", tmp_path / "from-s3")
    assert from_s3 == shards(str(local), str(ids), tmp_path / "from-disk")
    assert [row["sample_id"] for row in from_s3] == expected.tolist()


# --- the id index: built once by the driver, a part per worker --------------------------------------


def published_case(tmp_path: Path, parts: int = 4, cross_part: bool = False) -> tuple[Path, list[str]]:
    """An id list in the published container (torch.save of a list of int64 tensors, one per
    metadata part; each unsorted, with repeats) and a metadata file per part holding rows of some
    of its part's ids, ids in no part and, with ``cross_part``, ids of the other parts."""
    rng = np.random.default_rng(7)
    pool = rng.choice(10**12, size=parts * 60 + 30, replace=False)
    id_parts = [pool[p * 60 : (p + 1) * 60] for p in range(parts)]
    absent = pool[parts * 60 :]
    ids_path = tmp_path / "laion_face_ids.pth"
    torch.save([torch.from_numpy(np.concatenate([ids, ids[:5]])) for ids in id_parts], ids_path)
    metadata = []
    for p, ids in enumerate(id_parts):
        others = np.concatenate([o[:7] for q, o in enumerate(id_parts) if q != p]) if cross_part else []
        rows = rng.permutation(np.concatenate([ids[:40], absent[p * 5 : p * 5 + 10], others]))
        metadata.append(str(laion_metadata(tmp_path / f"part-{p:05d}.parquet", sample_ids=rows)))
    return ids_path, metadata


def url_files(root: Path) -> dict[str, bytes]:
    """Every file the select stage wrote (shards, blocked rows, markers), the index left out."""
    return {p.name: p.read_bytes() for p in sorted((root / "urls").glob("*")) if p.is_file()}


@pytest.mark.parametrize("cross_part", [False, True], ids=["published-layout", "other-parts-ids"])
def test_a_published_id_list_selects_the_shards_the_whole_list_did(tmp_path, cross_part):
    """Metadata file i against id part i only, memory-mapped: byte-identical url shards to today's
    whole list in memory; where a file holds ids of other parts, to today's path with
    id_parts=[i] (LAION-Face's own conversion: part i of the list for metadata part i)."""
    ids_path, metadata = published_case(tmp_path, cross_part=cross_part)
    config = SelectConfig(metadata=metadata, ids=str(ids_path), batch_rows=16, samples_per_shard=25)
    stage = SelectStage(config, metadata)
    stage.prepare(RunStore(str(tmp_path / "indexed")))
    stage.bind(tmp_path / "indexed")
    today = SelectStage(config, metadata).bind(tmp_path / "today")
    folder = stage.index.key.folder(tmp_path / "indexed")
    assert stage.index.per_part and stage.index.counts == {f"part-{p:05d}.npy": 60 for p in range(4)}
    for unit in range(4):
        assert stage.inputs(unit) == [folder / f"part-{unit:05d}.npy"]
        today.sample_ids = load_sample_ids(ids_path, [unit] if cross_part else None)
        stats, _ = execute_unit(stage, unit)
        assert stats == execute_unit(today, unit)[0]
        assert stats["counts"] == {
            "rows_read": 50 + 21 * cross_part,
            "selected": 40,
            "not_in_id_list": 10 + 21 * cross_part,
        }
    assert url_files(tmp_path / "indexed") == url_files(tmp_path / "today")


def test_the_index_is_built_once_reused_and_rebuilt_for_a_changed_list(tmp_path):
    ids_path, metadata = published_case(tmp_path, parts=3)
    config = SelectConfig(metadata=metadata, ids=str(ids_path))
    store = RunStore(str(tmp_path / "run"))
    stage = SelectStage(config, metadata)
    stage.prepare(store)
    folder = stage.index.key.folder(store.local)
    files = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert sorted(files) == ["index.json", "part-00000.npy", "part-00001.npy", "part-00002.npy"]
    part = np.load(folder / "part-00001.npy")
    assert part.dtype == np.int64 and part.tolist() == sorted(set(torch.load(ids_path)[1].tolist()))

    again = SelectStage(config, metadata)  # a rerun: the same index, not a byte rewritten
    again.prepare(store)
    assert again.index == stage.index
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == files
    lazy = SelectStage(config, metadata).bind(store.local)  # a stage run alone finds it too
    execute_unit(lazy, 1)
    assert lazy.index == stage.index and {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == files

    (folder / "index.json").unlink()  # a build killed before its marker is redone
    (folder / "part-00002.npy").unlink()
    SelectStage(config, metadata).prepare(store)
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)

    changed = torch.load(ids_path)
    changed[1] = changed[1][:10]
    torch.save(changed, ids_path)
    os.utime(ids_path, ns=(ids_path.stat().st_atime_ns, ids_path.stat().st_mtime_ns + 10**9))
    rebuilt = SelectStage(config, metadata)
    rebuilt.prepare(store)
    assert rebuilt.index.counts["part-00001.npy"] == 10 and rebuilt.index.counts["part-00000.npy"] == 60
    assert [p.name for p in (store.local / "urls" / "_ids").iterdir()] == [
        rebuilt.index.key.folder(store.local).name
    ]


def test_id_parts_leave_their_files_unselected_with_a_per_part_list(tmp_path):
    ids_path, metadata = published_case(tmp_path, parts=3)
    config = SelectConfig(metadata=metadata, ids=str(ids_path), id_parts=[0, 2])
    stage = SelectStage(config, metadata).bind(tmp_path)
    results = [execute_unit(stage, unit)[0]["counts"] for unit in range(3)]
    assert sorted(stage.index.counts) == ["part-00000.npy", "part-00002.npy"] and stage.inputs(1) == []
    assert [counts.get("selected", 0) for counts in results] == [40, 0, 40]
    assert results[1]["not_in_id_list"] == 50


def test_a_list_with_other_parts_than_files_is_one_flat_index(tmp_path, caplog):
    """Three parts, two metadata files: file i <-> part i does not hold, so every file is matched
    against all chosen parts, merged from the sorted parts, with a warning saying why."""
    ids_path, metadata = published_case(tmp_path, parts=3)
    expected = load_sample_ids(ids_path, [1, 2])
    config = SelectConfig(metadata=metadata[1:], ids=str(ids_path), id_parts=[1, 2])
    stage = SelectStage(config, metadata[1:]).bind(tmp_path)
    with caplog.at_level(logging.WARNING):
        stats, _ = execute_unit(stage, 1)
    assert "has 3 parts but select.metadata has 2 files" in caplog.text
    assert not stage.index.per_part and stage.index.counts == {"all.npy": 120}
    assert np.array_equal(np.load(stage.inputs(1)[0]), expected)
    assert stats["counts"]["selected"] == 40


def test_an_object_store_run_ships_the_index_and_a_worker_fetches_only_its_part(
    tmp_path, s3_bucket, monkeypatch
):
    """The driver uploads the index (marker last); a worker on another machine (an empty mirror,
    the stage as Beam pickles it, no id list at hand) fetches its unit's part and nothing else; a
    driver on a third machine reuses the index in the store."""
    ids_path, metadata = published_case(tmp_path, parts=3)
    config = SelectConfig(metadata=metadata, ids=str(ids_path), samples_per_shard=25)
    out = f"{s3_bucket}/select-{tmp_path.name}"
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "driver"))
    stage = SelectStage(config, metadata)
    stage.prepare(RunStore(out))
    folder = stage.index.key.folder(Path()).as_posix()  # urls/_ids/KEY
    assert Storage(out).glob("urls/_ids/*/*") == [
        f"{folder}/{name}" for name in ("index.json", "part-00000.npy", "part-00001.npy", "part-00002.npy")
    ]
    expected = execute_unit(SelectStage(config, metadata).bind(tmp_path / "local"), 1)[0]

    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "worker"))
    ids_path.rename(tmp_path / "away.pth")  # not on the worker's machine
    worker_store = RunStore(out)
    worker = pickle.loads(pickle.dumps(stage)).bind(worker_store.local)
    assert execute_unit(worker, 1, worker_store)[0] == expected
    fetched = [p.name for p in (worker_store.local / "urls" / "_ids").rglob("*") if p.is_file()]
    assert fetched == ["part-00001.npy"]

    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "driver-2"))
    (tmp_path / "away.pth").rename(ids_path)  # the same file: same size and modification time
    again = SelectStage(config, metadata)
    again.prepare(RunStore(out))
    assert again.index == stage.index
    assert [p.name for p in RunStore(out).local.rglob("*") if p.is_file()] == ["index.json"]


WORKER_PEAK = """
import pickle, sys
from pathlib import Path
from benchmarks._common import peak_rss_mb, reset_peak_rss, rss_mb
from facemllm.pipeline.stages.framework import execute_unit

before = rss_mb()
reset_peak_rss()
stage = pickle.loads(Path(sys.argv[1]).read_bytes()).bind(Path(sys.argv[2]))
for unit in (0, 1):
    execute_unit(stage, unit)
print(peak_rss_mb() - before)
"""


def test_a_worker_maps_its_part_and_never_holds_the_list(tmp_path):
    """A worker that selects two files grows by about their parts (8 MB each), far from the 64 MB
    list; read as VmHWM in a process of its own, from right after its imports."""
    rng = np.random.default_rng(3)
    id_parts = [rng.integers(0, 2**40, 1_000_000) for _ in range(8)]
    ids_path = tmp_path / "ids.pth"
    torch.save([torch.from_numpy(ids) for ids in id_parts], ids_path)
    metadata = [
        str(
            laion_metadata(
                tmp_path / f"part-{p:05d}.parquet", sample_ids=np.concatenate([ids[:300], -ids[:200]])
            )
        )
        for p, ids in enumerate(id_parts)
    ]
    stage = SelectStage(SelectConfig(metadata=metadata, ids=str(ids_path)), metadata)
    stage.prepare(RunStore(str(tmp_path / "run")))
    (tmp_path / "stage.pkl").write_bytes(pickle.dumps(stage))
    ids_path.unlink()
    worker = subprocess.run(
        [sys.executable, "-c", WORKER_PEAK, str(tmp_path / "stage.pkl"), str(tmp_path / "run")],
        env=subprocess_env(),
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    )
    assert float(worker.stdout.split()[-1]) < 32  # MB: half the list (the two parts are 16 MB)
    assert len(list((tmp_path / "run" / "urls").glob("part-*.parquet"))) == 2
