"""The vLLM adapter's request/option translation (vLLM itself is not installed on CPU machines)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from cluster.errors import RaydistillError
from serve.engine.types import SamplingOptions
from serve.vllm_engine import VLLMAsyncEngine, convert_output, engine_args, sampling_kwargs


def test_sampling_kwargs():
    kw = sampling_kwargs(
        SamplingOptions(
            max_tokens=7,
            temperature=0.5,
            top_p=0.9,
            top_k=0,
            seed=3,
            stop=["\n"],
            logprobs=True,
            top_logprobs=2,
            prompt_logprobs=True,
            ignore_eos=True,
        )
    )
    assert kw["max_tokens"] == 7 and kw["temperature"] == 0.5 and kw["top_p"] == 0.9
    assert kw["top_k"] == -1 and kw["seed"] == 3 and kw["stop"] == ["\n"] and kw["ignore_eos"] is True
    assert kw["logprobs"] == 2 and kw["prompt_logprobs"] == 2
    penalized = sampling_kwargs(SamplingOptions(presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.2))
    assert (penalized["presence_penalty"], penalized["frequency_penalty"], penalized["repetition_penalty"]) == (
        0.5,
        -1.0,
        1.2,
    )
    plain = sampling_kwargs(SamplingOptions(top_k=40))
    assert plain["top_k"] == 40 and plain["logprobs"] is None and plain["prompt_logprobs"] is None
    assert plain["stop"] is None


def _lp(value, rank):
    return SimpleNamespace(logprob=value, rank=rank, decoded_token="x")


def test_convert_output_delta_with_logprobs():
    opts = SamplingOptions(max_tokens=4, logprobs=True, top_logprobs=2, prompt_logprobs=True)
    ro = SimpleNamespace(
        finished=False,
        prompt_token_ids=[5, 6, 7],
        prompt_logprobs=[None, {6: _lp(-1.0, 2), 9: _lp(-0.5, 1)}, {7: _lp(-0.1, 1)}],
        outputs=[
            SimpleNamespace(
                text="ab",
                token_ids=[11, 12],
                finish_reason=None,
                logprobs=[{11: _lp(-0.2, 1), 13: _lp(-2.0, 2)}, {12: _lp(-3.0, 3), 14: _lp(-0.1, 1), 15: _lp(-1.0, 2)}],
            )
        ],
    )
    out = convert_output("r", ro, 3, 0, opts, first=True)
    assert out.token_ids == [11, 12] and out.text == "ab" and not out.finished
    assert out.completion_tokens == 2 and out.prompt_tokens == 3
    assert out.logprobs[0].logprob == -0.2 and out.logprobs[0].top == [(11, -0.2), (13, -2.0)]
    assert out.logprobs[1].token_id == 12 and out.logprobs[1].top == [(14, -0.1), (15, -1.0)]
    assert out.prompt_logprobs[0] is None and out.prompt_logprobs[1].logprob == -1.0
    assert out.prompt_logprobs[1].top == [(9, -0.5), (6, -1.0)]
    done = SimpleNamespace(
        finished=True,
        prompt_token_ids=[5],
        prompt_logprobs=None,
        outputs=[SimpleNamespace(text="", token_ids=[2], finish_reason="stop", logprobs=None)],
    )
    last = convert_output("r", done, 3, 2, SamplingOptions(), first=False)
    assert last.finished and last.finish_reason == "stop" and last.completion_tokens == 3 and last.logprobs is None
    aborted = SimpleNamespace(
        finished=True,
        prompt_token_ids=[5],
        prompt_logprobs=None,
        outputs=[SimpleNamespace(text="", token_ids=[], finish_reason=None, logprobs=None)],
    )
    assert convert_output("r", aborted, 3, 3, SamplingOptions(), first=False).finish_reason == "abort"


def test_engine_args_and_missing_vllm(monkeypatch):
    args = engine_args("/m", dtype="bfloat16", max_batch_size=8, max_model_len=1024)
    assert args["model"] == "/m" and args["max_num_seqs"] == 8 and args["max_model_len"] == 1024
    assert args["dtype"] == "bfloat16"
    # float32 stays float32: vLLM's "auto" would downcast a float32 checkpoint to bfloat16 on CPU
    assert engine_args("/m", dtype="float32")["dtype"] == "float32"
    for name in ("vllm", "vllm.v1", "vllm.v1.engine", "vllm.v1.engine.async_llm"):
        monkeypatch.setitem(sys.modules, name, None)  # every `import vllm...` raises ImportError, installed or not
    with pytest.raises(RaydistillError, match=r"raydistill\[gpu\]"):
        VLLMAsyncEngine.from_pretrained("/m")


def test_vllm_backend_without_vllm_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm.v1.engine.async_llm", None)  # what a main install without vLLM sees
    with pytest.raises(
        RaydistillError, match=r"serve.backend=vllm needs vLLM \(.*make vllm-cpu.*serve.backend: engine"
    ):
        VLLMAsyncEngine.from_pretrained("smollm2-135m-instruct")
