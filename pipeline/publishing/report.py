"""``OUT/report.html``: what a run (or a published version) holds, in one self-contained page.

Built from what stays small at 50M rows: the manifest's counts, the per-shard profiles the stages
write into their completion markers (merged into ``OUT/report.json``, a ``ReportData``), the
dedup decisions, and the crops of the few faces it shows, read from at most a handful of shards.
Every plot is a PNG from matplotlib embedded as a data URI, every crop a small JPEG the same way;
the page loads nothing (no script, no font, no stylesheet from anywhere).

For a published DEST the page is rebuilt from the version's manifest and shards plus the
``report.vN.json`` publish uploaded, so a face a removal took out never appears in it.
"""

from __future__ import annotations

import hashlib
import heapq
import html
import io
import posixpath
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic_core import from_json

from facemllm.pipeline.core.embed import data_uri, jpeg_thumbnail_uri
from facemllm.pipeline.core.files import write_bytes_atomic, write_json_atomic
from facemllm.pipeline.core.manifest import summary_rows
from facemllm.pipeline.core.profile import MEASURES, merge_profiles
from facemllm.pipeline.core.progress import MARKERS
from facemllm.pipeline.core.shards import iter_tar_samples
from facemllm.pipeline.core.storage import RunStore, Storage, StorageOptions
from facemllm.pipeline.publishing.layout import (
    REPORT_DATA,
    base_url,
    manifest_of_version,
    report_data_name,
)
from facemllm.schemas import DuplicateExample, DuplicateFace, ReportData, RunManifest

REPORT_HTML = "report.html"
PROFILED_STAGES = ("select", "download", "faces", "annotate")  # stages whose markers hold a profile
DECISIONS = "faces/_dedup/duplicates.parquet"
CONTACT_SHEET = 48
PER_SHARD = 12  # faces the contact sheet takes from one shard: 48 faces from at least 4 shards
DUPLICATE_GROUPS = 6
GROUP_MEMBERS = 5
THUMBNAIL_PX = 112
TOP = 20
SECTIONS = {
    "funnel": "Stage funnel",
    "statuses": "Every status",
    "failures": "Download failures",
    "distributions": "Distributions",
    "attributes": "Perceived attributes",
    "contact-sheet": "Contact sheet",
    "duplicates": "Duplicates",
    "blocklists": "Blocklists",
}
STATUS_GROUPS = {
    "download_status": "download",
    "face_status": "faces: images",
    "face_drops": "faces: faces dropped",
    "annotation_status": "annotate",
}
BLOCKLIST_GROUPS = {
    "blocked_rows_by_list": "rows (SAMPLE_ID, url, domain; before download)",
    "blocked_images_by_list": "images (sha256; after download)",
    "blocked_faces_by_list": "faces (phash; after detection)",
}


def _rank(text: str) -> bytes:
    """A stable pseudo-random order (what the page shows never depends on workers or timing)."""
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


# --- the data --------------------------------------------------------------------------------------


def collect_report_data(store: RunStore) -> ReportData:
    """Merge every stage's per-shard profile (from the markers, in the mirror or the store) and
    summarize the dedup decisions."""
    profiles = []
    for stage in PROFILED_STAGES:
        for marker in store.matching(f"{MARKERS[stage].folder}/{MARKERS[stage].pattern}"):
            profiles.append((store.read_marker(marker) or {}).get("profile"))
    duplicates: dict[str, int] = {}
    examples: list[DuplicateExample] = []
    decisions = store.local / DECISIONS
    if store.matching(DECISIONS):  # columns in Arrow; records only for the groups shown
        store.fetch(decisions)
        table = pq.read_table(decisions)
        counts = pc.value_counts(table["reason"]).to_pylist()
        duplicates = {entry["values"]: entry["counts"] for entry in counts}
        keepers = heapq.nsmallest(DUPLICATE_GROUPS, pc.unique(table["keeper"]).to_pylist(), key=_rank)
        for keeper in keepers:
            rows = table.filter(pc.equal(table["keeper"], keeper)).slice(0, GROUP_MEMBERS).to_pylist()
            members = [DuplicateFace.model_validate(row) for row in rows]
            examples.append(
                DuplicateExample(keeper=keeper, keeper_shard=members[0].keeper_shard, duplicates=members)
            )
    return ReportData(profile=merge_profiles(profiles), duplicates=duplicates, duplicate_examples=examples)


# --- faces from the shards -------------------------------------------------------------------------


class ShardReader:
    """Reads the few face samples the page shows from a run's or a version's shards."""

    def __init__(self, storage: Storage, manifest: RunManifest):
        self.storage = storage
        self.manifest = manifest

    def urls(self, stage: str) -> list[str]:
        stage_manifest = self.manifest.stages.get(stage)
        return [s.url for s in stage_manifest.shards if s.nsamples] if stage_manifest else []

    def samples(self, url: str) -> Iterable[tuple[str, dict[str, bytes]]]:
        with self.storage.open_read(url) as stream:
            yield from iter_tar_samples(stream)

    def contact_sheet(self) -> list[tuple[str, bytes, str]]:
        """(key, crop, caption) of up to 48 faces: shards in a hashed order, up to 12 faces of
        each (the lowest hashes of their keys), topped up from the shards read when they run out;
        captions from the annotations when there are any."""
        stage = "annotations" if self.urls("annotations") else "faces"
        taken: list[tuple[str, bytes, str]] = []
        left: list[tuple[str, bytes, str]] = []
        for url in sorted(self.urls(stage), key=_rank):
            faces = heapq.nsmallest(  # holds 48 faces of a shard at a time, never the whole shard
                CONTACT_SHEET,
                (
                    (_rank(key), key, sample["jpg"], _caption(stage, sample))
                    for key, sample in self.samples(url)
                    if "jpg" in sample
                ),
            )
            taken += [face[1:] for face in faces[:PER_SHARD]]
            left += [face[1:] for face in faces[PER_SHARD:]]
            if len(taken) >= CONTACT_SHEET:
                break
        return (taken + left)[:CONTACT_SHEET]

    def face_crops(self, wanted: dict[int, set[str]]) -> dict[str, bytes]:
        """key -> aligned crop, for the keys wanted from each face shard (those in this version)."""
        by_shard = {posixpath.basename(base_url(url)): url for url in self.urls("faces")}
        crops = {}
        for shard, keys in sorted(wanted.items()):
            url = by_shard.get(f"{shard:05d}.tar")
            if url is None:
                continue
            for key, sample in self.samples(url):
                if key in keys:
                    crops[key] = sample.get("aligned.jpg") or sample.get("jpg", b"")
        return crops


def _caption(stage: str, sample: dict[str, bytes]) -> str:
    if stage == "annotations":
        return sample.get("txt", b"").decode("utf-8", "replace")
    record = from_json(sample.get("json", b"{}"))
    return f"alt text: {record.get('caption') or ''}" if isinstance(record, dict) else ""


# --- drawing ---------------------------------------------------------------------------------------


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return f'<img alt="plot" src="{data_uri(buffer.getvalue(), "image/png")}">'


def _thumbnail(jpeg: bytes) -> str:
    try:
        return f'<img alt="face" src="{jpeg_thumbnail_uri(jpeg, THUMBNAIL_PX)}">'
    except (OSError, ValueError):
        return '<div class="missing">unreadable</div>'


def _bars(items: list[tuple[str, int]], title: str) -> str:
    """Horizontal bars, the first item on top, each labelled with its count."""
    import matplotlib.pyplot as plt

    items = items[::-1]
    figure, axes = plt.subplots(figsize=(8, 0.3 * len(items) + 0.8), layout="constrained")
    axes.barh([label[:60] for label, _ in items], [n for _, n in items], color="#4c72b0")
    for y, (_, n) in enumerate(items):
        axes.text(n, y, f" {n:,}", va="center", fontsize=8)
    axes.set_title(title)
    return _png(figure)


def _top(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP]


def _histograms(histograms: dict[str, list[int]]) -> str:
    import matplotlib.pyplot as plt

    measures = [m for m in MEASURES if m in histograms]
    columns = 3
    rows = -(-len(measures) // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(12, 2.6 * rows), squeeze=False, layout="constrained")
    for axes in grid.flat[len(measures) :]:
        axes.set_visible(False)
    for axes, measure in zip(grid.flat, measures, strict=False):
        edges = MEASURES[measure].edges
        axes.stairs(histograms[measure], edges, fill=True, color="#55a868")
        if MEASURES[measure].log:
            axes.set_xscale("log")
        axes.set_title(f"{MEASURES[measure].title} (n={sum(histograms[measure]):,})", fontsize=9)
    return _png(figure)


def _table(rows: Iterable[tuple], header: tuple[str, ...]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(f'{c:,}' if isinstance(c, int) else str(c))}</td>" for c in row)
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1300px; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-top: 0.6em; }
table { border-collapse: collapse; margin: 0.5em 1.5em 1em 0; display: inline-table; vertical-align: top; }
td, th { border: 1px solid #ddd; padding: 2px 8px; font-size: 0.9em; text-align: left; }
.faces { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: 150px; font-size: 0.72em; }
figure img { width: 112px; height: 112px; object-fit: cover; display: block; }
.group { display: flex; gap: 8px; align-items: flex-start; margin-bottom: 10px; }
.keeper img { outline: 3px solid #55a868; }
.note { color: #666; }
"""


def render_report(title: str, manifest: RunManifest, data: ReportData, reader: ShardReader) -> str:
    """The page: every section of ``SECTIONS``, in that order (an empty one says why)."""
    counts = data.profile.get("counts", {})
    histograms = data.profile.get("histograms", {})
    sections: dict[str, str] = {}

    sections["funnel"] = _funnel(manifest) + _table(summary_rows(manifest), ("stage", "outcome", "count"))

    status_tables = [
        _table(sorted(counts[group].items(), key=lambda kv: -kv[1]), (label, "count"))
        for group, label in STATUS_GROUPS.items()
        if counts.get(group)
    ]
    sections["statuses"] = "".join(status_tables) or '<p class="note">no per-shard profiles in this run</p>'

    failures = [
        _bars(_top(counts[group]), title)
        for group, title in (
            ("download_failure_reason", f"failures by reason (top {TOP})"),
            ("download_failure_domain", f"failures by domain (top {TOP})"),
        )
        if counts.get(group)
    ]
    sections["failures"] = "".join(failures) or '<p class="note">no download failed</p>'

    sections["distributions"] = (
        _histograms(histograms) if histograms else '<p class="note">no measures recorded</p>'
    )

    attributes = {
        group.removeprefix("attribute "): c for group, c in counts.items() if group.startswith("attribute ")
    }
    sections["attributes"] = (
        "".join(_bars(_top(c), name) for name, c in sorted(attributes.items()))
        if attributes
        else '<p class="note">no attribute labels: this run was annotated without them (template annotator)</p>'
    )

    faces = reader.contact_sheet()
    sections["contact-sheet"] = (
        '<div class="faces">'
        + "".join(
            f"<figure>{_thumbnail(jpg)}<figcaption><b>{html.escape(key)}</b> {html.escape(caption[:160])}"
            "</figcaption></figure>"
            for key, jpg, caption in faces
        )
        + "</div>"
        if faces
        else '<p class="note">no face in this run</p>'
    )

    sections["duplicates"] = _duplicates(data, reader)

    blocked = [
        _table(sorted(counts[group].items()), (label, "removed"))
        for group, label in BLOCKLIST_GROUPS.items()
        if counts.get(group)
    ]
    sections["blocklists"] = "".join(blocked) or '<p class="note">no blocklist removed anything</p>'

    body = "".join(
        f'<section id="{name}"><h2>{html.escape(SECTIONS[name])}</h2>{sections[name]}</section>'
        for name in SECTIONS
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<p class="note">config {html.escape(manifest.config_hash[:12])}</p>{body}</body></html>'
    )


def _funnel(manifest: RunManifest) -> str:
    """Rows read -> selected -> images -> faces -> annotated -> QA samples, in stage order."""
    steps = []
    for stage, stage_manifest in manifest.stages.items():
        if stage == "urls":
            steps += [(f"{stage}: {k}", stage_manifest.counts.get(k, 0)) for k in ("rows_read", "selected")]
        else:
            steps.append((f"{stage}: samples", stage_manifest.counts.get("samples", 0)))
    return _bars(steps, "what each stage kept")


def _duplicates(data: ReportData, reader: ShardReader) -> str:
    if not data.duplicates:
        return '<p class="note">no duplicates found (or the run did not deduplicate)</p>'
    wanted: defaultdict[int, set[str]] = defaultdict(set)
    for example in data.duplicate_examples:
        if example.keeper_shard is not None:
            wanted[example.keeper_shard].add(example.keeper)
        for face in example.duplicates:
            if face.shard is not None:
                wanted[face.shard].add(face.key)
    crops = reader.face_crops(wanted)
    groups = []
    for example in data.duplicate_examples:
        members = [f for f in example.duplicates if f.key in crops]
        if example.keeper not in crops or not members:
            continue  # taken out by a removal since, or from a run before shards were recorded
        cells = [
            f'<figure class="keeper">{_thumbnail(crops[example.keeper])}<figcaption>keeper '
            f"{html.escape(example.keeper)}</figcaption></figure>"
        ]
        cells += [
            f"<figure>{_thumbnail(crops[f.key])}<figcaption>{html.escape(f.key)}: {f.reason}, "
            f"distance {f.distance}</figcaption></figure>"
            for f in members
        ]
        groups.append(f'<div class="group">{"".join(cells)}</div>')
    summary = _table(sorted(data.duplicates.items()), ("duplicate kind", "faces"))
    return summary + "".join(groups)


# --- entry points ----------------------------------------------------------------------------------


def write_run_report(out: str | Path) -> Path:
    """``OUT/report.json`` and ``OUT/report.html`` for a finished run whose manifest is written,
    in the run's folder (its mirror for an object-store ``out``, the faces shown read from the store)."""
    store = RunStore(str(out))
    out = store.local
    manifest = RunManifest.model_validate_json((out / "manifest.json").read_bytes())
    data = collect_report_data(store)
    write_json_atomic(out / REPORT_DATA, data.model_dump(mode="json"))
    shards = store.remote or Storage(str(out))
    page = render_report(f"facemllm run report: {out.name}", manifest, data, ShardReader(shards, manifest))
    write_bytes_atomic(out / REPORT_HTML, page.encode())
    return out / REPORT_HTML


def write_published_report(
    dest: str, output: Path, version: int | None = None, options: StorageOptions | None = None
) -> Path:
    """The report of a published version, from its manifest, its shards and the newest report
    data published at or before it."""
    storage = Storage(dest, options)
    manifest = manifest_of_version(storage, version)
    title = f"facemllm report: {dest} version {manifest.version}"
    published = [v for v in range(manifest.version, 0, -1) if storage.exists(report_data_name(v))]
    if published:
        data = ReportData.model_validate(storage.read_json(report_data_name(published[0])))
        if published[0] != manifest.version:
            title += (
                f" (distributions as published in version {published[0]}; crops and counts of this version)"
            )
    else:
        data = ReportData(profile={})  # published before report data existed: counts and crops only
    page = render_report(title, manifest, data, ShardReader(storage, manifest))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(output, page.encode())
    return output
