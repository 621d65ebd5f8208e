"""Where a decode step and a prefill go, teacher vs student, on the engine that serves both.

    python bench/step_breakdown.py --student RUN/student [--teacher smollm2-135m-instruct]
        [--streams 1,16] [--prompt-tokens 64] [--rounds 3]

For each model: the median decode step at each number of concurrent greedy streams (every stream
past its first token) and the prefill of one ``--prompt-tokens`` prompt (the TTFT the eval reports),
split by forward hooks into attention, FFN (the MoE block for the student), the LM head and the rest
(norms, embedding, sampling, the engine's own work). Attention and FFN are also given per layer, so
a student layer can be set against a teacher layer: a step's ratio is layers x per-layer cost plus
the head, which both models share. The hooks cost a few microseconds per module call, the same for
both models. Rounds alternate the models so a busy machine favours neither; medians are printed.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.eval.speed import _random_prompts  # noqa: E402
from serve.engine.engine import LLMEngine  # noqa: E402
from serve.engine.types import GenerationRequest, SamplingOptions  # noqa: E402

PARTS = ("attn", "ffn", "head")


def _part(name: str) -> str | None:
    """The part a module's time counts to (the engine's modules keep the Hugging Face names)."""
    if name.endswith("self_attn"):
        return "attn"
    if name.endswith(".mlp"):  # the teacher's SwiGLU FFN, the student's MoE block
        return "ffn"
    if name.endswith("lm_head"):
        return "head"
    return None


class Timed:
    """Accumulates wall time inside the model's attention, FFN and head modules while ``on``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.on = False
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.layers = 0
        for name, module in model.named_modules():
            part = _part(name)
            if part is not None:
                self.layers += part == "attn"
                self._hook(module, part)

    def _hook(self, module: torch.nn.Module, part: str) -> None:
        start: list[float] = []
        module.register_forward_pre_hook(lambda m, a: start.append(time.perf_counter()))

        def done(m, a, o) -> None:
            began = start.pop()
            if self.on:
                self.seconds[part] += time.perf_counter() - began

        module.register_forward_hook(done)


def decode(engine: LLMEngine, timed: Timed, streams: int, tokens: int, vocab: int) -> dict[str, float]:
    """Median decode step (ms) and each part's mean (ms) over the steps that decode every stream."""
    sampling = SamplingOptions(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(_random_prompts(streams, 64, vocab)):
        engine.add_request(GenerationRequest(f"d{time.perf_counter_ns()}-{i}", ids, sampling))
    totals: dict[str, float] = collections.defaultdict(float)
    steps: list[float] = []
    first: set[str] = set()
    while engine.has_unfinished():
        steady = len(first) == streams  # every stream is past its prefill
        timed.seconds.clear()
        timed.on = True
        t = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - t
        timed.on = False
        first.update(out.request_id for out in outputs if out.token_ids)
        if steady and sum(len(out.token_ids) for out in outputs) == streams:
            steps.append(elapsed)
            for part in PARTS:
                totals[part] += timed.seconds[part]
    return {"step": statistics.median(steps) * 1e3, **{k: totals[k] / len(steps) * 1e3 for k in PARTS}}


def prefill(engine: LLMEngine, timed: Timed, prompt_tokens: int, vocab: int) -> dict[str, float]:
    """One prompt to its first token (ms) and each part's share of it."""
    sampling = SamplingOptions(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.add_request(
        GenerationRequest(f"p{time.perf_counter_ns()}", _random_prompts(1, prompt_tokens, vocab)[0], sampling)
    )
    timed.seconds.clear()
    timed.on = True
    t = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    timed.on = False
    return {"step": (time.perf_counter() - t) * 1e3, **{k: timed.seconds[k] * 1e3 for k in PARTS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="a student directory (a pipeline run's student/)")
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--streams", default="1,16")
    parser.add_argument("--tokens", type=int, default=40, help="tokens per stream in a decode measurement")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    streams = [int(s) for s in args.streams.split(",")]

    models = {}
    for label, path in (("teacher", args.teacher), ("student", args.student)):
        engine = LLMEngine.from_pretrained(path, max_batch_size=max(streams))
        models[label] = (engine, Timed(engine.model), engine.vocab_size)
    phases = [f"decode x{s}" for s in streams] + [f"prefill {args.prompt_tokens}"]
    results: dict[tuple[str, str], list[dict[str, float]]] = collections.defaultdict(list)
    for engine, timed, vocab in models.values():  # warm up: packed weights, first-call allocations
        decode(engine, timed, 2, 4, vocab)
    for _ in range(args.rounds):
        for label, (engine, timed, vocab) in models.items():
            for s in streams:
                results[label, f"decode x{s}"].append(decode(engine, timed, s, args.tokens, vocab))
            results[label, phases[-1]].append(prefill(engine, timed, args.prompt_tokens, vocab))

    def med(label: str, phase: str, key: str) -> float:
        return statistics.median(r[key] for r in results[label, phase])

    print(
        f"\nteacher={args.teacher} ({models['teacher'][1].layers} layers) "
        f"student={args.student} ({models['student'][1].layers} layers), {args.threads} threads, "
        f"medians of {args.rounds} rounds; ms"
    )
    columns = ("total", "attn", "/layer", "ffn", "/layer", "head", "rest")  # rest = total - the parts
    print(f"{'phase':14}{'model':9}" + "".join(f"{c:>8}" for c in columns))
    for phase in phases:
        row = {}
        for label in models:
            layers = models[label][1].layers
            total, attn, ffn, head = (med(label, phase, k) for k in ("step", *PARTS))
            row[label] = (total, attn, attn / layers, ffn, ffn / layers, head, total - attn - ffn - head)
            print(f"{phase:14}{label:9}" + "".join(f"{v:>8.2f}" for v in row[label]))
        ratio = [s / t if t else float("nan") for s, t in zip(row["student"], row["teacher"])]
        print(f"{'':14}{'s/t':9}" + "".join(f"{v:>8.2f}" for v in ratio))


if __name__ == "__main__":
    main()
