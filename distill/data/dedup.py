"""Text normalisation, exact dedup and MinHash near-dup detection for generated rows.

Both dedups work on the (prompt, completion) *pair*: ``samples_per_prompt > 1`` legitimately
repeats a prompt with different completions, and a stock reply ("I can't help with that.") to
unrelated prompts is not a duplicate either. A row is dropped when both its prompt and its
completion match one earlier kept row. "Earlier" is prompt_id order (the caller sorts), so the
rows kept do not depend on how generation happened to shard its output.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

_WORD = re.compile(r"\w+")
SHINGLE = 3  # word n-gram size of the MinHash shingles


def words(text: str | None) -> list[str]:
    """Normalised word tokens: NFKC, lowercase, punctuation and whitespace dropped."""
    if not text:
        return []
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def exact_key(prompt_words: list[str], completion_words: list[str]) -> bytes:
    """Hash of the normalised pair: case, punctuation and spacing differences do not matter."""
    body = " ".join(prompt_words) + "\x1e" + " ".join(completion_words)
    return hashlib.blake2b(body.encode("utf-8"), digest_size=16).digest()


def shingles(tokens: list[str], tag: bytes, k: int = SHINGLE) -> list[bytes]:
    """Word k-grams as bytes, tagged so prompt and completion shingles never collide."""
    if not tokens:
        return []
    if len(tokens) <= k:
        return [tag + " ".join(tokens).encode("utf-8")]
    return [tag + " ".join(tokens[i : i + k]).encode("utf-8") for i in range(len(tokens) - k + 1)]


class NearDuplicateIndex:
    """MinHash LSH over kept rows; ``check_and_add`` says whether a row near-duplicates one of them.

    A row is a near-duplicate of an earlier kept row when the estimated Jaccard similarity of the
    word-3-gram sets is >= ``threshold`` for the prompts *and* for the completions. Candidates come
    from an LSH index over the union of both tagged shingle sets; since the Jaccard of that union is
    at least the smaller of the two, every qualifying pair is a candidate (up to LSH error).
    """

    def __init__(self, threshold: float = 0.85, num_perm: int = 128, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        self.threshold = float(threshold)
        self._template = MinHash(num_perm=num_perm, seed=seed)
        # Weighted towards recall (few missed pairs at the threshold); candidates are verified below.
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
        self._prompt_sigs: list[np.ndarray] = []
        self._completion_sigs: list[np.ndarray] = []
        self._prompt_cache: dict[str, object] = {}

    def _minhash(self, items: list[bytes]):
        mh = self._template.copy()
        if items:
            mh.update_batch(items)
        return mh

    def _prompt_minhash(self, prompt_words: list[str]):
        key = " ".join(prompt_words)
        mh = self._prompt_cache.get(key)
        if mh is None:  # samples of one prompt share its signature
            mh = self._prompt_cache[key] = self._minhash(shingles(prompt_words, b"p\x1f"))
        return mh

    def check_and_add(self, prompt_words: list[str], completion_words: list[str]) -> bool:
        """True if the row near-duplicates a kept row (it is then not added), else add it; False."""
        from datasketch import MinHash

        p = self._prompt_minhash(prompt_words)
        c = self._minhash(shingles(completion_words, b"c\x1f"))
        for key in self._lsh.query(MinHash.union(p, c)):
            idx = int(key)
            if (
                np.mean(self._prompt_sigs[idx] == p.hashvalues) >= self.threshold
                and np.mean(self._completion_sigs[idx] == c.hashvalues) >= self.threshold
            ):
                return True
        idx = len(self._prompt_sigs)
        self._prompt_sigs.append(p.hashvalues)
        self._completion_sigs.append(c.hashvalues)
        self._lsh.insert(str(idx), MinHash.union(p, c))
        return False
