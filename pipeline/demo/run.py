"""``facemllm demo``: the whole acquisition pipeline on the bundled sample, offline.

Real face photos shipped inside installed packages are served from 127.0.0.1 together with routes
that must fail; ``demo.sample`` writes LAION-style metadata and a LAION-Face id list for
them and knows what a correct run reports. The demo runs ``configs/demo.yaml`` on them and
compares the manifest's counts with those expectations, so it doubles as a smoke test.
"""

from __future__ import annotations

import json
from pathlib import Path

from facemllm.annotators.model_store import ensure_scrfd_package
from facemllm.pipeline.config import RunConfig, load_config
from facemllm.pipeline.core.manifest import print_summary
from facemllm.pipeline.demo.sample import DemoSample, build_demo_sample, package_photos
from facemllm.pipeline.demo.server import SampleServer
from facemllm.pipeline.run import run

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"  # the checkout's configs/


def demo_config(sample: DemoSample, out: Path, overrides: list[str] = ()) -> RunConfig:
    """configs/demo.yaml pointed at ``sample`` and ``out``; the caller's overrides win."""
    placed = [
        f"out={json.dumps(str(out))}",
        f"select.metadata={json.dumps([str(sample.metadata_path)])}",
        f"select.ids={json.dumps(str(sample.face_ids_path))}",
    ]
    return load_config(DEMO_CONFIG, placed + list(overrides))


def expected_counts(sample: DemoSample) -> dict[tuple[str, str], int]:
    """(stage, outcome) -> count that a correct run of the sample reports."""
    return {
        ("urls", "rows_read"): sample.metadata_rows,
        ("urls", "selected"): sample.selected_rows,
        ("images", "success"): sample.expected_successes,
        ("images", "failures"): sample.expected_failures,
    }


def observed_counts(manifest) -> dict[tuple[str, str], int]:
    urls, images = manifest.stages["urls"].counts, manifest.stages["images"].counts
    return {
        ("urls", "rows_read"): urls.get("rows_read", 0),
        ("urls", "selected"): urls.get("selected", 0),
        ("images", "success"): images.get("success", 0),
        ("images", "failures"): images.get("failed_to_download", 0) + images.get("failed_to_resize", 0),
    }


def run_demo(out: Path, overrides: list[str] = ()) -> int:
    """Serve, build, run, check; returns the process exit code."""
    photos = package_photos(ensure_scrfd_package())
    with SampleServer(photos) as server:
        sample = build_demo_sample(out / "sample", server.base_url, photos)
        manifest = run(demo_config(sample, out, overrides))
    print_summary(manifest)
    expected, observed = expected_counts(sample), observed_counts(manifest)
    mismatches = {key: (expected[key], observed[key]) for key in expected if expected[key] != observed[key]}
    for (stage, outcome), (want, got) in mismatches.items():
        print(f"MISMATCH {stage}/{outcome}: expected {want}, got {got}")
    faces = manifest.stages["faces"].counts.get("samples", 0)
    if "annotations" in manifest.stages:  # the template annotator answers every face
        annotated = manifest.stages["annotations"].counts.get("success", 0)
        if annotated != faces:
            mismatches[("annotations", "success")] = (faces, annotated)
            print(f"MISMATCH annotations/success: expected {faces}, got {annotated}")
    print(
        f"demo: {observed[('images', 'success')]} images, {faces} faces -> {out}/faces "
        f"({'counts match the sample' if not mismatches else 'COUNTS DIFFER'})"
    )
    return 1 if mismatches else 0
