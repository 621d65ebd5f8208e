"""An MoE student's decode step and prefill in our engine: every expert run densely (the small-batch path) vs the routed dispatch.

    python bench/moe_decode.py --model RUN/student [--streams 1,2,4,8,16,32] [--prompt-tokens 32,64,128,256]
        [--threads 2] [--rounds 5]

``--model`` is a trained student directory (a pipeline run's ``student/``): routing decides how many
experts a step touches, and a trained router routes the way served traffic will. For each number of
concurrent greedy streams, the median decode-step time (prefill excluded) with
``MoEBlock.dense_max_tokens = 0`` (routed: each expert on its own tokens) and with the default (dense:
all experts and the shared expert as one SwiGLU, scaled by the routing weights), timed in interleaved
rounds so a busy machine favours neither. A single stream always takes the routed path (it reads
only its own experts), so its two columns should agree. Then the time to first token of one prompt
of each ``--prompt-tokens`` length (random ids, the eval's TTFT measurement), routed vs dense: where
the dense path stops paying is what ``dense_max_tokens`` should be.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_decode import PROMPTS, median_decode_step_s  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained student directory (a run's student/)")
    parser.add_argument("--streams", default="1,2,4,8,16,32")
    parser.add_argument("--tokens", type=int, default=24, help="decode steps per measurement")
    parser.add_argument("--prompt-tokens", default="32,64,128,256", help="prefill lengths to time ('' = none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--dense-max-tokens", type=int, default=None, help="the dense path's limit to time (default: MoEBlock's own)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from distill.eval.speed import measure_engine
    from distill.student.moe import MoEBlock
    from serve.engine.engine import LLMEngine

    streams = [int(s) for s in args.streams.split(",")]
    lengths = [int(n) for n in args.prompt_tokens.split(",") if n]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    engine = LLMEngine.from_pretrained(
        args.model,
        max_batch_size=max(streams),
        prefill_chunk=max([256, *lengths]),
        max_model_len=max([512, *lengths]) + 8,
    )
    blocks = [m for m in engine.model.modules() if isinstance(m, MoEBlock)]
    if not blocks:
        sys.exit(f"--model {args.model}: no MoE layers (a dense model has nothing to compare)")
    dense_default = blocks[0].dense_max_tokens
    dense_limit = dense_default if args.dense_max_tokens is None else args.dense_max_tokens
    encoded = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
        for p in PROMPTS
    ]
    onednn = sum(m.matmul is not torch.nn.functional.linear for m in blocks)
    print(
        f"model={args.model} threads={args.threads} torch={torch.__version__} moe_layers={len(blocks)} "
        f"dense_max_tokens={dense_limit} oneDNN dense matmuls in {onednn}/{len(blocks)} layers"
    )
    samples: dict[tuple[str, int], list[float]] = {}  # (mode, streams) -> decode-step seconds
    ttfts: dict[tuple[str, int], list[float]] = {}  # (mode, prompt tokens) -> seconds to the first token
    median_decode_step_s(engine, encoded[:2], 4)  # warm-up
    for _ in range(args.rounds):
        for n in streams:
            prompts = [encoded[i % len(encoded)] for i in range(n)]
            for mode, limit in (("routed", 0), ("dense", dense_limit)):
                for block in blocks:
                    block.dense_max_tokens = limit
                samples.setdefault((mode, n), []).append(median_decode_step_s(engine, prompts, args.tokens))
        for n in lengths:
            for mode, limit in (("routed", 0), ("dense", max(n, dense_limit))):
                for block in blocks:
                    block.dense_max_tokens = limit
                ttft = measure_engine(engine, 1, n, 2, len(tokenizer))["ttft_s"]
                ttfts.setdefault((mode, n), []).append(ttft)
    for block in blocks:
        block.dense_max_tokens = dense_default
    print(
        f"{'streams':>7} {'routed ms':>10} {'dense ms':>9} {'routed tok/s':>13} {'dense tok/s':>12} {'dense/routed':>13}"
    )
    for n in streams:
        routed, dense = (statistics.median(samples[(mode, n)]) for mode in ("routed", "dense"))
        print(
            f"{n:>7} {routed * 1e3:>10.2f} {dense * 1e3:>9.2f} {n / routed:>13.1f} {n / dense:>12.1f} {routed / dense:>12.2f}x"
        )
    if lengths:
        print(
            f"{'prompt':>7} {'routed TTFT ms':>15} {'dense TTFT ms':>14} {'dense/routed':>13}   (one prompt, dense forced)"
        )
    for n in lengths:
        routed, dense = (statistics.median(ttfts[(mode, n)]) for mode in ("routed", "dense"))
        print(f"{n:>7} {routed * 1e3:>15.1f} {dense * 1e3:>14.1f} {dense / routed:>12.2f}x")


if __name__ == "__main__":
    main()
