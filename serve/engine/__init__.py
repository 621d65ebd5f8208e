"""The inference engine (no Ray inside): continuous batching, chunked prefill, per-request sampling, streaming.

``LLMEngine`` is the synchronous core (``add_request`` / ``step`` / ``abort`` / ``generate``);
``AsyncEngine`` runs it in one background thread behind an asyncio streaming API. Both serve our
MoE student and dense LLaMA/Qwen2/Mistral HF models through the student's own decoder and KV cache.

The request/output types import without torch; the engine classes load lazily on first access, so
``from serve.engine import GenerationRequest`` stays cheap for the API layer.
"""

from __future__ import annotations

import importlib
from typing import Any

from serve.engine.types import (EngineError, EngineFailure, EngineUnavailable, GenerationOutput, GenerationRequest,
                                SamplingOptions, TokenLogprob)

_LAZY = {
    "LLMEngine": "serve.engine.engine",
    "AsyncEngine": "serve.engine.async_engine",
    "load_model": "serve.engine.loader",
    "resolve_model_dir": "serve.engine.loader",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'serve.engine' has no attribute {name!r}")


__all__ = ["AsyncEngine", "LLMEngine", "EngineError", "EngineFailure", "EngineUnavailable", "GenerationOutput",
           "GenerationRequest", "SamplingOptions", "TokenLogprob", "load_model", "resolve_model_dir"]
