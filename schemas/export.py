"""JSON Schema export, so consumers outside Python can validate our shards."""

from __future__ import annotations

import json
from pathlib import Path


def exported_records() -> tuple[type, ...]:
    """Every record of every stage: acquisition and publishing, QA samples, annotations, evaluation."""
    from facemllm.schemas.annotation import ANNOTATION_RECORDS
    from facemllm.schemas.evaluation import EVALUATION_RECORDS
    from facemllm.schemas.qa import QA_RECORDS
    from facemllm.schemas.records import ALL_RECORDS

    return ALL_RECORDS + QA_RECORDS + ANNOTATION_RECORDS + EVALUATION_RECORDS


def export_json_schemas(out_dir: str | Path) -> list[Path]:
    """Write ``<Record>.schema.json`` for every record; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for record in exported_records():
        path = out / f"{record.__name__}.schema.json"
        path.write_text(json.dumps(record.model_json_schema(), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
