"""Sample answers: each model's greedy answer to the same held-out prompts, for the report side by side.

Bits per byte say how far the student is from the teacher; the answers show what that distance reads
like. The prompts are held-out teacher rows (prompts the student never trained on), fed as the
teacher met them (the row's own prompt tokens, chat template included), so the teacher's answer is
what it would have written greedily and the student's is comparable token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def sample_rows(rows: Sequence[dict], count: int) -> list[dict]:
    """The first ``count`` held-out rows with a prompt (rows come sorted by prompt id: the same for every model)."""
    picked = [r for r in rows if r.get("prompt") and int(r.get("prompt_len") or 0) > 0]
    return picked[:count]


@torch.no_grad()
def greedy_answers(
    model: Any, tokenizer: Any, rows: Sequence[dict], *, max_new_tokens: int, repetition_penalty: float = 1.0
) -> list[str]:
    """Each row's prompt (``input_ids[:prompt_len]``) continued greedily by ``model`` (HF ``generate``), up to
    ``max_new_tokens`` or an end-of-sequence token; returns the new text only, special tokens dropped.

    ``repetition_penalty``: the CTRL penalty HF and our engine apply alike (1.0 = none); the eval passes the
    serving default, so the answers are the ones the endpoint would give."""
    device = next(model.parameters()).device
    answers = []
    for row in rows:
        ids = torch.tensor([list(map(int, row["input_ids"][: int(row["prompt_len"])]))], device=device)  # [1, P]
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=repetition_penalty,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )  # [1, P + new]
        answers.append(tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True).strip())
    return answers


def side_by_side(rows: Sequence[dict], answers: dict[str, list[str]]) -> list[dict[str, Any]]:
    """``[{prompt_id, prompt, answers: {model: text}}]`` for the report, in row order."""
    return [
        {
            "prompt_id": row.get("prompt_id"),
            "prompt": row["prompt"],
            "answers": {name: texts[i] for name, texts in answers.items() if i < len(texts)},
        }
        for i, row in enumerate(rows)
    ]
