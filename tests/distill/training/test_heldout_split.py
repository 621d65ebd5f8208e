"""The held-out split is by prompt: every sample of a prompt lands on the same side."""

from __future__ import annotations

import numpy as np

from distill.data.schema import prompt_id, to_table
from distill.data.split import is_heldout
from distill.training.data import heldout_mask


def _rows(prompts: int, samples: int, chat: bool = False) -> list[dict]:
    rows = []
    for i in range(prompts):
        prompt = f"Question {i}: why is the sky blue?"
        messages = [{"role": "user", "content": prompt}] if chat else None
        for s in range(samples):
            rows.append(
                {
                    "prompt_id": prompt_id("src", messages or prompt, s),
                    "prompt": prompt,
                    "messages": messages,
                    "source": "src",
                    "input_ids": [1, 2, 3],
                    "prompt_len": 2,
                    "completion_len": 1,
                }
            )
    return rows


def test_all_samples_of_a_prompt_fall_on_the_same_side():
    for chat in (False, True):
        rows = _rows(prompts=60, samples=3, chat=chat)
        held = heldout_mask(to_table(rows), fraction=0.3, seed=0)
        by_prompt = held.reshape(60, 3)
        assert (by_prompt == by_prompt[:, :1]).all()  # no prompt split across train and held-out
        assert 5 < by_prompt[:, 0].sum() < 35  # and both sides are used


def test_one_sample_per_prompt_keeps_the_split_by_prompt_id():
    rows = _rows(prompts=50, samples=1)
    held = heldout_mask(to_table(rows), fraction=0.3, seed=7)
    assert held.tolist() == [is_heldout(r["prompt_id"], 0.3, 7) for r in rows]
    assert not heldout_mask(to_table(rows), fraction=0.0, seed=7).any()
    assert np.asarray(held).dtype == bool
