"""cluster.storage on local paths and memory:// URIs."""

from __future__ import annotations

import uuid

import pytest

from cluster import storage
from cluster.errors import RaydistillError


@pytest.fixture(params=["local", "memory"])
def base(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "store")
        return
    uri = f"memory://raydistill-test-{uuid.uuid4().hex}"
    yield uri
    storage.remove(uri, recursive=True)


def _names(uris):
    return [u.rstrip("/").rsplit("/", 1)[-1] for u in uris]


def test_join_keeps_protocol_and_strips_slashes():
    assert storage.join("s3://bucket/x/", "/y/", "z.parquet") == "s3://bucket/x/y/z.parquet"
    assert storage.join("memory://a", "b") == "memory://a/b"
    assert storage.join("runs", "", "q") == "runs/q"
    assert storage.join("/abs/dir/", "f") == "/abs/dir/f"


def test_is_local_and_absolute(tmp_path, monkeypatch):
    assert storage.is_local("runs/x") and storage.is_local("file:///tmp/x")
    assert not storage.is_local("s3://b/k") and not storage.is_local("memory://x")
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("runs") == str(tmp_path / "runs")
    assert storage.absolute("s3://b/k") == "s3://b/k"


def test_write_read_roundtrip(base):
    uri = storage.join(base, "deep", "nested", "obj.json")
    assert not storage.exists(uri)
    storage.atomic_write_json(uri, {"b": 1, "a": [1, 2]})
    assert storage.exists(uri)
    assert storage.read_json(uri) == {"a": [1, 2], "b": 1}
    storage.atomic_write_text(uri, "überschrieben")  # overwrite in place
    assert storage.read_text(uri) == "überschrieben"
    storage.atomic_write_bytes(storage.join(base, "raw.bin"), b"\x00\x01")
    assert storage.read_bytes(storage.join(base, "raw.bin")) == b"\x00\x01"


def test_atomic_open_leaves_nothing_on_exception(base):
    uri = storage.join(base, "out", "part-00000.parquet")
    storage.atomic_write_bytes(uri, b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.atomic_open(uri, "wb") as handle:
            handle.write(b"half-written")
            raise RuntimeError("boom")
    # The previous content is intact and no temp sibling remains.
    assert storage.read_bytes(uri) == b"old"
    fs, path = storage.filesystem(storage.join(base, "out"))
    assert _names(fs.ls(path, detail=False)) == ["part-00000.parquet"]


def test_atomic_open_new_file_absent_after_exception(base):
    uri = storage.join(base, "new.txt")
    with pytest.raises(ValueError):
        with storage.atomic_open(uri, "w") as handle:
            handle.write("x")
            raise ValueError
    assert not storage.exists(uri)
    assert storage.listdir(base) == []
    fs, path = storage.filesystem(base)
    assert [n for n in _names(fs.ls(path, detail=False)) if n.startswith(storage.TMP_PREFIX)] == []


def test_atomic_open_rejects_read_modes(base):
    with pytest.raises(ValueError):
        with storage.atomic_open(storage.join(base, "x"), "rb"):
            pass


def test_listdir_sorted_suffix_and_hides_temp_files(base):
    for name in ["b.parquet", "a.parquet", "manifest.json"]:
        storage.atomic_write_bytes(storage.join(base, name), b"x")
    # A temp file as left by a crashed writer elsewhere.
    fs, path = storage.filesystem(base)
    with fs.open(f"{path}/{storage.TMP_PREFIX}123-c.parquet", "wb") as handle:
        handle.write(b"partial")
    assert storage.listdir(base, ".parquet") == [storage.join(base, "a.parquet"), storage.join(base, "b.parquet")]
    assert _names(storage.listdir(base)) == ["a.parquet", "b.parquet", "manifest.json"]
    assert storage.listdir(storage.join(base, "missing")) == []


def test_glob(base):
    for name in ["x/1.jsonl", "x/2.jsonl", "x/3.csv", "y/4.jsonl"]:
        storage.atomic_write_text(storage.join(base, name), "{}\n")
    hits = storage.glob(storage.join(base, "x", "*.jsonl"))
    assert _names(hits) == ["1.jsonl", "2.jsonl"]
    assert _names(storage.glob(storage.join(base, "*", "*.jsonl"))) == ["1.jsonl", "2.jsonl", "4.jsonl"]
    # Results are usable URIs (protocol kept for non-local filesystems).
    assert all(storage.read_text(h) == "{}\n" for h in hits)
    if base.startswith("memory://"):
        assert all(h.startswith("memory://") for h in hits)
    assert storage.glob(storage.join(base, "none", "*.jsonl")) == []


def test_missing_file_is_raydistill_error(base):
    with pytest.raises(RaydistillError, match="file not found"):
        storage.read_text(storage.join(base, "nope.json"))


def test_remove(base):
    storage.atomic_write_text(storage.join(base, "d", "f.txt"), "x")
    storage.remove(storage.join(base, "d"), recursive=True)
    assert not storage.exists(storage.join(base, "d", "f.txt"))
    storage.remove(storage.join(base, "never-existed"))  # no error


def test_unknown_protocol_names_uri():
    with pytest.raises(RaydistillError, match="nosuchproto://x"):
        storage.filesystem("nosuchproto://x/y")
