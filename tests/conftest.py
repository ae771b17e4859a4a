"""Shared fixtures: the real SCRFD package, real photos served from loopback, the demo sample, a
real S3-compatible server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"

from tests.vllm_server import vllm_server  # noqa: E402, F401 - session fixture: ONE real vLLM server


@pytest.fixture(scope="session")
def scrfd_dir() -> Path:
    from facemllm.annotators.model_store import ensure_scrfd_package

    return ensure_scrfd_package()


@pytest.fixture(scope="session")
def served_sample(scrfd_dir, tmp_path_factory):
    """One loopback server and one demo sample for the whole session.

    Urls (and so shard bytes) contain the server's port: runs compared with each other must use
    this same server and sample.
    """
    from facemllm.pipeline.demo.sample import build_demo_sample, package_photos
    from facemllm.pipeline.demo.server import SampleServer

    photos = package_photos(scrfd_dir)
    # a little latency per request keeps the download stage busy long enough to be killed mid-way
    with SampleServer(photos, latency_s=0.05) as server:
        sample = build_demo_sample(tmp_path_factory.mktemp("sample"), server.base_url, photos)
        yield server, sample


@pytest.fixture(scope="session")
def s3_bucket(tmp_path_factory) -> Iterator[str]:
    """A real S3-compatible server (SeaweedFS) for the session and one bucket on it; yields
    ``s3://BUCKET``. The client environment (dummy credentials, the endpoint in
    $FACEMLLM_S3_ENDPOINT) is set for this process and the processes it starts."""
    import fsspec

    from tests.s3server import CLIENT_ENV, SeaweedS3

    environment = pytest.MonkeyPatch()
    with SeaweedS3(tmp_path_factory.mktemp("seaweedfs")) as server:
        for name, value in {**CLIENT_ENV, "FACEMLLM_S3_ENDPOINT": server.endpoint_url}.items():
            environment.setenv(name, value)
        fsspec.filesystem("s3", client_kwargs={"endpoint_url": server.endpoint_url}).mkdir("facemllm-test")
        yield "s3://facemllm-test"
        environment.undo()


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: the venv first on PATH (Beam's worker pool runs `python`)."""
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
