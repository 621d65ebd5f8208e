"""On-policy pieces without Ray: the student's samples and their log-probs, the packed batch of
teacher labels, and the loss on it against a full-vocabulary reference."""

from __future__ import annotations

import json

import numpy as np
import torch

from distill.losses import LossWeights
from distill.teacher.base import ScoredSequence
from distill.training.loop import DistillModule
from distill.training.on_policy import packed_batch, sample
from tests.distill.training.tiny import VOCAB, tiny_model

EOS = 2
PROMPTS = [[5, 9, 11, 3], [7, 8], [20, 21, 22, 23, 24, 25]]


def _full_logprobs(model, seq):
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits
    return torch.log_softmax(logits[0].double(), -1)  # [L, V]


def _teacher_labels(teacher, samples, k):
    """What LabelService returns, computed in-process from a full forward of ``teacher``."""
    out = []
    for prompt, completion in zip(samples.prompts, samples.completions):
        lp = _full_logprobs(teacher, prompt + completion)[len(prompt) - 1 : -1].float()  # [T, V]
        top_lp, top_ids = lp.topk(k, dim=-1)
        tok = lp.gather(1, torch.tensor(completion)[:, None])[:, 0]
        out.append(ScoredSequence(top_ids.int().numpy(), top_lp.numpy(), tok.numpy()))
    return out


def test_samples_and_their_student_logprobs_follow_the_model():
    student = tiny_model(seed=1)
    g = torch.Generator().manual_seed(0)
    samples = sample(student, PROMPTS, max_new_tokens=7, temperature=1.0, eos_ids={EOS}, generator=g)
    assert student.training  # restored
    assert len(samples.completions) == 3 and all(1 <= len(c) <= 7 for c in samples.completions)
    for prompt, completion, lp in zip(samples.prompts, samples.completions, samples.student_logprobs):
        assert EOS not in completion[:-1]
        full = _full_logprobs(student, prompt + completion)[len(prompt) - 1 : -1]  # [T, V] predicts each token
        want = full.gather(1, torch.tensor(completion)[:, None])[:, 0]
        np.testing.assert_allclose(lp, want.numpy(), atol=2e-4)
    greedy = sample(student, PROMPTS, max_new_tokens=5, temperature=0.0, eos_ids=set())
    for prompt, completion in zip(greedy.prompts, greedy.completions):
        assert len(completion) == 5
        full = _full_logprobs(student, prompt + completion)[len(prompt) - 1 : -1]
        assert full.argmax(-1).tolist() == completion


def test_packed_batch_and_loss_equal_the_full_vocab_reverse_kl_on_the_samples():
    student, teacher = tiny_model(seed=1), tiny_model(seed=2)
    samples = sample(
        student, PROMPTS, max_new_tokens=6, temperature=1.0, eos_ids={EOS}, generator=torch.Generator().manual_seed(3)
    )
    batch = packed_batch(samples, _teacher_labels(teacher, samples, k=VOCAB))
    assert batch.tokens == samples.tokens and batch.topk_ids.shape == (samples.tokens, VOCAB + 1)
    assert torch.equal(batch.input_ids.reshape(-1)[batch.pred_index + 1], batch.targets)
    module = DistillModule(student, chunk_size=16)
    losses, _ = module(
        batch.input_ids,
        batch.attention_mask,
        batch.position_ids,
        batch.pred_index,
        batch.targets,
        batch.topk_ids,
        batch.topk_logprobs,
        LossWeights(forward_kl=0, reverse_kl=1),
    )
    ref = []
    for prompt, completion in zip(samples.prompts, samples.completions):
        q = _full_logprobs(student, prompt + completion)[len(prompt) - 1 : -1]
        p = _full_logprobs(teacher, prompt + completion)[len(prompt) - 1 : -1]
        ref.append((q.exp() * (q - p)).sum(-1))
    want = torch.cat(ref).mean()
    assert float(want) > 0.01
    torch.testing.assert_close(losses.loss.double(), want, atol=2e-4, rtol=1e-4)
    losses.loss.backward()
    assert student.lm_head.weight.grad is not None and student.lm_head.weight.grad.abs().sum() > 0


def test_with_a_small_k_the_sampled_token_is_labelled_even_outside_the_top_k():
    student, teacher = tiny_model(seed=1), tiny_model(seed=2)
    samples = sample(
        student, PROMPTS, max_new_tokens=6, temperature=1.5, eos_ids=set(), generator=torch.Generator().manual_seed(4)
    )
    labels = _teacher_labels(teacher, samples, k=2)
    batch = packed_batch(samples, labels)
    assert batch.topk_ids.shape == (samples.tokens, 3)
    outside = ~(batch.topk_ids[:, :2] == batch.targets[:, None]).any(-1)
    assert outside.any()
    assert torch.equal(batch.topk_ids[outside, 2], batch.targets[outside])
    np.testing.assert_allclose(
        batch.topk_logprobs[outside, 2].numpy(), np.concatenate([s.token_logprobs for s in labels])[outside.numpy()]
    )


def test_student_end_tokens_follow_the_teacher_backends_rule(tmp_path):
    from distill.training.stage import _eos_ids

    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert _eos_ids(tmp_path) == [2]
    # Chat models often end turns on a token only generation_config.json names (SmolLM2, Qwen2).
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert _eos_ids(tmp_path) == [2, 7]
