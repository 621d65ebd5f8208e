"""Engine decode throughput vs sequential ``transformers.generate``, and batch-1 decode vs the memory roofline.

    python bench/engine_decode.py [--tokens 64] [--threads 2] [--models teacher,student] [--concurrency 1,4,16]

For SmolLM2-135M (builtin) and a student built from it (``init_from_teacher``, default student
section: half the layers, 8 experts, top-2) this prints:

* sequential HF ``generate`` tokens/s (batch 1, greedy, one prompt after another);
* engine tokens/s with 1, 4 and 16 concurrent streams (greedy, every stream ``--tokens`` long,
  prefill included), and the 16-stream / sequential ratio (target >= 5x);
* measured memory copy bandwidth (``Tensor.copy_`` of 256 MiB, counted as read + write bytes),
  the batch-1 roofline (fp32 weight bytes / bandwidth, tokens/s) and the % the engine's batch-1
  decode steps reach (target >= 50% for SmolLM2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "List three uses of a paperclip.",
    "Describe a cat to a child.",
    "Give me a short recipe for pancakes.",
    "Why do leaves change colour in autumn?",
    "What is 17 times 23?",
]


def copy_bandwidth(mib: int = 256, repeats: int = 7) -> float:
    """Bytes/s moved by a large ``copy_`` (read + write), median of ``repeats``."""
    src = torch.ones(mib * 1024 * 1024 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(times)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter (a tied embedding / lm_head counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def hf_sequential(model, tokenizer, prompts: list[str], tokens: int) -> float:
    """Greedy HF generate, batch 1, one prompt after another: generated tokens/s."""
    generated, start = 0, time.perf_counter()
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
            )
        generated += out.shape[1] - ids.shape[1]
    return generated / (time.perf_counter() - start)


def engine_throughput(engine, prompts: list[list[int]], tokens: int) -> float:
    """All prompts at once (concurrent streams), greedy, ``tokens`` each: generated tokens/s, prefill included."""
    from serve.engine.types import GenerationRequest, SamplingOptions

    sampling = SamplingOptions(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    results = engine.generate(
        [GenerationRequest(f"b{time.perf_counter_ns()}-{i}", p, sampling) for i, p in enumerate(prompts)]
    )
    elapsed = time.perf_counter() - start
    return sum(o.completion_tokens for outs in results.values() for o in outs[-1:]) / elapsed


def median_decode_step_s(engine, prompts: list[list[int]], tokens: int) -> float:
    """Median wall time of the decode steps of greedy streams (one per prompt, ``tokens`` each, started
    together), after the first tokens: seconds."""
    from serve.engine.types import GenerationRequest, SamplingOptions

    options = SamplingOptions(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(GenerationRequest(f"d{time.perf_counter_ns()}-{i}", prompt, options))
    while not any(o.token_ids for o in engine.step()):
        pass
    times = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def engine_decode_b1(engine, prompt: list[int], tokens: int) -> float:
    """Batch-1 decode steps only (after the prompt is prefilled): tokens/s."""
    return 1.0 / median_decode_step_s(engine, [prompt], tokens)


def bench_model(label: str, model_dir: str, args, bandwidth: float) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import distill.student  # noqa: F401 - registers the student with AutoModelForCausalLM
    from serve.engine.engine import LLMEngine

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = LLMEngine.from_pretrained(model_dir, max_batch_size=max(args.concurrency), prefill_chunk=256)
    encoded = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
        for p in PROMPTS
    ]
    engine_throughput(engine, encoded[:2], 4)  # warm-up
    row = {"model": label, "weights_mb": weight_bytes(engine.model) / 2**20}
    row["hf_seq"] = hf_sequential(hf, tokenizer, PROMPTS[: args.hf_prompts], args.tokens)
    for c in args.concurrency:
        prompts = [encoded[i % len(encoded)] for i in range(c)]
        row[f"engine_{c}"] = engine_throughput(engine, prompts, args.tokens)
    row["decode_b1"] = engine_decode_b1(engine, encoded[0], args.tokens)
    row["roofline"] = bandwidth / weight_bytes(engine.model)
    del hf
    return row


def build_student(teacher_dir: str, out_dir: str) -> str:
    from transformers import AutoConfig, AutoTokenizer

    from distill.student.init import init_from_teacher
    from distill.student.section import StudentSection

    config = StudentSection().to_student_config(AutoConfig.from_pretrained(teacher_dir))
    student = init_from_teacher(teacher_dir, config)
    student.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per stream")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hf-prompts", type=int, default=3, help="prompts for the sequential HF baseline")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--models", default="teacher,student")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    torch.set_num_threads(args.threads)
    from distill.teacher.sources import resolve_model

    teacher_dir = resolve_model("smollm2-135m-instruct")
    bandwidth = copy_bandwidth()
    print(
        f"threads={args.threads} tokens/stream={args.tokens} copy bandwidth={bandwidth / 1e9:.2f} GB/s "
        f"(read+write; {bandwidth / 2e9:.2f} GB/s counting copied bytes once)",
        flush=True,
    )
    cols = ["hf_seq"] + [f"engine_{c}" for c in args.concurrency]
    print(
        f"{'model':<24}{'weights MB':>11}"
        + "".join(f"{c:>11}" for c in cols)
        + f"{'x' + str(max(args.concurrency)) + '/seq':>9}{'b1 decode':>11}{'roofline':>10}{'% roof':>8}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.models.split(","):
            model_dir = teacher_dir if label == "teacher" else build_student(teacher_dir, tmp)
            r = bench_model(
                "SmolLM2-135M" if label == "teacher" else "student (from SmolLM2)", model_dir, args, bandwidth
            )
            rows.append(r)
            ratio = r[f"engine_{max(args.concurrency)}"] / r["hf_seq"]
            print(
                f"{r['model']:<24}{r['weights_mb']:>11.0f}"
                + "".join(f"{r[c]:>11.1f}" for c in cols)
                + f"{ratio:>8.1f}x{r['decode_b1']:>11.1f}{r['roofline']:>10.1f}"
                f"{100 * r['decode_b1'] / r['roofline']:>7.0f}%",
                flush=True,
            )
    if len(rows) == 2:
        t, s = rows
        print("student / teacher: " + ", ".join(f"{c} {s[c] / t[c]:.2f}x" for c in cols + ["decode_b1"]))
    print("(tokens/s; hf_seq = sequential transformers.generate batch 1; engine_N = N concurrent streams)")


if __name__ == "__main__":
    main()
