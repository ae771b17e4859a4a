"""Face stage vs a bare loop over insightface's SCRFD, on the same image shards.

    python -m benchmarks.bench_faces [--images 48] [--shards 2] [--threads 1] [--repeats 3]

The input is image shard tars as the download stage writes them (``KEY.jpg`` + ``KEY.json``, via
``core.shards.ShardWriter``), built from package photos that mostly show faces (a group photo
with 6 faces, the 1927 Solvay conference with 29, single portraits) and a few without; the photos
repeat to reach ``--images``. PNGs are re-encoded to JPEG first, as img2dataset does for
``encode_format=jpg``.

- Ours: ``FaceStage`` run on each shard by the stage executor (``execute_unit``: reads the tar,
  decodes with a header size check, detects, filters, cuts a context crop and an aligned crop per
  kept face, JPEG-encodes both, builds a FaceRecord per face and a status row per image, writes the
  face tar, the status parquet and the stats file atomically). The image shards are written where
  the stage reads them (``images/NNNNN.tar`` under the run folder, the warm-up shard as shard
  99999); each run writes its faces under its own ``ours-<repeat>/faces``.
- Anchor: the minimal work: a plain ``tarfile`` loop over the same tars, ``cv2.imdecode``,
  ``SCRFD.detect`` and ``norm_crop`` for every detected face, nothing written.
- Both load the same ONNX file through ``insightface.model_zoo.get_model`` with the same
  onnxruntime settings ``annotators.faces`` uses (CPU provider, ``intra_op_num_threads`` =
  ``--threads``, ``inter_op_num_threads`` = 1), ``prepare(ctx_id=-1, input_size=(640, 640),
  det_thresh=0.3)``, and run in their own fresh child processes with the same environment (so the
  same OpenCV thread count), each warmed first on a separate shard of ``--warmup`` images. Ours pays
  one-time costs there: onnxruntime's first run, and pandas, which ``pa.Table.from_pylist`` imports
  at the first status table (about 1 s per process on a machine that caches no bytecode, i.e. with
  PYTHONDONTWRITEBYTECODE=1). ``--repeats`` alternates which side goes first; medians are reported. ``--profile`` adds a cProfile of ours' measured loop (that
  run's timings are then inflated; use it to see where the time goes, not for the ratio).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._common import (
    DEFAULT_OUT,
    machine_info,
    median_run,
    print_table,
    profile_text,
    rss_mb,
    run_isolated,
    write_result,
)

# Mostly faces (counts as SCRFD finds them at det_thresh 0.3 vary a little), then three without.
BENCH_PHOTOS = (
    "t1.jpg",
    "astronaut.png",
    "solvay_conference_1927.jpg",
    "newton.png",
    "gauss.png",
    "camera.png",
    "Tom_Hanks_54745.png",
    "mask_blue.jpg",
    "chelsea.png",
    "rocket.jpg",
)
DET_SIZE = 640
DET_THRESH = 0.3


def _jpeg_bytes(path: Path) -> bytes:
    import cv2

    if path.suffix.lower() in (".jpg", ".jpeg"):
        return path.read_bytes()
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise RuntimeError(f"could not re-encode {path}")
    return buffer.tobytes()


def _write_image_shards(
    photos: dict[str, Path], images: int, shards: int, folder: Path, first_shard_id: int = 0
) -> list[Path]:
    """``shards`` image shards ``folder/NNNNN.tar`` (ids from ``first_shard_id``) as the download
    stage writes them."""
    import json
    import math

    from facemllm.pipeline.core.shards import ShardWriter, shard_paths
    from facemllm.pipeline.demo.sample import ALT_TEXTS

    names = [name for name in BENCH_PHOTOS if name in photos]
    if not names:
        raise RuntimeError("none of the benchmark photos is installed (insightface, scikit-image, scrfd)")
    payloads = {name: _jpeg_bytes(photos[name]) for name in names}
    per_shard = math.ceil(images / shards)
    paths = []
    for number in range(shards):
        shard_id = first_shard_id + number
        writer = ShardWriter(shard_paths(folder, shard_id)["tar"])
        for index in range(number * per_shard, min(images, (number + 1) * per_shard)):
            name = names[index % len(names)]
            key = f"{shard_id:05d}{index - number * per_shard:04d}"
            meta = {
                "url": f"http://127.0.0.1/img/{name}?i={index}",
                "SAMPLE_ID": 1_630_000_000 + index,
                "caption": ALT_TEXTS.get(name, name),
                "LICENSE": "?",
                "NSFW": "UNLIKELY",
                "similarity": 0.33,
                "key": key,
                "status": "success",
            }
            writer.add(key, {"jpg": payloads[name], "json": json.dumps(meta).encode()})
        writer.close()
        paths.append(writer.path)
    return paths


WARM_SHARD_ID = 99_999


def run_ours(
    root: str, shard_ids: list[int], output_dir: str, model: str, threads: int, profile: bool
) -> dict:
    """Child process: our face stage, one image shard after another (``root/images/NNNNN.tar`` ->
    ``root/<output_dir>/``), each through the stage executor."""
    started = time.perf_counter()
    from facemllm.annotators.face_config import FaceConfig
    from facemllm.pipeline.stages.faces import FaceStage
    from facemllm.pipeline.stages.framework import execute_unit

    config = FaceConfig(model=Path(model), det_size=DET_SIZE, det_thresh=DET_THRESH, intra_op_threads=threads)
    stage = FaceStage(config, input_dir="images", output_dir=output_dir)
    stage.bind(Path(root)).setup()

    def run(shard_id: int) -> dict:
        stats, skipped = execute_unit(stage, shard_id)
        if skipped:
            raise RuntimeError(f"face shard {shard_id} was already complete under {root}/{output_dir}")
        return stats

    # a whole (tiny) shard, so that one-time costs of the first shard are paid here: onnxruntime's
    # first run, and the first pa.Table.from_pylist, which imports pandas (about 1 s)
    run(WARM_SHARD_ID)
    warmed = time.perf_counter()
    rss_before = rss_mb()
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    begin = time.perf_counter()
    stats = [run(shard_id) for shard_id in shard_ids]
    wall = time.perf_counter() - begin
    if profiler is not None:
        profiler.disable()
    dropped = ("dropped_small", "dropped_low_score", "dropped_over_max")
    return {
        "images": sum(s["images"] for s in stats),
        "faces": sum(s["faces"] for s in stats),  # kept faces = crops written
        "faces_detected": sum(s["faces"] + sum(s[d] for d in dropped) for s in stats),
        "startup_and_warmup_s": warmed - started,
        "wall_s": wall,
        "rss_before_mb": rss_before,
        "profile": profile_text(profiler) if profiler is not None else None,
    }


def run_anchor(tars: list[str], warm_tar: str, model: str, threads: int) -> dict:
    """Child process: a bare tarfile + cv2.imdecode + SCRFD.detect + norm_crop loop."""
    started = time.perf_counter()
    import tarfile
    import warnings

    import cv2
    import numpy as np
    import onnxruntime
    from insightface.model_zoo import get_model
    from insightface.utils.face_align import norm_crop

    # insightface 2.1's norm_crop calls a scikit-image method deprecated in 0.26 (a FutureWarning)
    warnings.filterwarnings("ignore", "`estimate` is deprecated", FutureWarning)
    options = onnxruntime.SessionOptions()  # as annotators.faces._load_detector sets them
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    detector = get_model(model, providers=["CPUExecutionProvider"], sess_options=options)
    detector.prepare(ctx_id=-1, input_size=(DET_SIZE, DET_SIZE), det_thresh=DET_THRESH)

    def run_tar(path: str) -> tuple[int, int]:
        images = faces = 0
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    data = tar.extractfile(member).read()
                    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
                    _, landmarks = detector.detect(image)
                    for points in landmarks:
                        norm_crop(image, points, 112)
                    images += 1
                    faces += len(landmarks)
        return images, faces

    run_tar(warm_tar)
    warmed = time.perf_counter()
    rss_before = rss_mb()
    images = faces = 0
    begin = time.perf_counter()
    for path in tars:
        shard_images, shard_faces = run_tar(path)
        images += shard_images
        faces += shard_faces
    wall = time.perf_counter() - begin
    return {
        "images": images,
        "faces": faces,  # every detected face is cropped
        "faces_detected": faces,
        "startup_and_warmup_s": warmed - started,
        "wall_s": wall,
        "rss_before_mb": rss_before,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48, help="images over all shards (48)")
    parser.add_argument("--shards", type=int, default=2, help="image shards (2)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads, both sides (1)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="images in the warm-up shard each side runs first (2)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, alternating order (3)")
    parser.add_argument("--profile", action="store_true", help="cProfile ours' loop (inflates its time)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result folder or .json path")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and print it")
    args = parser.parse_args(argv)

    from facemllm.annotators.model_store import default_detector_path, ensure_scrfd_package
    from facemllm.pipeline.demo.sample import package_photos

    photos = package_photos(ensure_scrfd_package())
    model = str(default_detector_path())
    tmp = Path(tempfile.mkdtemp(prefix="bench-faces-"))
    runs: dict[str, list[dict]] = {"ours": [], "anchor": []}
    try:
        # where the face stage reads them (root/images/NNNNN.tar); the anchor reads the same tars
        tars = [str(p) for p in _write_image_shards(photos, args.images, args.shards, tmp / "images")]
        warm_tar = str(_write_image_shards(photos, args.warmup, 1, tmp / "images", WARM_SHARD_ID)[0])
        for repeat in range(args.repeats):
            order = ("ours", "anchor") if repeat % 2 == 0 else ("anchor", "ours")
            for side in order:
                if side == "ours":
                    work = tmp / f"ours-{repeat}"
                    result = run_isolated(
                        run_ours,
                        root=str(tmp),
                        shard_ids=list(range(args.shards)),
                        output_dir=f"{work.name}/faces",
                        model=model,
                        threads=args.threads,
                        profile=args.profile and repeat == 0,
                    )
                    if not args.keep:
                        shutil.rmtree(work, ignore_errors=True)
                else:
                    result = run_isolated(
                        run_anchor, tars=tars, warm_tar=warm_tar, model=model, threads=args.threads
                    )
                result["images_per_s"] = result["images"] / result["wall_s"]
                result["faces_per_s"] = result["faces"] / result["wall_s"]
                runs[side].append(result)
                print(
                    f"  run {repeat + 1}/{args.repeats} {side:6s}: {result['images']} images, "
                    f"{result['faces']} faces, {result['wall_s']:.2f} s, {result['images_per_s']:.2f} images/s"
                    + (" (profiled)" if result.get("profile") else ""),
                    flush=True,
                )
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    # a profiled run's timings are inflated: leave it out of the medians when there are others
    timed = {
        side: [r for r in side_runs if not r.get("profile")] or side_runs for side, side_runs in runs.items()
    }
    summary = {}
    for side, side_runs in timed.items():
        summary[side] = {
            "images": side_runs[0]["images"],
            "faces": side_runs[0]["faces"],
            "faces_detected": side_runs[0]["faces_detected"],
            "wall_s": median_run(side_runs, "wall_s"),
            "images_per_s": median_run(side_runs, "images_per_s"),
            "faces_per_s": median_run(side_runs, "faces_per_s"),
            "startup_and_warmup_s": median_run(side_runs, "startup_and_warmup_s"),
            "rss_after_warmup_mb": median_run(side_runs, "rss_before_mb"),
            "peak_rss_mb": max(r["peak_rss_self_mb"] for r in side_runs),
        }
    ours, anchor = summary["ours"], summary["anchor"]
    ratio = ours["images_per_s"] / anchor["images_per_s"]
    # each repeat's two runs are adjacent in time: their ratio is less exposed to machine drift
    paired = [
        o["images_per_s"] / a["images_per_s"]
        for o, a in zip(runs["ours"], runs["anchor"], strict=True)
        if not o.get("profile")
    ]

    print()
    print(
        f"faces: {args.images} images in {args.shards} shards, onnxruntime intra-op threads {args.threads}, "
        f"det {DET_SIZE}px, {args.repeats} repeat(s), median; {machine_info()['affinity_cpus']} cpus"
    )
    print_table(
        [
            "side",
            "images",
            "faces out",
            "detected",
            "wall s",
            "images/s",
            "faces/s",
            "start+warm s",
            "RSS warm MiB",
            "peak RSS MiB",
        ],
        [
            [
                name,
                s["images"],
                s["faces"],
                s["faces_detected"],
                s["wall_s"],
                s["images_per_s"],
                s["faces_per_s"],
                s["startup_and_warmup_s"],
                s["rss_after_warmup_mb"],
                s["peak_rss_mb"],
            ]
            for name, s in (("ours (FaceStage)", ours), ("anchor (bare SCRFD loop)", anchor))
        ],
    )
    print(f"ratio ours/anchor (images/s): {ratio:.3f}   [goal >= 0.9]")
    print(f"  per repeat (adjacent runs): {', '.join(f'{r:.3f}' for r in paired)}")
    print(
        "faces out: ours keeps faces scoring >= 0.5 and >= 32 px (and writes 2 JPEGs + a record each); "
        "the anchor crops every detection >= det_thresh and writes nothing"
    )
    if ours["faces_detected"] != anchor["faces_detected"]:
        print(
            f"WARNING: detections differ (ours {ours['faces_detected']}, anchor {anchor['faces_detected']})"
        )
    for run in runs["ours"]:
        if run.get("profile"):
            print("\ncProfile of ours' measured loop (cumulative, top entries):")
            print(run["profile"])

    result = {
        "params": vars(args) | {"out": str(args.out), "model": model},
        "machine": machine_info(),
        "ours": ours,
        "anchor": anchor,
        "ratio": ratio,
        "ratio_per_repeat": paired,
        "runs": runs,
    }
    path = write_result(args.out, "bench_faces", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":  # children are spawned: the guard is required
    main()
