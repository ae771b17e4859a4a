"""``python -m facemllm.training CONFIG [--set key=value ...]``: one training stage (what torchrun launches).

torchrun --nproc_per_node 8 -m facemllm.training configs/stage2.yaml --set output_dir=runs/stage2
"""

from __future__ import annotations

import sys

from facemllm.pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
