"""The run report and the dedup as a share of a whole run, and dedup throughput against a bare loop.

    python -m benchmarks.bench_report [--rows 400] [--workers 2]

The scale benchmark's synthetic LAION slice (``benchmarks/laion_slice.py``: the package photos
under many urls, so duplicates abound, and a crawl's failure mix), served from loopback by the
demo's sample server. The whole run (select -> download -> faces -> dedup -> annotate (template)
-> LAION-Face QA -> manifest -> report) runs in its own child process on the direct runner with
``--workers`` processes, as ``bench_scale`` runs it.

Then, on that run's output, each in its own child process:
- the report: ``write_run_report`` (merge every marker's profile, read the contact sheet's and the
  duplicate groups' shards, draw the plots);
- the dedup: every face shard's hashes read (``face_hashes``), bucketed, paired and grouped
  (``close_pairs``, ``duplicate_rows``) on one core, the work the pipeline spreads over workers;
- the anchor: a bare loop reading the same face shards and computing the same perceptual hashes
  of the aligned crops with ``imagehash.phash``.

Share = (report + dedup) / whole run; the goal is at most 5%. These are one-core times of work
the run does in parallel, so the share is an upper bound.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks._common import DEFAULT_OUT, machine_info, print_table, run_isolated, write_result
from benchmarks.bench_scale import TIMEOUT_S, ours
from benchmarks.laion_slice import build_slice, slice_server


def report_only(out: str) -> dict:
    from facemllm.pipeline.publishing.report import write_run_report

    started = time.perf_counter()
    write_run_report(Path(out))
    return {"seconds": time.perf_counter() - started}


def dedup_only(out: str) -> dict:
    from facemllm.pipeline.core.shards import completed_shards
    from facemllm.pipeline.stages.dedup import (
        DedupConfig,
        bucket_keys,
        close_pairs,
        duplicate_rows,
        face_hashes,
    )

    config = DedupConfig()
    started = time.perf_counter()
    buckets: dict[tuple, list] = {}
    faces = 0
    for unit in completed_shards(Path(out) / "faces"):
        for face in face_hashes(Path(out), unit):
            faces += 1
            for bucket in bucket_keys(face, config.bands):
                buckets.setdefault(bucket, []).append(face.linked())
    pairs = [pair for bucket, members in buckets.items() for pair in close_pairs(bucket, members, config)]
    rows = duplicate_rows(pairs)
    return {"seconds": time.perf_counter() - started, "faces": faces, "duplicates": len(rows)}


def bare_phash(out: str) -> dict:
    import io

    import imagehash
    from PIL import Image

    from facemllm.pipeline.core.shards import iter_tar_samples

    started = time.perf_counter()
    hashes = 0
    for tar in sorted((Path(out) / "faces").glob("*.tar")):
        for _, sample in iter_tar_samples(tar):
            with Image.open(io.BytesIO(sample["aligned.jpg"])) as crop:
                imagehash.phash(crop)
            hashes += 1
    return {"seconds": time.perf_counter() - started, "faces": hashes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/facemllm-bench-report"))
    parser.add_argument("--results", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    with slice_server(TIMEOUT_S) as (server, photos):
        data = build_slice(args.work / "input", server.base_url, photos, args.rows)
        out = str(args.work / "run")
        run = run_isolated(
            ours,
            out=out,
            metadata=[str(p) for p in data.metadata],
            ids=str(data.ids),
            workers=args.workers,
            runner="direct",
        )
    report = run_isolated(report_only, out=out)
    dedup = run_isolated(dedup_only, out=out)
    anchor = run_isolated(bare_phash, out=out)
    share = (report["seconds"] + dedup["seconds"]) / run["seconds"]
    rows = [
        ("whole run", f"{run['seconds']:.1f}", f"{run['faces']:,} faces", ""),
        ("report", f"{report['seconds']:.2f}", "", f"{report['seconds'] / run['seconds']:.1%}"),
        (
            "dedup (one core)",
            f"{dedup['seconds']:.2f}",
            f"{dedup['faces'] / dedup['seconds']:,.0f} faces/s",
            f"{dedup['seconds'] / run['seconds']:.1%}",
        ),
        (
            "bare phash loop",
            f"{anchor['seconds']:.2f}",
            f"{anchor['faces'] / anchor['seconds']:,.0f} faces/s",
            "",
        ),
    ]
    print_table(("part", "seconds", "throughput", "share of the run"), rows)
    ratio = anchor["seconds"] / dedup["seconds"]
    print(
        f"report + dedup: {share:.1%} of the run (goal at most 5%); dedup throughput {ratio:.2f}x the bare phash loop"
    )
    write_result(
        args.results,
        "report",
        {
            "machine": machine_info(),
            "rows": args.rows,
            "workers": args.workers,
            "run": run,
            "report": report,
            "dedup": dedup,
            "bare_phash": anchor,
            "share": share,
            "dedup_vs_bare": ratio,
        },
    )


if __name__ == "__main__":
    main()
