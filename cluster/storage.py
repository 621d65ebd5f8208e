"""fsspec storage helpers used by every stage.

Every artifact path in raydistill is a URI: a local path (the default), ``memory://``,
``s3://`` (extra ``[s3]``) or ``gs://`` (extra ``[gcs]``). Writes are atomic: data goes to a
temporary sibling first and is renamed into place, so a crash never leaves a torn file and a
rerun never sees a half-written one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from cluster.errors import RaydistillError

TMP_PREFIX = ".tmp-"


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for a URI, with a clear error when its protocol is not installed."""
    try:
        return url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        scheme = uri.split("://", 1)[0] if "://" in uri else "file"
        hint = {
            "s3": "pip install 'raydistill[s3]'",
            "gs": "pip install 'raydistill[gcs]'",
            "gcs": "pip install 'raydistill[gcs]'",
        }.get(scheme, "check the URI")
        raise RaydistillError(f"cannot open storage URI {uri!r} ({exc}); {hint}") from exc


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str, why: str = "this stage writes model folders") -> str:
    """The local path of a local (or ``file://``) URI; a clear error for remote storage."""
    if not is_local(uri):
        raise RaydistillError(
            f"{uri}: {why} and needs a local or shared-filesystem path; set workdir to a "
            "local folder or a mount of your bucket"
        )
    return uri.removeprefix("file://")


def local_copy(uri: str) -> str:
    """A local directory holding the folder at ``uri``: local paths in place, remote ones downloaded once
    (under the temp dir, keyed by the URI) and reused while their ``config.json`` is there."""
    if is_local(uri):
        return uri.removeprefix("file://")
    fs, path = filesystem(uri)
    local = Path(tempfile.gettempdir()) / "raydistill-models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (local / "config.json").exists():
        fs.get(path.rstrip("/") + "/", str(local) + "/", recursive=True)
    return str(local)


def publish_dir(staged: str | Path, final: str | Path) -> Path:
    """Put the local folder ``staged`` at ``final`` by renames, replacing what was there: readers see the old
    folder or the new one, never half of one. ``staged`` should be a sibling (same filesystem)."""
    staged, final = Path(staged), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the protocol (``s3://b/x`` + ``y`` -> ``s3://b/x/y``)."""
    out = str(base).rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def absolute(uri: str) -> str:
    """Local paths become absolute (Ray workers run in other directories); URIs stay as they are."""
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def listdir(uri: str, suffix: str = "") -> list[str]:
    """Sorted full URIs of the entries directly under ``uri`` (temp files hidden), ``[]`` if absent."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    names = (posixpath.basename(n.rstrip("/")) for n in fs.ls(path, detail=False))
    return sorted(join(uri, n) for n in names if not n.startswith(TMP_PREFIX) and n.endswith(suffix))


def expand(uri: str) -> list[str]:
    """A glob's sorted matches (``*``, ``?`` or ``[`` in ``uri``), else ``[uri]`` itself (not checked)."""
    return glob(uri) if any(c in uri for c in "*?[") else [uri]


def glob(pattern: str) -> list[str]:
    """Expand a glob (``data/*.jsonl``, ``s3://b/p/*.parquet``) into sorted full URIs."""
    fs, path = filesystem(pattern)
    matches = sorted(fs.glob(path))
    return matches if is_local(pattern) else [fs.unstrip_protocol(m) for m in matches]


def _tmp_sibling(path: str) -> str:
    return posixpath.join(posixpath.dirname(path), f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(path)}")


@contextlib.contextmanager
def atomic_open(uri: str, mode: str = "wb") -> Iterator[Any]:
    """Open ``uri`` for writing; the file appears under its name only if the block succeeds."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes only ('w' or 'wb'), got mode={mode!r}")
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with fs.open(tmp, mode) as handle:
            yield handle
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp)
        raise


def atomic_write_bytes(uri: str, data: bytes) -> None:
    with atomic_open(uri, "wb") as handle:
        handle.write(data)


def atomic_write_text(uri: str, text: str) -> None:
    atomic_write_bytes(uri, text.encode("utf-8"))


def atomic_write_json(uri: str, obj: Any) -> None:
    atomic_write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError as exc:
        raise RaydistillError(f"file not found: {uri}") from exc


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
