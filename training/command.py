"""One training stage from the command line: ``facemllm train`` and ``python -m facemllm.training``
(what ``torchrun`` launches) share these arguments and this entry point."""

from __future__ import annotations

import argparse

from facemllm.pipeline.core.config import add_override_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML stage config (configs/stage1.yaml, stage2.yaml, stage3.yaml)")
    add_override_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Train the configured stage; 0 when it completed (or was interrupted cleanly and can resume)."""
    from facemllm.training.config import load_train_config

    config = load_train_config(args.config, args.overrides)  # a bad config stops before torch loads
    from facemllm.training.loop import train

    summary = train(config)
    return 0 if summary["status"] in ("completed", "interrupted") else 1
