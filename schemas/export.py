"""JSON Schema export, so consumers outside Python can validate our shards."""

from __future__ import annotations

import json
from pathlib import Path


def export_json_schemas(out_dir: str | Path) -> list[Path]:
    """Write ``<Record>.schema.json`` for every record; returns the written paths."""
    from schemas.records import ALL_RECORDS

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for record in ALL_RECORDS:
        path = out / f"{record.__name__}.schema.json"
        path.write_text(json.dumps(record.model_json_schema(), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
