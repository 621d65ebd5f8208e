"""Chunked prefill (``append``) equals one-shot prefill, on sliding and full layers, chunks crossing the window."""

from __future__ import annotations

import pytest
import torch

from tests.distill.student.conftest import tiny_student


def _prefill_then_decode(model, prompts: list[list[int]], steps: int = 3):
    """Reference: one-shot prefill of right-padded prompts, then greedy decode; logits per step [B, V]."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    cache = model.new_cache(len(prompts), max_seq_len=4)
    logits, cache = model.prefill(ids, mask, cache)
    out = [logits]
    for _ in range(steps):
        out.append(model.decode_step(out[-1].argmax(-1), cache))
    return out


def _chunked_then_decode(model, prompts: list[list[int]], chunk: int, steps: int = 3):
    """Append each prompt ``chunk`` tokens per call, rows at different progress in the same call."""
    cache = model.new_cache(len(prompts), max_seq_len=4)
    done = [0] * len(prompts)
    last = [None] * len(prompts)
    while any(d < len(p) for d, p in zip(done, prompts)):
        rows = [i for i, p in enumerate(prompts) if done[i] < len(p)]
        pieces = [prompts[i][done[i] : done[i] + chunk - (i % 2)] for i in rows]  # rows take uneven chunks
        width = max(len(x) for x in pieces)
        ids = torch.tensor([x + [0] * (width - len(x)) for x in pieces])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in pieces])
        logits = model.append(ids, mask, cache, rows=torch.tensor(rows))
        for j, i in enumerate(rows):
            done[i] += len(pieces[j])
            last[i] = logits[j]
    assert cache.lengths.tolist() == [len(p) for p in prompts]
    out = [torch.stack(last)]
    for _ in range(steps):
        out.append(model.decode_step(out[-1].argmax(-1), cache))
    return out


@pytest.mark.parametrize("layer_types", [None, ["full_attention"] * 4, ["sliding_attention"] * 4])
@pytest.mark.parametrize("chunk", [3, 8, 13])
def test_chunked_prefill_equals_one_shot(layer_types, chunk):
    # window 8: prompts of 5..29 tokens and chunks of 3/8/13 cross the ring boundary in every way,
    # including a chunk longer than the window (T + W > ring slots).
    model = tiny_student(seed=3, layer_types=layer_types)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (n,), generator=gen).tolist() for n in (29, 5, 17, 8)]
    with torch.no_grad():
        ref = _prefill_then_decode(model, prompts)
        got = _chunked_then_decode(model, prompts, chunk)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_append_all_logits_match_forward():
    model = tiny_student(seed=4)
    ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits  # [2, 20, V]
        cache = model.new_cache(2, max_seq_len=4)
        first = model.append(ids[:, :11], None, cache, all_logits=True)
        second = model.append(ids[:, 11:], None, cache, all_logits=True)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-4, rtol=1e-4)


def test_decode_subset_of_rows_reads_first_rows_only():
    """rows=None with fewer tokens than cache rows decodes rows 0..B-1 (an engine's compacted running rows)."""
    model = tiny_student(seed=5)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    with torch.no_grad():
        ref = _prefill_then_decode(model, prompts[:2], steps=1)
        cache = model.new_cache(3, max_seq_len=4)
        ids = torch.tensor([p + [0] * (4 - len(p)) for p in prompts])
        mask = torch.tensor([[1] * len(p) + [0] * (4 - len(p)) for p in prompts])
        logits, cache = model.prefill(ids, mask, cache)
        step = model.decode_step(logits[:2].argmax(-1), cache)
    torch.testing.assert_close(step, ref[1], atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [5, 4, 2]


def test_swap_and_move_rows():
    model = tiny_student(seed=6)
    with torch.no_grad():
        cache = model.new_cache(3, max_seq_len=4)
        model.append(
            torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 2, 3, 0, 0, 0, 0, 0, 0, 0]]),
            torch.tensor([[1] * 10, [1] * 3 + [0] * 7]),
            cache,
            rows=torch.tensor([0, 2]),
        )
        before = model.decode_step(torch.tensor([4, 4]), cache, rows=torch.tensor([0, 2]))
        cache.lengths[torch.tensor([0, 2])] -= 1  # undo the decode step (positions are overwritten next)
        cache.swap_rows(0, 2)
        assert cache.lengths.tolist() == [3, 0, 10]
        cache.move_row(2, 1)
        assert cache.lengths.tolist() == [3, 10, 0]
        after = model.decode_step(torch.tensor([4, 4]), cache)
    torch.testing.assert_close(after, before.flip(0), atol=1e-5, rtol=1e-5)
