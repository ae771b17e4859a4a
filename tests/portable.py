"""Beam's portable path on one machine: a local job service and an EXTERNAL worker pool."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tests.conftest import subprocess_env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


@contextmanager
def local_portable_services(log_dir: Path):
    """Yield (job_endpoint, worker_pool_address); both services stop on exit."""
    job_port, pool_port = free_port(), free_port()
    commands = {
        job_port: [
            sys.executable,
            "-m",
            "apache_beam.runners.portability.local_job_service_main",
            "--port",
            str(job_port),
        ],
        pool_port: [
            sys.executable,
            "-m",
            "apache_beam.runners.worker.worker_pool_main",
            "--service_port",
            str(pool_port),
        ],
    }
    with ExitStack() as stack:
        for port, command in commands.items():
            log = stack.enter_context(open(log_dir / f"service-{port}.log", "w"))
            process = subprocess.Popen(
                command, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            stack.callback(_stop, process)
            wait_for_port(port, process)
        yield f"localhost:{job_port}", f"localhost:{pool_port}"


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
