"""Arguments of ``facemllm annotate`` (kept free of Beam, so ``facemllm --help`` stays instant).

Flags cover the common settings; every other ``annotate`` or ``runner`` setting is a ``--set``
override (``--set annotate.temperature=0``, ``--set runner.direct_num_workers=2``).
"""

from __future__ import annotations

import argparse
import os
import shlex

from facemllm.annotators.annotate_config import AnnotateConfig
from facemllm.pipeline.core.config import apply_overrides
from facemllm.pipeline.runners import IN_PROCESS_WORKER, RunnerConfig
from facemllm.schemas import StrictModel

VLLM_PYTHON_ENV = "FACEMLLM_VLLM_PYTHON"


class AnnotateJob(StrictModel):
    annotate: AnnotateConfig
    runner: RunnerConfig = IN_PROCESS_WORKER


def add_annotate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="input", required=True, help="folder of face shards (OUT/faces)")
    parser.add_argument("--out", required=True, help="folder for annotation shards (OUT/annotations)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--endpoint", help="OpenAI-compatible base URL of a running server, e.g. http://h:8000/v1"
    )
    mode.add_argument(
        "--server-model", help="managed mode: model folder or name for a vLLM server per worker"
    )
    mode.add_argument(
        "--template",
        action="store_true",
        help="no model: the labelled template annotator (geometry + alt text)",
    )
    parser.add_argument("--model", help="served model name the requests carry (required with --endpoint)")
    parser.add_argument(
        "--server-python",
        default=os.environ.get(VLLM_PYTHON_ENV, "python"),
        help=f"managed mode: python with vLLM installed (default ${VLLM_PYTHON_ENV} or 'python')",
    )
    parser.add_argument(
        "--server-args",
        default="",
        help="managed mode: extra vLLM server arguments as one string, e.g. '--max-model-len 8192'",
    )
    parser.add_argument("--prompt", help="prompt version (face-v1, face-v1-compact) or a prompt YAML path")
    parser.add_argument("--concurrency", type=int, help="requests in flight per worker (default 32)")
    parser.add_argument("--max-tokens", type=int, help="completion token budget per request (default 1024)")


def annotate_job_from_args(args: argparse.Namespace) -> tuple[AnnotateConfig, RunnerConfig]:
    annotate: dict = {}
    if args.template:
        annotate["annotator"] = "template"
    if args.endpoint:
        annotate["endpoint"] = args.endpoint
    if args.server_model:
        annotate["server"] = {
            "model": args.server_model,
            "python": args.server_python,
            "args": shlex.split(args.server_args),
        }
    for flag, field in (
        ("model", "model"),
        ("prompt", "prompt"),
        ("concurrency", "concurrency"),
        ("max_tokens", "max_tokens"),
    ):
        if getattr(args, flag) is not None:
            annotate[field] = getattr(args, flag)
    data = apply_overrides({"annotate": annotate}, args.overrides)
    job = AnnotateJob.model_validate(data)
    return job.annotate, job.runner
