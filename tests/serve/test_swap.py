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

from tests.serve.fake_engine import FakeAsyncEngine

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


class GatedEngine(FakeAsyncEngine):
    """The fake engine, but a request longer than ``hold_after`` tokens stops after that many until ``gate``
    (a threading.Event) is set: the test decides when the in-flight request may go on, not a clock."""

    def __init__(self, *args, gate: threading.Event, hold_after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = gate
        self.hold_after = hold_after

    @classmethod
    def from_pretrained(cls, model: str, *, gate: threading.Event, hold_after: int = 4, **kw) -> GatedEngine:
        engine = FakeAsyncEngine.from_pretrained(model, **kw)
        engine.__class__ = cls
        engine.gate, engine.hold_after = gate, hold_after
        return engine

    async def generate(self, request):
        n = 0
        async for out in super().generate(request):
            yield out
            n += 1
            if n == self.hold_after and request.sampling.max_tokens > self.hold_after:
                while not self.gate.is_set() and not self.is_shut_down:
                    await asyncio.sleep(0.01)


GATED = "tests.serve.test_swap:GatedEngine.from_pretrained"


def _wait_for(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_request_crosses_the_swap_on_the_old_engine_while_new_requests_use_the_new_one(tiny_teacher_dir, tmp_path):
    """A stream is held half-way (after 4 of 12 tokens) while the model is swapped under it. The swap must
    not wait for it; a request sent after the swap is served by the new engine while the held stream is
    still open; released, the held stream finishes on the old engine with its full greedy text (the same as
    an unswapped run), and only then is the old engine shut down."""
    from serve.api import create_app
    from serve.app import ModelDeployment
    from serve.section import ServeSection
    from serve.server_thread import ServerThread

    other = str(tmp_path / "other-model")
    shutil.copytree(tiny_teacher_dir, other)
    gate = threading.Event()
    section = ServeSection(api_key_env=None)
    deployment = ModelDeployment.func_or_class(
        tiny_teacher_dir, section.model_dump(mode="json"), GATED, {"gate": gate, "hold_after": 4}
    )
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    server = ServerThread(create_app(DeploymentBackend(deployment, "m"), section)).start()
    held = {**LONG, "max_tokens": 12}
    try:
        # The reference: the same request, never held and never swapped.
        gate.set()
        ref = httpx.post(server.base_url + "/v1/completions", json={**held, "stream": False}, timeout=30).json()
        gate.clear()

        events: list[dict] = []
        got_first = threading.Event()
        out: dict = {}

        def run() -> None:
            with httpx.stream("POST", server.base_url + "/v1/completions", json=held, timeout=60) as resp:
                out["status"] = resp.status_code
                for line in resp.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line[6:]))
                        got_first.set()

        client = threading.Thread(target=run)
        client.start()
        assert got_first.wait(30), "the stream never started"
        old = deployment.current
        _wait_for(lambda: len(events) >= 4, "the first 4 tokens of the held stream")
        assert old.active == 1 and not gate.is_set()

        swap = asyncio.run_coroutine_threadsafe(deployment.reconfigure({"model_dir": other}), loop)
        try:
            swap.result(30)
        except TimeoutError:
            gate.set()
            pytest.fail("the swap waited for the in-flight request instead of switching at once")
        new = deployment.current
        assert new is not old and new.model_dir == other
        assert client.is_alive() and old.active == 1 and not old.engine.is_shut_down  # still held, not cut
        assert len(events) == 4

        # A request sent now goes to the new engine and finishes while the old one still holds the stream.
        r = httpx.post(server.base_url + "/v1/completions", json={**LONG, "stream": False, "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        assert len(new.engine.finished_ids) == 1 and old.active == 1 and len(events) == 4

        gate.set()
        client.join(timeout=60)
        assert not client.is_alive() and out["status"] == 200
        assert not any("error" in e for e in events), events[-1]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        text = "".join(c["text"] for e in events for c in e.get("choices", []))
        assert text == ref["choices"][0]["text"]
        # the held request finished on the old engine (which served the reference before), not the new one
        assert len(old.engine.finished_ids) == 2 and len(new.engine.finished_ids) == 1
        _wait_for(lambda: old.engine.is_shut_down and not deployment._draining, "the old engine's shutdown")
    finally:
        gate.set()
        server.stop()
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(timeout=10)
