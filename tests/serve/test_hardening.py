"""Serving hardening (issue #16): protocol edge cases, limits, engine failures, disconnects.

Black-box: HTTP (httpx / the openai client) against a real uvicorn server on 127.0.0.1, with the fake
engine of ``tests/serve/fake_engine.py`` (or a small variant of it) unless the real engine is the point.
"""

from __future__ import annotations

import contextlib
import json

import httpx
import openai
import pytest

from tests.serve.conftest import asgi_post_scope, asgi_receive, start_fake_server

MSGS = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def fake_server(serve_tokenizer):
    server, engine = start_fake_server(serve_tokenizer)
    yield server, engine
    server.stop()


def post(server, path: str, body: dict, timeout: float = 30) -> httpx.Response:
    return httpx.post(
        server.base_url + path, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=timeout
    )


def assert_openai_error(resp: httpx.Response, status: int, param=None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


# ---------------------------------------------------------------------------------------------------
# 13: explicit null means "default"
# ---------------------------------------------------------------------------------------------------
def test_explicit_null_optional_fields_mean_default(fake_server):
    server, _ = fake_server
    nulls = {
        k: None
        for k in (
            "n",
            "temperature",
            "top_p",
            "top_k",
            "stream",
            "stop",
            "seed",
            "user",
            "presence_penalty",
            "frequency_penalty",
            "stream_options",
            "ignore_eos",
            "tools",
            "tool_choice",
            "logit_bias",
            "response_format",
        )
    }
    chat = post(
        server,
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": MSGS,
            "max_tokens": 3,
            "logprobs": None,
            "top_logprobs": None,
            "max_completion_tokens": None,
            **nulls,
        },
    )
    assert chat.status_code == 200, chat.text
    body = chat.json()
    assert len(body["choices"]) == 1 and body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["logprobs"] is None
    comp = post(
        server,
        "/v1/completions",
        {
            "model": "tiny",
            "prompt": "hi",
            "max_tokens": None,
            "echo": None,
            "logprobs": None,
            "suffix": None,
            "best_of": None,
            **nulls,
        },
    )
    assert comp.status_code == 200, comp.text
    usage = comp.json()["usage"]  # the default max_tokens: serve.max_tokens_default, within the 256 context
    assert usage["completion_tokens"] == min(256 - usage["prompt_tokens"], 256)
    # LangChain's ChatOpenAI sends these nulls through the official client too.
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=30)
    r = c.chat.completions.create(
        model="tiny", messages=MSGS, max_tokens=2, extra_body={"n": None, "temperature": None, "stream": None}
    )
    assert r.usage.completion_tokens == 2
    # Required fields stay required.
    assert_openai_error(post(server, "/v1/chat/completions", {"model": None, "messages": MSGS}), 400, "model")


# ---------------------------------------------------------------------------------------------------
# 14: fields we don't implement are a 400 naming the field
# ---------------------------------------------------------------------------------------------------
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(
    "path, field, value",
    [
        ("/v1/chat/completions", "tools", [TOOL]),
        ("/v1/chat/completions", "tool_choice", "required"),
        ("/v1/chat/completions", "tool_choice", {"type": "function", "function": {"name": "f"}}),
        ("/v1/chat/completions", "functions", [TOOL["function"]]),
        ("/v1/chat/completions", "function_call", "auto"),
        ("/v1/chat/completions", "logit_bias", {"50256": -100}),
        ("/v1/completions", "logit_bias", {"50256": -100}),
        ("/v1/completions", "best_of", 3),
        ("/v1/completions", "suffix", "tail"),
    ],
)
def test_unsupported_fields_are_rejected_by_name(fake_server, path, field, value):
    server, engine = fake_server
    body = {"model": "tiny", "max_tokens": 2, field: value}
    body.update({"messages": MSGS} if "chat" in path else {"prompt": "hi"})
    err = assert_openai_error(post(server, path, body), 400, field)
    assert err["type"] == "invalid_request_error" and field in err["message"]
    assert err["code"] == "unsupported_parameter"


def test_penalties_reach_the_engine_and_out_of_range_values_are_400(fake_server):
    from serve.protocol import ChatCompletionRequest
    from serve.serving import OpenAIServer

    server, _ = fake_server
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 2}
    penalties = {"presence_penalty": 0.5, "frequency_penalty": -1.0, "repetition_penalty": 1.2}
    assert post(server, "/v1/chat/completions", {**body, **penalties}).status_code == 200
    assert (
        post(server, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2, **penalties}).status_code
        == 200
    )
    options = OpenAIServer.sampling(ChatCompletionRequest(**body, **penalties), 2, 0, logprobs=False, top=0)
    assert (options.presence_penalty, options.frequency_penalty, options.repetition_penalty) == (0.5, -1.0, 1.2)
    for field, value in [("repetition_penalty", 0), ("repetition_penalty", 2.5), ("presence_penalty", 3)]:
        assert_openai_error(post(server, "/v1/chat/completions", {**body, field: value}), 400, field)


def test_neutral_values_of_unsupported_fields_are_accepted(fake_server):
    server, _ = fake_server
    ok = post(
        server,
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": MSGS,
            "max_tokens": 2,
            "tools": [],
            "tool_choice": "none",
            "logit_bias": {},
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "response_format": {"type": "text"},
        },
    )
    assert ok.status_code == 200, ok.text
    ok = post(
        server, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2, "best_of": 1, "logit_bias": {}}
    )
    assert ok.status_code == 200, ok.text


# ---------------------------------------------------------------------------------------------------
# 16: logprob edge cases, GET /v1/models/{id}
# ---------------------------------------------------------------------------------------------------
class ScriptedEngine:
    """Emits ``script`` (token ids) for every request, with log-probability ``logprob`` for each token and
    alternatives ``[(token, logprob), (token + 1, -inf)]`` (a masked token, as real models produce)."""

    def __init__(self, tokenizer, script: list[int], logprob: float = -0.5):
        from tests.serve.fake_engine import FakeAsyncEngine

        self._fake = FakeAsyncEngine(tokenizer, name="tiny")
        self.tokenizer, self.model_name, self.context_length = tokenizer, "tiny", 256
        self.script, self.logprob = script, logprob

    async def generate(self, request):
        from serve.engine.types import GenerationOutput, TokenLogprob

        s, sent = request.sampling, ""
        n = min(len(self.script), s.max_tokens)
        for i, tok in enumerate(self.script[:n]):
            full = self.tokenizer.decode(self.script[: i + 1])
            delta = "" if full.endswith("\ufffd") else full[len(sent) :]
            sent += delta
            top = [(tok, self.logprob), (tok + 1, float("-inf"))][: s.top_logprobs]
            yield GenerationOutput(
                request.request_id,
                [tok],
                delta,
                finished=i == n - 1,
                finish_reason="length" if i == n - 1 else None,
                logprobs=[TokenLogprob(tok, self.logprob, top)] if s.logprobs else None,
                prompt_tokens=len(request.prompt_ids),
                completion_tokens=i + 1,
            )

    def stats(self) -> dict:
        return {"running": 0, "waiting": 0}

    def shutdown(self) -> None:
        pass


def start_engine_server(engine, name: str = "tiny", **section_kw):
    from serve.api import create_app
    from serve.backends import EngineBackend
    from serve.section import ServeSection
    from serve.server_thread import ServerThread

    section_kw.setdefault("api_key_env", None)
    return ServerThread(create_app(EngineBackend(engine, name=name), ServeSection(**section_kw))).start()


def strict_json(text: str):
    def bad(name):
        raise ValueError(f"invalid JSON constant {name}")

    return json.loads(text, parse_constant=bad)


def sse_events(resp: httpx.Response) -> list:
    lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    return [strict_json(ln[len("data: ") :]) for ln in lines[:-1]]


def test_minus_inf_logprobs_are_clamped_not_500(serve_tokenizer):
    ids = serve_tokenizer("the quick brown fox", add_special_tokens=False).input_ids
    server = start_engine_server(ScriptedEngine(serve_tokenizer, ids, logprob=float("-inf")))
    try:
        chat = post(
            server,
            "/v1/chat/completions",
            {"model": "tiny", "messages": MSGS, "max_tokens": 4, "logprobs": True, "top_logprobs": 2},
        )
        assert chat.status_code == 200, chat.text
        content = strict_json(chat.text)["choices"][0]["logprobs"]["content"]
        assert [e["logprob"] for e in content] == [-9999.0] * 4
        assert all([t["logprob"] for t in e["top_logprobs"]] == [-9999.0, -9999.0] for e in content)
        comp = post(server, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 4, "logprobs": 2})
        assert comp.status_code == 200, comp.text
        lp = strict_json(comp.text)["choices"][0]["logprobs"]
        assert lp["token_logprobs"] == [-9999.0] * 4
        assert all(set(top.values()) == {-9999.0} for top in lp["top_logprobs"])
        for path, body in (
            ("/v1/chat/completions", {"messages": MSGS, "logprobs": True, "top_logprobs": 2}),
            ("/v1/completions", {"prompt": "hi", "logprobs": 2}),
        ):
            with httpx.stream(
                "POST",
                server.base_url + path,
                timeout=30,
                json={"model": "tiny", "max_tokens": 4, "stream": True, **body},
            ) as resp:
                assert resp.status_code == 200
                events = sse_events(resp)
            assert all("error" not in e for e in events), events
    finally:
        server.stop()


def test_streamed_completion_text_offset_continues_across_chunks(fake_server):
    server, _ = fake_server
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 6, "logprobs": 1, "temperature": 0}
    whole = post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    tokens, offsets = [], []
    with httpx.stream("POST", server.base_url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        for event in sse_events(r):
            for choice in event["choices"]:
                if choice["logprobs"]:
                    tokens += choice["logprobs"]["tokens"]
                    offsets += choice["logprobs"]["text_offset"]
    assert tokens == whole["tokens"] and len(tokens) == 6
    assert offsets == whole["text_offset"] == [sum(len(t) for t in tokens[:i]) for i in range(6)]


def test_chat_logprob_bytes_are_the_tokens_bytes(serve_tokenizer):
    text = "é日本語 ok"
    ids = serve_tokenizer(text, add_special_tokens=False).input_ids
    # The byte-level tokenizer splits the CJK characters across tokens: single tokens decode to U+FFFD.
    assert any(serve_tokenizer.decode([i]) == "\ufffd" for i in ids)
    server = start_engine_server(ScriptedEngine(serve_tokenizer, ids))
    try:
        c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=30)
        r = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=len(ids), logprobs=True, top_logprobs=1)
        content = r.choices[0].logprobs.content
        assert r.choices[0].message.content == text
        assert b"".join(bytes(e.bytes) for e in content) == text.encode("utf-8")
        assert all(bytes(e.top_logprobs[0].bytes) == bytes(e.bytes) for e in content)
        chunks = list(
            c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=len(ids), logprobs=True, stream=True)
        )
        streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
        assert b"".join(bytes(e.bytes) for e in streamed) == text.encode("utf-8")
    finally:
        server.stop()


def test_get_model_by_id(fake_server):
    server, _ = fake_server
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=30)
    m = c.models.retrieve("tiny")
    assert m.id == "tiny" and m.object == "model" and m.owned_by == "raydistill"
    assert m.model_dump() == c.models.list().data[0].model_dump()
    err = assert_openai_error(httpx.get(server.base_url + "/v1/models/nope", timeout=30), 404, "model")
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("org/nope")


# ---------------------------------------------------------------------------------------------------
# 4: bounds on everything a client controls
# ---------------------------------------------------------------------------------------------------
LIMITS = dict(
    max_n=4, max_choices_per_request=6, max_stop_sequences=2, max_stop_length=10, max_tokens_limit=8, max_top_logprobs=3
)


@pytest.fixture(scope="module")
def limited_server(serve_tokenizer):
    server, engine = start_fake_server(serve_tokenizer, **LIMITS)
    yield server, engine
    server.stop()


@pytest.mark.parametrize(
    "path, body, param, limit",
    [
        ("/v1/completions", {"prompt": ["a", "b", "c", "d"], "n": 2}, "n", "serve.max_choices_per_request"),
        ("/v1/completions", {"prompt": ["a"] * 7}, "prompt", "serve.max_choices_per_request"),
        ("/v1/chat/completions", {"n": 5}, "n", "serve.max_n"),
        ("/v1/chat/completions", {"stop": ["a", "b", "c"]}, "stop", "serve.max_stop_sequences"),
        ("/v1/completions", {"stop": "x" * 11}, "stop", "serve.max_stop_length"),
        ("/v1/chat/completions", {"max_tokens": 9}, "max_tokens", "serve.max_tokens_limit"),
        ("/v1/chat/completions", {"max_completion_tokens": 9}, "max_completion_tokens", "serve.max_tokens_limit"),
        ("/v1/completions", {"max_tokens": 9}, "max_tokens", "serve.max_tokens_limit"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 4}, "top_logprobs", "serve.max_top_logprobs"),
        ("/v1/completions", {"logprobs": 4}, "logprobs", "serve.max_top_logprobs"),
        ("/v1/chat/completions", {"seed": 2**63}, "seed", "64-bit"),
        ("/v1/completions", {"seed": -(2**63) - 1}, "seed", "64-bit"),
    ],
)
def test_client_controlled_sizes_are_bounded(limited_server, path, body, param, limit):
    server, _ = limited_server
    base = {"model": "tiny", "max_tokens": 2}
    base.update({"messages": MSGS} if "chat" in path else {"prompt": "hi"})
    err = assert_openai_error(post(server, path, {**base, **body}), 400, param)
    assert err["type"] == "invalid_request_error" and limit in err["message"]


def test_requests_at_the_limits_are_served(limited_server):
    server, _ = limited_server
    r = post(
        server,
        "/v1/completions",
        {
            "model": "tiny",
            "prompt": ["a", "b", "c"],
            "n": 2,
            "max_tokens": 8,
            "stop": ["x" * 10, "zz"],
            "logprobs": 3,
            "seed": 2**63 - 1,
        },
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 6
    r = post(
        server,
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": MSGS,
            "n": 4,
            "max_completion_tokens": 8,
            "logprobs": True,
            "top_logprobs": 3,
            "seed": -(2**63),
        },
    )
    assert r.status_code == 200, r.text


def _wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_admission_counts_engine_jobs_not_http_requests(serve_tokenizer):
    # Room for 3 engine jobs (2 running + 1 queued): one request with n=2 leaves room for 1 job, not 2.
    server, engine = start_fake_server(
        serve_tokenizer, token_delay=0.05, max_batch_size=2, max_ongoing_requests=2, max_queued_requests=1
    )
    state = server.config.app.state.server
    try:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 200, "n": 2, "stream": True}
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=30) as first:
            assert first.status_code == 200
            _wait_for(lambda: engine.stats()["running"] == 2, what="2 running jobs")
            busy = post(server, "/v1/completions", {"model": "tiny", "prompt": "y", "max_tokens": 2, "n": 2})
            err = assert_openai_error(busy, 429)
            assert err["type"] == "rate_limit_error" and "engine jobs" in err["message"]
            assert_openai_error(
                post(server, "/v1/completions", {"model": "tiny", "prompt": ["y", "z"], "max_tokens": 2}), 429
            )
        _wait_for(lambda: state.in_flight == 0, what="the cancelled stream to give back its jobs")
        ok = post(server, "/v1/completions", {"model": "tiny", "prompt": "y", "max_tokens": 2, "n": 2})
        assert ok.status_code == 200, ok.text
    finally:
        server.stop()


def test_pending_prefill_bound_answers_429_until_the_waiting_request_has_its_first_token(serve_tokenizer):
    """serve.max_pending_prefills bounds TTFT under bursts: while 1 admitted job waits for its first token, a
    new request gets 429 (slots are free: only this bound refuses it); once the first token is out, it fits."""
    import threading

    server, engine = start_fake_server(
        serve_tokenizer, token_delay=0.5, max_batch_size=4, max_ongoing_requests=4, max_pending_prefills=1
    )
    state = server.config.app.state.server
    small = {"model": "tiny", "prompt": "y", "max_tokens": 1}
    first: list = []
    waiting = threading.Thread(
        target=lambda: first.append(post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 3}))
    )
    try:
        waiting.start()
        _wait_for(lambda: state.pending == 1, what="the first request to be admitted")
        err = assert_openai_error(post(server, "/v1/completions", small), 429)
        assert err["type"] == "rate_limit_error" and "serve.max_pending_prefills" in err["message"]
        assert engine.stats()["running"] == 1  # a slot was free: the bound, not the batch, refused it
        _wait_for(lambda: state.pending == 0, what="the first token")
        assert state.in_flight == 1  # still generating: it no longer counts as pending
        ok = post(server, "/v1/completions", small)
        assert ok.status_code == 200, ok.text
        waiting.join(30)
        assert first[0].status_code == 200, first[0].text
        _wait_for(lambda: state.in_flight == 0 and state.pending == 0, what="every job given back")
    finally:
        waiting.join(30)
        server.stop()


def test_requests_have_a_default_deadline(serve_tokenizer):
    from serve.section import ServeSection

    assert ServeSection().request_timeout_s is not None  # on by default
    server, engine = start_fake_server(serve_tokenizer, token_delay=0.05, request_timeout_s=0.5)
    state = server.config.app.state.server
    try:
        err = assert_openai_error(
            post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 200}), 504
        )
        assert err["type"] == "server_error" and err["code"] == "timeout"
        assert "serve.request_timeout_s" in err["message"]
        _wait_for(lambda: len(engine.aborted_ids) == 1 and not engine.stats()["running"], what="the abort")
        with httpx.stream(
            "POST",
            server.base_url + "/v1/chat/completions",
            timeout=30,
            json={"model": "tiny", "messages": MSGS, "max_tokens": 200, "stream": True},
        ) as resp:
            events = sse_events(resp)
        assert events[-1]["error"]["code"] == "timeout"
        assert not any(c.get("finish_reason") for e in events for c in e.get("choices", []))  # never "finished"
        _wait_for(lambda: len(engine.aborted_ids) == 2 and state.in_flight == 0, what="the stream's abort")
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------------
# 6 + 3: engine failures are 5xx server_error without backend text; a dead engine is 503 and unhealthy
# ---------------------------------------------------------------------------------------------------
SECRET = "secret-backend-detail-7f3a"


@pytest.fixture
def real_engine_server(tiny_teacher_dir):
    """(ServerThread, AsyncEngine) on the tiny random LLaMA, private to the test (tests break its engine)."""
    from serve.engine.async_engine import AsyncEngine

    engine = AsyncEngine.from_pretrained(tiny_teacher_dir, max_model_len=256, max_batch_size=4)
    server = start_engine_server(engine)
    yield server, engine
    server.stop()
    engine.shutdown()


def test_engine_step_failure_is_a_5xx_without_backend_text_and_the_engine_recovers(real_engine_server):
    import threading

    server, engine = real_engine_server
    core = engine.engine
    real_sample = core._sample_and_emit
    fail = threading.Event()

    def flaky_sample(*args):  # inside step(), as a model or sampling error would be
        if fail.is_set():
            fail.clear()
            raise RuntimeError(f"CUDA error: {SECRET}")
        return real_sample(*args)

    core._sample_and_emit = flaky_sample
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "ignore_eos": True}
    fail.set()
    err = assert_openai_error(post(server, "/v1/completions", body), 500)
    assert err["type"] == "server_error" and SECRET not in json.dumps(err) and "CUDA" not in err["message"]
    # The loop survives: the next request is served.
    ok = post(server, "/v1/completions", body)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    # Mid-stream: an in-band error event of type server_error, no finish_reason, then [DONE].
    with httpx.stream(
        "POST",
        server.base_url + "/v1/chat/completions",
        timeout=30,
        json={"model": "tiny", "messages": MSGS, "max_tokens": 200, "ignore_eos": True, "stream": True},
    ) as resp:
        events = []
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if len(events) == 3:
                    fail.set()
                    break
        rest = [ln for ln in lines if ln]
    assert rest[-1] == "data: [DONE]"
    tail = [json.loads(ln[6:]) for ln in rest[:-1]]
    assert tail[-1]["error"]["type"] == "server_error" and SECRET not in json.dumps(tail[-1])
    assert not any(c.get("finish_reason") for e in events + tail for c in e.get("choices", []))
    assert httpx.get(server.base_url + "/health", timeout=30).status_code == 200


def test_dead_engine_thread_means_503_and_unhealthy_not_a_hang(real_engine_server):
    server, engine = real_engine_server
    assert httpx.get(server.base_url + "/health", timeout=30).status_code == 200

    def broken(*_a, **_k):
        raise RuntimeError(SECRET)

    engine.engine.has_unfinished = broken  # outside step(): before the outer guard this killed the thread
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
    err = assert_openai_error(post(server, "/v1/completions", body, timeout=20), 503)  # the waiting request
    assert err["type"] == "server_error" and SECRET not in json.dumps(err)
    _wait_for(lambda: not engine._thread.is_alive(), what="the engine thread to end")
    health = httpx.get(server.base_url + "/health", timeout=30)
    assert_openai_error(health, 503)
    err = assert_openai_error(
        post(server, "/v1/chat/completions", {"model": "tiny", "messages": MSGS, "max_tokens": 2}, timeout=20), 503
    )
    assert err["type"] == "server_error"


# ---------------------------------------------------------------------------------------------------
# 7: a client that stops reading and then disconnects frees its engine slot
# ---------------------------------------------------------------------------------------------------
class FloodEngine:
    """Endless 8 KB text increments (a fast model meeting a slow reader); records running/aborted requests."""

    def __init__(self, tokenizer):
        self.tokenizer, self.model_name, self.context_length = tokenizer, "tiny", 10_000_000
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.produced = 0

    async def generate(self, request):
        import asyncio

        from serve.engine.types import GenerationOutput

        rid = request.request_id
        self.running.add(rid)
        try:
            for i in range(request.sampling.max_tokens):
                await asyncio.sleep(0.001)
                self.produced += 1
                yield GenerationOutput(
                    rid, [1], "x" * 8192, prompt_tokens=len(request.prompt_ids), completion_tokens=i + 1
                )
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(rid)
            raise
        finally:
            self.running.discard(rid)

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": 0}

    def shutdown(self) -> None:
        pass


@pytest.mark.parametrize(
    "path, body", [("/v1/completions", {"prompt": "flood"}), ("/v1/chat/completions", {"messages": MSGS})]
)
def test_slow_reader_who_disconnects_frees_the_slot(serve_tokenizer, path, body):
    import socket

    engine = FloodEngine(serve_tokenizer)
    server = start_engine_server(engine, max_tokens_limit=1_000_000, request_timeout_s=3600)
    state = server.config.app.state.server
    try:
        payload = json.dumps({"model": "tiny", "max_tokens": 1_000_000, "stream": True, **body}).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # a small window: the server's writes block
        sock.settimeout(30)
        sock.connect((server.host, server.port))
        sock.sendall(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        # Stop reading: the server's writes back up (socket buffers fill) while the engine keeps producing.
        start = engine.produced
        _wait_for(lambda: engine.produced > start + 2000, what="the engine to outpace the reader")
        assert len(engine.running) == 1 and not engine.aborted
        sock.close()  # disconnect with unread data
        _wait_for(
            lambda: not engine.running and len(engine.aborted) == 1,
            timeout=15,
            what="the engine request to be cancelled after the disconnect",
        )
        _wait_for(lambda: state.in_flight == 0, what="the admission slot to come back")
        # Logged and counted as a client disconnect (499), not as a server failure (5xx).
        endpoint = "chat" if "chat" in path else "completions"
        _wait_for(
            lambda: (
                f'raydistill_requests_total{{endpoint="{endpoint}",status="499"}} 1.0'
                in httpx.get(server.base_url + "/metrics", timeout=30).text
            ),
            what="the 499 in /metrics",
        )
        metrics = httpx.get(server.base_url + "/metrics", timeout=30).text
        assert f'endpoint="{endpoint}",status="5' not in metrics
    finally:
        server.stop()


@pytest.mark.parametrize(
    "path, body", [("/v1/completions", {"prompt": "flood"}), ("/v1/chat/completions", {"messages": MSGS})]
)
def test_sse_body_closed_at_a_yield_aborts_the_engine_request(serve_tokenizer, path, body):
    """ASGI 2.4 servers (and proxies) report a gone client by failing ``send``: the SSE generator is then
    left suspended at a ``yield`` and closed with GeneratorExit, which must cancel the engine request at once
    (it was swallowed, so the request kept generating). Driven at the ASGI level to reach that exact path."""
    import asyncio
    import time

    from serve.api import create_app
    from serve.backends import EngineBackend
    from serve.section import ServeSection

    engine = FloodEngine(serve_tokenizer)
    app = create_app(EngineBackend(engine, name="tiny"), ServeSection(api_key_env=None, max_tokens_limit=100_000))
    payload = json.dumps({"model": "tiny", "max_tokens": 100_000, "stream": True, **body}).encode()
    scope = asgi_post_scope(path, payload, spec_version="2.4")

    async def main() -> None:
        chunks = []
        receive = asgi_receive(payload)  # an ASGI 2.4 server need not report the disconnect

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                chunks.append(message["body"])
                if len(chunks) == 3:
                    raise OSError("the client went away")

        with contextlib.suppress(Exception):
            await app(scope, receive, send)
        assert len(chunks) == 3 and len(engine.running) <= 1
        deadline = time.monotonic() + 10
        while engine.running or not engine.aborted:
            assert time.monotonic() < deadline, f"engine request not cancelled (produced {engine.produced})"
            await asyncio.sleep(0.02)
        assert app.state.server.in_flight == 0

    asyncio.run(main())


def test_a_request_that_breaks_the_engine_step_fails_alone(real_engine_server):
    """A request whose step raises (here: while sampling, after the other rows of that step advanced) gets a
    500; the requests running beside it are rolled back, resumed and finish with the exact same text."""
    import threading
    import time

    server, engine = real_engine_server
    core = engine.engine
    poison = [7, 7, 7, 7]
    real_step, real_advance = core.step, core._advance

    def slow_step():
        time.sleep(0.01)  # keep the innocent requests running while the bad one arrives
        return real_step()

    def advance(seq, token, logprob):
        if seq.prompt[:4] == poison:
            raise RuntimeError(f"device-side assert: {SECRET}")
        return real_advance(seq, token, logprob)

    good = [
        {"model": "tiny", "prompt": p, "max_tokens": 120, "temperature": 0, "ignore_eos": True}
        for p in ("Once upon a time", "The capital of France is")
    ]
    reference = [post(server, "/v1/completions", b).json()["choices"][0]["text"] for b in good]
    core.step, core._advance = slow_step, advance

    results: dict[int, object] = {}

    def stream(i: int) -> None:
        with httpx.stream(
            "POST", server.base_url + "/v1/completions", json={**good[i], "stream": True}, timeout=60
        ) as resp:
            results[i] = (resp.status_code, sse_events(resp))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    _wait_for(lambda: engine.stats()["running"] == 2, what="both good requests running")
    bad = post(server, "/v1/completions", {"model": "tiny", "prompt": poison, "max_tokens": 5})
    err = assert_openai_error(bad, 500)
    assert err["type"] == "server_error" and SECRET not in json.dumps(err)
    stats = engine.stats()
    assert stats["running"] + stats["prefilling"] + stats["waiting"] == 2  # the good ones were still going
    for t in threads:
        t.join(timeout=60)
    for i in range(2):
        status, events = results[i]
        assert status == 200 and all("error" not in e for e in events), events[-1:]
        text = "".join(c["text"] for e in events for c in e["choices"])
        finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        assert finishes == ["length"] and text == reference[i]
    ok = post(server, "/v1/completions", good[0])
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == reference[0]


def test_serve_sampling_defaults_fill_only_what_a_request_leaves_out(serve_tokenizer):
    server, engine = start_fake_server(
        serve_tokenizer, sampling_defaults={"repetition_penalty": 1.1, "temperature": 0.5}
    )
    seen = []
    generate = engine.generate

    def recording(request):
        seen.append(request.sampling)
        return generate(request)

    engine.generate = recording
    try:
        body = {"model": "tiny", "messages": MSGS, "max_tokens": 2}
        assert post(server, "/v1/chat/completions", body).status_code == 200
        assert (
            post(server, "/v1/chat/completions", {**body, "temperature": 0, "repetition_penalty": None}).status_code
            == 200
        )
        assert (
            post(
                server, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2, "repetition_penalty": 1.0}
            ).status_code
            == 200
        )
    finally:
        server.stop()
    assert [(s.temperature, s.repetition_penalty) for s in seen] == [(0.5, 1.1), (0.0, 1.1), (0.5, 1.0)]


def test_bad_sampling_defaults_name_the_field():
    from serve.section import ServeSection

    with pytest.raises(ValueError, match=r"unknown sampling field\(s\) \['temprature'\]"):
        ServeSection(sampling_defaults={"temprature": 0.2})
    with pytest.raises(ValueError, match="repetition_penalty"):
        ServeSection(sampling_defaults={"repetition_penalty": 0})
