"""The run manifest ``{run}/manifest.json`` and input fingerprints.

One JSON document per run, rewritten atomically (temp + rename) after every change, so a reader or
a crashed driver never sees a torn file. Per stage it records::

    {"name", "status": pending|running|done|failed|skipped|refused,
     "outcome": done|refused (the last real execution; kept when a rerun skips the stage),
     "sections", "config_hash", "inputs": {uri: fingerprint}, "outputs": [uri],
     "started_at", "ended_at", "duration_s", "rows", "tokens", "tokens_per_s", "cost", "message",
     "attempts", "metrics": {...}}

A fingerprint is a short hash of what a stage consumed: for a data folder the names and sizes of
its Parquet shards (so a rerun that rewrites identical shards keeps the fingerprint), for another
folder with a ``manifest.json`` the manifest's bytes, for a file its bytes (or size + mtime when
large), for anything else the sorted names and sizes under it; ``"missing"`` when absent.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import posixpath
from collections.abc import Iterable
from typing import Any

from cluster import storage

MANIFEST = "manifest.json"
STATUSES = ("pending", "running", "done", "failed", "skipped", "refused")
# Stages whose last real execution completed (a rerun may skip them).
COMPLETED = ("done", "refused")
_HASH_BYTES_LIMIT = 64 * 1024 * 1024


def utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(uri: str) -> str:
    """Short content hash of a file or folder (see the module docstring); ``"missing"`` if absent."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        return "missing"
    if fs.isfile(path):
        info = fs.info(path)
        size = int(info.get("size") or 0)
        if size <= _HASH_BYTES_LIMIT:
            return _sha(storage.read_bytes(uri))
        return _sha(f"{size}:{info.get('mtime') or info.get('LastModified') or info.get('created')}".encode())
    entries = [
        (posixpath.basename(n["name"].rstrip("/")), int(n.get("size") or 0))
        for n in fs.ls(path, detail=True)
        if n.get("type") == "file"
    ]
    entries = [e for e in entries if not e[0].startswith(storage.TMP_PREFIX)]
    shards = sorted(e for e in entries if e[0].endswith(".parquet"))
    names = {e[0] for e in entries}
    if shards:
        return _sha(json.dumps({"shards": shards, "complete": MANIFEST in names}).encode())
    if MANIFEST in names:
        return _sha(storage.read_bytes(storage.join(uri, MANIFEST)))
    found = fs.find(path, detail=True)
    listing = sorted(
        (posixpath.relpath(name, path), int(info.get("size") or 0))
        for name, info in found.items()
        if not posixpath.basename(name).startswith(storage.TMP_PREFIX)
    )
    return _sha(json.dumps(listing).encode())


def fingerprints(uris: Iterable[str]) -> dict[str, str]:
    return {uri: fingerprint(uri) for uri in uris}


def new_stage_entry(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "status": "pending",
        "outcome": None,
        "sections": [],
        "config_hash": None,
        "inputs": {},
        "outputs": [],
        "started_at": None,
        "ended_at": None,
        "duration_s": None,
        "rows": None,
        "tokens": None,
        "tokens_per_s": None,
        "cost": None,
        "message": "",
        "attempts": 0,
        "metrics": {},
    }


class RunManifest:
    """``{run}/manifest.json``: load, update one stage, save (atomically) - nothing else touches the file."""

    def __init__(self, run_dir: str, data: dict[str, Any]):
        self.run_dir = run_dir
        self.data = data

    @property
    def uri(self) -> str:
        return storage.join(self.run_dir, MANIFEST)

    @staticmethod
    def path(run_dir: str) -> str:
        return storage.join(run_dir, MANIFEST)

    @classmethod
    def load(cls, run_dir: str) -> RunManifest | None:
        uri = cls.path(run_dir)
        if not storage.exists(uri):
            return None
        return cls(run_dir, storage.read_json(uri))

    @classmethod
    def open(cls, run_dir: str, *, name: str, run_id: str, stages: list[str]) -> RunManifest:
        """The run's manifest, created when absent; every stage in ``stages`` gets an entry (in order)."""
        manifest = cls.load(run_dir) or cls(
            run_dir,
            {
                "name": name,
                "run_id": run_id,
                "run_dir": run_dir,
                "status": "pending",
                "created_at": utcnow(),
                "updated_at": None,
                "finished_at": None,
                "stages": [],
                "invocations": [],
                "summary": {},
            },
        )
        known = {s["name"]: s for s in manifest.data["stages"]}
        ordered = [known.pop(n, None) or new_stage_entry(n) for n in stages]
        # Stages no longer in pipeline.stages stay listed after the current ones (their outputs still exist).
        manifest.data["stages"] = ordered + list(known.values())
        manifest.save()
        return manifest

    def save(self) -> None:
        self.data["updated_at"] = utcnow()
        storage.atomic_write_json(self.uri, self.data)

    def stage(self, name: str) -> dict[str, Any]:
        for entry in self.data["stages"]:
            if entry["name"] == name:
                return entry
        entry = new_stage_entry(name)
        self.data["stages"].append(entry)
        return entry

    def update_stage(self, name: str, **fields: Any) -> dict[str, Any]:
        entry = self.stage(name)
        entry.update(fields)
        self.save()
        return entry

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    @property
    def status(self) -> str:
        return self.data.get("status", "pending")

    def stage_names(self) -> list[str]:
        return [s["name"] for s in self.data["stages"]]
