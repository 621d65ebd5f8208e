"""Issue #16 point 15: ``response_format`` json_object / json_schema on our engine with llguidance.

The real engine on the tiny random LLaMA: whatever the (random) model prefers, the output must parse and
validate against the schema every time, and constrained and free requests run in the same batch.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

pytest.importorskip("llguidance")

PERSON = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age", "member"],
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
}
MSGS = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def engine_server(tiny_teacher_dir):
    from serve.api import create_app
    from serve.backends import EngineBackend
    from serve.engine.async_engine import AsyncEngine
    from serve.section import ServeSection
    from serve.server_thread import ServerThread

    engine = AsyncEngine.from_pretrained(tiny_teacher_dir, max_model_len=512, max_batch_size=8)
    server = ServerThread(
        create_app(EngineBackend(engine, name="tiny"), ServeSection(api_key_env=None), close_backends=True)
    ).start()
    yield server, engine
    server.stop()


def _chat(server, **body):
    return httpx.post(
        server.base_url + "/v1/chat/completions", json={"model": "tiny", "messages": MSGS, **body}, timeout=120
    )


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_output_always_validates(engine_server, seed):
    server, _ = engine_server
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = _chat(server, response_format=fmt, max_tokens=200, temperature=1.0, seed=seed)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


def test_json_object_streams_valid_json(engine_server):
    server, _ = engine_server
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    texts = []
    with httpx.stream(
        "POST",
        server.base_url + "/v1/chat/completions",
        timeout=120,
        json={
            "model": "tiny",
            "messages": MSGS,
            "stream": True,
            "max_tokens": 50,
            "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        },
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    texts.append(c["delta"].get("content") or "")
    assert json.loads("".join(texts)) in ({"ok": True}, {"ok": False})
    # json_object: any JSON object; if it finished (not cut by max_tokens) it parses to a dict
    r = _chat(server, response_format={"type": "json_object"}, max_tokens=120, temperature=0.7, seed=1)
    choice = r.json()["choices"][0]
    assert r.status_code == 200 and choice["message"]["content"].startswith("{")
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_constrained_and_free_requests_share_the_batch(tiny_teacher_dir):
    from serve.engine.engine import LLMEngine
    from serve.engine.types import GenerationRequest, SamplingOptions

    engine = LLMEngine.from_pretrained(tiny_teacher_dir, max_model_len=512, max_batch_size=4)
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    reqs = [
        GenerationRequest("json", [1, 2, 3], SamplingOptions(max_tokens=40, temperature=0, json_schema=schema)),
        GenerationRequest("free", [1, 2, 3], SamplingOptions(max_tokens=40, temperature=0, ignore_eos=True)),
    ]
    outs = engine.generate(reqs)
    text = "".join(o.text for o in outs["json"])
    assert json.loads(text)["n"] in range(10) and outs["json"][-1].finish_reason == "stop"
    free = outs["free"]
    assert len(free) == 40 and free[-1].finish_reason == "length"
    # both were decoded in the same steps: far fewer decode steps than the two requests' tokens together
    assert engine.stats()["decode_steps"] < 40 + len(outs["json"])


def test_bad_schemas_and_formats_are_400s(engine_server):
    server, _ = engine_server
    r = _chat(
        server, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema", r.text
    r = _chat(server, response_format={"type": "json_schema"})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("response_format")
    r = _chat(server, response_format={"type": "xml"})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("response_format")
    assert _chat(server, response_format={"type": "text"}, max_tokens=2).status_code == 200


def test_vllm_gets_the_schema_as_structured_output_parameters():
    from serve.engine.types import SamplingOptions
    from serve.vllm_engine import structured_kwargs

    assert structured_kwargs(SamplingOptions()) == {}
