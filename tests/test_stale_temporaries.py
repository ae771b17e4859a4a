"""A SIGKILL during the last write of a command (``sizes.json``) leaves a temporary file; the rerun
removes it, and any other temporary at any depth of the command's output, and ends as if never killed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from facemllm.pipeline.cli import main
from tests.conftest import subprocess_env
from tests.test_annotate import FRONTAL, face_record, write_face_shard

HANG_IN_SIZES_WRITE = """
import sys, time
from facemllm.pipeline.core import files
real_commit = files.commit
def commit(tmp, final):
    if final.name == "sizes.json":
        time.sleep(600)  # killed here: the temporary is written, not yet renamed
    real_commit(tmp, final)
files.commit = commit
from facemllm.pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_the_sizes_write_leaves_nothing_after_the_rerun(tmp_path):
    faces = tmp_path / "faces"
    keys = ["000000000_00", "000000000_01"]
    write_face_shard(faces / "00000.tar", {k: face_record(k, (1.0, 1.0, 50.0, 60.0), FRONTAL) for k in keys})
    (faces / "00000_stats.json").write_text("{}")
    out = tmp_path / "annotations"
    args = ["annotate", "--in", str(faces), "--out", str(out), "--template"]
    child = subprocess.Popen([sys.executable, "-c", HANG_IN_SIZES_WRITE, *args], env=subprocess_env())
    deadline = time.monotonic() + 120
    while not list(out.glob(".sizes.json.tmp-*")):
        assert child.poll() is None and time.monotonic() < deadline, "the child ended before the sizes write"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert list(out.glob(".sizes.json.tmp-*")) and not (out / "sizes.json").exists()
    deep = out / "_cache" / "old" / ".00000.jsonl.tmp-0badc0de"
    deep.parent.mkdir(parents=True)
    deep.write_bytes(b"half")

    assert main(args) == 0
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 2}
