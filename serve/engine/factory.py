"""Engine construction, in one place: the in-process engine behind ``raydistill serve --no-ray``, the Ray Serve
model deployment and the eval's speed measurement, built from the ``serve:`` section."""

from __future__ import annotations

import pkgutil
from typing import Any

from serve.section import ServeSection


def engine_kwargs(section: ServeSection) -> dict[str, Any]:
    return {
        "dtype": section.dtype,
        "max_batch_size": section.max_batch_size,
        "max_model_len": section.max_model_len,
        "prefill_chunk": section.prefill_chunk,
        "threads": section.threads,
    }


def load_engine(
    model_dir: str, section: ServeSection, engine_factory: str | None = None, engine_options: dict | None = None
) -> Any:
    """An AsyncEngine-like object for ``model_dir``: ours, vLLM (``serve.backend``), or ``engine_factory``.

    ``engine_factory`` (``'module:callable'``, tests) is called as ``factory(model_dir, **kwargs)``.
    """
    kwargs = {**engine_kwargs(section), **(engine_options or {})}
    if engine_factory:
        return pkgutil.resolve_name(engine_factory)(model_dir, **kwargs)
    if section.uses_vllm:
        from serve.vllm_engine import VLLMAsyncEngine

        return VLLMAsyncEngine.from_pretrained(model_dir, **kwargs)
    from serve.engine.async_engine import AsyncEngine

    return AsyncEngine.from_pretrained(model_dir, **kwargs)
