"""Versioned prompt files for the MLLM annotator.

A prompt is a YAML file with ``version``, ``system``, ``user`` and ``repair`` texts. It is named
either by its version (a file ``<version>.yaml`` in this folder, e.g. ``face-v1``) or by a path.
The version and the sha256 of the file's text travel into every annotation's provenance and into
the request cache key, so answers to an edited prompt are never mistaken for answers to the old one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

PROMPTS_DIR = Path(__file__).resolve().parent
DEFAULT_PROMPT = "face-v1"


@dataclass(frozen=True)
class Prompt:
    version: str
    sha256: str
    system: str
    user: str
    repair: str
    path: Path

    def user_text(self, caption_max_chars: int) -> str:
        return self.user.format(caption_max_chars=caption_max_chars)

    def repair_text(self, error: str) -> str:
        return self.repair.format(error=error)


def available_prompts() -> list[str]:
    return sorted(path.stem for path in PROMPTS_DIR.glob("*.yaml"))


def prompt_path(name: str) -> Path:
    candidate = Path(name).expanduser()
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise FileNotFoundError(f"annotate.prompt: no such prompt file {name!r}")
        return candidate
    path = PROMPTS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"annotate.prompt: unknown prompt {name!r}; bundled: {', '.join(available_prompts())}, "
            "or give a path to a YAML file"
        )
    return path


def load_prompt(name: str = DEFAULT_PROMPT) -> Prompt:
    path = prompt_path(name)
    text = path.read_text()
    data = yaml.safe_load(text)
    missing = [key for key in ("version", "system", "user", "repair") if not isinstance(data.get(key), str)]
    if missing:
        raise ValueError(f"prompt file {path} lacks the text fields {missing}")
    prompt = Prompt(
        version=data["version"],
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        system=data["system"].strip(),
        user=data["user"].strip(),
        repair=data["repair"].strip(),
        path=path,
    )
    try:  # placeholders are checked now, not at the first face
        prompt.user_text(1)
        prompt.repair_text("x")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"prompt file {path}: bad placeholder {err}") from err
    return prompt
