"""``runner: dask``: the pipeline on a real ``dask.distributed`` cluster (a scheduler and worker
processes on 127.0.0.1), against the direct runner's output for the same sample server: the same
shards, byte for byte; a worker killed with SIGKILL mid-run; a run whose inputs and output are all
on the S3 server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from facemllm.pipeline.core.storage import STAGING_ENV, Storage, StorageOptions
from facemllm.pipeline.demo.run import demo_config, expected_counts, observed_counts
from facemllm.schemas import RunManifest
from tests.conftest import VENV_BIN, subprocess_env

pytestmark = pytest.mark.slow
STAGES = "stages=[select, download, faces, annotate, laion_face_qa]"


def write_config(sample, out: str, folder: Path, *overrides: str) -> Path:
    path = folder / f"{abs(hash(out)) % 10**8}.yaml"
    path.write_text(yaml.safe_dump(demo_config(sample, out, [STAGES, *overrides]).model_dump(mode="json")))
    return path


def start_run(config: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "facemllm.pipeline.cli", "run", "--no-progress", str(config)],
        env={**subprocess_env(), **(env or {})},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def shard_digests(manifest: RunManifest) -> dict[str, dict]:
    """stage -> its shards (url, sha256, samples, bytes) and counts: what must not depend on the runner."""
    return {
        stage: {"shards": [s.model_dump() for s in m.shards], "counts": m.counts}
        for stage, m in manifest.stages.items()
    }


def manifest_of(out: Path) -> RunManifest:
    return RunManifest.model_validate_json((out / "manifest.json").read_text())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class HandStartedCluster:
    """``dask scheduler`` and ``dask worker`` processes, as a user starts them on their machines.
    ``own_disks``: each worker gets its own staging folder, as on machines that share no disk."""

    def __init__(self, workers: int, folder: Path, own_disks: bool = False):
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.folder = folder
        self.processes: list[subprocess.Popen] = []
        self.workers = workers
        self.own_disks = own_disks

    def __enter__(self) -> HandStartedCluster:
        dask = str(VENV_BIN / "dask")
        port = self.address.rsplit(":", 1)[1]
        self._start([dask, "scheduler", "--host", "127.0.0.1", "--port", port, "--dashboard-address", ":0"])
        for index in range(self.workers):
            self._start(
                [
                    dask,
                    "worker",
                    self.address,
                    "--nworkers",
                    "1",
                    "--nthreads",
                    "1",
                    "--host",
                    "127.0.0.1",
                    "--dashboard-address",
                    ":0",
                    "--local-directory",
                    str(self.folder / f"worker-{index}"),
                ],
                {STAGING_ENV: str(self.folder / f"staging-{index}")} if self.own_disks else {},
            )
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(self.workers, timeout=120)
        return self

    def _start(self, command: list[str], env: dict | None = None) -> None:
        log = open(self.folder / f"{len(self.processes)}.log", "w")  # noqa: SIM115 - closed with the process
        self.processes.append(
            subprocess.Popen(
                command,
                env={**subprocess_env(), **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> the worker process (its nanny restarts it when it dies)."""
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            return client.run(os.getpid)

    def busy_worker(self) -> int | None:
        """The process of a worker running a task now, if any."""
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            busy = [address for address, tasks in client.processing().items() if tasks]
            return client.run(os.getpid)[busy[0]] if busy else None

    def executed(self) -> dict[str, int]:
        """Worker address -> tasks it has run so far (a worker restarted by its nanny starts from 0)."""
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            return client.run(lambda dask_worker: dask_worker.state.executed_count)

    def __exit__(self, *exc) -> None:
        for process in reversed(self.processes):
            os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def direct_reference(served_sample, tmp_path_factory) -> RunManifest:
    _, sample = served_sample
    folder = tmp_path_factory.mktemp("direct")
    finish(start_run(write_config(sample, str(folder / "out"), folder)))
    return manifest_of(folder / "out")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[HandStartedCluster]:
    with HandStartedCluster(2, tmp_path_factory.mktemp("dask")) as cluster:
        yield cluster


def test_a_dask_cluster_writes_the_same_shards_as_the_direct_runner(
    served_sample, direct_reference, cluster, tmp_path
):
    _, sample = served_sample
    out = tmp_path / "out"
    config = write_config(
        sample, str(out), tmp_path, "runner.runner=dask", f"runner.dask_address={cluster.address}"
    )
    before = cluster.executed()
    finish(start_run(config))
    ran = [count - before.get(address, 0) for address, count in cluster.executed().items()]
    assert min(ran) > 10  # the pipeline ran as tasks of this cluster, on both workers
    manifest = manifest_of(out)
    assert observed_counts(manifest) == expected_counts(sample)
    assert shard_digests(manifest) == shard_digests(direct_reference)


def test_a_worker_killed_mid_run_changes_nothing(served_sample, direct_reference, cluster, tmp_path):
    _, sample = served_sample
    out = tmp_path / "out"
    config = write_config(
        sample, str(out), tmp_path, "runner.runner=dask", f"runner.dask_address={cluster.address}"
    )
    before = set(cluster.worker_pids().values())
    process = start_run(config)
    deadline = time.monotonic() + 240
    victim = None
    while victim is None:  # killed while it runs a task, once faces are being detected
        assert process.poll() is None, "the run ended before the kill point:\n" + process.stdout.read()
        assert time.monotonic() < deadline, "no worker was busy after a face shard completed"
        if list((out / "faces").glob("*_stats.json")):
            victim = cluster.busy_worker()
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    finish(process)
    after = set(cluster.worker_pids().values())
    assert victim not in after and len(after) == 2 and after != before  # the nanny started a new one
    assert shard_digests(manifest_of(out)) == shard_digests(direct_reference)


def test_inputs_and_output_on_s3_with_workers_that_share_no_disk(
    served_sample, direct_reference, s3_bucket, tmp_path
):
    """Metadata, id list and out on the S3 server; the driver and each of two hand-started workers
    have their own staging folder, as on separate machines: only the store connects them."""
    _, sample = served_sample
    inputs = Storage(f"{s3_bucket}/dask-inputs", StorageOptions(progress=False))
    inputs.write_bytes("part-00000.parquet", sample.metadata_path.read_bytes())
    inputs.write_bytes("laion_face_ids.pth", sample.face_ids_path.read_bytes())  # the published container
    out = f"{s3_bucket}/dask-run"
    with HandStartedCluster(2, tmp_path, own_disks=True) as machines:
        config = write_config(
            sample,
            out,
            tmp_path,
            "runner.runner=dask",
            f"runner.dask_address={machines.address}",
            f'select.metadata=["{s3_bucket}/dask-inputs/part-*.parquet"]',
            f"select.ids={s3_bucket}/dask-inputs/laion_face_ids.pth",
        )
        finish(start_run(config, {STAGING_ENV: str(tmp_path / "driver-staging")}))
    manifest = RunManifest.model_validate(
        Storage(out, StorageOptions(progress=False)).read_json("manifest.json")
    )
    assert observed_counts(manifest) == expected_counts(sample)
    assert shard_digests(manifest) == shard_digests(direct_reference)
    driver = tmp_path / "driver-staging"
    assert not list(driver.glob("*/*/*.tar")), "the driver downloaded shards; it needs only the markers"
    # the driver's live progress read the workers' markers from the store
    (log,) = driver.glob("*/logs/progress.jsonl")
    *units, last = [json.loads(line) for line in log.read_text().splitlines()]
    assert len([u for u in units if u["stage"] == "faces"]) == len(manifest.stages["faces"].shards)
    assert last["totals"]["annotate"]["items"] == manifest.stages["faces"].counts["samples"]


def _worker_settings() -> tuple[str | None, dict, bool, str]:
    import dask.config

    from facemllm.pipeline.runners import WORKER_ENVIRONMENT

    return (
        os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        {name: os.environ.get(name) for name in WORKER_ENVIRONMENT},
        dask.config.get("distributed.worker.profile.enabled"),
        dask.config.get("distributed.admin.tick.interval"),
    )


def test_the_local_cluster_workers_run_without_the_profiler_and_the_malloc_trim_setting():
    """dask's defaults cost the scale benchmark's workers 27% more CPU, and per-thread malloc arenas
    made their memory grow with the run (README, Runners)."""
    from distributed import Client

    from facemllm.pipeline.runners import RunnerConfig, dask_cluster

    with (
        dask_cluster(RunnerConfig(runner="dask", dask_workers=1)) as config,
        Client(config.dask_address) as client,
    ):
        settings = list(client.run(_worker_settings).values())
    assert settings == [(None, {"MALLOC_ARENA_MAX": "2", "ARROW_DEFAULT_MEMORY_POOL": "system"}, False, "1s")]


def test_the_direct_runner_workers_get_the_worker_environment(tmp_path, monkeypatch):
    """Per-thread malloc arenas made a direct worker's memory grow with the run, and pyarrow's jemalloc
    pool kept what it freed (README, Runners)."""
    import apache_beam as beam

    from facemllm.pipeline.runners import RunnerConfig, beam_pipeline

    for name in ("MALLOC_ARENA_MAX", "ARROW_DEFAULT_MEMORY_POOL"):
        monkeypatch.delenv(name, raising=False)
    folder = str(tmp_path)

    def report(unit: int) -> int:  # a local function: pickled by value for the worker processes
        import os
        from pathlib import Path

        import pyarrow

        seen = [os.environ.get("MALLOC_ARENA_MAX", ""), pyarrow.default_memory_pool().backend_name]
        Path(folder, str(os.getpid())).write_text(" ".join(seen))
        return unit

    with beam_pipeline(RunnerConfig(direct_num_workers=2)) as pipeline:
        _ = pipeline | beam.Create(range(4)) | beam.Reshuffle() | beam.Map(report)
    reports = {path.name: path.read_text() for path in tmp_path.iterdir()}
    assert reports and str(os.getpid()) not in reports and set(reports.values()) == {"2 system"}
