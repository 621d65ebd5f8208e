"""LLMEngine: exactness against transformers, continuous batching, sampling options, limits, abort."""

from __future__ import annotations

import pytest
import torch

from serve.engine.engine import LLMEngine
from serve.engine.types import EngineError, GenerationRequest, SamplingOptions
from tests.serve.engine.conftest import encode, text_of, tokens_of

PROMPTS = [
    "Hello there, how are you",
    "The capital of France is a city named",
    "1 2 3",
    "a b c d e f g h i j k l m n o p q r s t",
    "Once upon a time",
]


def greedy(max_tokens: int = 10, **kw) -> SamplingOptions:
    return SamplingOptions(max_tokens=max_tokens, temperature=0.0, **kw)


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_greedy_equals_transformers_generate(make_engine, tiny_llama, tokenizer):
    engine = make_engine(max_batch_size=3, prefill_chunk=5)  # fewer rows than requests, chunks split prompts
    requests = [GenerationRequest(f"r{i}", encode(tokenizer, p), greedy(12)) for i, p in enumerate(PROMPTS)]
    results = engine.generate(requests)
    for request in requests:
        outs = results[request.request_id]
        assert tokens_of(outs) == hf_greedy(tiny_llama, request.prompt_ids, 12)
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert outs[-1].completion_tokens == len(tokens_of(outs))
        assert outs[-1].prompt_tokens == len(request.prompt_ids)
    assert engine.stats()["running"] == 0 and engine.stats()["free_slots"] == 3


def test_moe_student_with_sliding_window_equals_its_generate(tiny_moe_student, tokenizer):
    # Prompts longer than the window (8) and chunks of 5: ring buffers wrap during chunked prefill and decode.
    engine = LLMEngine.from_model(tiny_moe_student, tokenizer, max_batch_size=2, prefill_chunk=5)
    prompts = [encode(tokenizer, p) for p in PROMPTS[1:4]]
    results = engine.generate([GenerationRequest(f"s{i}", p, greedy(14)) for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        assert tokens_of(results[f"s{i}"]) == hf_greedy(tiny_moe_student, prompt, 14)


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_dense_qwen2_and_mistral_logits_match(kind, tokenizer):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    if kind == "qwen2":  # q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(**common)).eval()
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
                layer.self_attn.k_proj.bias.normal_(0, 0.5)
    else:  # sliding window 6 on every layer
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=6)).eval()
    engine = LLMEngine.from_model(model, tokenizer, max_batch_size=2, prefill_chunk=4)
    ids = encode(tokenizer, PROMPTS[3])
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(engine.forward_logits(ids), ref, atol=1e-4, rtol=1e-4)
    if kind == "mistral":
        assert engine.model.model.config.window_of(0) == 6
    out = engine.generate([GenerationRequest("a", ids, greedy(8))])["a"]
    assert tokens_of(out) == hf_greedy(model, ids, 8)


def test_batching_is_real(make_engine, tokenizer):
    engine = make_engine(max_batch_size=8, prefill_chunk=256)
    requests = [
        GenerationRequest(f"r{i}", encode(tokenizer, PROMPTS[i % 5]), greedy(10, ignore_eos=True)) for i in range(8)
    ]
    results = engine.generate(requests)
    assert all(len(tokens_of(results[r.request_id])) == 10 for r in requests)
    # One prefill step yields every first token, then 9 batched decode steps: 10 steps, not 80.
    assert engine.stats()["steps"] == 10


def test_join_and_leave_mid_batch_equals_running_alone(make_engine, tokenizer):
    target = GenerationRequest("target", encode(tokenizer, PROMPTS[1]), greedy(15, ignore_eos=True))
    alone = tokens_of(make_engine().generate([target])["target"])

    engine = make_engine(max_batch_size=3, prefill_chunk=4)
    for i, n in enumerate((3, 20, 6)):
        engine.add_request(
            GenerationRequest(f"other{i}", encode(tokenizer, PROMPTS[i + 2]), greedy(n, ignore_eos=True))
        )
    got, company = [], set()
    for step in range(200):
        if step == 4:  # joins while the others decode; they leave at different steps around it
            engine.add_request(GenerationRequest("target", target.prompt_ids, target.sampling))
        outs = engine.step()
        company.add(len([o for o in outs if o.request_id != "target"]))
        got.extend(t for o in outs if o.request_id == "target" for t in o.token_ids)
        if not engine.has_unfinished():
            break
    assert got == alone
    assert len(company) > 1  # the batch really changed size around the target


def test_seed_repeatable_regardless_of_batch_company(make_engine, tokenizer):
    prompt = encode(tokenizer, PROMPTS[0])

    def run(seed, company):
        engine = make_engine()
        sampling = SamplingOptions(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=seed, ignore_eos=True)
        requests = [GenerationRequest("seeded", prompt, sampling)]
        requests += [
            GenerationRequest(
                f"c{i}",
                encode(tokenizer, PROMPTS[i]),
                SamplingOptions(max_tokens=5 + i, temperature=1.0, ignore_eos=True),
            )
            for i in range(company)
        ]
        return tokens_of(engine.generate(requests)["seeded"])

    first = run(7, 0)
    assert run(7, 3) == first
    assert run(8, 2) != first


def test_top_k_one_is_greedy(make_engine, tokenizer):
    prompt = encode(tokenizer, PROMPTS[2])
    engine = make_engine()
    ref = tokens_of(engine.generate([GenerationRequest("g", prompt, greedy(8, ignore_eos=True))])["g"])
    sampled = engine.generate(
        [GenerationRequest("k", prompt, SamplingOptions(max_tokens=8, temperature=1.5, top_k=1, ignore_eos=True))]
    )["k"]
    assert tokens_of(sampled) == ref


def test_stop_string_excluded_and_streamed_text_never_shows_it(make_engine, tokenizer):
    engine = make_engine()
    prompt = encode(tokenizer, PROMPTS[0])
    full = engine.generate([GenerationRequest("full", prompt, greedy(20, ignore_eos=True))])["full"]
    text = text_of(full)
    assert len(text) > 12
    stop = text[6:9]
    cut = text.find(stop)
    outs = engine.generate([GenerationRequest("stop", prompt, greedy(20, ignore_eos=True, stop=["zzzq", stop]))])[
        "stop"
    ]
    assert text_of(outs) == text[:cut]
    assert outs[-1].finish_reason == "stop"
    assert len(tokens_of(outs)) < 20
    streamed = ""
    for o in outs:  # held-back text: no prefix of the stop string is ever streamed past the cut
        streamed += o.text
        assert text[:cut].startswith(streamed)


def test_stop_token_ids_and_eos(make_engine, tokenizer):
    engine = make_engine()
    prompt = encode(tokenizer, PROMPTS[1])
    full = tokens_of(engine.generate([GenerationRequest("f", prompt, greedy(12, ignore_eos=True))])["f"])
    stop_token = full[4]
    outs = engine.generate([GenerationRequest("s", prompt, greedy(12, stop_token_ids=[stop_token]))])["s"]
    got = tokens_of(outs)
    assert got == full[: full.index(stop_token) + 1]  # the stop token is returned, generation ends there
    assert outs[-1].finish_reason == "stop"
    engine.eos_token_ids, engine._eos = [stop_token], {stop_token}  # same token as EOS
    outs = engine.generate([GenerationRequest("e", prompt, greedy(12))])["e"]
    assert tokens_of(outs) == got and outs[-1].finish_reason == "stop"
    outs = engine.generate([GenerationRequest("i", prompt, greedy(12, ignore_eos=True))])["i"]
    assert tokens_of(outs) == full and outs[-1].finish_reason == "length"


def test_max_tokens_and_context_length(make_engine, tokenizer):
    engine = make_engine(max_model_len=32)
    prompt = encode(tokenizer, PROMPTS[3])  # 20 tokens
    assert engine.context_length == 32
    outs = engine.generate([GenerationRequest("m", prompt, greedy(7, ignore_eos=True))])["m"]
    assert len(tokens_of(outs)) == 7 and outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 7
    outs = engine.generate([GenerationRequest("full", prompt, greedy(32 - len(prompt), ignore_eos=True))])["full"]
    assert len(tokens_of(outs)) == 32 - len(prompt)
    with pytest.raises(EngineError, match=rf"prompt has {len(prompt)} tokens, max_tokens 13, context 32"):
        engine.add_request(GenerationRequest("long", prompt, greedy(13)))
    with pytest.raises(EngineError, match="prompt is empty"):
        engine.add_request(GenerationRequest("empty", [], greedy(1)))
    for bad, field in (
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(top_logprobs=1000), "top_logprobs"),
    ):
        with pytest.raises(EngineError, match=field):
            engine.add_request(GenerationRequest("bad", prompt, SamplingOptions(**{"max_tokens": 1, **bad})))
    engine.add_request(GenerationRequest("dup", prompt, greedy(1)))
    with pytest.raises(EngineError, match="already"):
        engine.add_request(GenerationRequest("dup", prompt, greedy(1)))
    assert not engine.stats()["running"]


def test_abort_frees_the_slot_at_once(make_engine, tokenizer, tiny_llama):
    engine = make_engine(max_batch_size=2)
    prompt = encode(tokenizer, PROMPTS[0])
    # seeded sampling: varied tokens, so a corrupted cache row after compaction would show
    sampling = SamplingOptions(max_tokens=50, temperature=1.0, seed=5, ignore_eos=True, logprobs=True)
    for rid in ("a", "b", "c"):
        engine.add_request(GenerationRequest(rid, prompt, sampling))
    got_b = []

    def collect(outs):
        got_b.extend(lp for o in outs if o.request_id == "b" for lp in o.logprobs)

    for _ in range(3):
        collect(engine.step())
    assert engine.stats()["free_slots"] == 0 and engine.stats()["waiting"] == 1
    engine.abort("a")
    assert engine.stats()["free_slots"] == 1 and engine.stats()["running"] == 1
    outs = engine.step()
    collect(outs)
    aborted = [o for o in outs if o.request_id == "a"]
    assert aborted and aborted[0].finished and aborted[0].finish_reason == "abort"
    assert {o.request_id for o in outs} >= {"b", "c"}  # c took a's row in the same step
    assert engine.stats()["waiting"] == 0
    engine.abort("unknown")  # no error
    while engine.has_unfinished():
        collect(engine.step())
    tokens = [lp.token_id for lp in got_b]
    assert len(tokens) == 50 and len(set(tokens)) > 10
    # b, which stayed, is unaffected by a's departure (rows are compacted under it): every log-prob the
    # engine reported equals a full forward over b's own history. (Not token equality with a run
    # alone: fp32 rounding differs with the batch shape, so a sampled token may flip at a near-tie.)
    with torch.no_grad():
        full = torch.log_softmax(tiny_llama(torch.tensor([prompt + tokens])).logits[0].float(), -1)
    expected = full[len(prompt) - 1 : -1].gather(1, torch.tensor(tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in got_b]), expected, rtol=0, atol=1e-4)


def test_chunked_prefill_keeps_running_streams_decoding(make_engine, tokenizer):
    engine = make_engine(max_batch_size=2, prefill_chunk=4)
    engine.add_request(GenerationRequest("run", encode(tokenizer, PROMPTS[2]), greedy(30, ignore_eos=True)))
    engine.step()
    engine.step()
    long_prompt = encode(tokenizer, " ".join(PROMPTS * 2))
    assert len(long_prompt) > 30
    engine.add_request(GenerationRequest("long", long_prompt, greedy(2, ignore_eos=True)))
    steps_until_first = 0
    while True:
        outs = {o.request_id: o for o in engine.step()}
        assert "run" in outs  # a token for the running stream at every step of the long prefill
        steps_until_first += 1
        if "long" in outs:
            break
    assert steps_until_first == -(-len(long_prompt) // 4)


def test_logprobs_equal_log_softmax_of_reference_forward(make_engine, tiny_llama, tokenizer):
    engine = make_engine()
    prompt = encode(tokenizer, PROMPTS[1])
    outs = engine.generate(
        [
            GenerationRequest(
                "lp",
                prompt,
                SamplingOptions(max_tokens=6, temperature=0.8, seed=1, logprobs=True, top_logprobs=3, ignore_eos=True),
            )
        ]
    )["lp"]
    tokens = tokens_of(outs)
    with torch.no_grad():
        ref = torch.log_softmax(tiny_llama(torch.tensor([prompt + tokens])).logits[0].float(), dim=-1)
    for i, out in enumerate(outs):
        (entry,) = out.logprobs
        row = ref[len(prompt) - 1 + i]
        assert entry.token_id == tokens[i]
        assert entry.logprob == pytest.approx(float(row[tokens[i]]), abs=1e-4)
        top_v, top_i = row.topk(3)
        assert [t for t, _ in entry.top] == top_i.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top_v.tolist(), abs=1e-4)


def test_prompt_logprobs(make_engine, tiny_llama, tokenizer):
    engine = make_engine()
    prompt = encode(tokenizer, PROMPTS[0])
    with torch.no_grad():
        ref = torch.log_softmax(tiny_llama(torch.tensor([prompt])).logits[0].float(), dim=-1)
    for max_tokens in (0, 2):  # 0: scoring only (echo + logprobs clients)
        outs = engine.generate(
            [
                GenerationRequest(
                    f"p{max_tokens}",
                    prompt,
                    SamplingOptions(max_tokens=max_tokens, temperature=0, prompt_logprobs=True, top_logprobs=2),
                )
            ]
        )[f"p{max_tokens}"]
        scored = outs[0].prompt_logprobs
        assert len(scored) == len(prompt) and scored[0] is None
        for i in range(1, len(prompt)):
            assert scored[i].token_id == prompt[i]
            assert scored[i].logprob == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
            assert [t for t, _ in scored[i].top] == ref[i - 1].topk(2).indices.tolist()
        assert all(o.prompt_logprobs is None for o in outs[1:])
        assert len(tokens_of(outs)) == max_tokens and outs[-1].finished


@pytest.mark.slow
def test_builtin_smollm2_greedy_equals_transformers(builtin_teacher_model):
    engine = LLMEngine.from_pretrained("smollm2-135m-instruct", max_batch_size=2, prefill_chunk=16)
    hf = builtin_teacher_model
    tok = engine.tokenizer
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
        for text in ("What is the capital of France?", "Write one sentence about the sea.")
    ]
    results = engine.generate([GenerationRequest(f"p{i}", p, greedy(20)) for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        outs = results[f"p{i}"]
        assert tokens_of(outs) == hf_greedy(hf, prompt, 20)
        assert text_of(outs) == tok.decode(tokens_of(outs), skip_special_tokens=True)


def test_reset_after_a_failed_step_leaves_a_working_engine(make_engine, tokenizer):
    from serve.engine.types import GenerationRequest, SamplingOptions
    from tests.serve.engine.conftest import encode, tokens_of

    engine = make_engine(max_batch_size=2)
    sampling = SamplingOptions(max_tokens=6, temperature=0, ignore_eos=True)
    expected = make_engine().generate([GenerationRequest("ref", encode(tokenizer, "Hello there"), sampling)])["ref"]
    for i, text in enumerate(("a b c", "one two three four five six seven eight nine ten", "x")):
        engine.add_request(GenerationRequest(f"old{i}", encode(tokenizer, text), sampling))
    engine.step()
    engine.step()  # some rows running, some prefilling, one waiting
    assert sorted(engine.reset()) == ["old0", "old1", "old2"]
    assert not engine.has_unfinished() and engine.stats()["free_slots"] == 2
    got = engine.generate([GenerationRequest("new", encode(tokenizer, "Hello there"), sampling)])["new"]
    assert tokens_of(got) == tokens_of(expected)


def test_recover_after_a_failed_step_resumes_every_request_exactly(make_engine, tokenizer):
    """A step that fails half-way (one row advanced, the next raises) is rolled back: after recover() the
    requests resume (re-prefilling prompt + output) and produce the same tokens, seeded sampling included."""
    from serve.engine.types import GenerationRequest, SamplingOptions
    from tests.serve.engine.conftest import encode, text_of, tokens_of

    def requests():
        return [
            GenerationRequest(
                "a",
                encode(tokenizer, "Hello there"),
                SamplingOptions(max_tokens=12, temperature=0.9, seed=5, ignore_eos=True),
            ),
            GenerationRequest(
                "b",
                encode(tokenizer, "The capital of France is"),
                SamplingOptions(max_tokens=12, temperature=0, ignore_eos=True),
            ),
        ]

    expected = make_engine().generate(requests())
    engine = make_engine()
    for r in requests():
        engine.add_request(r)
    outs: dict[str, list] = {"a": [], "b": []}
    real_advance, calls = engine._advance, []

    def flaky(seq, token, logprob):
        calls.append(seq.id)
        if len(calls) == 10:  # mid-step (2 rows a step): after the other row advanced in the same step
            raise RuntimeError("boom")
        return real_advance(seq, token, logprob)

    engine._advance = flaky
    failures = 0
    while engine.has_unfinished():
        try:
            step = engine.step()
        except RuntimeError:
            failures += 1
            assert engine.recover() == []  # two requests involved: retried, nobody blamed yet
            continue
        for out in step:
            outs[out.request_id].append(out)
    assert failures == 1
    for rid in ("a", "b"):
        assert tokens_of(outs[rid]) == tokens_of(expected[rid])
        assert text_of(outs[rid]) == text_of(expected[rid])
        assert outs[rid][-1].finish_reason == "length" and outs[rid][-1].completion_tokens == 12


def _penalized_greedy_reference(model, prompt: list[int], steps: int, presence: float, frequency: float, rep: float):
    """Greedy with the penalties written out per token, over full forwards of the reference model."""
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out])).logits[0, -1].float()
        for token in set(prompt + out):
            value = float(logits[token])
            logits[token] = value / rep if value > 0 else value * rep
        for token in set(out):
            logits[token] -= frequency * out.count(token) + presence
        out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize(
    "presence, frequency, rep", [(0.0, 1.5, 1.0), (1.0, 0.0, 1.0), (0.0, 0.0, 1.8), (0.5, 0.5, 1.3)]
)
def test_penalties_steer_greedy_exactly_like_their_definition(
    make_engine, tiny_llama, tokenizer, presence, frequency, rep
):
    engine = make_engine(max_batch_size=2)
    prompt = encode(tokenizer, PROMPTS[3])
    options = greedy(
        10, ignore_eos=True, presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=rep
    )
    results = engine.generate(
        [GenerationRequest("pen", prompt, options), GenerationRequest("plain", prompt, greedy(10, ignore_eos=True))]
    )
    want = _penalized_greedy_reference(tiny_llama, prompt, 10, presence, frequency, rep)
    assert tokens_of(results["pen"]) == want
    plain = tokens_of(results["plain"])  # the other row of the batch is untouched
    assert plain == hf_greedy(tiny_llama, prompt, 10)
    assert want != plain  # the penalty changed the path (else this test would prove nothing)
