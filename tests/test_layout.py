"""The installed layout: every package folder is shipped under the facemllm namespace, and each
status table's columns come from its record."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pyarrow as pa
import pytest

from facemllm.schemas import AnnotationStatus, FaceStatus, LaionFaceQAStatus, LaionRow, ReformatStatus
from facemllm.schemas.tables import arrow_schema

REPO = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_installed_under_the_namespace():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in setuptools["package-dir"].items():
        for init in sorted((REPO / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(REPO / folder).parts
            found.add(".".join([name, *relative]))
    assert found == set(setuptools["packages"])


@pytest.mark.parametrize("record", [FaceStatus, AnnotationStatus, ReformatStatus, LaionFaceQAStatus])
def test_status_table_has_one_column_per_record_field(record):
    schema = arrow_schema(record)
    assert schema.names == list(record.model_fields)
    assert schema.field("status").type == pa.string() and schema.field("schema_version").type == pa.int64()


def test_url_shards_keep_laion_row_types():
    schema = arrow_schema(LaionRow, exclude=("schema_version",))
    assert schema.names == [name for name in LaionRow.model_fields if name != "schema_version"]
    assert schema.field("sample_id").type == pa.int64() and schema.field("similarity").type == pa.float64()


def test_a_record_with_a_type_a_column_cannot_hold_is_refused():
    from facemllm.schemas import StrictModel

    class Nested(StrictModel):
        counts: dict[str, int]

    with pytest.raises(TypeError, match="counts"):
        arrow_schema(Nested)
