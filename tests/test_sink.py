"""The shard sink: atomic, deterministic, WebDataset-conformant, and a safe reader."""

import io
import tarfile

import pytest

from pipeline.sink import (
    ShardFormatError,
    ShardWriter,
    UnsafeTarError,
    atomic_path,
    iter_tar_samples,
    sha256_file,
)


def write_shard(path, keys):
    writer = ShardWriter(path)
    for key in keys:
        writer.add(key, {"jpg": f"img-{key}".encode(), "json": b"{}"})
    return writer.close()


def test_shard_is_deterministic_and_sorted(tmp_path):
    first = write_shard(tmp_path / "a.tar", ["k2", "k1", "k3"])
    second = write_shard(tmp_path / "b.tar", ["k3", "k1", "k2"])
    assert first.sha256 == second.sha256 == sha256_file(tmp_path / "a.tar")
    assert first.nsamples == 3 and first.bytes == (tmp_path / "a.tar").stat().st_size
    with tarfile.open(tmp_path / "a.tar") as tar:
        names = tar.getnames()
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())
    assert names == ["k1.jpg", "k1.json", "k2.jpg", "k2.json", "k3.jpg", "k3.json"]
    assert [k for k, _ in iter_tar_samples(tmp_path / "a.tar")] == ["k1", "k2", "k3"]


@pytest.mark.parametrize("key", ["a.b", "", "x/y"])
def test_rejects_bad_keys(tmp_path, key):
    with pytest.raises(ShardFormatError):
        ShardWriter(tmp_path / "s.tar").add(key, {"jpg": b""})


def test_rejects_differing_members_and_duplicates(tmp_path):
    writer = ShardWriter(tmp_path / "s.tar")
    writer.add("a", {"jpg": b"", "json": b""})
    with pytest.raises(ShardFormatError):
        writer.add("b", {"jpg": b""})
    with pytest.raises(ShardFormatError):
        writer.add("a", {"jpg": b"", "json": b""})


def test_failed_write_leaves_nothing(tmp_path):
    final = tmp_path / "out.tar"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
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
