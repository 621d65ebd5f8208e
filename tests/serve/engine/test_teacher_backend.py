"""The ``engine`` teacher backend equals the ``hf`` backend on a tiny LLaMA (greedy text, soft labels, scores)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from distill.teacher.base import SamplingParams, backend_class


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    from tests.conftest import torch_threads

    with torch_threads(1):
        yield


PROMPTS = ["Hello there, how are you", "The capital of France is", [{"role": "user", "content": "Name a colour."}]]


@pytest.fixture(scope="module")
def teachers(tiny_teacher_dir):
    from distill.teacher.hf import HFTeacher
    from serve.engine.teacher import EngineTeacher

    return HFTeacher(tiny_teacher_dir, dtype="float32", batch_size=4), EngineTeacher(tiny_teacher_dir, batch_size=2)


def test_registered_backend_and_config_enum():
    from distill.teacher.section import TeacherBackendName as TeacherBackend
    from serve.engine.teacher import EngineTeacher

    assert backend_class("engine") is EngineTeacher
    assert TeacherBackend("engine").value == "engine"


def test_greedy_completions_and_soft_labels_equal_hf(teachers):
    hf, engine = teachers
    sampling = SamplingParams(max_new_tokens=10, temperature=0.0, logprobs=5)
    expected = hf.generate(PROMPTS, sampling)
    got = engine.generate(PROMPTS, sampling)
    assert engine.context_length == hf.context_length
    for want, have in zip(expected, got):
        assert have.prompt_ids == want.prompt_ids
        assert have.completion_ids == want.completion_ids
        assert have.finish_reason == want.finish_reason
        assert have.text == want.text
        assert have.topk_ids.shape == (len(have.completion_ids), 5) and have.topk_ids.dtype == np.int32
        np.testing.assert_array_equal(have.topk_ids, want.topk_ids)
        np.testing.assert_allclose(have.topk_logprobs, want.topk_logprobs, atol=1e-4)


def test_sampled_soft_labels_are_raw_and_seeds_separate_samples(teachers, tiny_teacher_dir):
    _, engine = teachers
    sampling = SamplingParams(max_new_tokens=6, temperature=1.3, top_k=20, logprobs=3, seed=11)
    a, b = engine.generate(["Once upon a time", "Once upon a time"], sampling)
    assert a.completion_ids != b.completion_ids  # samples_per_prompt duplicates must differ
    again = engine.generate(["Once upon a time", "Once upon a time"], sampling)
    assert again[0].completion_ids == a.completion_ids  # but the call is reproducible
    # Raw distribution: the top-3 of log_softmax of a temperature-1 forward over the sampled sequence
    # (not divided by the sampling temperature, not renormalised to top_k).
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    for c in (a, b):
        ids = torch.tensor([c.prompt_ids + c.completion_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(c.prompt_ids) - 1 : -1].float()
        want_lp, want_ids = torch.topk(torch.log_softmax(logits, dim=-1), 3, dim=-1)
        assert c.topk_logprobs.shape == (len(c.completion_ids), 3)
        np.testing.assert_array_equal(c.topk_ids, want_ids.numpy())
        np.testing.assert_allclose(c.topk_logprobs, want_lp.numpy(), atol=1e-4)


def test_score_equals_hf(teachers):
    hf, engine = teachers
    seqs = [hf.encode_prompt("The quick brown fox jumps over the lazy dog"), hf.encode_prompt("a b c d")]
    starts = [3, 1]
    for want, have in zip(hf.score(seqs, starts, 4), engine.score(seqs, starts, 4)):
        np.testing.assert_array_equal(have.topk_ids, want.topk_ids)
        np.testing.assert_allclose(have.topk_logprobs, want.topk_logprobs, atol=1e-4)
        np.testing.assert_allclose(have.token_logprobs, want.token_logprobs, atol=1e-4)


def test_score_batches_mixed_lengths_and_answers_as_alone(teachers):
    """More sequences than one scoring pass takes, of mixed lengths and starts, in an order the engine
    regroups by length: each result is the sequence's own (its full forward pass alone), in input order."""
    import random

    from serve.engine.teacher import SCORE_ROWS

    _, engine = teachers
    rng = random.Random(0)
    vocab = engine.engine.model.lm_head.weight.shape[0]
    seqs = [[rng.randrange(3, vocab) for _ in range(rng.randrange(2, 40))] for _ in range(SCORE_ROWS + 3)]
    starts = [rng.randrange(1, len(s) + 1) for s in seqs]
    scored = engine.score(seqs, starts, 4)
    assert len(scored) == len(seqs)
    for seq, start, have in zip(seqs, starts, scored):
        alone = torch.log_softmax(engine.engine.forward_logits(seq)[start - 1 : len(seq) - 1], -1)  # [L - start, V]
        assert have.topk_ids.shape == (len(seq) - start, 4) == have.topk_logprobs.shape
        want_top = torch.topk(alone, 4, dim=-1).values.numpy()
        np.testing.assert_allclose(have.topk_logprobs, want_top, atol=1e-4)
        # the ids chosen carry those log-probs in the sequence's own distribution (robust to near-ties)
        picked = alone.gather(-1, torch.as_tensor(have.topk_ids, dtype=torch.long)).numpy()
        np.testing.assert_allclose(picked, have.topk_logprobs, atol=1e-4)
        own = alone.gather(-1, torch.tensor(seq[start:])[:, None])[:, 0].numpy()
        np.testing.assert_allclose(have.token_logprobs, own, atol=1e-4)


@pytest.mark.parametrize("backend", ["hf", "engine"])
def test_score_rejects_bad_inputs_before_any_forward_pass(teachers, backend, monkeypatch):
    """Both backends check a whole call first, with the same messages: a bad start or an over-long
    sequence later in the call costs no teacher time and names the sequence."""
    from cluster.errors import ConfigError

    teacher = dict(zip(["hf", "engine"], teachers))[backend]
    model = teacher.model if backend == "hf" else teacher.engine.model

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass ran before the inputs were checked")

    monkeypatch.setattr(model, "forward", no_forward)
    good = [5, 6, 7, 8]
    with pytest.raises(ValueError, match=r"start 0 of sequence 1 must be in \[1, 4\]"):
        teacher.score([good, good], [1, 0], 4)
    with pytest.raises(ValueError, match=r"start 5 of sequence 0 must be in \[1, 4\]"):
        teacher.score([good], [5], 4)
    with pytest.raises(ValueError, match="2 sequences but 1 starts"):
        teacher.score([good, good], [1], 4)
    too_long = [5] * (teacher.context_length + 1)
    with pytest.raises(ConfigError, match=rf"sequence 1 has {len(too_long)} tokens.*corpus.row_tokens"):
        teacher.score([good, too_long], [1, 1], 4)


def test_calls_from_two_threads_share_one_engine_batch_and_answer_as_alone(tiny_teacher_dir):
    """The generate stage's ``teacher.batches_in_flight``: concurrent calls fill each other's free rows."""
    import threading

    from serve.engine.teacher import EngineTeacher

    teacher = EngineTeacher(tiny_teacher_dir, batch_size=4)
    sampling = SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=3)
    calls = [PROMPTS[:2], PROMPTS[2:] + ["Once upon a time"]]
    alone = [teacher.generate(prompts, sampling) for prompts in calls]

    engine, gate, running = teacher.engine, threading.Event(), []
    step = engine.step

    def gated_step():  # the first step waits until both calls have handed in their requests
        gate.wait(timeout=30)
        outputs = step()
        running.append(engine.stats()["running"])
        return outputs

    engine.step = gated_step
    together: list = [None, None]
    threads = [
        threading.Thread(target=lambda i=i: together.__setitem__(i, teacher.generate(calls[i], sampling)))
        for i in range(2)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(teacher._async._adds) + engine.stats()["waiting"] + engine.stats()["running"] < 4:
        assert time.monotonic() < deadline, "the two calls never both reached the engine"
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(timeout=60)
    teacher.close()

    assert max(running) == 4  # both calls' requests decoded in the same step
    for want_call, have_call in zip(alone, together):
        for want, have in zip(want_call, have_call):
            assert have.completion_ids == want.completion_ids
            np.testing.assert_allclose(have.topk_logprobs, want.topk_logprobs, atol=1e-4)


def test_auto_dtype_is_bfloat16_only_on_cpus_with_amx(tmp_path, monkeypatch, tiny_teacher_dir):
    """``teacher.dtype: auto`` on the engine backend: bfloat16 where /proc/cpuinfo lists ``amx_bf16`` (bf16
    matmul units), float32 on AVX2 / AVX-512 CPUs without them; a given dtype is kept as it is."""
    from distill.teacher.section import TeacherSection
    from serve.engine import kernels
    from serve.engine.teacher import EngineTeacher

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\n")
    assert {"avx2", "amx_bf16"} <= kernels.cpu_flags(str(cpuinfo))
    assert kernels.cpu_flags(str(tmp_path / "missing")) == set()
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert kernels.auto_cpu_dtype() == "float32"  # AVX512-BF16 alone: no matrix units
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "amx_bf16", "amx_tile"})
    assert kernels.auto_cpu_dtype() == "bfloat16"

    def weight_dtype(dtype: str) -> tuple[torch.dtype, str]:
        teacher = EngineTeacher.from_config(
            TeacherSection(model=tiny_teacher_dir, backend="engine", dtype=dtype, batch_size=2)
        )
        return next(teacher.engine.model.parameters()).dtype, teacher.name

    # The rows' ``teacher`` name says which dtype labelled them, where it is not float32.
    dtype, name = weight_dtype("auto")
    assert dtype == torch.bfloat16 and name.startswith(f"{tiny_teacher_dir}@") and name.endswith(" (bfloat16)")
    assert weight_dtype("float32") == (torch.float32, name.removesuffix(" (bfloat16)"))
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2"})
    assert weight_dtype("auto")[0] == torch.float32
