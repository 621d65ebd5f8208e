"""``serve.dtype: int8`` (or another dtype) against float32 on our engine: decode speed and bits per byte.

    python bench/int8_serving.py [--dtype int8|bfloat16|float16] [--student RUN_OR_DIR] [--threads 2]
                                 [--rounds 5] [--bytes 20000] [--batches 1,16]

For the builtin SmolLM2-135M teacher (and a student, when given) this loads the model twice, float32 and
``--dtype`` (int8 = weight-only, :func:`serve.engine.kernels.quantize_int8_weights`), then prints:

* bits per byte of each on the builtin fortunes corpus (first ``--bytes`` bytes), and the change;
* the median decode step at each of ``--batches`` (greedy, fixed-length answers), the two engines
  taking turns for ``--rounds`` rounds so both see the same machine, and the tokens/s ratio.

Targets for int8 (issue 17): batch-1 decode >= 1.6x float32, bits/byte within +2%. ``--dtype bfloat16``
paid on a CPU with AMX (measured; README, Benchmarks), the one place ``teacher.dtype: auto`` picks it
(:func:`serve.engine.kernels.auto_cpu_dtype`); AVX2-only CPUs have no bf16 matmul hardware, and
AVX512-BF16 without AMX was not measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default=None, help="a student run dir or model dir (optional)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--bytes", type=int, default=20000)
    parser.add_argument("--dtype", default="int8", choices=["int8", "bfloat16", "float16"])
    parser.add_argument("--batches", default="1,16", help="concurrent streams, comma-separated")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    other = args.dtype
    torch.set_num_threads(args.threads)

    import distill.student  # noqa: F401 - registers the student class
    from bench.engine_decode import median_decode_step_s
    from distill.eval.corpora import builtin_corpus
    from distill.eval.metrics import bits_per_byte
    from serve.engine.engine import LLMEngine

    texts = builtin_corpus("fortunes", max_bytes=args.bytes)
    models = {"SmolLM2-135M": "smollm2-135m-instruct"}
    if args.student:
        models["student"] = args.student
    rows = []
    for label, model in models.items():
        engines = {
            d: LLMEngine.from_pretrained(model, dtype=d, max_batch_size=max(batches)) for d in ("float32", other)
        }
        bpb = {}
        for d, engine in engines.items():
            with torch.inference_mode():
                bpb[d] = bits_per_byte(engine.model, engine.tokenizer, texts)["bits_per_byte"]
        for batch in batches:
            steps: dict[str, list[float]] = {d: [] for d in engines}
            for _ in range(args.rounds):
                for d, engine in engines.items():
                    prompts = [list(range(100, 130 + i)) for i in range(batch)]
                    median_decode_step_s(engine, prompts, 3)  # warm
                    steps[d].append(median_decode_step_s(engine, prompts, args.tokens))
            fp32, low = (statistics.median(steps[d]) for d in ("float32", other))
            rows.append((label, batch, batch / fp32, batch / low, bpb["float32"], bpb[other]))
        del engines
    print(f"\nthreads={args.threads}, fortunes {args.bytes} bytes, median decode step over {args.rounds} rounds")
    print(
        f"{'model':14s} {'batch':>5s} {'fp32 tok/s':>10s} {other[:4] + ' tok/s':>10s} {other[:4] + '/fp32':>9s} "
        f"{'bpb fp32':>8s} {'bpb ' + other[:4]:>8s} {'change':>7s}"
    )
    for label, batch, a, b, p, q in rows:
        print(f"{label:14s} {batch:5d} {a:10.1f} {b:10.1f} {b / a:8.2f}x {p:8.4f} {q:8.4f} {100 * (q / p - 1):+6.2f}%")


if __name__ == "__main__":
    main()
