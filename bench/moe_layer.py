"""Tokens/s of the student's MoE layer vs transformers' Qwen2MoeSparseMoeBlock (same weights) vs a dense FFN.

    python bench/moe_layer.py [--threads 2] [--tokens 16 256 1024] [--device cpu|cuda] [--dtype float32|bfloat16]

The dense FFN has the same *active* width as the MoE layer (k * moe_intermediate_size + shared),
so "dense" is the speed of light for the routed compute. transformers 5 picks an experts kernel
per model ("grouped_mm" by default when built through from_pretrained, "eager" otherwise); both
are timed. Implementations are timed in interleaved rounds and the median is reported, which
keeps a busy shared machine from favouring whichever ran first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # HF's empty shared expert

from distill.student.config import StudentConfig  # noqa: E402
from distill.student.experts import SwiGLU  # noqa: E402
from distill.student.moe import MoEBlock  # noqa: E402

SHAPES = {
    # SmolLM2-135M FFN (576 x 1536) split into 8 experts of 192, 2 active
    "smollm2-8x192-k2": dict(
        hidden_size=576,
        num_experts=8,
        moe_intermediate_size=192,
        num_experts_per_tok=2,
        shared_expert_intermediate_size=0,
    ),
    # finer experts with a shared one: 16 x 96, 4 active, shared 384
    "16x96-k4+shared384": dict(
        hidden_size=576,
        num_experts=16,
        moe_intermediate_size=96,
        num_experts_per_tok=4,
        shared_expert_intermediate_size=384,
    ),
}


def build(shape: dict, device: str, dtype: torch.dtype):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    config = StudentConfig(
        vocab_size=32,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        norm_topk_prob=True,
        **shape,
    )
    torch.manual_seed(0)
    ours = MoEBlock(config, 0)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.05)
    qcfg = Qwen2MoeConfig(
        hidden_size=config.hidden_size,
        num_experts=config.num_experts,
        moe_intermediate_size=config.moe_intermediate_size,
        num_experts_per_tok=config.num_experts_per_tok,
        norm_topk_prob=True,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size,
    )
    theirs = Qwen2MoeSparseMoeBlock(qcfg)
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.gate.weight)
        for e, expert in enumerate(ours.experts):
            theirs.experts.gate_up_proj[e].copy_(torch.cat([expert.gate_proj.weight, expert.up_proj.weight]))
            theirs.experts.down_proj[e].copy_(expert.down_proj.weight)
        if ours.shared_expert is not None:
            theirs.shared_expert.load_state_dict(ours.shared_expert.state_dict())
            theirs.shared_expert_gate.weight.copy_(ours.shared_expert_gate.weight)
        else:
            theirs.shared_expert_gate.weight.zero_()
    active = config.num_experts_per_tok * config.moe_intermediate_size + config.shared_expert_intermediate_size
    dense = SwiGLU(config.hidden_size, active)
    return (
        ours.to(device, dtype).eval(),
        theirs.to(device, dtype).eval(),
        qcfg,
        dense.to(device, dtype).eval(),
        config,
    )


def timed(fn, x, min_seconds: float) -> float:
    """Seconds per call, averaged over as many calls as fit in ``min_seconds`` (at least 3)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < min_seconds:
        fn(x)
        calls += 1
    sync()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 256, 1024])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is steadier on a shared CPU; oversubscribed threads stall)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.25, help="timing window per implementation per round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"device={args.device} dtype={args.dtype} threads={args.threads} torch={torch.__version__}")
    header = (
        f"{'shape':<20} {'tokens':>6} {'ours tok/s':>11} {'hf eager':>10} {'hf grouped':>10} {'dense':>10} "
        f"{'ours/eager':>10} {'ours/grouped':>12} {'ours/dense':>10} {'max|diff|':>9}"
    )
    print(header)
    for name, shape in SHAPES.items():
        ours, theirs, qcfg, dense, config = build(shape, args.device, dtype)
        for tokens in args.tokens:
            x = torch.randn(1, tokens, config.hidden_size, device=args.device, dtype=dtype)

            def run_theirs(impl, qcfg=qcfg, theirs=theirs):
                def forward(inp):
                    qcfg._experts_implementation = impl
                    return theirs(inp)

                return forward

            impls = {
                "ours": lambda inp, ours=ours: ours(inp, compute_aux=False)[0],
                "eager": run_theirs("eager"),
                "grouped": run_theirs("grouped_mm"),
                "dense": dense,
            }
            with torch.no_grad():
                diff = max((ours(x)[0] - run_theirs(impl)(x)).abs().max().item() for impl in ("eager", "grouped_mm"))
                samples = {k: [] for k in impls}
                for _ in range(args.rounds):
                    for key, fn in impls.items():
                        samples[key].append(timed(fn, x, args.seconds))
            rate = {k: tokens / statistics.median(v) for k, v in samples.items()}
            print(
                f"{name:<20} {tokens:>6} {rate['ours']:>11,.0f} {rate['eager']:>10,.0f} {rate['grouped']:>10,.0f} "
                f"{rate['dense']:>10,.0f} {rate['ours'] / rate['eager']:>9.2f}x "
                f"{rate['ours'] / rate['grouped']:>11.2f}x "
                f"{rate['ours'] / rate['dense']:>9.2f}x {diff:>9.1e}"
            )


if __name__ == "__main__":
    main()
