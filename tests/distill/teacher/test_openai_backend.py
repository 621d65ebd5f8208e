"""The ``openai`` teacher against a small local OpenAI-compatible server (loopback only)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from cluster.errors import ConfigError, RaydistillError
from distill.teacher.base import SamplingParams, backend_class
from distill.teacher.openai_backend import (
    OPENAI_TOP_LOGPROBS_CAP,
    OpenAITeacher,
    RateLimiter,
    RoutingSession,
    TokenMapper,
    build_request,
    completion_from_canonical,
    finalize_request,
    http_processor_kwargs,
    normalize_http_response,
    normalize_response,
)
from distill.teacher.section import TeacherSection
from distill.teacher.vllm_backend import PAD_LOGPROB, row_keys
from tests.distill.teacher.fake_openai_server import FakeOpenAIServer, TinyLM, build_tokenizer

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=5)
PROMPTS = [
    "the cat sat on the mat",
    [{"role": "system", "content": "please explain"}, {"role": "user", "content": "tell me a short story"}],
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return build_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="module")
def lm(tokenizer_dir) -> TinyLM:
    return TinyLM(tokenizer_dir)


@pytest.fixture
def server(lm, request):
    flavor = getattr(request, "param", "vllm")
    with FakeOpenAIServer(lm, flavor=flavor) as srv:
        yield srv


def teacher_for(srv: FakeOpenAIServer, tokenizer_dir: str, **kwargs) -> OpenAITeacher:
    return OpenAITeacher(srv.base_url, srv.model_name, tokenizer=tokenizer_dir, retry_base_s=0.01, **kwargs)


def assert_matches_forward_pass(lm: TinyLM, completion, k: int) -> None:
    """Stored top-k == a direct forward pass of the tiny model over prompt + completion."""
    ids = list(completion.prompt_ids) + list(completion.completion_ids)
    full = lm.position_logprobs(ids)  # [L, V]
    start = len(completion.prompt_ids)
    expected = full[start - 1 : len(ids) - 1]  # rows predicting completion tokens
    values, top_ids = torch.topk(expected, k, dim=-1)
    assert completion.topk_ids.shape == (completion.num_tokens, k)
    np.testing.assert_allclose(completion.topk_logprobs, values.numpy(), atol=1e-3)
    np.testing.assert_array_equal(completion.topk_ids, top_ids.numpy())
    assert np.all(np.diff(completion.topk_logprobs, axis=1) <= 0)


# --------------------------------------------------------------------------- pure functions


def test_finalize_request_routes_and_shapes_bodies():
    text = build_request("the cat", [8, 9], GREEDY, model="m", k=5, vllm=False, max_tokens=8)
    route, body = finalize_request(text)
    assert route == "completions"
    assert body == {"model": "m", "prompt": "the cat", "max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "logprobs": 5}
    chat = build_request(PROMPTS[1], [1, 2, 3], GREEDY, model="m", k=5, vllm=False, max_tokens=8)
    route, body = finalize_request(chat)
    assert route == "chat/completions"
    assert body["messages"] == PROMPTS[1] and body["logprobs"] is True and body["top_logprobs"] == 5
    assert "prompt" not in body and "return_tokens_as_token_ids" not in body
    sampled = SamplingParams(max_new_tokens=4, temperature=0.7, top_k=3, seed=11, stop=("\n",), logprobs=2)
    route, body = finalize_request(
        build_request(PROMPTS[1], [1, 2, 3], sampled, model="m", k=2, vllm=True, max_tokens=4)
    )
    assert route == "completions"  # vLLM: chat rendered locally, sent as token ids
    assert body == {
        "model": "m",
        "prompt": [1, 2, 3],
        "max_tokens": 4,
        "temperature": 0.7,
        "top_p": 1.0,
        "top_k": 3,
        "seed": 11,
        "stop": ["\n"],
        "logprobs": 2,
        "return_tokens_as_token_ids": True,
        "return_token_ids": True,
    }
    # Same keys for every row, whatever the route (one Arrow struct in Ray).
    assert set(text) == set(chat)


def test_normalize_completions_and_chat_json():
    completions = {
        "choices": [
            {
                "text": " a b",
                "finish_reason": "length",
                "logprobs": {
                    "tokens": ["a", "token_id:7"],
                    "token_logprobs": [None, -0.5],
                    "top_logprobs": [None, {"token_id:7": -0.5, "token_id:3": -1.5}],
                },
                "prompt_token_ids": [1, 2],
                "token_ids": [4, 7],
            }
        ]
    }
    canon = normalize_response(completions)
    assert canon["error"] == "" and canon["text"] == " a b" and canon["finish_reason"] == "length"
    assert canon["tokens"] == ["a", "token_id:7"] and np.isnan(canon["token_logprobs"][0])
    assert canon["top_tokens"] == [[], ["token_id:7", "token_id:3"]]
    assert canon["top_logprobs"] == [[], [-0.5, -1.5]]
    assert canon["prompt_token_ids"] == [1, 2] and canon["token_ids"] == [4, 7]
    chat = {
        "prompt_token_ids": [5, 6],
        "choices": [
            {
                "message": {"role": "assistant", "content": "hi"},
                "finish_reason": "stop",
                "logprobs": {
                    "content": [
                        {
                            "token": "hi",
                            "logprob": -0.1,
                            "bytes": [104, 105],
                            "top_logprobs": [{"token": "hi", "logprob": -0.1}, {"token": "yo", "logprob": -2.4}],
                        }
                    ]
                },
            }
        ],
    }
    canon = normalize_response(chat)
    assert canon["text"] == "hi" and canon["tokens"] == ["hi"] and canon["token_logprobs"] == [-0.1]
    assert canon["top_tokens"] == [["hi", "yo"]] and canon["top_logprobs"] == [[-0.1, -2.4]]
    assert canon["prompt_token_ids"] == [5, 6]
    assert normalize_http_response(401, json.dumps({"error": {"message": "bad key"}}))["error"] == "401: bad key"
    assert normalize_http_response(502, "<html>Bad Gateway</html>")["error"] == "502: <html>Bad Gateway</html>"
    assert normalize_http_response(200, "not json")["error"].startswith("200: response is not a JSON object")
    assert normalize_http_response(200, json.dumps({"choices": []}))["error"] == "response has no choices"


def test_completion_from_canonical_keeps_raw_topk_sorted():
    canon = {
        "error": "",
        "text": "x",
        "finish_reason": "stop",
        "prompt_token_ids": [],
        "token_ids": [],
        "tokens": ["token_id:9", "token_id:2"],
        "token_logprobs": [-3.0, -0.1],
        # position 0: k+1 entries (sampled token 9 is outside the top-2), unsorted
        "top_tokens": [["token_id:9", "token_id:1", "token_id:4"], ["token_id:2"]],
        "top_logprobs": [[-3.0, -0.2, -0.9], [-0.1]],
    }
    completion = completion_from_canonical(canon, [5, 6], 2, TokenMapper(None))
    assert completion.completion_ids == [9, 2] and completion.prompt_ids == [5, 6]
    np.testing.assert_array_equal(completion.topk_ids, [[1, 4], [2, 0]])
    np.testing.assert_allclose(completion.topk_logprobs, [[-0.2, -0.9], [-0.1, PAD_LOGPROB]])
    assert completion.finish_reason == "stop" and completion.text == "x"
    with pytest.raises(RaydistillError, match="no log-probs"):
        completion_from_canonical(
            {**canon, "tokens": [], "top_tokens": [], "top_logprobs": []}, [1], 2, TokenMapper(None)
        )


def test_token_mapper_maps_vocab_strings(lm):
    mapper = TokenMapper(lm.tokenizer)
    cat = lm.tokenizer.convert_tokens_to_ids("cat")
    assert mapper("cat") == cat
    assert mapper("token_id:17") == 17
    assert mapper("</s>") == lm.eos_id
    assert mapper("definitely-not-a-token") is None


def test_rate_limiter_spaces_requests(monkeypatch):
    """On a fake clock: 20 qps starts requests 50 ms apart; unlimited never sleeps."""
    from distill.teacher import openai_backend

    clock = {"now": 100.0}
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock["now"] += seconds

    from types import SimpleNamespace

    monkeypatch.setattr(openai_backend, "time", SimpleNamespace(monotonic=lambda: clock["now"], sleep=sleep))
    limiter = RateLimiter(20)
    for _ in range(5):
        limiter.wait()
    assert sleeps == pytest.approx([0.05] * 4) and clock["now"] == pytest.approx(100.2)
    clock["now"] += 1.0  # idle for a second: the next request starts at once
    limiter.wait()
    assert len(sleeps) == 4
    unlimited = RateLimiter(None)
    for _ in range(100):
        unlimited.wait()
    assert len(sleeps) == 4


def test_http_processor_kwargs_build_a_valid_config():
    from ray.data.llm import HttpRequestProcessorConfig

    cfg = TeacherSection(
        backend="openai",
        model="m",
        base_url="http://h/v1",
        qps=10,
        replicas=3,
        batch_size=4,
        max_retries=5,
        num_cpus=0.5,
    )
    kwargs = http_processor_kwargs(cfg, "http://h/v1", {"Authorization": "Bearer k"})
    config = HttpRequestProcessorConfig(**kwargs)
    assert config.url == "http://h/v1/completions"
    assert config.headers == {"Authorization": "Bearer k"}
    assert config.qps == 3  # per actor: 10 // 3 replicas
    assert config.max_retries == 5 and config.concurrency == 3 and config.batch_size == 4
    assert config.http_request_stage == {"num_cpus": 0.5}
    assert kwargs["session_factory"].func is RoutingSession
    assert http_processor_kwargs(cfg.model_copy(update={"qps": None}), "http://h/v1", {})["headers"] is None


# --------------------------------------------------------------------------- against the server


@pytest.mark.parametrize("server", ["vllm", "openai"], indirect=True)
def test_generate_greedy_matches_forward_pass(server, lm, tokenizer_dir):
    teacher = teacher_for(server, tokenizer_dir)
    assert teacher.vllm is (server.flavor == "vllm")
    completions = teacher.generate(PROMPTS, GREEDY)
    assert len(completions) == 2
    for prompt, completion in zip(PROMPTS, completions):
        assert completion.prompt_ids == teacher.encode_prompt(prompt)
        assert 1 <= completion.num_tokens <= GREEDY.max_new_tokens
        # greedy: each generated token is the top-1 of the stored distribution
        np.testing.assert_array_equal(completion.completion_ids, completion.topk_ids[:, 0])
        assert_matches_forward_pass(lm, completion, GREEDY.logprobs)
        assert completion.text == lm.tokenizer.decode(completion.completion_ids, skip_special_tokens=True)
        assert completion.finish_reason == ("stop" if completion.completion_ids[-1] == lm.eos_id else "length")
    posts = [r for r in server.requests if r["method"] == "POST"]
    if server.flavor == "vllm":
        assert [r["path"] for r in posts] == ["/v1/completions"] * 2
        assert all(r["body"]["return_tokens_as_token_ids"] and isinstance(r["body"]["prompt"], list) for r in posts)
    else:  # plain OpenAI: no vLLM-only params (the strict server would 400), chat goes to chat
        assert sorted(r["path"] for r in posts) == ["/v1/chat/completions", "/v1/completions"]
        assert all("return_tokens_as_token_ids" not in r["body"] for r in posts)
    teacher.close()


def test_sampled_generation_stores_raw_distribution(server, lm, tokenizer_dir):
    """Temperature 1.5: the stored soft labels are still the raw (T=1) top-k."""
    teacher = teacher_for(server, tokenizer_dir)
    sampling = SamplingParams(max_new_tokens=8, temperature=1.5, top_k=0, seed=3, logprobs=3)
    completions = teacher.generate(["one two three", "the robot found a blue flower"], sampling)
    outside = 0
    for completion in completions:
        assert_matches_forward_pass(lm, completion, 3)
        outside += sum(tok not in row for tok, row in zip(completion.completion_ids, completion.topk_ids.tolist()))
    # the server sent k+1 entries where the sampled token was outside the top-k; we kept the top-k
    assert outside >= 1


def test_score_matches_forward_pass(server, lm, tokenizer_dir):
    teacher = teacher_for(server, tokenizer_dir)
    sequences = [
        teacher.encode_prompt("the cat sat on the mat and looked at the dog"),
        teacher.encode_prompt(PROMPTS[1]) + [10, 11, 12],
    ]
    starts = [3, len(sequences[1]) - 3]
    scored = teacher.score(sequences, starts, 4)
    for seq, start, result in zip(sequences, starts, scored):
        full = lm.position_logprobs(seq)[start - 1 : len(seq) - 1]
        values, ids = torch.topk(full, 4, dim=-1)
        np.testing.assert_allclose(result.topk_logprobs, values.numpy(), atol=1e-3)
        np.testing.assert_array_equal(result.topk_ids, ids.numpy())
        actual = full.gather(-1, torch.tensor(seq[start:])[:, None])[:, 0]
        np.testing.assert_allclose(result.token_logprobs, actual.numpy(), atol=1e-3)
    body = server.requests[-1]["body"]
    assert body["echo"] is True and body["max_tokens"] == 0 and body["logprobs"] == 4


def test_api_key_header_and_missing_env_var(lm, tokenizer_dir, monkeypatch):
    with FakeOpenAIServer(lm, api_key="sk-test-123") as srv:
        cfg = TeacherSection(
            backend="openai",
            model=srv.model_name,
            base_url=srv.base_url,
            api_key_env="RAYDISTILL_TEST_KEY",
            tokenizer=tokenizer_dir,
        )
        monkeypatch.delenv("RAYDISTILL_TEST_KEY", raising=False)
        with pytest.raises(ConfigError, match="RAYDISTILL_TEST_KEY") as info:
            backend_class("openai").from_config(cfg)
        assert "teacher.api_key_env" in str(info.value)
        # no key at all: the server answers 401 and the error says how to fix it
        with pytest.raises(RaydistillError, match="401") as info:
            OpenAITeacher.from_config(cfg.model_copy(update={"api_key_env": None}))
        assert "api_key_env" in str(info.value)
        monkeypatch.setenv("RAYDISTILL_TEST_KEY", "sk-test-123")
        teacher = OpenAITeacher.from_config(cfg)
        completion = teacher.generate(["the cat"], GREEDY)[0]
        assert completion.num_tokens >= 1
        assert {r["headers"].get("authorization") for r in srv.requests[-2:]} == {"Bearer sk-test-123"}
        monkeypatch.setenv("RAYDISTILL_TEST_KEY", "sk-wrong")
        with pytest.raises(RaydistillError, match="RAYDISTILL_TEST_KEY"):
            OpenAITeacher.from_config(cfg)


def test_config_errors_name_the_field(server, tokenizer_dir):
    base = TeacherSection(backend="openai", model=server.model_name, base_url=server.base_url, tokenizer=tokenizer_dir)
    with pytest.raises(ConfigError, match="teacher.tokenizer"):
        OpenAITeacher.from_config(base.model_copy(update={"tokenizer": None}))
    with pytest.raises(ConfigError, match="teacher.base_url"):
        OpenAITeacher.from_config(base.model_copy(update={"base_url": None}))
    with pytest.raises(ConfigError, match="teacher.model='nope'"):
        OpenAITeacher.from_config(base.model_copy(update={"model": "nope"}))


@pytest.mark.parametrize("server", ["openai"], indirect=True)
def test_top_logprobs_cap_is_validated(server, tokenizer_dir):
    teacher = teacher_for(server, tokenizer_dir)
    with pytest.raises(ConfigError, match="generate.logprobs=25"):
        teacher.generate(["the cat"], SamplingParams(max_new_tokens=2, logprobs=OPENAI_TOP_LOGPROBS_CAP + 5))
    assert not [r for r in server.requests if r["method"] == "POST"]


def test_retries_then_gives_up(server, tokenizer_dir):
    teacher = teacher_for(server, tokenizer_dir, max_retries=2)
    server.fail_next = 2
    assert teacher.generate(["the cat"], GREEDY)[0].num_tokens >= 1
    assert sum(r["method"] == "POST" for r in server.requests) == 3
    server.fail_next = 5
    teacher.max_retries = 1
    with pytest.raises(RaydistillError, match="failed 2 times.*503"):
        teacher.generate(["the cat"], GREEDY)


def test_context_length_clamps_max_tokens(server, tokenizer_dir):
    teacher = teacher_for(server, tokenizer_dir)
    assert teacher.context_length == server.max_model_len == 64  # from vLLM's /v1/models
    prompt = " ".join(["one two three four five six seven eight nine ten"] * 6)  # 60 tokens
    completion = teacher.generate([prompt], SamplingParams(max_new_tokens=32, temperature=0, logprobs=2))[0]
    assert len(completion.prompt_ids) == 60 and completion.num_tokens <= 4
    with pytest.raises(ConfigError, match="no room"):
        teacher.generate([prompt + " one two three four"], GREEDY)


def test_routing_session_sends_concurrently_and_returns_canonical(lm, tokenizer_dir):
    """The aiohttp façade ray.data.llm's HttpRequestUDF uses: routing, concurrency, error bodies."""
    with FakeOpenAIServer(lm, flavor="openai", delay_s=0.3, api_key="k") as srv:
        bodies = [
            build_request(p, [1], GREEDY, model=srv.model_name, k=3, vllm=False, max_tokens=3)
            for p in ["the cat", PROMPTS[1], "a dog"]
        ]

        async def run(headers):
            async with RoutingSession(srv.base_url) as session:
                requests = [
                    session.post(f"{srv.base_url}/completions", headers=headers, data=json.dumps(b)) for b in bodies
                ]
                out = []
                for request in requests:  # awaited one by one, as the UDF does
                    async with await request as response:
                        out.append((response.status, await response.json()))
                return out, None

        results, elapsed = asyncio.run(run({"Authorization": "Bearer k", "Content-Type": "application/json"}))
        assert srv.max_in_flight == 3  # sent together: all three were open on the server at once
        assert [s for s, _ in results] == [200, 200, 200]
        assert all(c["error"] == "" and len(c["tokens"]) == 3 and len(c["top_tokens"][0]) == 3 for _, c in results)
        paths = sorted(r["path"] for r in srv.requests)
        assert paths == ["/v1/chat/completions", "/v1/completions", "/v1/completions"]
        results, _ = asyncio.run(run({"Content-Type": "application/json"}))
        assert [s for s, _ in results] == [401] * 3
        assert results[0][1]["error"] == "401: Incorrect API key provided" and results[0][1]["tokens"] == []


# --------------------------------------------------------------------------- Ray Data stage


def _requests(prompts) -> list[dict]:
    rows = []
    for i, prompt in enumerate(prompts):
        rows.append(
            {
                "prompt_id": f"p{i}",
                "prompt": prompt if isinstance(prompt, str) else None,
                "messages": None if isinstance(prompt, str) else prompt,
                "source": "test",
            }
        )
    return rows


def _run_stage(cfg, sampling, rows, logprob_dtype="float32"):
    import pyarrow as pa
    import ray

    from distill.data.generate import _request_schema

    stage = backend_class(cfg.backend).build_dataset_stage(cfg, sampling, logprob_dtype)
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=_request_schema()))
    out = stage(ds).materialize()
    schema = out.schema()
    types = dict(zip(schema.names, schema.types))
    # typed list columns, not pickled Python objects
    assert str(types["topk_ids"]) == "list<item: list<item: int64>>", types["topk_ids"]
    assert str(types["topk_logprobs"]) == "list<item: list<item: double>>", types["topk_logprobs"]
    assert str(types["input_ids"]) == "list<item: int64>"
    return {row["prompt_id"]: row for row in out.take_all()}


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_dataset_stage_vllm_server(ray_session, lm, tokenizer_dir):
    long_prompt = " ".join(["one two three four five six seven eight nine ten"] * 7)  # 70 tokens > 64
    prompts = PROMPTS + [
        "a dog ran in the park",
        [{"role": "user", "content": "what is the capital of france ?"}],
        long_prompt,
    ]
    with FakeOpenAIServer(lm, flavor="vllm", delay_s=0.05) as srv:
        cfg = TeacherSection(
            backend="openai",
            model=srv.model_name,
            base_url=srv.base_url,
            tokenizer=tokenizer_dir,
            replicas=1,
            batch_size=8,
            num_cpus=0.5,
        )
        out = _run_stage(cfg, GREEDY, _requests(prompts))
        direct = teacher_for(srv, tokenizer_dir).generate(prompts[:4], GREEDY)
        assert srv.max_in_flight >= 2  # the batch's requests overlapped
    assert sorted(out) == ["p0", "p1", "p2", "p3", "p4"]
    for row in out.values():
        assert tuple(row) == row_keys()
    assert out["p4"]["skip_reason"].startswith("prompt_too_long (70 tokens > context 64)")
    assert out["p4"]["topk_ids"] is None
    for i, completion in enumerate(direct):
        row = out[f"p{i}"]
        assert row["skip_reason"] is None and row["source"] == "test" and row["teacher"] == "tiny-teacher@api"
        assert list(row["input_ids"]) == completion.prompt_ids + completion.completion_ids
        assert row["prompt_len"] == len(completion.prompt_ids)
        assert row["completion"] == completion.text and row["finish_reason"] == completion.finish_reason
        topk_ids = np.array([list(r) for r in row["topk_ids"]])
        topk_logprobs = np.array([list(r) for r in row["topk_logprobs"]], dtype=np.float32)
        np.testing.assert_array_equal(topk_ids[:, 0], row["input_ids"][row["prompt_len"] :])  # greedy: top-1
        np.testing.assert_array_equal(topk_ids, completion.topk_ids)
        np.testing.assert_allclose(topk_logprobs, completion.topk_logprobs, atol=1e-6)
        assert_matches_forward_pass(lm, completion, GREEDY.logprobs)
        assert json.loads(row["sampling"])["logprobs"] == GREEDY.logprobs
    assert [m["content"] for m in out["p1"]["messages"]] == [m["content"] for m in PROMPTS[1]]


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_dataset_stage_plain_openai_server_with_key(ray_session, lm, tokenizer_dir, monkeypatch):
    prompts = ["the cat sat", [{"role": "user", "content": "tell me a short story"}], "the blue flower"]
    monkeypatch.setenv("RAYDISTILL_TEST_KEY", "sk-abc")
    with FakeOpenAIServer(lm, flavor="openai", api_key="sk-abc", reject_word="flower") as srv:
        cfg = TeacherSection(
            backend="openai",
            model=srv.model_name,
            base_url=srv.base_url,
            tokenizer=tokenizer_dir,
            api_key_env="RAYDISTILL_TEST_KEY",
            replicas=1,
            batch_size=4,
            num_cpus=0.5,
            qps=50,
        )
        out = _run_stage(cfg, GREEDY, _requests(prompts), logprob_dtype="float16")
        posts = [r for r in srv.requests if r["method"] == "POST"]
    assert {r["headers"]["authorization"] for r in posts} == {"Bearer sk-abc"}
    assert "/v1/chat/completions" in {r["path"] for r in posts}
    assert all("return_tokens_as_token_ids" not in r["body"] for r in posts)
    assert out["p2"]["skip_reason"] == "http_error (400: This request was rejected by the content policy.)"
    for key in ("p0", "p1"):
        row = out[key]
        assert row["skip_reason"] is None and row["completion_len"] >= 1
        completion_ids = list(row["input_ids"][row["prompt_len"] :])
        assert [r[0] for r in row["topk_ids"]] == completion_ids
        ids = list(row["input_ids"])
        full = lm.position_logprobs(ids)[row["prompt_len"] - 1 : len(ids) - 1]
        values = torch.topk(full, GREEDY.logprobs, dim=-1).values.numpy()
        stored = np.array([list(r) for r in row["topk_logprobs"]], dtype=np.float32)
        np.testing.assert_allclose(stored, values, atol=2e-3)  # float16 storage
