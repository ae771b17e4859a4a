"""Reformat stage vs a bare loop that parses the attribute file and tars the images, on one synthetic CelebA.

    python -m benchmarks.bench_reformat [--rows 20000] [--repeats 2] [--mode in_memory] [--workers 1]

The input is CelebA's official layout (``Anno/list_attr_celeba.txt`` with its count and header
lines and CelebA's two-character value columns, ``Eval/list_eval_partition.txt``, 178x218 JPEGs
in ``Img/img_align_celeba/``) with ``--rows`` rows of seeded random attributes; the images are
hard links to a few real face photos (pipeline/demo/face_datasets.py), so building it costs no disk.

- Ours: ``pipeline.reformat.run_reformat`` as ``facemllm reformat celeba`` runs it: listing,
  Beam (FnApiRunner, ``--mode``/``--workers``; in_memory with 1 worker matches the anchor's one
  thread), per row a header check and full decode of the image, one sample per image and split
  holding all its questions (by default 4 yes/no attribute questions, a selection, a description,
  plus the zero-shot questions on test images), the image stored once, status parquet, sizes,
  manifest.
- Anchor: the minimum the task needs: read the attribute file, split each line, and copy every
  image into one ``tarfile`` (one member per image, nothing decoded, nothing else written).

Rows/s (source images per second) compares the same input on both sides, and is the headline
ratio; bytes written per source image compare the shards with the bare tar of the images (the
image bytes plus tar headers). Questions/s is ours alone (the anchor asks none).
Each side runs in a fresh child process (``benchmarks._common``), ours warmed first on a 200-row
copy; ``--repeats`` alternates which side goes first, and medians are reported.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._common import DEFAULT_OUT, machine_info, median_run, print_table, run_isolated, write_result

DISTINCT_PHOTOS = 8


def build_synthetic_celeba(root: Path, rows: int, seed: int = 0) -> Path:
    """CelebA's official layout with ``rows`` rows; images are hard links to a few real photos."""
    from facemllm.pipeline.demo.face_datasets import ATTRIBUTE_NAMES, celeba_attr_line, photo_jpeg

    images = root / "Img" / "img_align_celeba"
    images.mkdir(parents=True)
    (root / "Anno").mkdir()
    (root / "Eval").mkdir()
    sources = []
    for index in range(DISTINCT_PHOTOS):
        source = root / f"photo{index}.jpg"
        source.write_bytes(photo_jpeg(index, (178, 218)))
        sources.append(source)
    rng = random.Random(seed)
    lines, partitions = [], []
    for number in range(1, rows + 1):
        name = f"{number:06d}.jpg"
        os.link(sources[number % DISTINCT_PHOTOS], images / name)
        lines.append(celeba_attr_line(name, [1 if rng.random() < 0.2 else -1 for _ in ATTRIBUTE_NAMES]))
        partitions.append(f"{name} {0 if number <= 0.8 * rows else 1 if number <= 0.9 * rows else 2}")
    header = f"{rows}\n{' '.join(ATTRIBUTE_NAMES)} \n"
    (root / "Anno" / "list_attr_celeba.txt").write_text(header + "\n".join(lines) + "\n")
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(partitions) + "\n")
    return root


def run_ours(root: str, warm_root: str, work: str, mode: str, workers: int) -> dict:
    """Child process: ``run_reformat`` on the warm-up copy, then on the measured one."""
    started = time.perf_counter()
    from facemllm.pipeline.stages.reformat import load_reformat_config, run_reformat

    overrides = [f"runner.direct_running_mode={mode}", f"runner.direct_num_workers={workers}"]

    def reformat(source: str, out: str):
        return run_reformat(load_reformat_config(None, overrides, dataset="celeba", root=source, out=out))

    reformat(warm_root, f"{work}/warm")
    warmed = time.perf_counter()
    begin = time.perf_counter()
    manifest = reformat(root, f"{work}/qa")
    wall = time.perf_counter() - begin
    splits = [stage for name, stage in manifest.stages.items() if name.count("/") == 2]
    return {
        "rows": manifest.stages["qa/celeba"].counts["rows"],
        "samples": sum(stage.counts["samples"] for stage in splits),
        "questions": sum(n for stage in splits for key, n in stage.counts.items() if key.startswith("task_")),
        "bytes": sum(shard.bytes for stage in splits for shard in stage.shards),
        "startup_and_warmup_s": warmed - started,
        "wall_s": wall,
    }


def run_anchor(root: str, work: str) -> dict:
    """Child process: parse list_attr_celeba.txt, copy each image into one tar."""
    import io
    import tarfile

    started = time.perf_counter()
    begin = time.perf_counter()
    source = Path(root)
    lines = (source / "Anno" / "list_attr_celeba.txt").read_text().splitlines()
    names = lines[1].split()
    out = Path(work) / "anchor.tar"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for line in lines[2:]:
            name, *values = line.split()
            dict(zip(names, (value == "1" for value in values), strict=True))
            payload = (source / "Img" / "img_align_celeba" / name).read_bytes()
            info = tarfile.TarInfo(name)  # not tar.add: it would store our hard links as links
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
            rows += 1
    wall = time.perf_counter() - begin
    return {
        "rows": rows,
        "samples": rows,
        "questions": 0,
        "bytes": out.stat().st_size,
        "startup_and_warmup_s": begin - started,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="attribute rows (20000)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, alternating order (2)")
    parser.add_argument(
        "--mode", default="in_memory", choices=["in_memory", "multi_threading", "multi_processing"]
    )
    parser.add_argument("--workers", type=int, default=1, help="Beam direct_num_workers for ours (1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result folder or .json path")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-reformat-"))
    runs: dict[str, list[dict]] = {"ours": [], "anchor": []}
    try:
        root = str(build_synthetic_celeba(tmp / "celeba", args.rows))
        warm_root = str(build_synthetic_celeba(tmp / "warm", 200, seed=1))
        for repeat in range(args.repeats):
            for side in ("ours", "anchor") if repeat % 2 == 0 else ("anchor", "ours"):
                work = tmp / f"{side}-{repeat}"
                if side == "ours":
                    result = run_isolated(
                        run_ours,
                        root=root,
                        warm_root=warm_root,
                        work=str(work),
                        mode=args.mode,
                        workers=args.workers,
                    )
                else:
                    result = run_isolated(run_anchor, root=root, work=str(work))
                shutil.rmtree(work, ignore_errors=True)
                result["rows_per_s"] = result["rows"] / result["wall_s"]
                result["samples_per_s"] = result["samples"] / result["wall_s"]
                runs[side].append(result)
                print(
                    f"  run {repeat + 1}/{args.repeats} {side:6s}: {result['rows']} rows, {result['samples']} samples, "
                    f"{result['wall_s']:.2f} s, {result['samples_per_s']:,.0f} samples/s",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {
        side: {
            "rows": side_runs[0]["rows"],
            "samples": side_runs[0]["samples"],
            "questions": side_runs[0]["questions"],
            "mib_written": side_runs[0]["bytes"] / 2**20,
            "bytes_per_row": side_runs[0]["bytes"] / side_runs[0]["rows"],
            "wall_s": median_run(side_runs, "wall_s"),
            "rows_per_s": median_run(side_runs, "rows_per_s"),
            "samples_per_s": median_run(side_runs, "samples_per_s"),
            "startup_and_warmup_s": median_run(side_runs, "startup_and_warmup_s"),
            "peak_rss_mb": max(r["peak_rss_self_mb"] for r in side_runs),
        }
        for side, side_runs in runs.items()
    }
    ours, anchor = summary["ours"], summary["anchor"]
    ratio_rows = ours["rows_per_s"] / anchor["rows_per_s"]
    ratio_bytes = ours["bytes_per_row"] / anchor["bytes_per_row"]
    print()
    print(
        f"reformat: synthetic CelebA of {args.rows} rows, ours on FnApiRunner {args.mode} x{args.workers}, "
        f"{args.repeats} repeat(s), median; {machine_info()['affinity_cpus']} cpus"
    )
    print_table(
        [
            "side",
            "rows",
            "samples",
            "questions",
            "MiB out",
            "bytes/row",
            "wall s",
            "rows/s",
            "samples/s",
            "start+warm s",
            "peak RSS MiB",
        ],
        [
            [
                name,
                s["rows"],
                s["samples"],
                s["questions"],
                s["mib_written"],
                s["bytes_per_row"],
                s["wall_s"],
                s["rows_per_s"],
                s["samples_per_s"],
                s["startup_and_warmup_s"],
                s["peak_rss_mb"],
            ]
            for name, s in (("ours (facemllm reformat)", ours), ("anchor (parse + tar copy)", anchor))
        ],
    )
    print(f"ratio ours/anchor, rows/s (same source images): {ratio_rows:.3f}")
    print(f"ratio ours/anchor, bytes written per source image: {ratio_bytes:.3f}")
    result = {
        "params": vars(args) | {"out": str(args.out)},
        "machine": machine_info(),
        "ours": ours,
        "anchor": anchor,
        "ratio_rows": ratio_rows,
        "ratio_bytes_per_row": ratio_bytes,
        "runs": runs,
    }
    path = write_result(args.out, "bench_reformat", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":  # children are spawned: the guard is required
    main()
