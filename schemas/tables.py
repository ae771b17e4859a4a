"""Arrow schemas of the status tables, derived from the pydantic records they hold.

A stage's ``NNNNN.parquet`` has one row per input element and one column per field of its status
record (``FaceStatus``, ``AnnotationStatus``, ...), in field order: deriving the schema from the
record means a new field cannot be forgotten in the table, and a table can be validated row by
row against the record that defined it.
"""

from __future__ import annotations

import types
import typing
from functools import cache
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel

SCALARS: dict[type, pa.DataType] = {
    bool: pa.bool_(),  # before int: bool is an int subclass
    int: pa.int64(),
    float: pa.float64(),
    str: pa.string(),
}


def _arrow_type(annotation: object, where: str) -> pa.DataType:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) != 1:
            raise TypeError(f"{where}: a status column holds one type, not {annotation}")
        return _arrow_type(members[0], where)
    if origin is Literal:
        kinds = {type(value) for value in typing.get_args(annotation)}
        if len(kinds) != 1:
            raise TypeError(f"{where}: a Literal column mixes {kinds}")
        return _arrow_type(kinds.pop(), where)
    if isinstance(annotation, type):
        for python_type, arrow_type in SCALARS.items():
            if issubclass(annotation, python_type):
                return arrow_type
    raise TypeError(f"{where}: no Arrow column type for {annotation!r}")


@cache
def arrow_schema(record: type[BaseModel], exclude: tuple[str, ...] = ()) -> pa.Schema:
    """One nullable column per field of ``record`` (but ``exclude``), in field order."""
    return pa.schema(
        [
            (name, _arrow_type(field.annotation, f"{record.__name__}.{name}"))
            for name, field in record.model_fields.items()
            if name not in exclude
        ]
    )
