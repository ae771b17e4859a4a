"""``python -m facemllm.training CONFIG [--set key=value ...]``: one training stage (what torchrun launches).

torchrun --nproc_per_node 8 -m facemllm.training configs/stage2.yaml --set output_dir=runs/stage2
"""

from __future__ import annotations

import argparse
import sys

from facemllm.training.command import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m facemllm.training", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
