"""Select workers with the published LAION-Face id list: the whole list per worker (before) against
the driver's sorted per-part index, memory-mapped (after).

    python -m benchmarks.bench_select_ids [--parts 32] [--per-part 1560000] [--rows 200000] [--quick]

The input: a synthetic id list in the published container (``torch.save`` of a list of ``--parts``
int64 tensors of ``--per-part`` random, unsorted ids each: 32 x 1.56M = 50M ids, 400 MB, as
``laion_face_ids.pth``), generated once and cached under the cache folder
(``$FACEMLLM_CACHE/bench``) by its parameters; and one LAION-400M-style metadata file for unit
``--unit`` of ``--rows`` rows, half of them ids of that part, half ids in no part. The other
metadata files are only named (the layout needs as many files as parts; no worker reads them).

Each side runs in its own freshly spawned process, so its peak (VmHWM, which includes the pages of
a memory map it touched) is its own:

- driver: ``SelectStage.prepare`` on a local run folder: reads the list, sorts each part, writes
  ``urls/_ids/KEY/part-NNNNN.npy`` and the marker. Once per run.
- before: one worker as every worker did until now: ``load_sample_ids`` of the whole list in
  ``setup`` (its sort now by ``sorted_unique``; the ``np.unique`` it replaced took about 40x
  longer here), then the unit (``execute_unit``).
- after: one worker with the driver's index (as the pickled stage carries it): maps its unit's
  part (``IdIndex.load``), then the same unit.

Setup is the time until the worker can test membership; the goal for after is at most 300 MB peak
and 5 s setup per worker. Both workers must select the same rows (checked). The run folder lives
in a temporary folder, removed at the end (the cached list is kept).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._common import (
    DEFAULT_OUT,
    machine_info,
    peak_rss_mb,
    print_table,
    reset_peak_rss,
    rss_mb,
    run_isolated,
    write_result,
)

GOAL_PEAK_MB = 300
GOAL_SETUP_S = 5


def cached_id_list(parts: int, per_part: int, seed: int) -> Path:
    """The synthetic published-format list for these parameters, generated on first use."""
    from facemllm.pipeline.core.files import default_cache_dir

    path = default_cache_dir() / "bench" / f"laion_face_ids-{parts}x{per_part}-seed{seed}.pth"
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        run_isolated(generate_id_list, path=str(path), parts=parts, per_part=per_part, seed=seed)
    return path


def generate_id_list(path: str, parts: int, per_part: int, seed: int) -> dict:
    import numpy as np
    import torch

    from facemllm.pipeline.core.files import atomic_path

    rng = np.random.default_rng(seed)
    tensors = [torch.from_numpy(rng.integers(0, 2**40, per_part)) for _ in range(parts)]
    with atomic_path(Path(path)) as tmp:
        torch.save(tensors, tmp)
    return {}


def write_metadata(id_list: str, unit: int, rows: int, path: str, seed: int) -> dict:
    """A metadata file for ``unit``: ``rows // 2`` ids of part ``unit``, the rest in no part."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    rng = np.random.default_rng(seed + 1)
    part = torch.load(id_list, weights_only=True)[unit].numpy()
    members = rng.choice(part, size=rows // 2, replace=False)
    sample_ids = rng.permutation(np.concatenate([members, rng.integers(2**41, 2**42, rows - len(members))]))
    pq.write_table(
        pa.table(
            {
                "SAMPLE_ID": pa.array(sample_ids, pa.int64()),
                "URL": [f"http://example.test/{i}.jpg" for i in range(rows)],
                "TEXT": ["a photo of a face"] * rows,
                "HEIGHT": pa.array(np.full(rows, 512), pa.int32()),
                "WIDTH": pa.array(np.full(rows, 512), pa.int32()),
                "LICENSE": ["?"] * rows,
                "NSFW": ["UNLIKELY"] * rows,
                "similarity": np.full(rows, 0.3),
            }
        ),
        path,
    )
    return {"members": len(np.unique(members))}


def _stage(id_list: str, metadata: list[str]):
    from facemllm.pipeline.stages.select import SelectConfig, SelectStage

    return SelectStage(SelectConfig(metadata=metadata, ids=id_list), metadata)


def run_driver(id_list: str, metadata: list[str], root: str) -> dict:
    """The driver's one-time index build."""
    from facemllm.pipeline.core.storage import RunStore

    stage = _stage(id_list, metadata)
    rss_before = rss_mb()
    reset_peak_rss()
    started = time.perf_counter()
    stage.prepare(RunStore(root))
    return {
        "build_s": time.perf_counter() - started,
        "rss_before_mb": rss_before,
        "peak_mb": peak_rss_mb(),
        "index": stage.index.model_dump(mode="json"),
    }


def run_worker(id_list: str, metadata: list[str], root: str, unit: int, index: dict | None) -> dict:
    """One select worker on ``unit``: the whole list in memory (``index`` None) or its part mapped.
    ``ids_peak_mb``: the peak once the ids are ready and every row's id was looked up, before
    the unit streams its rows (which costs both sides the same)."""
    import pyarrow.parquet as pq

    from facemllm.pipeline.stages.framework import execute_unit
    from facemllm.pipeline.stages.select import IdIndex, is_member, load_sample_ids

    stage = _stage(id_list, metadata).bind(Path(root))
    rows = pq.read_table(metadata[unit], columns=["SAMPLE_ID"])["SAMPLE_ID"].to_numpy()
    rss_before = rss_mb()
    started = time.perf_counter()
    if index is None:  # what setup() did
        stage.sample_ids = ids = load_sample_ids(id_list)
    else:  # what the unit does first
        stage.index = IdIndex.model_validate(index)
        ids = stage.index.load(stage.root, unit)
    setup_s = time.perf_counter() - started
    members = int(is_member(ids, rows).sum())
    ids_peak = peak_rss_mb()
    del ids
    started = time.perf_counter()
    stats, _ = execute_unit(stage, unit)
    assert stats["counts"]["selected"] == members
    return {
        "setup_s": setup_s,
        "unit_s": time.perf_counter() - started,
        "rss_after_imports_mb": rss_before,
        "ids_peak_mb": ids_peak,
        "counts": stats["counts"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", type=int, default=32, help="parts of the id list (32)")
    parser.add_argument("--per-part", type=int, default=1_560_000, help="ids per part (1,560,000)")
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the worker's metadata file")
    parser.add_argument(
        "--unit", type=int, default=0, help="the metadata file (and id part) the worker selects"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="4 parts of 100,000 ids, 20,000 rows")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result folder or .json path")
    args = parser.parse_args(argv)
    if args.quick:
        args.parts, args.per_part, args.rows = 4, 100_000, 20_000

    id_list = str(cached_id_list(args.parts, args.per_part, args.seed))
    tmp = Path(tempfile.mkdtemp(prefix="bench-select-ids-"))
    try:
        metadata = [str(tmp / "metadata" / f"part-{i:05d}.parquet") for i in range(args.parts)]
        Path(metadata[0]).parent.mkdir()
        members = run_isolated(
            write_metadata,
            id_list=id_list,
            unit=args.unit,
            rows=args.rows,
            path=metadata[args.unit],
            seed=args.seed,
        )["members"]
        driver = run_isolated(run_driver, id_list=id_list, metadata=metadata, root=str(tmp / "run"))
        print(
            f"driver: index built in {driver['build_s']:.2f} s, peak {driver['peak_mb']:,.0f} MB", flush=True
        )
        from facemllm.pipeline.runners import WORKER_ENVIRONMENT

        os.environ.update(WORKER_ENVIRONMENT)  # what every worker process a run starts gets (both sides)
        workers = {
            side: run_isolated(
                run_worker,
                id_list=id_list,
                metadata=metadata,
                root=str(tmp / root),
                unit=args.unit,
                index=index,
            )
            for side, root, index in (("before", "before", None), ("after", "run", driver["index"]))
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    before, after = workers["before"], workers["after"]
    if before["counts"] != after["counts"] or after["counts"]["selected"] != members:
        raise AssertionError(f"the workers selected differently: {before['counts']} vs {after['counts']}")
    print_table(
        ["per select worker", "setup s", "unit s", "after imports MB", "ids peak MB", "peak MB"],
        [
            [
                side,
                run["setup_s"],
                run["unit_s"],
                run["rss_after_imports_mb"],
                run["ids_peak_mb"],
                run["peak_rss_self_mb"],
            ]
            for side, run in workers.items()
        ],
    )
    goal = after["peak_rss_self_mb"] <= GOAL_PEAK_MB and after["setup_s"] <= GOAL_SETUP_S
    print(
        f"{args.parts} parts x {args.per_part:,} ids, {args.rows:,} rows ({members:,} members): peak "
        f"{before['peak_rss_self_mb'] / after['peak_rss_self_mb']:.1f}x lower, setup "
        f"{before['setup_s'] / max(after['setup_s'], 1e-6):,.0f}x faster; goal (<= {GOAL_PEAK_MB} MB, "
        f"<= {GOAL_SETUP_S} s per worker) {'met' if goal else 'MISSED'}"
    )
    result = {
        "machine": machine_info(),
        "parts": args.parts,
        "per_part": args.per_part,
        "rows": args.rows,
        "driver": {key: value for key, value in driver.items() if key != "index"},
        "before": before,
        "after": after,
        "goal_met": goal,
    }
    print(f"wrote {write_result(args.out, 'bench_select_ids', result)}")
    return result


if __name__ == "__main__":
    main()
