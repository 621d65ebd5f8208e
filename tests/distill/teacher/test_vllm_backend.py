"""The ``vllm`` teacher on CPU: pure flatteners, processor kwargs, the row functions of its Ray Data
stage (with a fake engine standing in for vLLM), and the clear error when vLLM is absent."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

import numpy as np
import pytest
import torch

from cluster.errors import RaydistillError
from distill.teacher.base import SamplingParams, backend_class
from distill.teacher.section import TeacherSection
from distill.teacher.vllm_backend import (
    PAD_LOGPROB,
    VLLMTeacher,
    chosen_logprobs,
    classify_engine_error,
    completion_from_vllm,
    flatten_logprob_dicts,
    infer_finish_reason,
    row_keys,
    scored_from_prompt_logprobs,
    token_id_of,
    topk_from_mapping,
    vllm_engine_kwargs,
    vllm_finalize_row,
    vllm_postprocess_row,
    vllm_preprocess_row,
    vllm_processor_kwargs,
    vllm_sampling_kwargs,
    vllm_stage_spec,
)
from tests.distill.teacher.fake_openai_server import TinyLM, build_tokenizer


@dataclasses.dataclass
class Logprob:  # the shape of vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return build_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer_vllm"))


@pytest.fixture(scope="module")
def lm(tokenizer_dir) -> TinyLM:
    return TinyLM(tokenizer_dir)


# --------------------------------------------------------------------------- pure flatteners


def test_token_ids_and_values_in_every_shape():
    assert token_id_of(7) == 7 and token_id_of(np.int64(7)) == 7
    assert token_id_of("7") == 7 and token_id_of("token_id:7") == 7
    mapping = {3: Logprob(-0.5, 1), "9": {"logprob": -0.1, "rank": 2}, "token_id:4": -2.0, 8: None}
    assert topk_from_mapping(mapping, 2) == ([9, 3], [-0.1, -0.5])
    assert topk_from_mapping(mapping, 10) == ([9, 3, 4], [-0.1, -0.5, -2.0])  # None dropped
    assert topk_from_mapping(None, 3) == ([], [])


def test_flatten_keeps_topk_when_vllm_adds_the_sampled_token():
    # vLLM puts the sampled token first; here it is outside the top-2 (k+1 = 3 entries)
    positions = [
        {42: Logprob(-4.0, 7, "x"), 1: Logprob(-0.3, 1, "a"), 2: Logprob(-1.2, 2, "b")},
        {5: Logprob(-0.01, 1, "c"), 6: Logprob(-5.0, 2, "d")},  # sampled == top-1: k entries
        {7: {"logprob": -0.7, "rank": 1, "decoded_token": "e"}},  # fewer than k: padded
    ]
    ids, values = flatten_logprob_dicts(positions, 2)
    assert ids.dtype == np.int32 and values.dtype == np.float32 and ids.shape == (3, 2)
    np.testing.assert_array_equal(ids, [[1, 2], [5, 6], [7, 0]])
    np.testing.assert_allclose(values, [[-0.3, -1.2], [-0.01, -5.0], [-0.7, PAD_LOGPROB]])
    np.testing.assert_allclose(chosen_logprobs(positions, [42, 5, 9]), [-4.0, -0.01, np.nan])
    empty_ids, empty_values = flatten_logprob_dicts([], 4)
    assert empty_ids.shape == (0, 4) and empty_values.shape == (0, 4)


def test_completion_and_score_from_vllm_outputs():
    logprobs = [{11: Logprob(-0.2, 1), 12: Logprob(-1.9, 2)}, {2: Logprob(-0.4, 1), 13: Logprob(-1.1, 2)}]
    completion = completion_from_vllm([1, 2, 3], [11, 2], logprobs, "hi", "stop", 2)
    assert completion.prompt_ids == [1, 2, 3] and completion.completion_ids == [11, 2]
    np.testing.assert_array_equal(completion.topk_ids, [[11, 12], [2, 13]])
    assert completion.finish_reason == "stop" and completion.text == "hi"
    with pytest.raises(RaydistillError, match="logprob positions"):
        completion_from_vllm([1], [11, 2], logprobs[:1], "", "length", 2)
    # prompt_logprobs: entry i is the distribution over token i; entry 0 is None
    prompt_logprobs = [
        None,
        {"5": {"logprob": -0.5}, "6": {"logprob": -1.5}, "8": {"logprob": -3.0}},
        {7: Logprob(-0.1), 9: Logprob(-2.2)},
    ]
    scored = scored_from_prompt_logprobs([4, 8, 7], 1, prompt_logprobs, 2)
    np.testing.assert_array_equal(scored.topk_ids, [[5, 6], [7, 9]])
    np.testing.assert_allclose(scored.token_logprobs, [-3.0, -0.1])
    with pytest.raises(ValueError, match="start 0"):
        scored_from_prompt_logprobs([4, 8, 7], 0, prompt_logprobs, 2)


def test_finish_reason_and_engine_errors():
    assert infer_finish_reason([5, 3], 8, {3}) == "stop"
    assert infer_finish_reason([5, 6], 2, {3}) == "length"
    assert infer_finish_reason([5, 3], 2, {3}) == "stop"
    assert infer_finish_reason([5], 8, {3}) == "stop"  # stop string
    assert classify_engine_error(
        "ValueError: The decoder prompt (length 70) is longer than the maximum model length of 64."
    ).startswith("prompt_too_long (")
    assert classify_engine_error("RuntimeError: CUDA error").startswith("engine_error (RuntimeError")


# --------------------------------------------------------------------------- parameters


def test_sampling_kwargs():
    greedy = vllm_sampling_kwargs(SamplingParams(max_new_tokens=9, temperature=0.0, seed=None), 7, 20)
    assert greedy == {
        "max_tokens": 7,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": -1,
        "logprobs": 20,
        "detokenize": False,
        "stop": [],
    }
    sampled = vllm_sampling_kwargs(SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=5, stop=("###",)), 16, 8)
    assert sampled["top_k"] == 40 and sampled["seed"] == 5 and sampled["stop"] == ["###"]
    assert sampled["detokenize"] is True and sampled["logprobs"] == 8 and sampled["top_p"] == 0.9


def test_processor_kwargs_make_a_valid_ray_config(tmp_path):
    from ray.data.llm import vLLMEngineProcessorConfig

    cfg = TeacherSection(
        backend="vllm",
        model="Qwen/Qwen2.5-7B-Instruct",
        revision="abc123",
        replicas=4,
        tensor_parallel_size=2,
        max_model_len=4096,
        dtype="bfloat16",
        batch_size=32,
    )
    cfg = cfg.model_copy(update={"accelerator_type": "H100"})
    kwargs = vllm_processor_kwargs(cfg, 20, "Qwen/Qwen2.5-7B-Instruct")
    assert kwargs["engine_kwargs"] == {
        "tensor_parallel_size": 2,
        "max_logprobs": 20,
        "logprobs_mode": "raw_logprobs",
        "dtype": "bfloat16",
        "enable_prefix_caching": True,
        "max_model_len": 4096,
        "revision": "abc123",
    }
    assert kwargs["concurrency"] == 4 and kwargs["batch_size"] == 32 and kwargs["should_continue_on_error"] is True
    assert kwargs["chat_template_stage"] is False and kwargs["tokenize_stage"] is False
    assert kwargs["detokenize_stage"] is False
    assert kwargs["accelerator_type"] == "H100"
    # teacher.num_gpus 0 (this config) = vLLM-CPU: one CPU bundle of teacher.num_cpus per engine actor
    assert kwargs["placement_group_config"] == {"bundles": [{"CPU": 1}]} and "runtime_env" not in kwargs
    gpu = vllm_processor_kwargs(
        cfg.model_copy(update={"num_gpus": 2, "vllm_env": {"A": "1"}, "vllm_engine_kwargs": {"enforce_eager": True}}),
        20,
        "Qwen/Qwen2.5-7B-Instruct",
    )
    assert "placement_group_config" not in gpu and gpu["runtime_env"] == {"env_vars": {"A": "1"}}
    assert gpu["engine_kwargs"]["enforce_eager"] is True  # teacher.vllm_engine_kwargs on top
    config = vLLMEngineProcessorConfig(**kwargs)  # validates without vLLM installed
    assert config.model_source == "Qwen/Qwen2.5-7B-Instruct" and config.concurrency == 4
    assert config.engine_kwargs["logprobs_mode"] == "raw_logprobs" and config.engine_kwargs["task_type"] == "generate"
    local = tmp_path / "model"
    local.mkdir()
    engine = vllm_engine_kwargs(cfg.model_copy(update={"model": str(local), "max_model_len": None}), 5)
    assert "revision" not in engine and "max_model_len" not in engine and engine["max_logprobs"] == 5


def test_without_vllm_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, installed or not
    cfg = TeacherSection(backend="vllm", model=str(tmp_path))
    cls = backend_class("vllm")  # the module imports fine without vLLM
    assert cls is VLLMTeacher
    with pytest.raises(RaydistillError, match=r"install raydistill\[gpu\] on a GPU node"):
        cls.from_config(cfg)
    with pytest.raises(RaydistillError, match="vLLM is not installed"):
        VLLMTeacher(str(tmp_path))


# --------------------------------------------------------------------------- the stage's row functions


def make_spec(tokenizer_dir: str, sampling: SamplingParams, max_model_len: int | None = 64):
    cfg = TeacherSection(backend="vllm", model=tokenizer_dir, max_model_len=max_model_len)
    return vllm_stage_spec(cfg, sampling, "float32", tokenizer_dir)


@functools.lru_cache(maxsize=2)
def worker_lm(tokenizer_dir: str) -> TinyLM:
    return TinyLM(tokenizer_dir)


def fake_engine(lm: TinyLM, max_model_len: int, data: dict) -> dict:
    """What vLLMEngineStageUDF does to one row (should_continue_on_error=True), with the tiny model."""
    data = dict(data)
    prompt = data.pop("prompt", None)
    ids = [int(t) for t in data.pop("tokenized_prompt")]
    params = dict(data.pop("sampling_params"))
    if len(ids) + 1 > max_model_len:
        return {
            **data,
            "prompt": (prompt or "")[:500],
            "prompt_token_ids": None,
            "num_input_tokens": 0,
            "generated_tokens": [],
            "generated_text": "",
            "num_generated_tokens": 0,
            "logprobs": None,
            "prompt_logprobs": None,
            "__inference_error__": f"ValueError: The decoder prompt (length {len(ids)}) "
            f"is longer than the maximum model length of {max_model_len}.",
        }
    gen, rows, _ = lm.generate(
        ids,
        max_tokens=int(params["max_tokens"]),
        temperature=float(params["temperature"]),
        top_p=1.0,
        top_k=0,
        seed=None,
    )
    k = int(params["logprobs"])
    logprobs = []
    for tok, row in zip(gen, rows):
        values, top = torch.topk(row, k)
        entry = {tok: {"logprob": float(row[tok]), "rank": 1 + int((row > row[tok]).sum()), "decoded_token": None}}
        for rank, (i, v) in enumerate(zip(top.tolist(), values.tolist()), 1):
            entry.setdefault(i, {"logprob": v, "rank": rank, "decoded_token": None})
        logprobs.append(entry)
    return {
        **data,
        "prompt": prompt or "",
        "prompt_token_ids": ids,
        "num_input_tokens": len(ids),
        "generated_tokens": gen,
        "generated_text": "",
        "num_generated_tokens": len(gen),
        "logprobs": logprobs,
        "prompt_logprobs": None,
        "__inference_error__": "",
    }


def test_preprocess_builds_engine_inputs(lm, tokenizer_dir):
    sampling = SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=3)
    spec = make_spec(tokenizer_dir, sampling)
    messages = [{"role": "user", "content": "tell me a story"}]
    out = vllm_preprocess_row(spec, {"prompt_id": "a", "prompt": None, "messages": messages, "source": "s"})
    expected = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert out["tokenized_prompt"] == expected == out["rd_prompt_ids"] and out["rd_skip"] == ""
    assert out["sampling_params"] == vllm_sampling_kwargs(sampling, 8, 3) and out["rd_max_tokens"] == 8
    near = " ".join(["one two three four five six seven eight nine ten"] * 6)  # 60 tokens: 4 left
    out = vllm_preprocess_row(spec, {"prompt_id": "b", "prompt": near, "messages": None, "source": "s"})
    assert out["sampling_params"]["max_tokens"] == 4 and out["rd_skip"] == ""
    out = vllm_preprocess_row(
        spec, {"prompt_id": "c", "prompt": near + " one two three four", "messages": None, "source": "s"}
    )
    assert out["rd_skip"] == "prompt_too_long (64 tokens > context 64)"
    assert len(out["tokenized_prompt"]) == 1 and out["sampling_params"]["max_tokens"] == 1
    assert set(out["sampling_params"]) == set(vllm_sampling_kwargs(sampling, 1, 3))  # one struct for all rows
    skipped = vllm_postprocess_row(
        spec,
        {
            "prompt_id": "c",
            "source": "s",
            "rd_prompt": near,
            **out,
            "generated_tokens": [1],
            "logprobs": [{1: {"logprob": -0.1}}],
        },
    )
    assert tuple(skipped) == row_keys() and skipped["skip_reason"].startswith("prompt_too_long")


def test_postprocess_and_finalize_rows(lm, tokenizer_dir):
    sampling = SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=4)
    spec = make_spec(tokenizer_dir, sampling)
    request = {"prompt_id": "p", "prompt": "the cat sat on the mat", "messages": None, "source": "unit"}
    data = {**request, **vllm_preprocess_row(spec, request)}
    engine_row = fake_engine(lm, 64, data)
    row = vllm_finalize_row({**vllm_postprocess_row(spec, engine_row), "__inference_error__": ""})
    assert tuple(row) == row_keys() and row["skip_reason"] is None
    prompt_ids = data["rd_prompt_ids"]
    assert row["input_ids"][: len(prompt_ids)] == prompt_ids and row["prompt_len"] == len(prompt_ids)
    completion_ids = row["input_ids"][len(prompt_ids) :]
    assert completion_ids == engine_row["generated_tokens"]
    assert [r[0] for r in row["topk_ids"]] == completion_ids  # greedy: top-1
    assert row["completion"] == lm.tokenizer.decode(completion_ids, skip_special_tokens=True)
    assert row["finish_reason"] == ("stop" if completion_ids[-1] == lm.eos_id else "length")
    assert row["prompt"] == request["prompt"] and row["source"] == "unit"
    assert json.loads(row["sampling"])["logprobs"] == 4
    full = lm.position_logprobs(row["input_ids"])[len(prompt_ids) - 1 : -1]
    values, ids = torch.topk(full, 4, dim=-1)
    np.testing.assert_array_equal(np.array(row["topk_ids"]), ids.numpy())
    np.testing.assert_allclose(np.array(row["topk_logprobs"]), values.numpy(), atol=1e-3)
    error_row = {
        **data,
        "__inference_error__": "ValueError: The decoder prompt (length 70) is longer than the "
        "maximum model length of 64.",
        "generated_tokens": [],
        "prompt": "",
    }
    skipped = vllm_finalize_row(error_row)
    assert tuple(skipped) == row_keys() and skipped["prompt_id"] == "p"
    assert skipped["skip_reason"].startswith("prompt_too_long (ValueError") and skipped["topk_ids"] is None


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_stage_row_functions_through_ray(ray_session, lm, tokenizer_dir):
    """Ray's own pre/postprocess wrappers around a CPU fake of the engine stage: logprob dicts with int
    keys cross Ray (as pickled objects) and come out as typed list columns; engine errors become skips."""
    import pyarrow as pa
    import ray
    from ray.llm._internal.batch.stages.base import wrap_postprocess, wrap_preprocess

    from distill.data.generate import _request_schema

    sampling = SamplingParams(max_new_tokens=5, temperature=0.0, logprobs=3)
    spec = make_spec(tokenizer_dir, sampling, max_model_len=None)  # context from the tokenizer (4096)
    long_prompt = " ".join(["one two three four five six seven eight nine ten"] * 7)  # 70 > the engine's 64
    prompts = ["the cat sat", [{"role": "user", "content": "what is the capital of france ?"}], long_prompt]
    rows = [
        {
            "prompt_id": f"p{i}",
            "prompt": p if isinstance(p, str) else None,
            "messages": None if isinstance(p, str) else p,
            "source": "ray",
        }
        for i, p in enumerate(prompts)
    ]
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=_request_schema()))
    pre = wrap_preprocess(functools.partial(vllm_preprocess_row, spec), "__data")
    post = wrap_postprocess(functools.partial(vllm_postprocess_row, spec), "__data", include_error_column=True)

    def engine(row):  # builds the same seeded tiny model in the worker (a TinyLM holds a lock: not picklable)
        return {"__data": fake_engine(worker_lm(tokenizer_dir), 64, row["__data"])}

    out_ds = ds.map(pre).map(engine).map(post).map(vllm_finalize_row).materialize()
    types = dict(zip(out_ds.schema().names, out_ds.schema().types))
    assert str(types["topk_ids"]) == "list<item: list<item: int64>>"
    assert str(types["topk_logprobs"]) == "list<item: list<item: double>>"
    out = {r["prompt_id"]: r for r in out_ds.take_all()}
    assert sorted(out) == ["p0", "p1", "p2"]
    assert out["p2"]["skip_reason"].startswith("prompt_too_long (ValueError: The decoder prompt (length 70)")
    for key in ("p0", "p1"):
        row = out[key]
        assert row["skip_reason"] is None and row["source"] == "ray" and 1 <= row["completion_len"] <= 5
        ids = list(row["input_ids"])
        full = lm.position_logprobs(ids)[row["prompt_len"] - 1 : len(ids) - 1]
        values, top = torch.topk(full, 3, dim=-1)
        stored_ids = np.array([list(r) for r in row["topk_ids"]])
        np.testing.assert_array_equal(stored_ids, top.numpy())
        np.testing.assert_array_equal(stored_ids[:, 0], ids[row["prompt_len"] :])
        np.testing.assert_allclose(np.array([list(r) for r in row["topk_logprobs"]]), values.numpy(), atol=1e-3)
    assert out["p1"]["prompt"] is None and out["p1"]["messages"][0]["role"] == "user"
    assert out["p0"]["prompt"] == "the cat sat"
