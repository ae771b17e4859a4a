"""``python -m facemllm.pipeline.cli``: the ``facemllm`` command without its console script."""

import sys

from facemllm.pipeline.cli import main

sys.exit(main())
