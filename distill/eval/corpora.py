"""Human-written evaluation text: user files (fsspec URIs) and one builtin corpus from Debian.

The builtin corpus is ``fortunes``: Debian's ``fortunes-min`` package (BSD licence, about 100 KB
of English: the classic fortune-cookie sayings, literature quotes and riddles), installed with
``apt-get install fortunes-min`` (``make corpus``). Its files hold entries separated by ``%``
lines; each entry is one text.

User files: ``.txt`` (the whole file is one text; blank-line separated paragraphs are kept
together) or ``.jsonl`` (a ``text`` field per line). Globs are expanded.
"""

from __future__ import annotations

import os

from cluster import storage
from cluster.errors import RaydistillError
from distill.data import texts as text_files
from distill.data.texts import EVAL_FORTUNE_FILES as FORTUNES_FILES
from distill.data.texts import read_texts, split_fortunes  # noqa: F401 - split_fortunes is part of this API

BUILTIN_INSTALL_HINT = {
    "fortunes": "install it with `apt-get install fortunes-min` (or `make corpus`), or set eval.builtin_corpus: null"
}


def _truncate(texts: list[str], max_bytes: int | None) -> list[str]:
    """Keep whole texts in order until ``max_bytes`` UTF-8 bytes (at least one, cut at a character)."""
    if max_bytes is None:
        return texts
    out, used = [], 0
    for text in texts:
        size = len(text.encode("utf-8"))
        if used + size > max_bytes:
            if not out:  # one long document: keep its first max_bytes bytes
                out.append(text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore"))
            break
        out.append(text)
        used += size
    return out


def builtin_corpus(name: str, max_bytes: int | None = None) -> list[str]:
    """Texts of a builtin corpus; RaydistillError with the install command when it is missing."""
    if name != "fortunes":
        raise RaydistillError(f"eval.builtin_corpus: unknown corpus {name!r}; allowed: fortunes, null")
    texts = text_files.read_eval_fortunes()
    if not texts:
        raise RaydistillError(
            f"builtin corpus {name!r} not found under {text_files.FORTUNES_DIR}; {BUILTIN_INSTALL_HINT[name]}"
        )
    return _truncate(texts, max_bytes)


def builtin_available(name: str) -> bool:
    return name == "fortunes" and any(os.path.exists(os.path.join(text_files.FORTUNES_DIR, f)) for f in FORTUNES_FILES)


def read_corpus(uri: str, max_bytes: int | None = None) -> list[str]:
    """Texts of one user file (``.txt`` or ``.jsonl``); RaydistillError if it is missing or holds no text."""
    return _truncate(read_texts(uri, "eval.corpora"), max_bytes)


def corpus_name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def load_corpora(
    uris: list[str], builtin: str | None, max_bytes: int | None, resolve=lambda p: p
) -> tuple[dict[str, list[str]], list[str]]:
    """``({name: texts}, notes)`` for the configured corpora; a missing builtin corpus is a note, not an error."""
    corpora: dict[str, list[str]] = {}
    notes: list[str] = []
    for pattern in uris:
        pattern = resolve(pattern)
        matches = storage.expand(pattern)
        if not matches:
            raise RaydistillError(f"eval.corpora: {pattern} matches no file; fix the glob or remove it")
        for uri in matches:
            name = corpus_name(uri)
            while name in corpora:
                name += "'"
            corpora[name] = read_corpus(uri, max_bytes)
    if builtin:
        if builtin_available(builtin):
            corpora[builtin] = builtin_corpus(builtin, max_bytes)
        else:
            notes.append(f"builtin corpus {builtin!r} skipped: not installed; {BUILTIN_INSTALL_HINT.get(builtin, '')}")
    return corpora, notes
