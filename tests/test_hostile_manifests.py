"""Manifests are outside data: a shard url that leaves OUT or DEST is refused by every reader and
writer (publish, verify, remove), through the one path check in ``Storage``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from facemllm.pipeline.core.storage import Storage, StorageOptions, UnsafePathError, checked_relative
from facemllm.pipeline.publishing.layout import CURRENT_MANIFEST, version_manifest_name
from facemllm.pipeline.publishing.publish import publish
from facemllm.pipeline.publishing.remove import RemovalRequest, remove
from facemllm.pipeline.publishing.verify import verify
from tests.test_publish import FIRST_SAMPLE_ID, QUIET, build_run

OPTIONS = StorageOptions(**QUIET)


@pytest.mark.parametrize(
    "rel",
    [
        "../outside/victim.tar",
        "/etc/passwd",
        "faces/../../x.tar",
        "..",
        "",
        ".",
        "a//b.tar",
        "./a.tar",
        "faces/",
        "a\\..\\b.tar",
        "a\x00.tar",
        "C:/x.tar",
        "s3://bucket/key.tar",
        "file:///etc/passwd",
    ],
)
def test_paths_that_leave_the_root_are_refused(rel, tmp_path):
    with pytest.raises(UnsafePathError):
        checked_relative(rel)
    with pytest.raises(UnsafePathError):
        Storage(tmp_path).path(rel)


def test_ordinary_paths_pass(tmp_path):
    storage = Storage(tmp_path)
    assert checked_relative("qa/celeba/train/00000.tar") == "qa/celeba/train/00000.tar"
    assert storage.path("faces/v2/00001.tar") == f"{tmp_path}/faces/v2/00001.tar"
    assert storage.glob("*/manifest.json") == []


def test_a_symbolic_link_out_of_the_root_is_refused(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "faces").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        Storage(tmp_path / "root").path("faces/00000.tar")


@pytest.fixture
def published(tmp_path) -> tuple[Path, Path]:
    """A local DEST holding one published run, and the folder beside it a hostile manifest aims at."""
    out = tmp_path / "out"
    build_run(out)
    dest = tmp_path / "dest"
    publish(out, str(dest), OPTIONS)
    return dest, tmp_path / "outside"


def point_first_face_shard_outside(dest: Path, outside: Path) -> None:
    """Rewrite the current manifest (and its version file) so the first face shard is '../outside/...',
    with a real copy of the shard there: the attack reads and writes that file."""
    manifest = json.loads((dest / CURRENT_MANIFEST).read_text())
    shard = manifest["stages"]["faces"]["shards"][0]
    outside.mkdir(exist_ok=True)
    shutil.copyfile(dest / shard["url"], outside / "victim.tar")
    shard["url"] = "../outside/victim.tar"
    for name in (CURRENT_MANIFEST, version_manifest_name(manifest["version"])):
        (dest / name).write_text(json.dumps(manifest))


def test_verify_never_reads_outside_dest(published):
    dest, outside = published
    point_first_face_shard_outside(dest, outside)
    report = verify(str(dest), OPTIONS)
    assert [(p.url, p.problem.split(":")[0]) for p in report.problems] == [
        ("../outside/victim.tar", "unsafe url")
    ]


def test_remove_never_writes_outside_dest(published):
    dest, outside = published
    point_first_face_shard_outside(dest, outside)
    before = sorted(p.relative_to(outside) for p in outside.rglob("*"))
    with pytest.raises(UnsafePathError):
        remove(str(dest), RemovalRequest([str(FIRST_SAMPLE_ID)]), OPTIONS)
    assert sorted(p.relative_to(outside) for p in outside.rglob("*")) == before  # no v2/, no sizes.json
    assert json.loads((dest / CURRENT_MANIFEST).read_text())["version"] == 1


def test_publish_never_reads_outside_out_nor_writes_outside_dest(tmp_path):
    out = tmp_path / "out"
    build_run(out)
    manifest = json.loads((out / CURRENT_MANIFEST).read_text())
    shard = manifest["stages"]["images"]["shards"][0]
    (tmp_path / "secret").mkdir()
    shutil.copyfile(out / shard["url"], tmp_path / "secret" / "00000.tar")
    shard["url"] = "../secret/00000.tar"
    (out / CURRENT_MANIFEST).write_text(json.dumps(manifest))
    dest = tmp_path / "site" / "dest"
    with pytest.raises(UnsafePathError):
        publish(out, str(dest), OPTIONS)
    assert sorted(p.name for p in (tmp_path / "site").rglob("*")) in ([], ["dest"])
    assert not (dest / CURRENT_MANIFEST).exists()
