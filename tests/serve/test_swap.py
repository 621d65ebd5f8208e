"""Issue #16 point 8: a model swap drains the old engine until its in-flight requests finish (bounded by
serve.swap_drain_timeout_s); a request cut off by the bound ends with an error, never as finished.

The real model deployment class (``serve.app.ModelDeployment``, outside Ray) behind the real HTTP API:
a long stream is started, ``reconfigure`` swaps the model (as ``update_model`` / ``raydistill rollback``
make Serve do), and the stream must complete or fail loudly.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time

import httpx
import pytest

FAKE = "tests.serve.fake_engine:FakeAsyncEngine.from_pretrained"
LONG = {"model": "m", "prompt": "a long answer", "max_tokens": 50, "temperature": 0, "stream": True}


class DeploymentBackend:
    """The API backend over an in-process ModelDeployment (what HandleBackend does through Ray)."""

    def __init__(self, deployment, name: str):
        self.deployment = deployment
        self.name = name
        engine = deployment.current.engine
        self.tokenizer = engine.tokenizer
        self.context_length = engine.context_length

    def generate(self, request):
        return self.deployment.generate(request)

    async def stats(self) -> dict:
        return self.deployment.stats()


@pytest.fixture
def swap_setup(tiny_teacher_dir, tmp_path):
    """start(**section) -> (server, deployment, swap(model_dir)); reconfigure runs on a long-lived loop of
    its own (as on a replica, the drain task it starts outlives the call)."""
    from serve.api import create_app
    from serve.app import ModelDeployment
    from serve.section import ServeSection
    from serve.server_thread import ServerThread

    other = str(tmp_path / "other-model")
    shutil.copytree(tiny_teacher_dir, other)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servers = []

    def start(**section_kw):
        section = ServeSection(api_key_env=None, **section_kw)
        deployment = ModelDeployment.func_or_class(
            tiny_teacher_dir, section.model_dump(mode="json"), FAKE, {"token_delay": 0.06}
        )
        server = ServerThread(create_app(DeploymentBackend(deployment, "m"), section)).start()
        servers.append(server)

        def swap() -> None:
            asyncio.run_coroutine_threadsafe(deployment.reconfigure({"model_dir": other}), loop).result(60)

        return server, deployment, swap

    yield start
    for s in servers:
        s.stop()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def _stream_during_swap(server, deployment, swap) -> list[dict]:
    out: dict = {}

    def run() -> None:
        with httpx.stream("POST", server.base_url + "/v1/completions", json=LONG, timeout=60) as resp:
            out["status"] = resp.status_code
            out["events"] = [
                json.loads(line[6:])
                for line in resp.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"
            ]

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 20
    while deployment.current.active == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert deployment.current.active == 1, "the stream never started"
    old = deployment.current
    swap()
    assert deployment.current is not old  # new requests go to the new engine at once
    t.join(timeout=60)
    assert out["status"] == 200
    return out["events"]


def test_a_long_stream_during_a_swap_completes(swap_setup):
    # The stream (50 tokens x 60 ms = 3 s) outlives graceful_shutdown_timeout_s=1 by far; the old engine
    # must keep serving it until it is done.
    server, deployment, swap = swap_setup(graceful_shutdown_timeout_s=1)
    events = _stream_during_swap(server, deployment, swap)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    assert not any("error" in e for e in events)
    deadline = time.monotonic() + 10
    while deployment._draining and time.monotonic() < deadline:  # then the old engine is shut down
        time.sleep(0.05)
    assert not deployment._draining


def test_a_stream_cut_off_by_the_drain_bound_ends_with_an_error_not_stop(swap_setup):
    server, deployment, swap = swap_setup(swap_drain_timeout_s=0.5)
    events = _stream_during_swap(server, deployment, swap)
    finishes = [c.get("finish_reason") for e in events for c in e.get("choices", [])]
    assert "stop" not in finishes and "length" not in finishes, finishes
    assert events[-1]["error"]["type"] == "server_error" and events[-1]["error"]["code"] == "engine_unavailable"
    # the new engine serves the next request normally
    r = httpx.post(server.base_url + "/v1/completions", json={**LONG, "stream": False, "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
