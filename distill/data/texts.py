"""Plain-text inputs: a ``.txt`` file (one text) or ``.jsonl`` (a ``text`` field per line), on any fsspec URI."""

from __future__ import annotations

import json

from cluster import storage
from cluster.errors import RaydistillError


def read_texts(uri: str, field: str) -> list[str]:
    """The non-empty texts of one file. ``field`` names the config key in error messages."""
    if not storage.exists(uri):
        raise RaydistillError(f"{field}: {uri} does not exist; fix the path or remove it from {field}")
    raw = storage.read_text(uri)
    if uri.endswith((".jsonl", ".json")):
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RaydistillError(
                    f'{field}: {uri} line {number} is not JSON ({exc}); write one {{"text": ...}} object per line'
                ) from exc
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise RaydistillError(f"{field}: {uri} line {number} has no string 'text' field")
            texts.append(text)
    else:
        texts = [raw]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise RaydistillError(f"{field}: {uri} is empty (no text); give a file with text or remove it from {field}")
    return texts
