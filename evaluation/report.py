"""Reports: a markdown table and an HTML page per model, and a side-by-side comparison of models.

The comparison covers every ``*/result.json`` in the results folder, grouped by data hash: models
scored on different data (another split, another subsample, changed shards) are never put in one
table. HTML pages are self-contained (inline CSS, images as data URLs) so they can be mailed or
published as one file.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path

from facemllm.pipeline.core.embed import jpeg_thumbnail_uri
from facemllm.pipeline.core.files import write_bytes_atomic
from facemllm.schemas.evaluation import (
    EVAL_TASKS,
    ConfusionMatrix,
    Estimate,
    EvalResult,
    Prediction,
    TaskResult,
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.example { display: flex; gap: 1em; margin: 0.5em 0; border-bottom: 1px solid #eee; padding-bottom: 0.5em; }
.example img { width: 96px; height: 96px; object-fit: cover; }
.example pre { white-space: pre-wrap; margin: 0; font-size: 0.85em; }
.note { color: #666; font-size: 0.9em; }
"""
THUMBNAIL_PX = 128


def fmt(estimate: Estimate | None, interval: bool = True) -> str:
    if estimate is None or estimate.value is None:
        return "n/a"
    text = f"{estimate.value:.3f}"
    if interval and estimate.low is not None:
        text += f" [{estimate.low:.3f}, {estimate.high:.3f}]"
    return text


def headline_rows(result: EvalResult) -> list[tuple[str, str, str, int, str]]:
    """(task, metric, value with interval, samples, unparsed rate) per scored task, in task order."""
    rows = []
    for name in EVAL_TASKS:
        task = result.tasks.get(name)
        if task is None:
            continue
        rows.append(
            (
                name,
                task.headline,
                fmt(task.metrics[task.headline]),
                task.samples,
                fmt(task.metrics["unparsed_rate"], False),
            )
        )
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def model_markdown(result: EvalResult) -> str:
    rows = [list(row) for row in headline_rows(result)]
    text = f"# {result.model.label}\n\n"
    text += markdown_table(
        ["task", "metric", f"value [{result.bootstrap['confidence']:.0%} CI]", "samples", "unparsed"], rows
    )
    text += (
        f"\nmodel: {result.model.kind} `{result.model.target}`"
        + (f" (served as `{result.model.served_model}`)" if result.model.served_model else "")
        + f"; data hash `{result.data.data_hash}`; decoding {json.dumps(result.generation)}\n"
    )
    return text


def _estimate_table(title: str, estimates: dict[str, Estimate]) -> str:
    if not estimates:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{fmt(e)}</td><td>{e.n}</td></tr>"
        for name, e in estimates.items()
    )
    return f"<h4>{html.escape(title)}</h4><table><tr><th></th><th>accuracy [CI]</th><th>n</th></tr>{rows}</table>"


def _confusion_table(matrix: ConfusionMatrix) -> str:
    columns = [*matrix.labels, "unparsed"]
    top = max((c for row in matrix.counts for c in row), default=0) or 1
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = ""
    for label, row in zip(matrix.labels, matrix.counts, strict=True):
        cells = "".join(
            f'<td style="background: rgba(40, 90, 200, {0.75 * count / top:.2f})">{count}</td>'
            for count in row
        )
        body += f"<tr><td>{html.escape(label)}</td>{cells}</tr>"
    return f"<h4>confusion: {html.escape(matrix.title)} (rows: true, columns: predicted)</h4><table><tr><th></th>{head}</tr>{body}</table>"


def _examples(task: TaskResult, predictions: dict[str, Prediction], images: dict[str, bytes]) -> str:
    if not task.worst:
        return ""
    blocks = []
    for worst in task.worst:
        p = predictions[worst.key]
        image = (
            f'<img src="{jpeg_thumbnail_uri(images[p.key], THUMBNAIL_PX)}" alt="{html.escape(p.key)}">'
            if p.key in images
            else ""
        )
        text = (
            f"{p.key} ({p.dataset}/{p.split}, {p.qa_task}, {p.answer_style}): {worst.why}\n\n"
            f"Q: {p.question}\nexpected: {p.expected}\nreply: {p.reply if p.reply is not None else '-'}\n"
            f"parsed: {p.parsed or '-'}"
        )
        blocks.append(f'<div class="example">{image}<pre>{html.escape(text)}</pre></div>')
    return "<h4>worst examples</h4>" + "".join(blocks)


def model_html(result: EvalResult, predictions: list[Prediction], images: dict[str, bytes]) -> str:
    by_key = {p.key: p for p in predictions}
    parts = [
        f"<h1>{html.escape(result.model.label)}</h1>",
        f'<p class="note">{html.escape(result.model.kind)} {html.escape(result.model.target)}; '
        f"data hash {result.data.data_hash} ({html.escape(', '.join(result.data.splits))}); decoding "
        f"{html.escape(json.dumps(result.generation))}; bootstrap {html.escape(json.dumps(result.bootstrap))}; "
        f"parser v{result.parser_version}</p>",
    ]
    summary = "".join(
        f"<tr><td>{t}</td><td>{m}</td><td>{v}</td><td>{n}</td><td>{u}</td></tr>"
        for t, m, v, n, u in headline_rows(result)
    )
    parts.append(
        f"<table><tr><th>task</th><th>metric</th><th>value [CI]</th><th>samples</th><th>unparsed</th></tr>{summary}</table>"
    )
    for name in EVAL_TASKS:
        task = result.tasks.get(name)
        if task is None:
            continue
        metrics = "".join(
            f"<tr><td>{k}</td><td>{fmt(v)}</td><td>{v.n}</td></tr>" for k, v in task.metrics.items()
        )
        parts.append(f"<h2>{html.escape(task.title)}</h2>")
        parts += [f'<p class="note">{html.escape(note)}</p>' for note in task.notes]
        parts.append(f"<table><tr><th>metric</th><th>value [CI]</th><th>n</th></tr>{metrics}</table>")
        parts.append(_estimate_table("by answer style", task.by_style))
        parts.append(_estimate_table("by dataset", task.by_dataset))
        parts.append(
            _estimate_table("per attribute" if "attributes" in name else "per true class", task.per_class)
        )
        for group, estimates in task.by_group.items():
            parts.append(_estimate_table(f"by perceived {group} (of the same image)", estimates))
        parts += [_confusion_table(matrix) for matrix in task.confusion]
        parts.append(_examples(task, by_key, images))
    return page(f"facemllm eval: {result.model.label}", "".join(parts))


def page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>\n"
    )


def write_model_report(
    folder: Path, result: EvalResult, predictions: list[Prediction], images: dict[str, bytes]
) -> None:
    write_bytes_atomic(folder / "results.md", model_markdown(result).encode())
    write_bytes_atomic(folder / "report.html", model_html(result, predictions, images).encode())


def comparison_tables(results: list[EvalResult]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(data hash, header, rows) per group of results scored on the same data."""
    groups: dict[str, list[EvalResult]] = defaultdict(list)
    for result in results:
        groups[result.data.data_hash].append(result)
    tables = []
    for data_hash, members in sorted(groups.items()):
        header = ["task", "metric", *(r.model.label for r in members)]
        rows = []
        for name in EVAL_TASKS:
            scored = [r.tasks.get(name) for r in members]
            first = next((t for t in scored if t is not None), None)
            if first is None:
                continue
            for metric in first.metrics:  # headline first, unparsed rate last (as score_task orders them)
                interval = metric != "unparsed_rate"
                rows.append(
                    [name, metric, *(fmt(t.metrics.get(metric), interval) if t else "-" for t in scored)]
                )
        tables.append((data_hash, header, rows))
    return tables


def load_results(out: Path) -> list[EvalResult]:
    """Every model's ``result.json`` in a results folder, in label order."""
    return [EvalResult.model_validate_json(p.read_text()) for p in sorted(out.glob("*/result.json"))]


def write_comparison(out: Path) -> None:
    results = load_results(out)
    tables = comparison_tables(results)
    markdown = ""
    body = "<h1>facemllm eval: comparison</h1>"
    confidence = {r.data.data_hash: r.bootstrap["confidence"] for r in results}
    for data_hash, header, rows in tables:
        markdown += (
            f"Data hash `{data_hash}`; {confidence[data_hash]:.0%} bootstrap intervals (images resampled):\n\n"
            + markdown_table(header, rows)
            + "\n"
        )
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        cells = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
        )
        links = " ".join(
            f'<a href="{html.escape(label)}/report.html">{html.escape(label)}</a>' for label in header[2:]
        )
        body += f"<h2>data {data_hash}</h2><p>{links}</p><table><tr>{head}</tr>{cells}</table>"
    write_bytes_atomic(out / "comparison.md", markdown.encode())
    write_bytes_atomic(out / "comparison.html", page("facemllm eval: comparison", body).encode())
    summary = {
        data_hash: {
            r.model.label: {t: task.metrics[task.headline].model_dump() for t, task in r.tasks.items()}
            for r in results
            if r.data.data_hash == data_hash
        }
        for data_hash, _, _ in tables
    }
    write_bytes_atomic(
        out / "comparison.json", (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode()
    )
