"""Beam runner selection from ``RunnerConfig``, and the pipeline every command runs in.

The local default is the FnApiRunner itself (what the DirectRunner delegates to), chosen
explicitly: since Beam 2.68 ``DirectRunner`` first tries Prism, which downloads a binary and fails
offline. ``dask`` is Beam's DaskRunner on a ``dask.distributed`` cluster: an existing scheduler
(``dask_address``: any deployment, dask-kubernetes, dask-jobqueue on SLURM, a hand-started
``dask scheduler`` and ``dask worker``s) or, without one, a local cluster of ``dask_workers``
processes started for the run. Everything else goes through Beam's own runners with standard
pipeline options.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from pydantic import Field, model_validator

from facemllm.schemas import StrictModel


class RunnerConfig(StrictModel):
    """Which Beam runner executes the stages; see README for Dataflow, Flink and Spark."""

    runner: Literal["direct", "dask", "portable", "dataflow", "flink", "spark"] = "direct"
    direct_num_workers: int = Field(2, ge=0, description="0 = one per core")
    direct_running_mode: Literal["in_memory", "multi_threading", "multi_processing"] = "multi_processing"
    dask_address: str | None = Field(
        None, description="dask scheduler to run on (tcp://host:8786); None: a local cluster for the run"
    )
    dask_workers: int = Field(2, ge=1, description="worker processes of the local dask cluster")
    dask_threads_per_worker: int = Field(1, ge=1, description="threads per local dask worker process")
    dask_partitions: int | None = Field(
        None,
        ge=1,
        description="dask partitions each stage's units are spread over (a partition is one task; a "
        "stage's setup, e.g. loading SCRFD, runs once per partition); None: twice the cluster's "
        "worker threads (measured on 2 workers: 4 partitions 81.7 s, 8: 88.5 s, 16: 96.7 s)",
    )
    job_endpoint: str | None = Field(None, description="portable/flink/spark job service host:port")
    environment_type: str | None = Field(None, description="LOOPBACK, EXTERNAL, PROCESS or DOCKER")
    environment_config: str | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("WARNING", description="Beam worker logs")
    options: list[str] = Field(default_factory=list, description="extra Beam pipeline options, verbatim")

    @model_validator(mode="after")
    def _portable_needs_endpoint(self) -> RunnerConfig:
        if self.runner == "portable" and not self.job_endpoint:
            raise ValueError("runner 'portable' needs runner.job_endpoint (e.g. localhost:8099)")
        return self


# One in-process worker: the default of the single-stage commands (annotate, laion-face-qa), whose
# worker's requests are already concurrent and which in managed mode start a server per worker.
IN_PROCESS_WORKER = RunnerConfig(direct_num_workers=1, direct_running_mode="in_memory")

RUNNER_NAMES = {
    "portable": "PortableRunner",
    "dataflow": "DataflowRunner",
    "flink": "FlinkRunner",
    "spark": "SparkRunner",
}


def pipeline_options(config: RunnerConfig):
    from apache_beam.options.pipeline_options import PipelineOptions  # Beam loads only to run

    args = [f"--default_sdk_harness_log_level={config.log_level}", *config.options]
    if config.runner == "direct":
        args += [
            f"--direct_num_workers={config.direct_num_workers}",
            f"--direct_running_mode={config.direct_running_mode}",
        ]
    elif config.runner == "dask":
        if config.dask_partitions:
            args.append(f"--dask_npartitions={config.dask_partitions}")
        if config.dask_address:
            args.append(f"--dask_client_address={config.dask_address}")
    else:
        args.append(f"--runner={RUNNER_NAMES[config.runner]}")
        if config.job_endpoint:
            args.append(f"--job_endpoint={config.job_endpoint}")
    if config.environment_type:
        args.append(f"--environment_type={config.environment_type}")
    if config.environment_config:
        args.append(f"--environment_config={config.environment_config}")
    return PipelineOptions(args, save_main_session=False)


def make_runner(config: RunnerConfig):
    """The runner object for ``beam.Pipeline(runner=...)``; None lets the options choose."""
    if config.runner == "direct":
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    if config.runner == "dask":
        from apache_beam.runners.dask.dask_runner import DaskRunner

        _spread_on_dask()
        return DaskRunner()
    return None


def _spread_on_dask() -> None:
    """Make ``beam.Reshuffle`` spread units over ``dask_partitions`` partitions on the DaskRunner.

    Beam's DaskRunner turns Reshuffle into a no-op, so the units a step emits stay in the partition
    of the unit that emitted them: a run from one metadata file ran every stage in one partition,
    on one worker. Its translations are a table by transform class; this adds one for the
    Reshuffle it leaves, a dask ``Bag.repartition``."""
    from apache_beam.runners.dask import transform_evaluator
    from apache_beam.runners.dask.overrides import _Reshuffle

    class Spread(transform_evaluator.DaskBagOp):
        def apply(self, input_bag, side_inputs=None):
            partitions = self.bag_kwargs.get("npartitions")  # set by beam_pipeline
            return input_bag.repartition(npartitions=partitions) if partitions else input_bag

    transform_evaluator.TRANSLATIONS[_Reshuffle] = Spread


# The environment of every worker process facemllm starts (read by glibc and pyarrow when a process
# starts, so set before the workers are), measured on the scale and select benchmarks:
# - glibc gives each thread that allocates its own malloc arena, up to 8 per core, and a worker's
#   threads (img2dataset's downloads, the streamed face detection) each keep freed image buffers in
#   theirs: a direct worker's peak grew from 888 MB at 2,000 rows to 1,085 MB at 6,000 with the
#   default, and stayed at 709 and 722 MB with 2 arenas, at the same speed;
# - pyarrow's default pool (jemalloc) keeps what it freed: a select worker streaming 200,000 rows
#   peaked at 308 MB with it, 262 MB with the system allocator.
WORKER_ENVIRONMENT = {"MALLOC_ARENA_MAX": "2", "ARROW_DEFAULT_MEMORY_POOL": "system"}

# dask settings for the local cluster's workers (a remote cluster: the same in its dask config, see
# README). Measured on the scale benchmark's 2,000 rows, 2 workers: with dask's defaults the workers
# spent 118 CPU-seconds where the direct runner's spent 93 on the same work. Its statistical profiler
# samples every thread's stack every 10 ms; and its MALLOC_TRIM_THRESHOLD_ (which also turns off
# glibc's adaptive mmap threshold) made every decoded image and detector tensor fresh pages.
WORKER_SETTINGS = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,  # None: not set (dask's rule)
    **{f"distributed.nanny.pre-spawn-environ.{name}": value for name, value in WORKER_ENVIRONMENT.items()},
}


@contextmanager
def dask_cluster(config: RunnerConfig) -> Iterator[RunnerConfig]:
    """``config`` pointed at a running scheduler (its own, or a local cluster of worker processes
    on 127.0.0.1 started here and closed on exit; workers restart when killed: the nanny), with
    its partition count settled."""
    if config.runner != "dask":
        yield config
        return
    import dask
    from distributed import Client, LocalCluster

    if config.dask_address:
        with Client(config.dask_address) as client:
            yield _with_partitions(config, client)
        return
    with (
        dask.config.set(WORKER_SETTINGS),
        LocalCluster(
            n_workers=config.dask_workers,
            threads_per_worker=config.dask_threads_per_worker,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield _with_partitions(config.model_copy(update={"dask_address": cluster.scheduler_address}), client)


def _with_partitions(config: RunnerConfig, client) -> RunnerConfig:
    """``dask_partitions`` as set, else twice the worker threads the cluster has now."""
    if config.dask_partitions:
        return config
    threads = sum(client.nthreads().values())
    return config.model_copy(update={"dask_partitions": max(2, 2 * threads)})


@contextmanager
def beam_pipeline(config: RunnerConfig):
    """The Beam pipeline on the configured runner (a local dask cluster for its lifetime when
    asked for); leaving the block runs it to completion."""
    import apache_beam as beam

    for name, value in WORKER_ENVIRONMENT.items():
        os.environ.setdefault(name, value)  # the direct runner's worker processes inherit it
    with (
        dask_cluster(config) as resolved,
        beam.Pipeline(runner=make_runner(resolved), options=pipeline_options(resolved)) as pipeline,
    ):
        yield pipeline
