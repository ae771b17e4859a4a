"""The run report: built from the per-shard profiles in the completion markers, equal to the status
tables, self-contained, opened in a real headless Chromium, and rebuilt for a published version
without the faces a removal took out."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageStat

from facemllm.pipeline.cli import main
from facemllm.pipeline.core.profile import MEASURES, OTHER, TOP_PER_SHARD, ProfileBuilder, merge_profiles
from facemllm.pipeline.demo.run import demo_config
from facemllm.pipeline.publishing.report import REPORT_DATA, REPORT_HTML, SECTIONS
from facemllm.pipeline.run import run
from facemllm.schemas import ReportData
from tests.browser import page_requests, screenshot


def rows(folder: Path, pattern: str = "*.parquet") -> list[dict]:
    return [row for p in sorted(folder.glob(pattern)) for row in pq.read_table(p).to_pylist()]


@pytest.fixture(scope="module")
def report_run(served_sample, tmp_path_factory) -> Path:
    """The sample through annotate (template), with two SAMPLE_IDs on a blocklist."""
    _, sample = served_sample
    out = tmp_path_factory.mktemp("report") / "run"
    listed = pq.read_table(sample.metadata_path, columns=["SAMPLE_ID"])["SAMPLE_ID"].to_pylist()[:2]
    ids = out.parent / "takedown.txt"
    ids.write_text("".join(f"{i}\n" for i in listed))
    blocklist = json.dumps([{"kind": "sample_id", "path": str(ids)}])
    run(
        demo_config(
            sample, out, ["stages=[select, download, faces, annotate]", f"select.blocklist={blocklist}"]
        )
    )
    return out


def test_the_report_data_equals_the_status_tables(report_run):
    data = ReportData.model_validate_json((report_run / REPORT_DATA).read_bytes())
    counts, histograms = data.profile["counts"], data.profile["histograms"]
    images, faces, annotations = (rows(report_run / d) for d in ("images", "faces", "annotations"))
    assert counts["download_status"] == dict(Counter(r["status"] for r in images))
    assert counts["face_status"] == dict(Counter(r["status"] for r in faces))
    assert counts["annotation_status"] == dict(Counter(r["status"] for r in annotations))
    blocked = rows(report_run / "urls", "_blocked-*.parquet")
    assert len(blocked) == 2 and counts["blocked_rows_by_list"] == dict(
        Counter(r["blocklist"] for r in blocked)
    )
    kept_faces = sum(r["faces_kept"] for r in faces)
    assert sum(histograms["detector_score"]) == sum(histograms["yaw"]) == kept_faces
    assert sum(histograms["faces_per_image"]) == len(faces)
    assert sum(histograms["caption_words"]) == Counter(r["status"] for r in annotations)["success"]
    failures = Counter(r["status"] for r in images if r["status"].startswith("failed"))
    assert sum(counts["download_failure_domain"].values()) == sum(failures.values())
    decisions = rows(report_run / "faces" / "_dedup")
    assert sum(data.duplicates.values()) == len(decisions) > 0
    assert data.duplicate_examples and all(
        f.shard is not None for example in data.duplicate_examples for f in example.duplicates
    )


def test_the_report_opens_in_headless_chromium_complete_and_offline(report_run, tmp_path):
    page = (report_run / REPORT_HTML).read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    # everything it shows is inline: every src/href is a data URI, no stylesheet or script anywhere
    assert re.findall(r'(?:src|href)="(?!data:)([^"]*)"', page) == []
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert len(re.findall(r'alt="face" src="data:image/jpeg', page)) >= 8  # contact sheet and duplicates

    png = tmp_path / "report.png"
    requests = screenshot(report_run / REPORT_HTML, png)
    assert page_requests(requests) == []
    with Image.open(png) as image:
        spread = ImageStat.Stat(image.convert("L")).stddev[0]
        colours = len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])
    assert spread > 20 and colours > 1000  # plots and faces drawn, not a blank page


def test_the_browser_check_sees_a_page_that_loads_from_the_network(tmp_path):
    """The control for the test above: the same check catches an image and a stylesheet from elsewhere."""
    page = tmp_path / "leaky.html"
    page.write_text(
        '<html><body><img src="http://images.example.invalid/a.png">'
        '<link rel="stylesheet" href="https://cdn.example.invalid/x.css"></body></html>'
    )
    hosts = b" ".join(page_requests(screenshot(page, tmp_path / "leaky.png")))
    assert b"images.example.invalid" in hosts and b"cdn.example.invalid" in hosts


def test_a_published_report_leaves_out_what_a_removal_took(report_run, tmp_path, capsys):
    dest = tmp_path / "dest"
    assert main(["publish", str(report_run), str(dest), "--no-progress"]) == 0
    page_v1 = tmp_path / "v1.html"
    assert main(["report", str(dest), "--output", str(page_v1), "--no-progress"]) == 0
    shown = re.findall(r"<figcaption><b>([0-9_]+)</b>", page_v1.read_text())
    assert shown, "the contact sheet shows faces"
    annotation = next(r for r in rows(report_run / "annotations") if r["key"] == shown[0])
    source = next(r for r in rows(report_run / "images") if r["key"] == annotation["source_key"])
    request = tmp_path / "takedown.txt"
    request.write_text(f"{source['SAMPLE_ID']}\n")
    assert main(["remove", str(dest), "--ids", str(request), "--no-progress"]) == 0
    page_v2 = tmp_path / "v2.html"
    assert main(["report", str(dest), "--output", str(page_v2), "--no-progress"]) == 0
    text = page_v2.read_text()
    removed = {r["key"] for r in rows(report_run / "annotations") if r["source_key"] == source["key"]}
    assert shown[0] in removed and not removed & set(re.findall(r"<b>([0-9_]+)</b>", text))
    assert main(["verify", str(dest), "--no-progress"]) == 0
    assert "version 2" in text and "distributions as published in version 1" in text
    assert main(["report", str(dest), "--version", "1", "--output", str(page_v1), "--no-progress"]) == 0
    assert shown[0] in page_v1.read_text()  # version 1 is immutable, its report too


def test_the_report_command_rebuilds_a_run_report(report_run, capsys):
    before = (report_run / REPORT_DATA).read_bytes()
    assert main(["report", str(report_run)]) == 0
    assert (report_run / REPORT_DATA).read_bytes() == before
    assert main(["report", str(report_run / "missing")]) == 2


def test_profiles_merge_by_addition_with_fixed_edges():
    rng = np.random.default_rng(0)
    values = rng.normal(0, 40, 1000)  # yaw: some beyond +-90 land in the edge bins
    halves = []
    for part in (values[:300], values[300:]):
        builder = ProfileBuilder()
        for v in part:
            builder.observe("yaw", v)
        builder.count("face_status", "success", len(part))
        halves.append(builder.build())
    merged = merge_profiles(
        [*halves, None, {"histograms": {"yaw": [1, 2]}}]
    )  # old and odd markers add nothing
    edges = np.asarray(MEASURES["yaw"].edges)
    expected = np.histogram(np.clip(values, edges[0], edges[-1]), edges)[0].tolist()
    assert merged["histograms"]["yaw"] == expected and sum(expected) == len(values)
    assert merged["counts"]["face_status"] == {"success": 1000}


def test_a_shard_keeps_its_most_common_categories_and_counts_the_rest():
    builder = ProfileBuilder()
    for i in range(TOP_PER_SHARD + 50):
        builder.count("download_failure_domain", f"host{i}.example", 2 if i < TOP_PER_SHARD else 1)
    counts = builder.build()["counts"]["download_failure_domain"]
    assert len(counts) == TOP_PER_SHARD + 1 and counts[OTHER] == 50
    assert sum(counts.values()) == 2 * TOP_PER_SHARD + 50
    with pytest.raises(KeyError):
        builder.observe("no_such_measure", 1.0)
