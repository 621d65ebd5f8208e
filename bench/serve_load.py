"""Serving load test: student vs teacher through one OpenAI-compatible server.

    python bench/serve_load.py [--tokens 64] [--concurrency 1,4,16] [--student DIR] [--threads 2]

Starts one server (a subprocess running ``serve.api.create_app`` with two engines: ``teacher`` =
builtin SmolLM2-135M-Instruct, ``student`` = ``--student DIR`` or a student built from the teacher
by ``distill.student.init.init_from_teacher`` with the default student section), then drives it over
HTTP with streaming chat completions (greedy, ``ignore_eos``, ``--tokens`` each) and prints per model
and concurrency: time to first token p50/p99 (request sent -> first content chunk) and output
tokens/s (all completion tokens / wall time), the student/teacher ratios, and the engine through
HTTP at the top concurrency vs sequential ``transformers.generate`` (batch 1, same tokens).
The load generator runs in this process, the server in another, so the client does not steal the
server's GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._serving import listening_socket, serve_on_fd, wait_healthy  # noqa: E402

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


# ------------------------------------------------------------------------------------------ server side
def run_server(fd: int, teacher_dir: str, student_dir: str, threads: int, max_batch: int) -> None:
    import torch

    from serve.api import create_app
    from serve.backends import EngineBackend
    from serve.engine.async_engine import AsyncEngine
    from serve.section import ServeSection

    torch.set_num_threads(threads)
    backends = [
        EngineBackend(AsyncEngine.from_pretrained(d, max_batch_size=max_batch), name=n)
        for n, d in (("teacher", teacher_dir), ("student", student_dir))
    ]
    section = ServeSection(api_key_env=None, max_ongoing_requests=256, max_queued_requests=256)
    serve_on_fd(create_app(backends, section, close_backends=True), fd, log_level="error")


def build_student(teacher_dir: str, out_dir: str) -> str:
    from transformers import AutoConfig, AutoTokenizer

    from distill.student.init import init_from_teacher
    from distill.student.section import StudentSection

    config = StudentSection().to_student_config(AutoConfig.from_pretrained(teacher_dir))
    init_from_teacher(teacher_dir, config).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out_dir)
    return out_dir


# ------------------------------------------------------------------------------------------ client side
async def one_stream(http, url: str, model: str, prompt: str, tokens: int) -> tuple[float, int]:
    """(seconds to the first content chunk, completion tokens) of one streaming chat completion."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, completion = None, 0
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {await resp.aread()}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                completion = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if ttft is None and "role" not in choice["delta"] and choice["delta"].get("content") is not None:
                    ttft = time.perf_counter() - start
    return (ttft if ttft is not None else time.perf_counter() - start), completion


async def load_level(url: str, model: str, concurrency: int, requests: int, tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        queue = list(range(requests))
        results: list[tuple[float, int]] = []

        async def worker() -> None:
            while queue:
                i = queue.pop()
                results.append(await one_stream(http, url, model, PROMPTS[i % len(PROMPTS)], tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return {
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "tok_s": sum(r[1] for r in results) / wall,
        "requests": len(results),
    }


def hf_sequential(model_dir: str, tokens: int, prompts: int, threads: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import distill.student  # noqa: F401 - registers the student with AutoModelForCausalLM

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generated, start = 0, None
    for i, prompt in enumerate(PROMPTS[: prompts + 1]):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
            )
        if i == 0:  # warm-up
            start = time.perf_counter()
            continue
        generated += out.shape[1] - ids.shape[1]
    return generated / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="completion tokens per request")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: max(4, 2 x c))")
    parser.add_argument("--student", help="student model dir (default: built from the teacher)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--hf-prompts", type=int, default=3)
    parser.add_argument("--port", type=int, default=0, help="the server's port (default 0: a free one)")
    parser.add_argument("--_server", nargs=3, metavar=("FD", "TEACHER", "STUDENT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if args._server:
        fd, teacher, student = args._server
        run_server(int(fd), teacher, student, args.threads, max(levels))
        return

    from distill.teacher.sources import resolve_model

    teacher_dir = resolve_model("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as tmp:
        student_dir = args.student or build_student(teacher_dir, tmp)
        sock = listening_socket(args.port)  # the server subprocess inherits the listening socket
        port = sock.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
        server = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--_server",
                str(sock.fileno()),
                teacher_dir,
                student_dir,
                "--threads",
                str(args.threads),
                "--concurrency",
                args.concurrency,
            ],
            env=env,
            pass_fds=[sock.fileno()],
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, server, timeout_s=300)
            rows: dict[str, dict[int, dict]] = {}
            for model in ("teacher", "student"):
                asyncio.run(load_level(url, model, 2, 2, 8))  # warm-up
                rows[model] = {}
                for c in levels:
                    n = args.requests or max(4, 2 * c)
                    rows[model][c] = asyncio.run(load_level(url, model, c, n, args.tokens))
        finally:
            server.terminate()
            server.wait(timeout=60)
            sock.close()
        hf = {
            m: hf_sequential(d, args.tokens, args.hf_prompts, args.threads)
            for m, d in (("teacher", teacher_dir), ("student", student_dir))
        }

    print(f"server threads={args.threads}, {args.tokens} completion tokens per request, greedy, streaming chat")
    print(f"{'model':<9}{'conc':>5}{'reqs':>6}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}{'out tok/s':>11}")
    for model, by_c in rows.items():
        for c, r in by_c.items():
            print(
                f"{model:<9}{c:>5}{r['requests']:>6}{1000 * r['ttft_p50']:>13.0f}{1000 * r['ttft_p99']:>13.0f}"
                f"{r['tok_s']:>11.1f}"
            )
    print("student / teacher:")
    for c in levels:
        s, t = rows["student"][c], rows["teacher"][c]
        print(f"  c={c:<3} tokens/s {s['tok_s'] / t['tok_s']:.2f}x   TTFT p50 {s['ttft_p50'] / t['ttft_p50']:.2f}x")
    top = max(levels)
    for model in ("teacher", "student"):
        print(
            f"{model}: sequential transformers.generate {hf[model]:.1f} tok/s; server at c={top} "
            f"{rows[model][top]['tok_s']:.1f} tok/s = {rows[model][top]['tok_s'] / hf[model]:.1f}x"
        )


if __name__ == "__main__":
    main()
