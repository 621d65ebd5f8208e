"""The held-out split, decided by the prompt's id alone so training and evaluation agree without a file.

A row's ``prompt_id`` also hashes its sample index (``samples_per_prompt > 1`` gives each sample
its own id), so the split hashes :func:`split_id`: the id of the prompt's sample 0. All samples of
one prompt fall on the same side, so a held-out prompt is never seen in training. With one sample
per prompt ``split_id == prompt_id``. Corpus rows (``distill.data.corpus``) are always training rows.
"""

from __future__ import annotations

import hashlib
from typing import Any

SPLIT_COLUMNS = ["prompt_id", "source", "prompt", "messages"]  # what split_id reads from a row


def split_id(
    prompt_id: str, source: str | None = None, prompt: str | None = None, messages: list[dict[str, Any]] | None = None
) -> str:
    """The id the split hashes: ``prompt_id(source, messages or prompt, 0)``, or ``prompt_id`` without a prompt."""
    from distill.data.schema import prompt_id as make_id

    body = messages or prompt
    if body is None:
        return prompt_id
    if messages:  # Parquet gives the structs back as dicts; the id hashes role/content only
        body = [{"role": m["role"], "content": m["content"]} for m in messages]
    return make_id(source or "", body, 0)


def heldout_score(prompt_id: str, seed: int = 0) -> float:
    """A stable pseudo-random number in [0, 1) for a prompt id."""
    digest = hashlib.sha256(f"{seed}\x1f{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_heldout(prompt_id: str, fraction: float, seed: int = 0) -> bool:
    """``prompt_id`` here is a :func:`split_id` (the row's own id is one only with one sample per prompt)."""
    return fraction > 0 and heldout_score(prompt_id, seed) < fraction


def row_is_heldout(row: dict[str, Any], fraction: float, seed: int = 0) -> bool:
    """A row (a dict with :data:`SPLIT_COLUMNS`; missing ones count as None) is held out.

    Corpus rows (human text the teacher scored) never are: the held-out split measures the teacher's
    own text, and human text is measured on the eval corpora, which the corpus never overlaps.
    """
    from distill.data.schema import is_corpus_source

    if is_corpus_source(row.get("source")):
        return False
    return is_heldout(
        split_id(row["prompt_id"], row.get("source"), row.get("prompt"), row.get("messages")), fraction, seed
    )
