"""Penalties on the logits (serve.engine.sampling.apply_penalties): OpenAI's presence/frequency, the repetition penalty;
the greedy pick (greedy_tokens)."""

from __future__ import annotations

import torch

from serve.engine.sampling import apply_penalties, greedy_tokens
from serve.engine.types import SamplingOptions


def test_presence_and_frequency_count_generated_tokens_only_and_repetition_also_sees_the_prompt():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    got = apply_penalties(
        logits,
        [0],
        prompts=[[4]],
        outputs=[[0, 0, 1]],
        options=[SamplingOptions(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)],
    )
    # token 0: seen (2.0 / 2 = 1.0), generated twice: - 0.25 * 2 - 0.5 -> 0.0
    # token 1: seen (-1.0 * 2 = -2.0), generated once: - 0.25 - 0.5 -> -2.75
    # token 4: only in the prompt: repetition only (1.0 / 2); tokens 2, 3 untouched
    assert torch.allclose(got[0], torch.tensor([0.0, -2.75, 0.5, 3.0, 0.5]))
    assert torch.equal(got[1], logits[1])  # rows not listed are untouched
    assert torch.equal(logits[0], torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0]))  # a copy: the raw logits stay (logprobs)


def test_negative_penalties_favour_repeats_and_neutral_values_change_nothing():
    logits = torch.tensor([[0.0, 0.0, 0.0]])
    more = apply_penalties(logits, [0], [[]], [[2]], [SamplingOptions(presence_penalty=-1.0)])
    assert more[0].tolist() == [0.0, 0.0, 1.0]
    same = apply_penalties(logits + 1, [0], [[1]], [[2, 2]], [SamplingOptions()])
    assert torch.equal(same, logits + 1)


def test_greedy_tokens_pick_each_rows_largest_logit_and_the_first_on_a_tie():
    logits = torch.tensor(
        [
            [0.0, 2.0, 1.0, 2.0],  # tie: the first of the two 2.0s
            [-1.0, -3.0, -0.5, -2.0],
            [float("-inf"), float("-inf"), 0.0, float("-inf")],  # top-k / penalties leave -inf around the pick
        ]
    )
    assert greedy_tokens(logits).tolist() == [1, 2, 2]
    big = torch.randn(16, 49152, generator=torch.Generator().manual_seed(0))  # the vocabulary size served
    assert torch.equal(greedy_tokens(big), big.argmax(dim=-1))
