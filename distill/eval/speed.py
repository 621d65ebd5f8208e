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
from collections.abc import Callable
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
    """``{"engine", "by_batch": {b: {...}}}`` for one model: :func:`measure_speeds` with one round."""
    return measure_speeds(
        {name: (model, tokenizer)},
        batch_sizes=batch_sizes,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        warmup=warmup,
        repeats=repeats,
        rounds=1,
    )[name]


def _runner(
    model: Any, tokenizer: Any, name: str, batch_sizes: list[int], prompt_tokens: int, new_tokens: int
) -> tuple[str, Callable[[int, int, int], dict[str, float]]]:
    """(engine label, ``run(batch, prompt_tokens, new_tokens)``) for one model; the same code path for every model."""
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
        return "LLMEngine", lambda b, p, n: measure_engine(engine, b, p, n, vocab)
    return "hf_loop", lambda b, p, n: measure_hf_loop(model, b, p, n, vocab)


_MEDIAN_FIELDS = ("ttft_s", "decode_tokens_per_s", "decode_tokens_per_s_wall", "wall_s")


def measure_speeds(
    models: dict[str, tuple[Any, Any]],
    *,
    batch_sizes: list[int],
    prompt_tokens: int,
    new_tokens: int,
    warmup: bool = True,
    repeats: int = 3,
    rounds: int = 2,
) -> dict[str, dict[str, Any]]:
    """``{name: {"engine", "by_batch": {b: {...}}}}`` for ``models`` (name -> (model, tokenizer)), timed in turn.

    At each batch size every model runs ``rounds`` times, the order reversed on odd rounds (teacher,
    student, student, teacher: ABBA), and each figure is the median over its rounds (all decode rates
    in ``decode_tokens_per_s_runs``). A ratio between two models then compares runs seconds apart, not
    minutes: the demo's eval once read a student/teacher decode ratio of 1.07 where the same two models
    measured in one process right after gave 1.40 (a slow hour; the eval had timed them minutes apart). The smallest
    batch's TTFT is the median of ``max(repeats, rounds)`` prefills: the full runs' and prefill-only
    runs (``new_tokens=2``) after them, also in turn (all in ``ttft_s_runs``).
    """
    runners = {
        name: _runner(model, tokenizer, name, batch_sizes, prompt_tokens, new_tokens)
        for name, (model, tokenizer) in models.items()
    }
    names = list(models)
    if warmup:
        # Every timed shape once, untimed: the first prefill of a shape pays oneDNN's primitive creation
        # and the allocator's first touch (a student's first 64-token prefill took 111 ms against 85-94
        # after it; an 8-token warm-up left that in the first timed round, which the median of 3 kept).
        for b in batch_sizes:
            for name in names:
                runners[name][1](b, prompt_tokens, 2)
    rounds = max(rounds, 1)
    full: dict[str, dict[int, list[dict[str, float]]]] = {name: {b: [] for b in batch_sizes} for name in names}
    for b in batch_sizes:
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                full[name][b].append(runners[name][1](b, prompt_tokens, new_tokens))
    smallest = min(batch_sizes)  # its TTFT is the headline figure
    ttft = {name: [run["ttft_s"] for run in full[name][smallest]] for name in names}
    for r in range(max(repeats, 1) - rounds):
        for name in names if (rounds + r) % 2 == 0 else names[::-1]:
            ttft[name].append(runners[name][1](smallest, prompt_tokens, 2)["ttft_s"])
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        by_batch = {}
        for b, runs in full[name].items():
            merged = {**runs[0], **{k: statistics.median(run[k] for run in runs) for k in _MEDIAN_FIELDS}}
            merged["decode_tokens_per_s_runs"] = [run["decode_tokens_per_s"] for run in runs]
            if b == smallest:
                merged.update(ttft_s=statistics.median(ttft[name]), ttft_s_runs=ttft[name])
            by_batch[str(b)] = merged
        out[name] = {
            "engine": runners[name][0],
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "rounds": rounds,
            "by_batch": by_batch,
        }
    return out


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
