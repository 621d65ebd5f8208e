"""Decode tokens/s and KV-cache bytes: 3:1 sliding/full student vs the same student with all-full attention.

    python bench/student_decode.py [--context 2048] [--batch 8] [--steps 48] [--window 512] [--threads 1]

Both models have identical weights (SmolLM2-135M-shaped student: 8 layers, 576 hidden, 9/3 heads,
8 experts x 192, top-2, 49k vocab); only ``layer_types`` differs. Each row is prefilled to
``--context`` tokens, then ``--steps`` greedy tokens are decoded with the KV cache. Decode is timed
in interleaved rounds (median), so a busy shared machine does not favour one model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.student.accounting import kv_cache_bytes  # noqa: E402
from distill.student.config import StudentConfig  # noqa: E402
from distill.student.model import StudentLM  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is steadier on a shared CPU; oversubscribed threads stall)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    hybrid_cfg = StudentConfig(
        num_hidden_layers=8, sliding_window=args.window, max_position_embeddings=args.context + args.steps + 8
    )
    full_cfg = hybrid_cfg.replace(layer_types=["full_attention"] * 8)
    torch.manual_seed(0)
    hybrid = StudentLM(hybrid_cfg).to(args.device, dtype).eval()
    full = StudentLM(full_cfg).to(args.device, dtype).eval()
    full.load_state_dict(hybrid.state_dict())
    prompt = torch.randint(0, hybrid_cfg.vocab_size, (args.batch, args.context), device=args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    print(
        f"device={args.device} dtype={args.dtype} threads={args.threads} batch={args.batch} "
        f"context={args.context} steps={args.steps} window={args.window}"
    )
    print(
        f"layers: hybrid {' '.join('F' if t == 'full_attention' else 'S' for t in hybrid_cfg.layer_types)}"
        f" | full {' '.join('F' for _ in full_cfg.layer_types)}"
    )

    results = {}
    with torch.no_grad():
        for name, model in (("hybrid 3:1", hybrid), ("all-full", full)):
            start = time.perf_counter()
            cache = model.new_cache(args.batch, max_seq_len=args.context + args.steps + 1)
            logits, cache = model.prefill(prompt, cache=cache)
            sync()
            results[name] = {
                "prefill_s": time.perf_counter() - start,
                "cache": cache,
                "logits": logits,
                "bytes": cache.nbytes(),
                "decode": [],
            }
        # Decode in interleaved rounds from copies of the prefilled caches.
        per_round = max(1, args.steps // args.rounds)
        for _ in range(args.rounds):
            for name, model in (("hybrid 3:1", hybrid), ("all-full", full)):
                state = results[name]
                tokens = state["logits"].argmax(-1)
                sync()
                start = time.perf_counter()
                for _ in range(per_round):
                    state["logits"] = model.decode_step(tokens, state["cache"])
                    tokens = state["logits"].argmax(-1)
                sync()
                state["decode"].append(args.batch * per_round / (time.perf_counter() - start))

    h, f = results["hybrid 3:1"], results["all-full"]
    rate_h, rate_f = statistics.median(h["decode"]), statistics.median(f["decode"])
    at_ctx_h = kv_cache_bytes(hybrid_cfg, args.context, args.batch, dtype_bytes=2)["total"]
    at_ctx_f = kv_cache_bytes(full_cfg, args.context, args.batch, dtype_bytes=2)["total"]
    print(f"{'':<28} {'hybrid 3:1':>14} {'all-full':>14} {'ratio':>8}")
    print(f"{'decode tokens/s':<28} {rate_h:>14,.1f} {rate_f:>14,.1f} {rate_h / rate_f:>7.2f}x")
    print(
        f"{'prefill seconds':<28} {h['prefill_s']:>14.2f} {f['prefill_s']:>14.2f} "
        f"{h['prefill_s'] / f['prefill_s']:>7.2f}x"
    )
    print(f"{'KV cache bytes (measured)':<28} {h['bytes']:>14,} {f['bytes']:>14,} {h['bytes'] / f['bytes']:>7.2f}x")
    print(f"{'KV bytes at ctx, bf16 (calc)':<28} {at_ctx_h:>14,} {at_ctx_f:>14,} {at_ctx_h / at_ctx_f:>7.2f}x")
    print(f"positions after decode: {h['cache'].lengths.tolist()} (sliding rings hold {args.window} slots)")


if __name__ == "__main__":
    main()
