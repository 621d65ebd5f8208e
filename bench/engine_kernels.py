"""torch's default CPU linear (MKL sgemm) vs oneDNN's, on the weight shapes of SmolLM2-135M and its students.

    python bench/engine_kernels.py [--threads 2] [--layers 30]

For each shape, ``--layers`` distinct weights are multiplied in turn (as a decode step walks the layers,
so none stays in cache) at M = 1 and 16 rows; prints the median time per call and the oneDNN gain.
``serve.engine.kernels.ONEDNN_MIN_WEIGHT`` is set from this table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.engine.kernels import ONEDNN_MIN_WEIGHT, onednn_linear_works  # noqa: E402

SHAPES = [  # (out, in): LM head, MoE dense gate/up, FFN gate/up, FFN down, q/k/v fused, q/o, shared expert, k/v
    (49152, 576),
    (3072, 576),
    (960, 576),
    (1536, 576),
    (576, 1536),
    (576, 576),
    (384, 576),
    (576, 384),
    (192, 576),
]


def per_call_us(fn, weights, x, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for w in weights:
            fn(x, w)
        times.append((time.perf_counter() - start) / len(weights))
    return statistics.median(times[1:]) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not onednn_linear_works():
        sys.exit("this torch has no working oneDNN linear; the engine uses F.linear everywhere")
    mkl = lambda x, w: F.linear(x, w)  # noqa: E731
    onednn = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # noqa: E731
    print(f"threads={args.threads}  {args.layers} distinct weights per shape (2 for the head)")
    print(f"{'[M, in] x [in, out]':26s} {'F.linear':>11s} {'oneDNN':>11s} {'gain':>6s}  engine uses")
    with torch.inference_mode():
        for out_f, in_f in SHAPES:
            weights = [torch.randn(out_f, in_f) for _ in range(2 if out_f > 20000 else args.layers)]
            for m in (1, 16):
                x = torch.randn(m, in_f)
                a, b = per_call_us(mkl, weights, x), per_call_us(onednn, weights, x)
                uses = "oneDNN" if out_f * in_f >= ONEDNN_MIN_WEIGHT else "F.linear"
                print(f"[{m}, {in_f}] x [{in_f}, {out_f}]".ljust(26), f"{a:9.1f}us {b:9.1f}us {a / b:5.2f}x  {uses}")


if __name__ == "__main__":
    main()
