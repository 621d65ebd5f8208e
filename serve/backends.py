"""What the HTTP app talks to: a :class:`Backend` (anything with ``name``, ``tokenizer``, ``context_length`` and an
async ``generate(GenerationRequest)`` stream of :class:`GenerationOutput`). :class:`EngineBackend` wraps an
in-process ``AsyncEngine`` (``raydistill serve --no-ray``, tests); ``serve.app`` supplies a backend that
forwards to the Ray Serve model deployment."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from serve.engine.types import GenerationOutput, GenerationRequest


class Backend(Protocol):
    name: str
    tokenizer: Any
    context_length: int

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]: ...

    async def stats(self) -> dict: ...


class EngineBackend:
    """An in-process ``AsyncEngine`` (``serve.engine.AsyncEngine`` or anything with its interface)."""

    def __init__(self, engine: Any, name: str | None = None):
        self.engine = engine
        self.name = name or engine.model_name
        self.tokenizer = engine.tokenizer
        self.context_length = int(engine.context_length)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        return self.engine.generate(request)

    async def stats(self) -> dict:
        return dict(self.engine.stats())

    def shutdown(self) -> None:
        self.engine.shutdown()

    def check_health(self) -> None:
        """Raise when the engine cannot serve (its loop thread died); ``GET /health`` then answers 503."""
        check = getattr(self.engine, "check_health", None)
        if check is not None:
            check()
