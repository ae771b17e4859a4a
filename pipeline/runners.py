"""Beam runner selection from ``RunnerConfig``.

The local default is the FnApiRunner itself (what the DirectRunner delegates to), chosen
explicitly: since Beam 2.68 ``DirectRunner`` first tries Prism, which downloads a binary and fails
offline. Everything else goes through Beam's own runners with standard pipeline options.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

from facemllm.pipeline.config import RunnerConfig

RUNNER_NAMES = {
    "portable": "PortableRunner",
    "dataflow": "DataflowRunner",
    "flink": "FlinkRunner",
    "spark": "SparkRunner",
}


def pipeline_options(config: RunnerConfig) -> PipelineOptions:
    args = [f"--default_sdk_harness_log_level={config.log_level}", *config.options]
    if config.runner == "direct":
        args += [
            f"--direct_num_workers={config.direct_num_workers}",
            f"--direct_running_mode={config.direct_running_mode}",
        ]
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
    return None
