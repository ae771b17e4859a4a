"""Near-duplicate faces: precision and recall of the phash threshold on a labelled set built from
real photos, and the dedup grouping's throughput against a bare loop computing the same hashes.

    python -m benchmarks.bench_dedup [--copies 3]

The labelled set: every face SCRFD finds in the photos installed packages ship (the Solvay 1927
conference: 29 people; insightface's t1: 6; Newton, Gauss, the astronaut), each under
transformations a web crawl produces: rescaled (0.5x, 0.75x), recompressed (JPEG quality 30),
slightly cropped (5% off each side), brightened. A pair is a duplicate when both faces are the
same face of the same photo (one possibly a transformed copy); different people, including the
other people of the same group photo, are not. Faces are matched to their original by the
position of their landmarks mapped back to the original image.

Throughput: ours is ``dedup.close_pairs`` + ``duplicate_rows`` over the faces' ``FaceHashes``
bucketed as the pipeline buckets them, per face, with ``--copies`` copies of the set (distinct
keys) so buckets hold real collisions; the anchor computes the same phashes from the aligned crops
in a bare loop (``imagehash.phash``), the part of the work any dedup needs.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections import defaultdict

import cv2
import imagehash
import numpy as np
from PIL import Image

from benchmarks._common import DEFAULT_OUT, machine_info, print_table, write_result

PHOTOS = ("solvay_conference_1927.jpg", "t1.jpg", "newton.png", "gauss.png", "astronaut.png")


def transformations(image: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (transformed image, 2x3 affine mapping original pixels into it)."""
    height, width = image.shape[:2]
    identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    out = {"original": (image, identity)}
    for scale in (0.5, 0.75):
        out[f"rescaled_{scale}"] = (
            cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA),
            identity * scale,
        )
    buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 30])[1]
    out["recompressed_q30"] = (cv2.imdecode(buffer, cv2.IMREAD_COLOR), identity)
    dx, dy = int(0.05 * width), int(0.05 * height)
    out["cropped_5pct"] = (
        image[dy : height - dy, dx : width - dx].copy(),
        np.array([[1.0, 0, -dx], [0, 1.0, -dy]]),
    )
    out["brightened"] = (cv2.convertScaleAbs(image, alpha=1.1, beta=20), identity)
    return out


def labelled_faces() -> list[tuple[str, int, str, object]]:
    """(photo, face identity within it, transformation, FaceRecord) for every matched face."""
    from facemllm.annotators.faces import FaceConfig, FaceCropper
    from facemllm.annotators.model_store import ensure_scrfd_package
    from facemllm.pipeline.demo.sample import package_photos

    cropper = FaceCropper(FaceConfig(max_faces=99))
    photos = package_photos(ensure_scrfd_package())
    faces = []
    for name in PHOTOS:
        image = cv2.imread(str(photos[name]))
        originals = None
        for transform, (copy, affine) in transformations(image).items():
            records = [
                f.record for f in cropper.process(cv2.imencode(".png", copy)[1].tobytes(), "k", {}).faces
            ]
            if originals is None:
                originals = [np.asarray(r.detection.landmarks) for r in records]
            for record in records:  # which original face: the nearest mapped landmarks
                points = np.asarray(record.detection.landmarks)
                mapped = [o @ affine[:, :2].T + affine[:, 2] for o in originals]
                errors = [np.abs(points - m).mean() for m in mapped]
                best = int(np.argmin(errors))
                if errors[best] < 0.1 * np.linalg.norm(points[1] - points[0]) + 2:
                    faces.append((name, best, transform, record))
    return faces


def precision_recall(faces: list, thresholds: range) -> list[dict]:
    rows = []
    pairs = [
        (
            (a[0], a[1]) == (b[0], b[1]),
            (int(a[3].quality.phash, 16) ^ int(b[3].quality.phash, 16)).bit_count(),
        )
        for a, b in itertools.combinations(faces, 2)
    ]
    positives = sum(same for same, _ in pairs)
    for threshold in thresholds:
        found = [(same, d) for same, d in pairs if d <= threshold]
        true = sum(same for same, _ in found)
        rows.append(
            {
                "max_distance": threshold,
                "precision": true / len(found) if found else 1.0,
                "recall": true / positives,
                "false_pairs": len(found) - true,
            }
        )
    return rows


def throughput(faces: list, copies: int) -> dict:
    from facemllm.pipeline.stages.dedup import (
        DedupConfig,
        FaceHashes,
        bucket_keys,
        close_pairs,
        duplicate_rows,
    )

    config = DedupConfig()
    hashes = [
        FaceHashes(
            key=f"{c:03d}_{i:05d}",
            sample_id=i,
            phash=int(f[3].quality.phash, 16),
            image_sha256=None,
            face_index=0,
            shard=c,
        )
        for c in range(copies)
        for i, f in enumerate(faces)
    ]
    started = time.perf_counter()
    buckets = defaultdict(list)
    for face in hashes:
        for key in bucket_keys(face, config.bands):
            buckets[key].append(face)
    pairs = [pair for key, members in buckets.items() for pair in close_pairs(key, members, config)]
    rows = duplicate_rows(pairs)
    ours = time.perf_counter() - started
    crops = [
        cv2.resize(np.zeros((112, 112, 3), np.uint8) + (i % 255), (112, 112)) for i in range(len(hashes))
    ]
    started = time.perf_counter()
    for crop in crops:
        imagehash.phash(Image.fromarray(crop))
    anchor = time.perf_counter() - started
    return {
        "faces": len(hashes),
        "duplicates": len(rows),
        "ours_faces_per_s": len(hashes) / ours,
        "anchor_hashes_per_s": len(hashes) / anchor,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=20, help="copies of the labelled set for throughput")
    parser.add_argument("--out", default=DEFAULT_OUT, help="result folder or .json path")
    args = parser.parse_args(argv)
    faces = labelled_faces()
    identities = {(f[0], f[1]) for f in faces}
    print(f"labelled set: {len(faces)} faces of {len(identities)} people in {len(PHOTOS)} photos")
    table = precision_recall(faces, range(0, 13))
    print_table(
        ["max_distance", "precision", "recall", "false pairs"],
        [[r["max_distance"], r["precision"], r["recall"], r["false_pairs"]] for r in table],
    )
    speed = throughput(faces, args.copies)
    ratio = speed["ours_faces_per_s"] / speed["anchor_hashes_per_s"]
    print(
        f"grouping: {speed['ours_faces_per_s']:,.0f} faces/s over {speed['faces']} faces; "
        f"bare phash loop {speed['anchor_hashes_per_s']:,.0f} hashes/s; ratio {ratio:.2f}"
    )
    result = {
        "machine": machine_info(),
        "faces": len(faces),
        "people": len(identities),
        "table": table,
        **speed,
    }
    print(f"wrote {write_result(args.out, 'bench_dedup', result)}")
    return result


if __name__ == "__main__":
    main()
