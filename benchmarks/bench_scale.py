"""The acquisition chain at scale: ours against the chain a user would script, direct against dask,
and peak memory as the input grows.

    python -m benchmarks.bench_scale [--rows 2000] [--memory-rows 20000] [--workers 2]

Input: ``benchmarks/laion_slice.py``: a synthetic LAION-400M slice in the real schema (several
metadata parts, the published id-list container), about 20% dead links, 2% stalls, 3% HTML
bodies, NSFW tags, the package photos under many urls; served from loopback with 20 ms latency.

Each run is its own child process with its whole process tree watched for peak memory (VmHWM of
the driver and of every worker it starts):
- **ours, direct**: ``facemllm run`` select -> download -> faces -> dedup -> annotate (template)
  -> LAION-Face QA -> manifest and report, ``--workers`` worker processes;
- **ours, dask**: the same on a local dask cluster of ``--workers`` processes;
- **anchor**: img2dataset's CLI on the same selected urls (same threads, timeout, processes),
  then a bare SCRFD loop over its tars (``--workers`` processes, same detector settings), one after
  the other, as a user would chain them;
- **ours at ``--memory-rows``**: the direct run again on 10x the rows, for memory only.

Images/s = images downloaded and passed through face detection / wall seconds, on both sides.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmarks._common import DEFAULT_OUT, machine_info, print_table, run_isolated, write_result
from benchmarks.laion_slice import build_slice, slice_server

THREADS = 8
TIMEOUT_S = 2


def ours(out: str, metadata: list[str], ids: str, workers: int, runner: str) -> dict:
    from facemllm.pipeline.config import load_config
    from facemllm.pipeline.demo.run import DEMO_CONFIG
    from facemllm.pipeline.run import run

    overrides = [
        f"out={json.dumps(out)}",
        f"select.metadata={json.dumps(metadata)}",
        f"select.ids={json.dumps(ids)}",
        "stages=[select, download, faces, annotate, laion_face_qa]",
        "select.samples_per_shard=100",
        f"download.thread_count={THREADS}",
        f"download.timeout={TIMEOUT_S}",
        f"runner.runner={runner}",
        f"runner.direct_num_workers={workers}",
        f"runner.dask_workers={workers}",
    ]
    started = time.perf_counter()
    manifest = run(load_config(DEMO_CONFIG, overrides), progress=False)
    return {
        "seconds": time.perf_counter() - started,
        "images": manifest.stages["images"].counts.get("success", 0),
        "faces": manifest.stages["faces"].counts.get("samples", 0),
    }


def selected_urls(out: Path, target: Path) -> int:
    """The url shards our select wrote, as one parquet for img2dataset's CLI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables(pq.read_table(p) for p in sorted((out / "urls").glob("part-*.parquet")))
    pq.write_table(table.select(["url", "text"]), target)
    return table.num_rows


def img2dataset_cli(urls: str, folder: str, workers: int) -> dict:
    import subprocess
    import sys

    started = time.perf_counter()
    subprocess.run(
        [
            str(Path(sys.executable).parent / "img2dataset"),
            f"--url_list={urls}",
            "--input_format=parquet",
            "--url_col=url",
            "--caption_col=text",
            "--output_format=webdataset",
            f"--output_folder={folder}",
            f"--processes_count={workers}",
            f"--thread_count={THREADS}",
            f"--timeout={TIMEOUT_S}",
            "--retries=0",
            "--resize_mode=no",
            "--number_sample_per_shard=100",
            "--enable_wandb=False",
        ],
        check=True,
        capture_output=True,
    )
    return {"seconds": time.perf_counter() - started}


def _detect_tar(tar: str) -> int:
    import tarfile

    import cv2
    import numpy as np

    from benchmarks.bench_scale import _detector

    detector = _detector()
    images = 0
    with tarfile.open(tar) as archive:
        for member in archive:
            if member.name.endswith(".jpg"):
                data = archive.extractfile(member).read()
                image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
                if image is not None:
                    detector.detect(image, max_num=0)
                    images += 1
    return images


_DETECTOR = None


def _detector():
    """The bare loop's SCRFD, loaded once per process with the faces stage's defaults."""
    global _DETECTOR
    if _DETECTOR is None:
        import onnxruntime
        from insightface.model_zoo import get_model

        from facemllm.annotators.face_config import FaceConfig
        from facemllm.annotators.model_store import default_detector_path

        config = FaceConfig()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        _DETECTOR = get_model(
            str(default_detector_path()), providers=["CPUExecutionProvider"], sess_options=options
        )
        _DETECTOR.prepare(
            ctx_id=-1, input_size=(config.det_size, config.det_size), det_thresh=config.det_thresh
        )
    return _DETECTOR


def bare_scrfd(folder: str, workers: int) -> dict:
    import multiprocessing

    tars = sorted(str(p) for p in Path(folder).glob("*.tar"))
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        images = sum(pool.map(_detect_tar, tars, chunksize=1))
    return {"seconds": time.perf_counter() - started, "images": images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--memory-rows", type=int, default=20000, help="0: skip the memory run")
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/facemllm-bench-scale"))
    parser.add_argument("--results", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    results: dict = {"machine": machine_info(), "rows": args.rows, "workers": args.workers}
    with slice_server(TIMEOUT_S) as (server, photos):

        def run_ours(rows: int, runner: str) -> dict:
            data = build_slice(args.work / f"input-{rows}", server.base_url, photos, rows, args.parts)
            out = args.work / f"{runner}-{rows}"
            result = run_isolated(
                ours,
                log_path=args.work / f"{runner}-{rows}.log",
                watch_tree=True,
                out=str(out),
                metadata=[str(p) for p in data.metadata],
                ids=str(data.ids),
                workers=args.workers,
                runner=runner,
            )
            return {**result, "out": str(out), "selected": data.selected}

        direct = run_ours(args.rows, "direct")
        urls = args.work / "selected.parquet"
        selected_urls(Path(direct["out"]), urls)
        folder = str(args.work / "img2dataset")
        download = run_isolated(
            img2dataset_cli, watch_tree=True, urls=str(urls), folder=folder, workers=args.workers
        )
        detect = run_isolated(bare_scrfd, watch_tree=True, folder=folder, workers=args.workers)
        dask = run_ours(args.rows, "dask")
        large = run_ours(args.memory_rows, "direct") if args.memory_rows else None

    anchor = {
        "seconds": download["seconds"] + detect["seconds"],
        "images": detect["images"],
        "memory": {
            "driver_mb": download["memory"]["driver_mb"],
            "workers_mb": download["memory"]["workers_mb"] + detect["memory"]["workers_mb"],
        },
    }
    chains = {"ours, direct": direct, "ours, dask": dask, "img2dataset CLI + bare SCRFD": anchor}
    if large is not None:
        chains[f"ours, direct, {args.memory_rows:,} rows"] = large
    rate = {name: chain["images"] / chain["seconds"] for name, chain in chains.items()}
    rows = [
        (
            name,
            f"{chain['seconds']:.1f}",
            chain["images"],
            f"{rate[name]:.1f}",
            chain["memory"]["driver_mb"],
            max(chain["memory"]["workers_mb"], default=0),
        )
        for name, chain in chains.items()
    ]
    print_table(("chain", "seconds", "images", "images/s", "driver peak MB", "largest worker peak MB"), rows)
    summary = {
        "ours_vs_anchor": rate["ours, direct"] / rate["img2dataset CLI + bare SCRFD"],
        "dask_vs_direct": rate["ours, dask"] / rate["ours, direct"],
    }
    if large is not None:
        summary["driver_growth"] = large["memory"]["driver_mb"] / direct["memory"]["driver_mb"]
        summary["worker_growth"] = max(large["memory"]["workers_mb"]) / max(direct["memory"]["workers_mb"])
    print(
        f"ours / anchor {summary['ours_vs_anchor']:.2f} (goal >= 1.2); dask / direct "
        f"{summary['dask_vs_direct']:.2f} (goal >= 0.9)"
        + (
            f"; peak memory at {args.memory_rows:,} / {args.rows:,} rows: driver "
            f"{summary['driver_growth']:.2f}x, largest worker {summary['worker_growth']:.2f}x (goal <= 1.2)"
            if large is not None
            else ""
        )
    )
    results.update(direct=direct, dask=dask, img2dataset=download, bare_scrfd=detect, large=large, **summary)
    write_result(args.results, "scale", results)


if __name__ == "__main__":
    main()
