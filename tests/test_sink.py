"""The shard sink: atomic, deterministic, WebDataset-conformant, and a safe reader."""

import io
import tarfile

import pytest

from facemllm.pipeline.core.files import atomic_path, sha256_file
from facemllm.pipeline.core.shards import (
    ShardFormatError,
    ShardWriter,
    UnsafeTarError,
    iter_tar_samples,
    repack_sorted,
)


def write_shard(path, keys):
    with ShardWriter(path) as writer:
        for key in keys:
            writer.add(key, {"jpg": f"img-{key}".encode(), "json": b"{}"})
    return writer.count


def test_shard_is_deterministic(tmp_path):
    assert write_shard(tmp_path / "a.tar", ["k1", "k2", "k3"]) == 3
    write_shard(tmp_path / "b.tar", ["k1", "k2", "k3"])
    assert sha256_file(tmp_path / "a.tar") == sha256_file(tmp_path / "b.tar")
    with tarfile.open(tmp_path / "a.tar") as tar:
        names = tar.getnames()
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())
    assert names == ["k1.jpg", "k1.json", "k2.jpg", "k2.json", "k3.jpg", "k3.json"]
    assert [k for k, _ in iter_tar_samples(tmp_path / "a.tar")] == ["k1", "k2", "k3"]


@pytest.mark.parametrize("key", ["a.b", "", "x/y"])
def test_rejects_bad_keys(tmp_path, key):
    with pytest.raises(ShardFormatError):
        ShardWriter(tmp_path / "s.tar").add(key, {"jpg": b""})


def test_rejects_differing_members_duplicates_and_disorder(tmp_path):
    writer = ShardWriter(tmp_path / "s.tar")
    writer.add("b", {"jpg": b"", "json": b""})
    with pytest.raises(ShardFormatError, match="members"):
        writer.add("c", {"jpg": b""})
    with pytest.raises(ShardFormatError, match="increase"):
        writer.add("b", {"jpg": b"", "json": b""})
    with pytest.raises(ShardFormatError, match="increase"):
        writer.add("a", {"jpg": b"", "json": b""})


def test_error_inside_writer_leaves_no_shard(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "s.tar") as writer:
        writer.add("a", {"jpg": b"x"})
        raise RuntimeError("killed mid-shard")
    assert list(tmp_path.iterdir()) == []


def test_repack_sorts_any_order_deterministically(tmp_path):
    unordered = tmp_path / "img2dataset.tar"
    unordered.write_bytes(
        make_tar(
            [
                ("k3.jpg", b"3"),
                ("k3.json", b"{}"),
                ("k1.jpg", b"1"),
                ("k1.json", b"{}"),
                ("k2.jpg", b"2"),
                ("k2.json", b"{}"),
            ]
        )
    )
    assert repack_sorted(unordered, tmp_path / "sorted.tar") == 3
    assert [key for key, _ in iter_tar_samples(tmp_path / "sorted.tar")] == ["k1", "k2", "k3"]
    write_shard(tmp_path / "direct.tar", [])  # an empty shard is still a valid tar
    assert [key for key, _ in iter_tar_samples(tmp_path / "direct.tar")] == []


def test_failed_write_leaves_nothing(tmp_path):
    final = tmp_path / "out.tar"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def make_tar(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["../evil.jpg", "/etc/evil.jpg", "a/../../evil.jpg"])
def test_reader_rejects_escaping_members(name):
    with pytest.raises(UnsafeTarError):
        list(iter_tar_samples(make_tar([("ok.jpg", b"x"), (name, b"x")])))


def test_reader_rejects_links():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        link = tarfile.TarInfo("k.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(UnsafeTarError):
        list(iter_tar_samples(buffer.getvalue()))


def test_reader_groups_members_by_key():
    data = make_tar([("a.jpg", b"1"), ("a.aligned.jpg", b"2"), ("b.jpg", b"3")])
    assert list(iter_tar_samples(data)) == [("a", {"jpg": b"1", "aligned.jpg": b"2"}), ("b", {"jpg": b"3"})]
