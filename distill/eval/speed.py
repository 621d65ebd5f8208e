"""Speed, memory and cost: TTFT and decode tokens/s on one engine, KV bytes and active parameters per token.

Teacher and student are timed the same way on the same machine: ``serve.engine.LLMEngine`` when
it is installed (the engine that serves them), else a plain prefill + greedy decode loop over
the HF model (``engine: "hf_loop"`` in the result), so the two numbers always compare.

A measurement at batch ``b``: ``b`` requests of ``prompt_tokens`` random tokens, greedy, EOS
ignored, ``new_tokens`` each, all submitted at once. TTFT = mean time from submission to a
request's first token, the median over ``repeats`` submissions; decode tokens/s = tokens per
decode step over the median step time of the steady phase (after the last first token). Medians,
because a shared 2-core VM loses bursts of CPU time to its neighbours (steal): one burst in one
model's run moved a single-shot student/teacher ratio from 1.8 to 1.3. The wall-clock rate of the
steady phase is kept as ``decode_tokens_per_s_wall``.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch

log = logging.getLogger(__name__)


def _random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # Skip the lowest ids: they are special tokens in most vocabularies.
    low = min(100, max(vocab // 10, 1))
    return torch.randint(low, vocab, (batch, length), generator=gen).tolist()


def _engine_class():
    try:
        from serve.engine.engine import LLMEngine
    except ImportError:
        return None
    return LLMEngine


def measure_engine(engine: Any, batch: int, prompt_tokens: int, new_tokens: int, vocab: int) -> dict[str, float]:
    """One measurement on an ``LLMEngine`` (add_request / step)."""
    from serve.engine.types import GenerationRequest, SamplingOptions

    prompts = _random_prompts(batch, prompt_tokens, vocab)
    sampling = SamplingOptions(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    first: dict[str, float] = {}
    generated: dict[str, int] = {}
    steps: list[tuple[float, int]] = []  # (seconds, tokens) of each step once every request has its first token
    for i, ids in enumerate(prompts):
        engine.add_request(GenerationRequest(request_id=f"speed-{batch}-{i}", prompt_ids=ids, sampling=sampling))
    before = start
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        steady = len(first) == batch
        for out in outputs:
            if out.token_ids and out.request_id not in first:
                first[out.request_id] = now
            generated[out.request_id] = generated.get(out.request_id, 0) + len(out.token_ids)
        if steady:
            steps.append((now - before, sum(len(out.token_ids) for out in outputs)))
        before = now
    end = time.perf_counter()
    return _summarise(start, first, generated, end, batch, steps)


def _summarise(
    start: float,
    first: dict[str, float],
    generated: dict[str, int],
    end: float,
    batch: int,
    steps: list[tuple[float, int]],
) -> dict[str, float]:
    last_first = max(first.values()) if first else end
    decode_tokens = sum(max(n - 1, 0) for n in generated.values())
    decode_s = max(end - last_first, 1e-9)
    full = [s for s, n in steps if n == batch]  # steps that decoded every request (not the ragged tail)
    return {
        "batch": batch,
        "ttft_s": (sum(first.values()) / max(len(first), 1)) - start,
        "decode_tokens_per_s": batch / max(statistics.median(full), 1e-9) if full else 0.0,
        "decode_tokens_per_s_wall": decode_tokens / decode_s if decode_tokens else 0.0,
        "decode_steps": len(full),
        "total_tokens": int(sum(generated.values())),
        "wall_s": end - start,
    }


@torch.no_grad()
def measure_hf_loop(model: Any, batch: int, prompt_tokens: int, new_tokens: int, vocab: int) -> dict[str, float]:
    """The fallback engine: one batched prefill with a KV cache, then greedy one-token decode steps."""
    prompts = torch.tensor(_random_prompts(batch, prompt_tokens, vocab), dtype=torch.long)
    mask = torch.ones_like(prompts)
    start = time.perf_counter()
    out = model(input_ids=prompts, attention_mask=mask, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
    t_first = before = time.perf_counter()
    cache = out.past_key_values
    steps: list[tuple[float, int]] = []
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        now = time.perf_counter()
        steps.append((now - before, batch))
        before = now
    end = time.perf_counter()
    first = {str(i): t_first for i in range(batch)}
    return _summarise(start, first, {str(i): new_tokens for i in range(batch)}, end, batch, steps)


def measure_speed(
    model: Any,
    tokenizer: Any,
    *,
    name: str,
    batch_sizes: list[int],
    prompt_tokens: int,
    new_tokens: int,
    warmup: bool = True,
    repeats: int = 3,
) -> dict[str, Any]:
    """``{"engine", "by_batch": {b: {...}}}`` for one model; the same code path for every model.

    Each batch size is measured once in full; the smallest (whose TTFT is the headline figure) then has
    its prefill timed ``repeats - 1`` more times (``new_tokens=2``): its ``ttft_s`` is the median of
    the ``repeats`` (all in ``ttft_s_runs``).
    """
    vocab = (
        int(model.get_output_embeddings().weight.shape[0])
        if hasattr(model, "get_output_embeddings")
        else len(tokenizer)
    )
    engine_cls = _engine_class()
    engine = None
    if engine_cls is not None:
        try:
            engine = engine_cls.from_model(
                model,
                tokenizer,
                max_batch_size=max(batch_sizes),
                max_model_len=prompt_tokens + new_tokens + 8,
                name=name,
            )
        except Exception as exc:  # noqa: BLE001 - fall back, but say why in the report
            log.warning("LLMEngine cannot run %s (%s); timing with the hf loop", name, exc)
            engine = None
    if engine is not None:
        run = lambda b, p, n: measure_engine(engine, b, p, n, vocab)  # noqa: E731
        label = "LLMEngine"
    else:
        run = lambda b, p, n: measure_hf_loop(model, b, p, n, vocab)  # noqa: E731
        label = "hf_loop"
    if warmup:
        run(1, min(prompt_tokens, 8), 2)
    by_batch = {}
    for b in batch_sizes:
        result = run(b, prompt_tokens, new_tokens)
        extra = max(repeats, 1) - 1 if b == min(batch_sizes) else 0  # the headline TTFT is the smallest batch's
        runs = [result["ttft_s"]] + [run(b, prompt_tokens, 2)["ttft_s"] for _ in range(extra)]
        by_batch[str(b)] = {**result, "ttft_s": statistics.median(runs), "ttft_s_runs": runs}
    return {
        "engine": label,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "by_batch": by_batch,
    }


# ----------------------------------------------------------------------------- memory, parameters, cost
def dtype_bytes(model: Any) -> int:
    try:
        return next(model.parameters()).element_size()
    except (StopIteration, AttributeError):
        return 4


def model_footprint(
    model: Any, experts_per_token: list[float] | None = None, context_len: int = 2048
) -> dict[str, Any]:
    """Parameters, active parameters per token and KV-cache bytes per token (at ``context_len``).

    Student: from :mod:`distill.student.accounting` with the measured experts per token per MoE
    layer. Dense HF models: every parameter is active (the input embedding lookup excluded, as for
    the student, unless tied to the head); KV = 2 x kv_heads x head_dim x layers per token.
    """
    cfg = model.config
    nbytes = dtype_bytes(model)
    if getattr(cfg, "model_type", "") == "raydistill_moe":
        from distill.student import accounting

        scfg = cfg.to_student_config()
        kv = accounting.kv_cache_bytes(scfg, context_len, dtype_bytes=nbytes)
        return {
            "parameters": accounting.count_parameters(scfg).total,
            "active_parameters": float(accounting.active_parameters(scfg, experts_per_token)),
            "active_parameters_note": "measured experts/token"
            if experts_per_token
            else ("configured k" if scfg.routing.value == "topk" else "upper bound k=max_k"),
            "kv_bytes_per_token": kv["total"] / context_len,
            "kv_context_len": context_len,
            "dtype_bytes": nbytes,
        }
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel() if hasattr(model, "get_input_embeddings") else 0
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    heads = getattr(cfg, "num_attention_heads", 1)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    per_token = 2 * kv_heads * head_dim * nbytes * cfg.num_hidden_layers
    return {
        "parameters": int(total),
        "active_parameters": float(total if tied else total - embed),
        "active_parameters_note": "dense",
        "kv_bytes_per_token": float(per_token),
        "kv_context_len": context_len,
        "dtype_bytes": nbytes,
    }


def cost_per_million_tokens(tokens_per_s: float | None, cost_per_hour: float | None) -> float | None:
    """Hardware cost of one million output tokens at ``tokens_per_s``; None without a price or a speed."""
    if cost_per_hour is None or not tokens_per_s:
        return None
    return cost_per_hour / (tokens_per_s * 3600.0) * 1e6
