"""Plain-text inputs: a ``.txt`` file (one text) or ``.jsonl`` (a ``text`` field per line), on any fsspec URI;
and Debian's fortune files (entries separated by ``%`` lines), the project's human-written English.

Debian ships the fortunes in two packages under :data:`FORTUNES_DIR`: ``fortunes-min`` (the files in
:data:`EVAL_FORTUNE_FILES`, about 100 KB: the eval's builtin human corpus) and ``fortunes`` (about
2.5 MB more in ~40 topic files: what ``corpus.builtin: fortunes`` trains on, never the eval's files).
"""

from __future__ import annotations

import json
import os

from cluster import storage
from cluster.errors import RaydistillError

FORTUNES_DIR = os.environ.get("RAYDISTILL_FORTUNES_DIR", "/usr/share/games/fortunes")
EVAL_FORTUNE_FILES = ("fortunes", "literature", "riddles")  # Debian's fortunes-min: the eval's human text


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


def split_fortunes(text: str) -> list[str]:
    """Entries of a fortune file (separated by lines holding only ``%``), stripped, empty ones dropped."""
    entries, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current).strip())
    return [e for e in entries if e]


def fortune_files(directory: str | None = None) -> list[str]:
    """Names of the fortune files under ``directory`` (default :data:`FORTUNES_DIR`): no ``.dat``/``.u8`` twins."""
    directory = directory or FORTUNES_DIR
    if not os.path.isdir(directory):
        return []
    return sorted(
        name for name in os.listdir(directory) if "." not in name and os.path.isfile(os.path.join(directory, name))
    )


def read_fortunes(name: str, directory: str | None = None) -> list[str]:
    """The entries of one fortune file."""
    with open(os.path.join(directory or FORTUNES_DIR, name), encoding="utf-8", errors="replace") as handle:
        return split_fortunes(handle.read())


def read_eval_fortunes() -> list[str]:
    """The entries of the eval's fortune files (:data:`EVAL_FORTUNE_FILES`) that are installed, in order."""
    return [
        entry
        for name in EVAL_FORTUNE_FILES
        if os.path.exists(os.path.join(FORTUNES_DIR, name))
        for entry in read_fortunes(name)
    ]
