"""Property-based HTTP fuzzing of the served OpenAPI schema (issue #16 acceptance).

    python bench/serve_fuzz.py [--max-examples 60] [--seed 1] [--max-time 600]

Starts the OpenAI server in this process (uvicorn thread) on the real engine with a tiny random LLaMA (the
builtin teacher's tokenizer and chat template), with an API key set, and runs ``schemathesis run`` against
its ``/openapi.json`` (every operation, examples + coverage + fuzzing + stateful phases, the key sent) with
the ``not_a_server_error`` check. Then it checks the server still answers (``/health`` and a chat
completion). Prints the schemathesis summary, the HTTP status counts the server saw, and exits 1 on any
5xx or when the server stopped answering.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KEY = "fuzz-key-1"


class StatusCounter:
    """ASGI middleware counting response status codes by path (what the fuzzer made the server answer)."""

    def __init__(self, app: Any):
        self.app = app
        self.counts: collections.Counter = collections.Counter()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.counts[(message["status"], scope["path"])] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


def tiny_model(out: str) -> str:
    from distill.teacher.sources import resolve_model
    from tests.conftest import make_tiny_llama

    return make_tiny_llama(Path(out), resolve_model("smollm2-135m-instruct"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-examples", type=int, default=60, help="examples per operation and phase")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-time", type=int, default=600, help="time budget of the schemathesis run (s)")
    args = ap.parse_args()

    import httpx
    import torch

    from serve.api import create_app
    from serve.backends import EngineBackend
    from serve.engine.async_engine import AsyncEngine
    from serve.section import ServeSection
    from serve.server_thread import ServerThread

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="rd-fuzz-")
    engine = AsyncEngine.from_pretrained(tiny_model(os.path.join(tmp, "tiny")), max_model_len=256, max_batch_size=8)
    # A server configured for exposure: a key, and small per-request limits so generated requests stay cheap.
    section = ServeSection(
        api_key_env=None,
        max_tokens_limit=32,
        max_tokens_default=16,
        max_n=2,
        max_choices_per_request=4,
        request_timeout_s=60,
    )
    app = create_app(EngineBackend(engine, name="tiny"), section, api_keys=[KEY], close_backends=True)
    counter = StatusCounter(app)
    server = ServerThread(counter).start()
    url = server.base_url
    try:
        cmd = [
            os.path.join(os.path.dirname(sys.executable), "schemathesis"),
            "run",
            f"{url}/openapi.json",
            "-H",
            f"Authorization: Bearer {KEY}",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            str(args.max_examples),
            "--seed",
            str(args.seed),
            "--workers",
            "1",
            "--request-timeout",
            "60",
            "--max-time",
            str(args.max_time),
            "--continue-on-failure",
            "--warnings",
            "off",
        ]
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, text=True, capture_output=True, cwd=tmp)  # its report folder goes there
        print(proc.stdout[-6000:])
        if proc.stderr.strip():
            print(proc.stderr[-2000:], file=sys.stderr)
        health = httpx.get(url + "/health", timeout=30).status_code
        chat = httpx.post(
            url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        unauth = httpx.get(url + "/v1/models", timeout=30).status_code
    finally:
        server.stop()
    by_status: collections.Counter = collections.Counter()
    for (status, _path), n in counter.counts.items():
        by_status[status] += n
    server_errors = {k: v for k, v in counter.counts.items() if k[0] >= 500}
    total = sum(by_status.values())
    print(f"fuzz: {total} HTTP responses, by status {dict(sorted(by_status.items()))}")
    print(f"fuzz: 5xx responses: {sum(server_errors.values())} {server_errors or ''}")
    print(
        f"after the fuzz: GET /health {health}, chat completion {chat.status_code}, "
        f"GET /v1/models without a key {unauth}; schemathesis exit code {proc.returncode}"
    )
    ok = not server_errors and health == 200 and chat.status_code == 200 and unauth == 401 and proc.returncode == 0
    print("fuzz: PASS" if ok else "fuzz: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
