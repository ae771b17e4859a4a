"""Config loading for every command: pydantic models from YAML, overridable on the command line.

A bad configuration stops the run before any work, with pydantic's message naming the field.
Overrides are ``dotted.path=value`` with the value parsed as YAML (``download.timeout=5``,
``select.nsfw=[UNLIKELY]``). Every config says what decides its output with ``config_hash()``,
built here the same way for all of them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel

ConfigModel = TypeVar("ConfigModel", bound=BaseModel)


def hash_config(config: BaseModel, exclude: Any = None) -> str:
    """16 hex digits of sha256 over the config's JSON, minus ``exclude`` (pydantic's exclude
    syntax): a config's ``config_hash()`` leaves out what does not change its output."""
    payload = config.model_dump(mode="json", exclude=exclude)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries in a nested dict; values are parsed as YAML scalars or lists."""
    for override in overrides:
        path, sep, raw = override.partition("=")
        if not sep or not path:
            raise ValueError(f"override {override!r} is not of the form dotted.key=value")
        node = data
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {override!r}: {part!r} is not a section")
        node[leaf] = _parse_yaml(raw, f"override {override!r}")
    return data


def _parse_yaml(text: str, where: str) -> Any:
    """YAML -> Python; a syntax error (or nesting too deep) is a ValueError naming ``where``."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as err:
        problem = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise ValueError(f"{where}: not valid YAML: {problem}") from None


def load_yaml_config(
    model: type[ConfigModel],
    path: str | Path | None,
    overrides: list[str] = (),
    given: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> ConfigModel:
    """``base`` values, then the YAML file (optional), then ``given`` values (a command's own
    arguments; None means not given), then ``--set`` overrides. A ValidationError names the field."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        loaded = _parse_yaml(Path(path).read_text(), str(path)) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the config must be a mapping")
        data.update(loaded)
    data.update({key: value for key, value in (given or {}).items() if value is not None})
    return model.model_validate(apply_overrides(data, list(overrides)))


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable) on any command that loads a config."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set download.timeout=5 --set runner.direct_num_workers=4",
    )
