"""Structured output (``response_format``) with llguidance: JSON-schema grammars and per-row token masks.

``response_format: {"type": "json_object"}`` is the schema ``{"type": "object"}``; ``{"type": "json_schema",
"json_schema": {"schema": ...}}`` is that schema. The API checks the schema (:func:`grammar_for`, a 400 when
it is not one llguidance can compile); the engine builds one :class:`llguidance.LLMatcher` per request and,
each step, masks the logits of the constrained rows only (:func:`mask_logits`), so constrained and free
requests share the batch. The JSON is compact (no free whitespace between tokens), which also keeps a
small model from padding it with whitespace forever.

llguidance (extra ``[structured]``, in ``[dev]``) is imported only when a request asks for a format.
"""

from __future__ import annotations

import functools
import json
from typing import Any

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
COMPILE_DEFAULTS = {"whitespace_flexible": False}


class StructuredOutputUnavailable(RuntimeError):
    """llguidance is not installed."""


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf  # noqa: F401 - the HF tokenizer bridge
    except ImportError as exc:
        raise StructuredOutputUnavailable(
            "response_format needs the llguidance package on the server (pip install 'raydistill[structured]')"
        ) from exc
    return llguidance


@functools.lru_cache(maxsize=256)
def _grammar(schema_json: str) -> str:
    llg = _llguidance()
    grammar = llg.LLMatcher.grammar_from_json_schema(schema_json, defaults=COMPILE_DEFAULTS)
    error = llg.LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise ValueError(error)
    return grammar


def grammar_for(schema: dict[str, Any]) -> str:
    """The llguidance grammar of a JSON schema (cached). ValueError naming the problem for a schema it
    cannot compile; StructuredOutputUnavailable without llguidance."""
    try:
        text = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the schema is not JSON: {exc}") from None
    try:
        return _grammar(text)
    except (StructuredOutputUnavailable, ValueError):
        raise
    except Exception as exc:  # noqa: BLE001 - llguidance's own errors are a bad schema
        raise ValueError(str(exc)) from None


class GrammarFactory:
    """Matchers for one tokenizer (its llguidance view is built once, on first use: ~0.5 s)."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lltok: Any | None = None

    def matcher(self, schema: dict[str, Any]) -> Any:
        llg = _llguidance()
        if self._lltok is None:
            self._lltok = llg.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
        matcher = llg.LLMatcher(self._lltok, grammar_for(schema))
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher


def mask_logits(logits: Any, rows: list[int], matchers: list[Any]) -> Any:
    """A copy of ``logits`` [m, V] where, in each of ``rows``, the tokens its matcher forbids are -inf."""
    import numpy as np
    import torch

    out = logits.clone()
    vocab = logits.shape[-1]
    for row, matcher in zip(rows, matchers):
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.from_numpy(bits[:vocab].astype(bool))
        if allowed.shape[0] < vocab:
            allowed = torch.cat([allowed, torch.zeros(vocab - allowed.shape[0], dtype=torch.bool)])
        out[row].masked_fill_(~allowed, float("-inf"))
    return out
