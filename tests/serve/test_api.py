"""The OpenAI-compatible API driven by the official ``openai`` client (fake engine: fast, deterministic)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from tests.serve.conftest import start_fake_server


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.base_url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=30, **kw
    )


NO_EOS = {"ignore_eos": True}  # the random tiny model may emit EOS anywhere; counts must be exact


def test_models_health_and_chat(api_server):
    server, engine = api_server
    c = client(server)
    models = c.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert httpx.get(server.base_url + "/health").json()["status"] == "ok"

    msgs = [{"role": "user", "content": "hello"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, extra_body=NO_EOS)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    # The prompt is the tokenizer's chat template, counted exactly.
    prompt_ids = engine.tokenizer(
        engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    ).input_ids
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == 6
    assert r.usage.total_tokens == len(prompt_ids) + 6
    # Same answer as the engine given those token ids directly (greedy).
    from serve.engine.types import GenerationRequest, SamplingOptions

    async def direct() -> str:
        parts = []
        async for out in engine.generate(
            GenerationRequest("direct", prompt_ids, SamplingOptions(max_tokens=6, temperature=0, ignore_eos=True))
        ):
            parts.append(out.text)
        return "".join(parts)

    assert choice.message.content == asyncio.run(direct())


def test_chat_stream_with_usage_and_done(api_server):
    server, _ = api_server
    c = client(server)
    kw = dict(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=8,
        temperature=1.0,
        seed=11,
        extra_body=NO_EOS,
    )
    full = c.chat.completions.create(**kw).choices[0].message.content
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full and full
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    # Raw SSE ends with [DONE].
    with httpx.stream(
        "POST",
        server.base_url + "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
    ) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_chat_logprobs_n_seed_stop(api_server):
    server, _ = api_server
    c = client(server)
    msgs = [{"role": "user", "content": "tell me"}]
    r = c.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=5, logprobs=True, top_logprobs=3, temperature=0, extra_body=NO_EOS
    )
    lp = r.choices[0].logprobs.content
    assert len(lp) == 5 and all(len(e.top_logprobs) == 3 for e in lp)
    for e in lp:  # greedy: the chosen token is the most likely one; alternatives sorted, all <= 0
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert e.logprob == pytest.approx(tops[0]) and e.token == e.top_logprobs[0].token
        assert e.bytes == list(e.token.encode())

    sample = dict(model="tiny", messages=msgs, max_tokens=10, temperature=1.0, extra_body=NO_EOS)
    a = c.chat.completions.create(**sample, seed=7, n=3)
    b = c.chat.completions.create(**sample, seed=7, n=3)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    assert len({ch.message.content for ch in a.choices}) > 1  # n samples differ from each other
    other = c.chat.completions.create(**sample, seed=8)
    assert other.choices[0].message.content != a.choices[0].message.content
    assert a.usage.completion_tokens == 30

    text = c.chat.completions.create(**{**sample, "max_tokens": 12}, seed=5).choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    stopped = c.chat.completions.create(**{**sample, "max_tokens": 12}, seed=5, stop=[stop, "zzqq-never"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(stop)]


def test_completions_plain_stream_and_batch(api_server):
    server, engine = api_server
    c = client(server)
    kw = dict(model="tiny", max_tokens=5, temperature=1.0, seed=3, extra_body=NO_EOS)
    r = c.completions.create(prompt="Once upon a time", **kw)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length" and r.choices[0].text
    streamed = list(c.completions.create(prompt="Once upon a time", stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text
    assert [ch.choices[0].finish_reason for ch in streamed][-1] == "length"
    # A list of prompts, and token ids, each with n choices, indexed prompt-major.
    ids = engine.tokenizer("Once upon a time").input_ids
    multi = c.completions.create(prompt=["Once upon a time", "The end"], **{**kw, "n": 2})
    assert [ch.index for ch in multi.choices] == [0, 1, 2, 3]
    assert multi.choices[0].text == r.choices[0].text  # same prompt, same seed (choice 0 uses the seed itself)
    assert multi.usage.prompt_tokens == len(ids) + len(engine.tokenizer("The end").input_ids)
    by_ids = c.completions.create(prompt=ids, **kw)
    assert by_ids.choices[0].text == r.choices[0].text and by_ids.usage.prompt_tokens == len(ids)


def test_completions_echo_logprobs_scores_prompt(api_server, tiny_teacher_dir):
    """lm-eval style loglikelihood: echo + logprobs + max_tokens=0 gives log p(token | prefix) per prompt token."""
    import torch
    from transformers import AutoModelForCausalLM

    server, engine = api_server
    c = client(server)
    prompt = "The capital of France is Paris"
    ids = engine.tokenizer(prompt).input_ids
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)  # [T, V]
    expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-3)
    gen = c.completions.create(
        model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=2, temperature=0, extra_body=NO_EOS
    )
    assert gen.choices[0].text.startswith(prompt) and len(gen.choices[0].logprobs.tokens) == len(ids) + 3
    assert all(len(t) >= 2 for t in gen.choices[0].logprobs.top_logprobs[len(ids) :])


def _post(server, path, body, headers=None, raw=None):
    return httpx.post(
        server.base_url + path,
        content=raw if raw is not None else json.dumps(body),
        headers={"content-type": "application/json", **(headers or {})},
        timeout=30,
    )


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, 400, "max_tokens"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 2.5}, 400, "temperature"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
        ({"model": "tiny", "messages": []}, 400, "messages"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 1000}, 400, "n"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, 400, None),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ],
)
def test_bad_chat_requests_get_4xx_openai_shape(api_server, body, status, param):
    server, _ = api_server
    resp = _post(server, "/v1/chat/completions", body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param


def test_bad_json_long_prompt_and_oversized_body(api_server):
    server, _ = api_server
    bad = _post(server, "/v1/chat/completions", None, raw=b"{not json")
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    arr = _post(server, "/v1/completions", None, raw=b"[1, 2]")
    assert arr.status_code == 400
    long_prompt = "word " * 400  # > 256-token context
    resp = _post(server, "/v1/completions", {"model": "tiny", "prompt": long_prompt, "max_tokens": 10})
    err = resp.json()["error"]
    assert resp.status_code == 400 and err["code"] == "context_length_exceeded"
    assert "256" in err["message"] and "10 for the completion" in err["message"]
    huge = _post(server, "/v1/completions", {"model": "tiny", "prompt": "x" * 2_000_000})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    assert _post(server, "/v1/nothing", {}).status_code == 404
    assert httpx.get(server.base_url + "/v1/chat/completions").status_code == 405
    # The server is still fine.
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_openai_client_raises_typed_errors(api_server):
    server, _ = api_server
    c = client(server)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=3)
    assert info.value.body["param"] == "temperature"


def test_api_keys_401_and_metrics(serve_tokenizer, monkeypatch, tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# keys\nsecret-one\n")
    monkeypatch.setenv("TEST_KEYS", "secret-two, secret-three")
    server, _ = start_fake_server(serve_tokenizer, api_key_env="TEST_KEYS", api_key_file=str(key_file))
    try:
        msgs = [{"role": "user", "content": "x"}]
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key="wrong").chat.completions.create(model="tiny", messages=msgs, max_tokens=2)
        resp = _post(server, "/v1/chat/completions", {"model": "tiny", "messages": msgs})
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.base_url + "/v1/models").status_code == 401
        for key in ("secret-one", "secret-two", "secret-three"):
            r = client(server, api_key=key).chat.completions.create(model="tiny", messages=msgs, max_tokens=2)
            assert r.usage.completion_tokens == 2
        assert httpx.get(server.base_url + "/health").status_code == 200  # probes need no key
        text = httpx.get(server.base_url + "/metrics").text
        assert 'raydistill_requests_total{endpoint="chat",status="401"} 2.0' in text
        assert 'raydistill_requests_total{endpoint="chat",status="200"} 3.0' in text
        assert 'raydistill_output_tokens_total{model="tiny"} 6.0' in text
        assert "raydistill_time_to_first_token_seconds_count" in text
        assert 'raydistill_queue_depth{model="tiny"}' in text
    finally:
        server.stop()


def test_open_server_warns(serve_tokenizer, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="serve.auth"):
        server, _ = start_fake_server(serve_tokenizer)
        server.stop()
    assert any("OPEN" in rec.message and "no API key" in rec.message for rec in caplog.records)


async def _stream_once(base_url: str, max_tokens: int) -> str:
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream(
            "POST",
            base_url + "/v1/completions",
            json={"model": "tiny", "prompt": "hi", "max_tokens": max_tokens, "stream": True},
        ) as r:
            return "".join([line async for line in r.aiter_lines()])


def test_concurrent_streams_overlap_and_cancel_frees_slot(serve_tokenizer):
    server, engine = start_fake_server(serve_tokenizer, token_delay=0.02, max_batch_size=4)
    try:
        # 4 streams run at once: each is held after its first token until all 4 are in the engine together
        # (a server that ran them one after another never gets there and the deadline fails the test).
        engine.hold = threading.Event()

        async def many() -> list[str]:
            streams = asyncio.gather(*(_stream_once(server.base_url, 20) for _ in range(4)))
            deadline = time.monotonic() + 30
            while engine.stats()["running"] < 4:
                assert time.monotonic() < deadline, f"never 4 streams at once: {engine.stats()}"
                await asyncio.sleep(0.01)
            engine.hold.set()
            return await streams

        bodies = asyncio.run(many())
        engine.hold = None
        assert len(bodies) == 4 and all(b.endswith("data: [DONE]") for b in bodies), bodies
        assert len(engine.finished_ids) == 4 and not engine.aborted_ids

        # Cancel a stream mid-way: the engine aborts it and the slot is free again.
        async def cancel_one() -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                async with http.stream(
                    "POST",
                    server.base_url + "/v1/completions",
                    json={"model": "tiny", "prompt": "cancel me", "max_tokens": 200, "stream": True},
                ) as r:
                    n = 0
                    async for line in r.aiter_lines():
                        n += bool(line)
                        if n >= 3:
                            break

        asyncio.run(cancel_one())
        deadline = time.time() + 5
        while time.time() < deadline and engine.stats()["running"]:
            time.sleep(0.05)
        assert engine.stats()["running"] == 0
        assert len(engine.aborted_ids) == 1

        # A non-streaming request whose client gives up is cancelled too.
        # (It goes away once the engine runs it, not after a fixed client timeout that a busy machine can
        # make fire before the request reached the engine.)
        async def give_up_once_running() -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                call = asyncio.ensure_future(
                    http.post(
                        server.base_url + "/v1/completions", json={"model": "tiny", "prompt": "slow", "max_tokens": 200}
                    )
                )
                deadline = time.monotonic() + 30
                while not engine.stats()["running"]:
                    assert time.monotonic() < deadline and not call.done(), "the request never ran"
                    await asyncio.sleep(0.01)
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call

        asyncio.run(give_up_once_running())
        deadline = time.time() + 5
        while time.time() < deadline and (engine.stats()["running"] or len(engine.aborted_ids) < 2):
            time.sleep(0.05)
        assert engine.stats()["running"] == 0 and len(engine.aborted_ids) == 2
        assert server.config.app.state.server.in_flight == 0  # every slot of the admission limit came back
    finally:
        server.stop()


def test_overload_answers_429_and_health_stays_ok(serve_tokenizer):
    server, engine = start_fake_server(
        serve_tokenizer, token_delay=0.05, max_batch_size=2, max_ongoing_requests=2, max_queued_requests=1
    )

    async def hammer() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as http:

            async def one() -> int:
                r = await http.post(
                    server.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 10}
                )
                if r.status_code != 200:
                    assert r.json()["error"]["type"] == "rate_limit_error"
                return r.status_code

            codes = asyncio.gather(*(one() for _ in range(8)))
            deadline = time.monotonic() + 30  # health is asked while the admission limit is full, not before
            while server.config.app.state.server.in_flight < 3:
                assert time.monotonic() < deadline, "the 3 admitted requests never were in flight"
                await asyncio.sleep(0.01)
            health = await http.get(server.base_url + "/health")
            assert health.status_code == 200
            return list(await codes)

    try:
        codes = asyncio.run(hammer())
        assert codes.count(200) == 3 and codes.count(429) == 5, codes
        # Once the load is gone requests succeed again.
        assert _post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        server.stop()
