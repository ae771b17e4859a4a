"""Keep the console for what a person reads: Beam's and its worker harnesses' chatter goes to a log.

Beam logs every worker start, channel and bundle at INFO from processes it spawns (the SDK
harnesses of the multi-process direct runner, img2dataset's pool), which inherit the driver's
standard error; their log level is set only after they have said most of it. So while a pipeline
runs, file descriptor 2 itself points at ``OUT/logs/beam.log``: everything any process writes to
standard error lands there, and the driver's own warnings (``facemllm.*`` loggers) and the live
progress table go to the console through a copy of the original descriptor.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

BEAM_LOG = Path("logs") / "beam.log"


@contextmanager
def chatter_to_log(log: Path) -> Iterator[TextIO]:
    """Standard error of this process and every process it starts goes to ``log`` (appended)
    inside the block; yields a stream to the console as it was, for the progress table."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    console_fd = os.dup(2)
    console = os.fdopen(os.dup(console_fd), "w", buffering=1)
    handler = logging.StreamHandler(console)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    ours = logging.getLogger("facemllm")
    ours.addHandler(handler)
    with open(log, "ab") as sink:
        os.dup2(sink.fileno(), 2)
    try:
        yield console
    finally:
        sys.stderr.flush()
        os.dup2(console_fd, 2)
        os.close(console_fd)
        ours.removeHandler(handler)
        console.close()
