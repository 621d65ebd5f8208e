"""Overload test of the OpenAI server (issue #16 acceptance): 4x more concurrent streams than it admits.

    python bench/serve_overload.py [--engine tiny|fake] [--slots 8] [--queued 4] [--factor 4] [--rounds 3]
                                   [--tokens 48] [--threads 1] [--max-pending N] [--model smollm2-135m-instruct]

The server runs in a subprocess (so the load generator never takes its GIL): ``raydistill serve --no-ray``'s
app on the real engine with a tiny random LLaMA (``--engine tiny``, default; the builtin teacher's
tokenizer) or on the timing-controlled fake engine of the tests (``--engine fake``, 20 ms per token). It
admits ``max_ongoing_requests`` (= ``--slots`` = the engine's batch) + ``max_queued_requests``
(``--queued``) engine jobs, and at most ``--max-pending`` (``serve.max_pending_prefills``) still waiting
for their first token, and answers 429 beyond that. ``--threads`` is the engine's torch threads: on a
2-core machine, 1 leaves a core to the HTTP front end and to this load generator (the README's table
compares 1 and 2).

1. idle: ``--idle`` sequential streaming chat completions -> time to first token (request sent -> first
   content chunk), p50.
2. overload: ``--rounds`` bursts of ``factor x (slots + queued)`` concurrent streaming completions
   (``--tokens`` each, ``ignore_eos``) while ``GET /health`` is polled every 100 ms.

Prints per status the count; that every non-200 is a 429 or 503 in OpenAI's error shape; that every 200
stream ended with a finish reason; /health answers (all 200?); TTFT p50/p90 of the admitted requests vs
idle, and PASS when every criterion holds (p50 admitted <= 2x idle p50).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._serving import listening_socket, serve_on_fd, wait_healthy  # noqa: E402

MSGS = [{"role": "user", "content": "Tell me a long story about the sea."}]


# ------------------------------------------------------------------------------------------ server side
def serve(
    fd: int, engine_kind: str, slots: int, queued: int, pending: int, threads: int, model_dir: str, log_path: str
) -> None:
    import logging

    import torch

    # One line per request with the server-side TTFT (handler start -> first token), parsed by the client.
    log = logging.getLogger("raydistill.serve")
    log.setLevel(logging.INFO)
    log.addHandler(logging.FileHandler(log_path))
    log.propagate = False

    from serve.api import create_app
    from serve.backends import EngineBackend
    from serve.section import ServeSection

    torch.set_num_threads(threads)
    if engine_kind == "fake":
        from tests.serve.fake_engine import FakeAsyncEngine

        engine = FakeAsyncEngine.from_pretrained(model_dir, max_batch_size=slots, token_delay=0.02, max_model_len=512)
    else:
        from serve.engine.async_engine import AsyncEngine

        engine = AsyncEngine.from_pretrained(model_dir, max_model_len=512, max_batch_size=slots)
    section = ServeSection(
        api_key_env=None,
        max_batch_size=slots,
        max_ongoing_requests=slots,
        max_queued_requests=queued,
        max_pending_prefills=pending or None,
    )
    serve_on_fd(create_app(EngineBackend(engine, name="m"), section, close_backends=True), fd, log_level="error")


# ------------------------------------------------------------------------------------------ client side
def is_openai_error(body: Any) -> bool:
    err = body.get("error") if isinstance(body, dict) else None
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and bool(err["message"])


async def one(http: Any, url: str, tokens: int) -> dict:
    t0 = time.perf_counter()
    body = {"model": "m", "messages": MSGS, "max_tokens": tokens, "stream": True, "temperature": 0, "ignore_eos": True}
    out: dict = {"ttft": None, "finish": None, "error_shape": None}
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        out["status"] = resp.status_code
        if resp.status_code != 200:
            raw = await resp.aread()
            try:
                out["error_shape"] = is_openai_error(json.loads(raw))
            except ValueError:
                out["error_shape"] = False
            return out
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if out["ttft"] is not None and '"finish_reason":null' in line:
                continue  # a plain content chunk after the first: nothing to record (keeps the client light)
            event = json.loads(line[6:])
            if "error" in event:
                out["finish"] = "error"
                continue
            for c in event.get("choices", []):
                if c.get("delta", {}).get("content") and out["ttft"] is None:
                    out["ttft"] = time.perf_counter() - t0
                if c.get("finish_reason"):
                    out["finish"] = c["finish_reason"]
    return out


async def health_poller(http: Any, url: str, stop: asyncio.Event, codes: list) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            codes.append(((await http.get(url + "/health", timeout=5)).status_code, time.perf_counter() - t0))
        except Exception:  # noqa: BLE001 - a timeout or refused connection: /health did not answer
            codes.append((0, time.perf_counter() - t0))
        await asyncio.sleep(0.1)


async def drive(url: str, args: argparse.Namespace) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        for _ in range(2):  # warm-up
            await one(http, url, 4)
        idle = [(await one(http, url, args.tokens))["ttft"] for _ in range(args.idle)]
        concurrent = args.factor * (args.slots + args.queued)
        stop = asyncio.Event()
        health: list = []
        poller = asyncio.ensure_future(health_poller(http, url, stop, health))
        results = []
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            results += await asyncio.gather(*(one(http, url, args.tokens) for _ in range(concurrent)))
        wall = time.perf_counter() - t0
        stop.set()
        await poller
        return {"idle": idle, "results": results, "health": health, "concurrent": concurrent, "wall": wall}


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["tiny", "fake"], default="tiny")
    ap.add_argument("--slots", type=int, default=8, help="engine batch = serve.max_ongoing_requests")
    ap.add_argument("--queued", type=int, default=4, help="serve.max_queued_requests")
    ap.add_argument("--factor", type=int, default=4, help="concurrent streams = factor x (slots + queued)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--idle", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--max-pending", type=int, default=0, help="serve.max_pending_prefills (0 = no bound, the default setting)"
    )
    ap.add_argument(
        "--model",
        help="model dir or alias for --engine tiny (default: a tiny random LLaMA); e.g. smollm2-135m-instruct",
    )
    ap.add_argument("--serve", nargs=3, metavar=("FD", "MODEL_DIR", "LOG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(
            int(args.serve[0]),
            args.engine,
            args.slots,
            args.queued,
            args.max_pending,
            args.threads,
            args.serve[1],
            args.serve[2],
        )
        return 0

    from distill.teacher.sources import resolve_model
    from tests.conftest import make_tiny_llama

    tmp = Path(tempfile.mkdtemp(prefix="rd-overload-"))
    model_dir = (
        resolve_model(args.model)
        if args.model
        else make_tiny_llama(tmp / "tiny", resolve_model("smollm2-135m-instruct"))
    )
    log_path = str(tmp / "server.log")
    sock = listening_socket()  # port 0: the kernel picks; the server subprocess inherits the socket
    port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--engine",
            args.engine,
            "--slots",
            str(args.slots),
            "--queued",
            str(args.queued),
            "--max-pending",
            str(args.max_pending),
            "--threads",
            str(args.threads),
            "--serve",
            str(sock.fileno()),
            model_dir,
            log_path,
        ],
        env=env,
        pass_fds=[sock.fileno()],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=180)
        run = asyncio.run(drive(url, args))
        with open(log_path) as handle:
            server_lines = handle.read().splitlines()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        sock.close()

    results = run["results"]
    by_status: dict[int, int] = {}
    for r in results:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    rejected = [r for r in results if r["status"] != 200]
    admitted = [r for r in results if r["status"] == 200]
    bad_status = [r for r in rejected if r["status"] not in (429, 503)]
    bad_shape = [r for r in rejected if not r["error_shape"]]
    unfinished = [r for r in admitted if r["finish"] not in ("stop", "length")]
    health_codes = [c for c, _ in run["health"]]
    health_lat = [t for _, t in run["health"]]
    idle_p50 = statistics.median(run["idle"])
    ttft = [r["ttft"] for r in admitted if r["ttft"] is not None]
    p50 = statistics.median(ttft)
    # Server-side TTFT of the streams (handler start -> first token): the idle ones are the first
    # 2 + --idle lines (warm-up + idle phase), the rest are the overload's admitted requests.
    server_ttft = [
        float(m.group(1)) for m in (re.search(r"status=200 .*ttft=([0-9.]+)s", ln) for ln in server_lines) if m
    ]
    n_idle = 2 + args.idle
    s_idle, s_load = server_ttft[2:n_idle], server_ttft[n_idle:]
    engine = (
        "fake engine (20 ms/token)" if args.engine == "fake" else f"our engine on {args.model or 'a tiny random LLaMA'}"
    )
    print(
        f"{engine}, slots {args.slots} (batch = max_ongoing_requests), max_queued_requests "
        f"{args.queued}, max_pending_prefills {args.max_pending or 'none'}; {run['concurrent']} concurrent streams x {args.rounds} rounds, {args.tokens} tokens each, "
        f"{run['wall']:.1f}s"
    )
    print(
        f"responses by status: {dict(sorted(by_status.items()))}; non-200 not 429/503: {len(bad_status)}; "
        f"non-200 not in OpenAI's error shape: {len(bad_shape)}; admitted streams without a finish reason: "
        f"{len(unfinished)}"
    )
    print(
        f"/health during the overload: {len(health_codes)} polls, {health_codes.count(200)} x 200, "
        f"latency p50 {statistics.median(health_lat) * 1000:.1f} ms, max {max(health_lat) * 1000:.1f} ms"
    )
    print(
        f"TTFT seen by the client: idle p50 {idle_p50 * 1000:.1f} ms; admitted under overload p50 "
        f"{p50 * 1000:.1f} ms, p90 {pct(ttft, 90) * 1000:.1f} ms -> p50 ratio {p50 / idle_p50:.2f}x"
    )
    server_ratio = float("inf")
    if s_idle and s_load:
        server_ratio = statistics.median(s_load) / statistics.median(s_idle)
        print(
            f"TTFT in the server (request handler start -> first token): idle p50 "
            f"{statistics.median(s_idle) * 1000:.1f} ms; admitted under overload p50 "
            f"{statistics.median(s_load) * 1000:.1f} ms, p90 {pct(s_load, 90) * 1000:.1f} ms -> p50 ratio "
            f"{server_ratio:.2f}x (limit 2x)"
        )
    ok = (
        not bad_status
        and not bad_shape
        and not unfinished
        and health_codes
        and all(c == 200 for c in health_codes)
        and server_ratio <= 2
        and by_status.get(429, 0) > 0
    )
    print("overload: PASS" if ok else "overload: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
