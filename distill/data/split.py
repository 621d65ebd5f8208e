"""The held-out split, decided by ``prompt_id`` alone so training and evaluation agree without a file.

All samples of one prompt fall on the same side, so a held-out prompt is never seen in training.
"""

from __future__ import annotations

import hashlib


def heldout_score(prompt_id: str, seed: int = 0) -> float:
    """A stable pseudo-random number in [0, 1) for a prompt id."""
    digest = hashlib.sha256(f"{seed}\x1f{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_heldout(prompt_id: str, fraction: float, seed: int = 0) -> bool:
    return fraction > 0 and heldout_score(prompt_id, seed) < fraction
