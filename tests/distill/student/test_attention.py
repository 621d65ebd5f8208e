"""Hybrid attention: masks against a naive reference, and incremental decoding against the full forward pass."""

from __future__ import annotations

import math

import pytest
import torch

from distill.student.accounting import kv_cache_bytes
from distill.student.attention import (
    Attention,
    AttentionBatch,
    contiguous_rows,
    prefill_mask,
    rope_cos_sin,
    sliding_blocks,
)
from distill.student.config import LayerType

from .conftest import tiny_config, tiny_student


def naive_attention(attn: Attention, x, positions, valid, window):
    """Per-query loop: softmax over the keys the rule allows, GQA by integer division of heads."""
    bsz, seq, _ = x.shape
    nh, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    cos, sin = rope_cos_sin(positions, d, 10000.0, x.dtype)
    q = attn.q_proj(x).view(bsz, seq, nh, d)
    k = attn.k_proj(x).view(bsz, seq, kvh, d)
    v = attn.v_proj(x).view(bsz, seq, kvh, d)

    def rope(t):  # t [T, heads, D]
        c, s = cos[b][:, None, :], sin[b][:, None, :]
        half = d // 2
        rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
        return t * c + rotated * s

    out = torch.zeros(bsz, seq, nh, d)
    for b in range(bsz):
        qb, kb, vb = rope(q[b]), rope(k[b]), v[b]
        for i in range(seq):
            if not valid[b, i]:
                continue
            keys = [
                j
                for j in range(seq)
                if valid[b, j]
                and positions[b, j] <= positions[b, i]
                and (window is None or positions[b, i] - positions[b, j] < window)
            ]
            for h in range(nh):
                g = h // (nh // kvh)
                scores = torch.stack([qb[i, h] @ kb[j, g] for j in keys]) / math.sqrt(d)
                probs = torch.softmax(scores, dim=0)
                out[b, i, h] = sum(p * vb[j, g] for p, j in zip(probs, keys))
    return attn.o_proj(out.reshape(bsz, seq, nh * d))


def padded_mask(lengths: list[int], padding: str) -> torch.Tensor:
    """[B, S] validity mask of sequences of ``lengths`` padded on the left or the right."""
    seq = max(lengths)
    valid = torch.zeros(len(lengths), seq, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if padding == "left":
            valid[b, seq - n :] = True
        else:
            valid[b, :n] = True
    return valid


@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
@pytest.mark.parametrize("padding", ["left", "right", "none"])
def test_attention_matches_naive_reference(layer_type, padding):
    torch.manual_seed(0)
    config = tiny_config(sliding_window=4, layer_types=[layer_type] * 4)
    attn = Attention(config, 0).eval()
    lengths = [12, 7, 9] if padding != "none" else [12, 12, 12]
    seq = max(lengths)
    valid = padded_mask(lengths, padding)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    x = torch.randn(3, seq, config.hidden_size)
    window = config.window_of(0)
    assert window == (4 if layer_type == "sliding_attention" else None)
    cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta, x.dtype)
    mask = prefill_mask(positions, valid, window)
    with torch.no_grad():
        got = attn(x, cos, sin, AttentionBatch(positions, valid, {window: mask}))
        want = naive_attention(attn, x, positions, valid, window)
    assert got.shape == (3, seq, config.hidden_size)
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)
    # Unpadded input may take SDPA's is_causal path for full attention: same numbers.
    if padding == "none" and window is None:
        with torch.no_grad():
            fast = attn(x, cos, sin, AttentionBatch(positions, valid, {None: None}))
        torch.testing.assert_close(fast, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding", ["left", "right", "none"])
def test_blockwise_sliding_prefill_matches_the_full_mask(padding):
    torch.manual_seed(1)
    config = tiny_config(sliding_window=4, layer_types=["sliding_attention"] * 4)
    attn = Attention(config, 0).eval()
    lengths = [19, 10, 4] if padding != "none" else [19, 19, 19]
    seq = max(lengths)
    valid = padded_mask(lengths, padding)
    assert contiguous_rows(valid)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    x = torch.randn(3, seq, config.hidden_size)
    cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta, x.dtype)
    blocks = sliding_blocks(positions, valid, 4)
    assert [(q0, q1, k0) for q0, q1, k0, _ in blocks][:3] == [(0, 4, 0), (4, 8, 1), (8, 12, 5)]
    with torch.no_grad():
        blockwise = attn(x, cos, sin, AttentionBatch(positions, valid, {4: None}, blocks={4: blocks}))
        masked = attn(x, cos, sin, AttentionBatch(positions, valid, {4: prefill_mask(positions, valid, 4)}))
        want = naive_attention(attn, x, positions, valid, 4)
    torch.testing.assert_close(blockwise[valid], masked[valid], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(blockwise[valid], want[valid], atol=1e-5, rtol=1e-5)


def test_rows_with_holes_fall_back_to_the_full_mask():
    valid = torch.tensor([[True, False, True, True], [True, True, True, False]])
    assert not contiguous_rows(valid)
    model = tiny_student(seed=2, sliding_window=2)
    ids = torch.randint(3, 96, (2, 4))
    with torch.no_grad():
        out = model(ids, attention_mask=valid.long()).logits
        alone = model(ids[:1, [0, 2, 3]]).logits
    torch.testing.assert_close(out[0, [0, 2, 3]], alone[0], atol=1e-5, rtol=1e-5)


def _pad(prompts, side):
    seq = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), seq, dtype=torch.long)
    mask = torch.zeros(len(prompts), seq, dtype=torch.long)
    for b, p in enumerate(prompts):
        sl = slice(seq - len(p), seq) if side == "left" else slice(0, len(p))
        ids[b, sl] = torch.tensor(p)
        mask[b, sl] = 1
    return ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {
            "routing": "topp",
            "top_p": 0.6,
            "min_k": 1,
            "max_k": 3,
            "shared_expert_intermediate_size": 16,
            "mlp_only_layers": [0],
        },
    ],
)
def test_incremental_decoding_equals_full_forward(side, variant):
    model = tiny_student(seed=3, **variant)
    window = model.student_config.sliding_window
    gen = torch.Generator().manual_seed(7)
    lengths = [5, 19, 3]  # 19 > 2 windows: the prompt overflows the ring and is prefilled blockwise
    steps = 70  # every row ends far past the window
    prompts = [torch.randint(3, 96, (n,), generator=gen).tolist() for n in lengths]
    fed = torch.randint(3, 96, (len(prompts), steps), generator=gen)  # teacher-forced tokens
    ids, mask = _pad(prompts, side)
    step_logits = []
    with torch.no_grad():
        logits, cache = model.prefill(ids, mask)
        step_logits.append(logits)
        for s in range(steps):
            step_logits.append(model.decode_step(fed[:, s], cache))
    assert cache.lengths.tolist() == [n + steps for n in lengths]
    for i, layer in enumerate(cache.layers):
        if model.student_config.layer_types[i] == LayerType.sliding.value:
            assert layer.k.shape[2] == window  # O(window), not O(sequence)
        else:
            assert layer.k.shape[2] >= max(lengths) + steps
    worst = 0.0
    for b, prompt in enumerate(prompts):
        full = torch.tensor(prompt + fed[b].tolist())[None]
        with torch.no_grad():
            reference = model(full).logits[0]  # [L, V]
        n = len(prompt)
        for s in range(steps + 1):
            worst = max(worst, (step_logits[s][b] - reference[n - 1 + s]).abs().max().item())
    assert worst < 1e-4, worst


def test_rows_at_different_positions_and_refilled_rows():
    """A serving engine's pattern: prefill some rows, decode, add a row, refill a row that ran past W."""
    model = tiny_student(seed=5)
    gen = torch.Generator().manual_seed(11)
    history = {
        0: torch.randint(3, 96, (9,), generator=gen).tolist(),
        1: torch.randint(3, 96, (4,), generator=gen).tolist(),
    }
    cache = model.new_cache(batch_size=3, max_seq_len=8)  # full layers must grow past 8
    checks = []  # (row, sequence so far, logits for its next token)

    def prefill(rows, prompts, side="right"):
        ids, mask = _pad(prompts, side)
        logits, _ = model.prefill(ids, mask, cache=cache, rows=torch.tensor(rows))
        for r, p, lg in zip(rows, prompts, logits):
            history[r] = list(p)
            checks.append((r, list(p), lg))

    def decode(rows, steps):
        for _ in range(steps):
            tokens = torch.randint(3, 96, (len(rows),), generator=gen)
            for r, t in zip(rows, tokens.tolist()):
                history[r].append(t)
            logits = model.decode_step(tokens, cache, rows=torch.tensor(rows))
            for r, lg in zip(rows, logits):
                checks.append((r, list(history[r]), lg))

    with torch.no_grad():
        prefill([0, 1], [history[0], history[1]])
        decode([0, 1], 12)
        prefill([2], [torch.randint(3, 96, (6,), generator=gen).tolist()])
        decode([2, 0, 1], 10)  # rows in any order, at positions 6, 31, 26
        prefill([0], [torch.randint(3, 96, (3,), generator=gen).tolist()], side="left")  # stale ring data
        decode([0, 1, 2], 9)
        assert cache.lengths.tolist() == [12, 35, 25]
        worst = max((lg - model(torch.tensor(seq)[None]).logits[0, -1]).abs().max().item() for _, seq, lg in checks)
    assert worst < 1e-4, worst


def test_cache_bytes_match_accounting():
    model = tiny_student(seed=0)
    config = model.student_config
    length = 40
    ids = torch.randint(0, 96, (2, length))
    cache = model.new_cache(batch_size=2, max_seq_len=length)
    with torch.no_grad():
        model.prefill(ids, cache=cache)
    expected = kv_cache_bytes(config, length, batch_size=2, dtype_bytes=4)
    got = cache.nbytes_by_layer_type()
    assert got[LayerType.full.value] == expected[LayerType.full.value] == 1 * 2 * 2 * 2 * 16 * 4 * length
    assert got[LayerType.sliding.value] == expected[LayerType.sliding.value] == 3 * 2 * 2 * 2 * 16 * 4 * 8
    assert cache.nbytes() == expected["total"]


def test_bf16_prefill_and_decode_keep_dtype_and_router_fp32():
    model = tiny_student(seed=0, routing="topp", top_p=0.5).to(torch.bfloat16)
    ids = torch.randint(3, 96, (2, 20))
    with torch.no_grad():
        logits, cache = model.prefill(ids)
        step = model.decode_step(logits.argmax(-1), cache)
        routing = model.model.layers[0].mlp.gate(torch.randn(4, 64, dtype=torch.bfloat16))
    assert logits.dtype == step.dtype == cache.layers[0].k.dtype == torch.bfloat16
    assert torch.isfinite(step).all() and routing.probs.dtype == torch.float32


@pytest.mark.parametrize("bias", [False, True])
def test_inference_projects_q_k_v_in_one_matmul_with_the_same_result(bias):
    """Without autograd, q, k and v come from one matmul over their stacked weights (and biases): the
    same output as three projections, rebuilt after an in-place weight change; with autograd (training)
    the three projections run as they are and get their gradients."""
    torch.manual_seed(0)
    config = tiny_config(attention_bias=bias)
    attn = Attention(config, 3).eval()
    if bias:
        for m in (attn.q_proj, attn.k_proj, attn.v_proj):
            torch.nn.init.normal_(m.bias, std=0.5)
    calls = []
    attn.matmul = lambda x, w, b: calls.append((tuple(w.shape), b is not None)) or torch.nn.functional.linear(x, w, b)
    positions = torch.arange(6).expand(2, 6)
    valid = torch.ones(2, 6, dtype=torch.bool)
    x = torch.randn(2, 6, config.hidden_size)
    cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta, x.dtype)
    batch = AttentionBatch(positions, valid, {None: None})

    def both():
        attn.fused_qkv = False
        separate = attn(x, cos, sin, batch)
        attn.fused_qkv = True
        return separate, attn(x, cos, sin, batch)

    rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    with torch.no_grad():
        separate, fused = both()
        torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
        assert calls == [((rows, config.hidden_size), bias)]
        attn.k_proj.weight.mul_(3.0)  # in-place change: the stacked copy follows
        separate2, fused2 = both()
        torch.testing.assert_close(fused2, separate2, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(separate, separate2)
    calls.clear()
    attn(x, cos, sin, batch).sum().backward()
    assert calls == [] and attn.k_proj.weight.grad is not None
