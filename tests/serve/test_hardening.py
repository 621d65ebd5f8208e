"""Serving hardening (issue #16): protocol edge cases, limits, engine failures, disconnects.

Black-box: HTTP (httpx / the openai client) against a real uvicorn server on 127.0.0.1, with the fake
engine of ``tests/serve/fake_engine.py`` (or a small variant of it) unless the real engine is the point.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.serve.conftest import start_fake_server

MSGS = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def fake_server(serve_tokenizer):
    server, engine = start_fake_server(serve_tokenizer)
    yield server, engine
    server.stop()


def post(server, path: str, body: dict, timeout: float = 30) -> httpx.Response:
    return httpx.post(server.base_url + path, content=json.dumps(body),
                      headers={"content-type": "application/json"}, timeout=timeout)


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
    nulls = {k: None for k in ("n", "temperature", "top_p", "top_k", "stream", "stop", "seed", "user",
                               "presence_penalty", "frequency_penalty", "stream_options", "ignore_eos",
                               "tools", "tool_choice", "logit_bias", "response_format")}
    chat = post(server, "/v1/chat/completions", {"model": "tiny", "messages": MSGS, "max_tokens": 3, "logprobs": None,
                                                 "top_logprobs": None, "max_completion_tokens": None, **nulls})
    assert chat.status_code == 200, chat.text
    body = chat.json()
    assert len(body["choices"]) == 1 and body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["logprobs"] is None
    comp = post(server, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": None, "echo": None,
                                            "logprobs": None, "suffix": None, "best_of": None, **nulls})
    assert comp.status_code == 200, comp.text
    usage = comp.json()["usage"]  # the default max_tokens: serve.max_tokens_default, within the 256 context
    assert usage["completion_tokens"] == min(256 - usage["prompt_tokens"], 256)
    # LangChain's ChatOpenAI sends these nulls through the official client too.
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=30)
    r = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2,
                                  extra_body={"n": None, "temperature": None, "stream": None})
    assert r.usage.completion_tokens == 2
    # Required fields stay required.
    assert_openai_error(post(server, "/v1/chat/completions", {"model": None, "messages": MSGS}), 400, "model")


# ---------------------------------------------------------------------------------------------------
# 14: fields we don't implement are a 400 naming the field
# ---------------------------------------------------------------------------------------------------
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("path, field, value", [
    ("/v1/chat/completions", "tools", [TOOL]),
    ("/v1/chat/completions", "tool_choice", "required"),
    ("/v1/chat/completions", "tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("/v1/chat/completions", "functions", [TOOL["function"]]),
    ("/v1/chat/completions", "function_call", "auto"),
    ("/v1/chat/completions", "logit_bias", {"50256": -100}),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", "presence_penalty", 0.5),
    ("/v1/chat/completions", "frequency_penalty", -1.0),
    ("/v1/completions", "logit_bias", {"50256": -100}),
    ("/v1/completions", "best_of", 3),
    ("/v1/completions", "presence_penalty", 1.0),
    ("/v1/completions", "suffix", "tail"),
])
def test_unsupported_fields_are_rejected_by_name(fake_server, path, field, value):
    server, engine = fake_server
    body = {"model": "tiny", "max_tokens": 2, field: value}
    body.update({"messages": MSGS} if "chat" in path else {"prompt": "hi"})
    err = assert_openai_error(post(server, path, body), 400, field)
    assert err["type"] == "invalid_request_error" and field in err["message"]
    assert err["code"] == "unsupported_parameter"


def test_neutral_values_of_unsupported_fields_are_accepted(fake_server):
    server, _ = fake_server
    ok = post(server, "/v1/chat/completions", {"model": "tiny", "messages": MSGS, "max_tokens": 2, "tools": [],
                                               "tool_choice": "none", "logit_bias": {}, "presence_penalty": 0,
                                               "frequency_penalty": 0.0, "response_format": {"type": "text"}})
    assert ok.status_code == 200, ok.text
    ok = post(server, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2, "best_of": 1,
                                          "logit_bias": {}})
    assert ok.status_code == 200, ok.text
