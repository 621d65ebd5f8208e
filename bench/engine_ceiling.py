"""Engine decode against the matmul ceiling of the model's own GEMMs, and batch-1 decode against the bandwidth roofline.

    python bench/engine_ceiling.py [--model smollm2-135m-instruct] [--streams 1,16,32,64] [--tokens 48]

For each number of concurrent greedy streams (prompts of ``--prompt-tokens`` random ids):

* the **ceiling**: every matmul one decode step of this model runs at that many streams is
  recorded (a ``TorchDispatchMode`` sees each ``mm``/``addmm``/oneDNN linear with its operands), then
  replayed back to back on the model's own weights, each with the faster of ``a @ b.T`` (torch's
  default BLAS) and oneDNN's linear on a packed weight (the engine's weights are recorded packed,
  so those replay on oneDNN only). The ceiling is ``streams / replay time``: tokens/s if a step did
  nothing but its GEMMs. Its GFLOP/s is printed too;
* **decode**: the engine's median decode-step time once every stream has its first token
  (``bench.engine_decode.median_decode_step_s``), as tokens/s and as % of the ceiling;
* **with prefill**: generated tokens over the wall time of the whole job (prefill included), as % of
  the same ceiling (the issue's "end to end" figure);
* at one stream, the **bandwidth roofline**: fp32 weight bytes read per token over a measured
  ``copy_`` bandwidth, and the % batch-1 decode reaches.

Rounds alternate measurements so a busy machine favours none; medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_decode import copy_bandwidth, engine_throughput, median_decode_step_s, weight_bytes  # noqa: E402


class RecordGemms(TorchDispatchMode):
    """Records (x shape, weight tensor) for every 2-D matmul dispatched inside the block; ``weight`` is
    the [out, in] operand (transposed views are resolved to it), so the replay reads the same bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[int, int], torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = (args[0], args[1]) if func is torch.ops.aten.mm.default else (args[1], args[2])
            if a.dim() == 2 and b.dim() == 2:
                self.calls.append(((a.shape[0], a.shape[1]), b.t()))  # b [in, out] -> weight [out, in]
        elif "mkldnn._linear_pointwise" in name or func is torch.ops.aten.linear.default:
            x, w = args[0], args[1]
            self.calls.append(((x.numel() // x.shape[-1], x.shape[-1]), w))
        return out


def record_step(engine, streams: int, prompt_tokens: int) -> list[tuple[tuple[int, int], torch.Tensor]]:
    """The GEMMs of one pure decode step at ``streams`` streams (after every stream's prefill)."""
    from serve.engine.types import GenerationRequest, SamplingOptions

    gen = torch.Generator().manual_seed(1)
    # Long enough that no stream finishes while the last ones prefill; aborted after the recorded step.
    options = SamplingOptions(max_tokens=512, temperature=0.0, ignore_eos=True)
    ids = [f"rec{time.perf_counter_ns()}-{i}" for i in range(streams)]
    for rid in ids:
        prompt = torch.randint(100, engine.vocab_size, (prompt_tokens,), generator=gen).tolist()
        engine.add_request(GenerationRequest(rid, prompt, options))
    # Step until every stream has its first token (prefill finished), then record one step.
    started: set[str] = set()
    while len(started) < streams:
        started.update(o.request_id for o in engine.step() if o.token_ids)
    mode = RecordGemms()
    with mode:
        decoded = sum(1 for o in engine.step() if o.token_ids)
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    assert decoded == streams, f"recorded a step that decoded {decoded} streams, not {streams}"
    return mode.calls


def replay_s(calls, rounds: int = 5) -> tuple[float, float]:
    """(seconds, FLOPs) of running ``calls`` back to back, each with the faster of BLAS and oneDNN."""
    from serve.engine.kernels import _onednn_linear, onednn_linear_works

    def blas(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
        return None if w.layout == torch._mkldnn else x @ w.t()  # a packed weight: oneDNN only

    def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if w.layout == torch._mkldnn:  # recorded already packed (the engine's own weights)
            return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return _onednn_linear(x, w, None)  # packs on the warm-up call

    kernels = [blas] + ([onednn] if onednn_linear_works() else [])
    inputs = [torch.randn(shape) for shape, _ in calls]
    best_total, flops = 0.0, 0.0
    with torch.inference_mode():
        per_call = []
        for kernel in kernels:
            for x, (_, w) in zip(inputs, calls):
                kernel(x, w)  # warm
            times = [[] for _ in calls]
            for _ in range(rounds):
                for i, (x, (_, w)) in enumerate(zip(inputs, calls)):
                    start = time.perf_counter()
                    ran = kernel(x, w) is not None
                    times[i].append(time.perf_counter() - start if ran else float("inf"))
            per_call.append([statistics.median(t) for t in times])
        for i, (shape, w) in enumerate(calls):
            best_total += min(k[i] for k in per_call)
            flops += 2.0 * shape[0] * shape[1] * w.shape[0]  # a packed weight keeps its [out, in] shape
    return best_total, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, model dir or a run's student/")
    parser.add_argument("--streams", default="1,16,32,64")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=48, help="generated tokens per stream")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from serve.engine.engine import LLMEngine

    streams = [int(s) for s in args.streams.split(",")]
    engine = LLMEngine.from_pretrained(args.model, max_batch_size=max(streams))
    gen = torch.Generator().manual_seed(0)
    prompts = [  # one per stream: the whole-job runs prefill distinct prompts
        torch.randint(100, engine.vocab_size, (args.prompt_tokens,), generator=gen).tolist()
        for _ in range(max(streams))
    ]
    median_decode_step_s(engine, prompts[:1], 4)  # warm-up
    calls = {n: record_step(engine, n, args.prompt_tokens) for n in streams}
    samples: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for n in streams:
            seconds, flops = replay_s(calls[n])
            samples.setdefault(("ceiling", n), []).append(seconds)
            samples[("flops", n)] = [flops]
            step_prompts = [prompts[0]] * n
            samples.setdefault(("decode", n), []).append(median_decode_step_s(engine, step_prompts, args.tokens))
            samples.setdefault(("job", n), []).append(engine_throughput(engine, prompts[:n], args.tokens))
    bandwidth = copy_bandwidth()
    print(
        f"model={args.model} threads={args.threads} torch={torch.__version__} prompt={args.prompt_tokens} "
        f"tokens/stream={args.tokens} rounds={args.rounds} copy bandwidth={bandwidth / 1e9:.1f} GB/s (read+write)"
    )
    print(
        f"{'streams':>7} {'GEMMs':>6} {'GFLOP':>6} {'ceiling tok/s':>14} {'GFLOP/s':>8} "
        f"{'decode tok/s':>13} {'% ceiling':>10} {'job tok/s':>10} {'% ceiling':>10}"
    )
    for n in streams:
        ceiling_s = statistics.median(samples[("ceiling", n)])
        flops = samples[("flops", n)][0]
        ceiling = n / ceiling_s
        decode = n / statistics.median(samples[("decode", n)])
        job = statistics.median(samples[("job", n)])
        print(
            f"{n:>7} {len(calls[n]):>6} {flops / 1e9:>6.2f} {ceiling:>14.1f} {flops / ceiling_s / 1e9:>8.1f} "
            f"{decode:>13.1f} {100 * decode / ceiling:>9.0f}% {job:>10.1f} {100 * job / ceiling:>9.0f}%"
        )
    if 1 in streams:
        roofline = bandwidth / weight_bytes(engine.model)
        decode_b1 = 1 / statistics.median(samples[("decode", 1)])
        print(
            f"batch-1 decode {decode_b1:.1f} tok/s vs bandwidth roofline {roofline:.1f} tok/s "
            f"(fp32 weight bytes / copy bandwidth): {100 * decode_b1 / roofline:.0f}%"
        )


if __name__ == "__main__":
    main()
