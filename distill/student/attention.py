"""Grouped-query attention with RoPE, per-layer sliding window or full context, on torch SDPA.

Legend in ``config.py``. Masks are boolean (True = may attend) and built from token *positions*,
not columns, so left padding, right padding and rows at different decode positions all use the
same rule: a query at position ``q`` sees a valid key at position ``p`` iff ``p <= q`` and, on a
sliding layer, ``q - p < W`` (W keys, itself included: Mistral/Qwen2 ``sliding_window``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from distill.student.cache import LayerKV
from distill.student.config import StudentConfig
from distill.student.stacked import cached_stack


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, D] for positions [B, T] (half-split "rotate_half" layout, as Llama/Qwen2).

    Recomputed per call instead of cached in a buffer: it is [B, T, D] work, and a model without
    buffers loads identically through ``from_pretrained`` (meta-device init) and plain PyTorch.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos, sin [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def prefill_mask(
    positions: torch.Tensor, valid: torch.Tensor, window: int | None, segments: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask [B, 1, T, T] for a prompt attending to itself.

    positions, valid [B, T]. ``segments`` [B, T] (packed training sequences): a query only sees
    keys of its own segment. The diagonal is always allowed: a padding query would otherwise have
    no key, SDPA would return NaN for it, and that NaN would reach valid tokens through the padding
    token's value vector in the next layer (0 * NaN = NaN).
    """
    q_pos, k_pos = positions[:, :, None], positions[:, None, :]  # [B, T, 1], [B, 1, T]
    allowed = valid[:, None, :] & (k_pos <= q_pos)  # [B, T, T]
    if segments is not None:
        allowed = allowed & (segments[:, :, None] == segments[:, None, :])
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    eye = torch.eye(positions.shape[1], dtype=torch.bool, device=positions.device)
    return (allowed | eye).unsqueeze(1)


def sliding_blocks(
    positions: torch.Tensor, valid: torch.Tensor, window: int
) -> list[tuple[int, int, int, torch.Tensor]]:
    """Prefill a long prompt on a sliding layer block by block: O(T * W) instead of O(T^2).

    Query columns ``[q0, q1)`` (``q1 - q0 <= W``) only need key columns ``[q0 - W + 1, q1)`` when
    each row's tokens are one contiguous run (left or right padding), because positions then
    advance by one per column. Returns ``(q0, q1, k0, mask [B, 1, q1-q0, q1-k0])`` per block, with
    the same rule and diagonal fallback as :func:`prefill_mask`.
    """
    seq = positions.shape[1]
    cols = torch.arange(seq, device=positions.device)
    blocks = []
    for q0 in range(0, seq, window):
        q1, k0 = min(q0 + window, seq), max(0, q0 - window + 1)
        q_pos, k_pos = positions[:, q0:q1, None], positions[:, None, k0:q1]  # [B, Tq, 1], [B, 1, Tk]
        allowed = valid[:, None, k0:q1] & (k_pos <= q_pos) & (q_pos - k_pos < window)  # [B, Tq, Tk]
        diagonal = cols[q0:q1, None] == cols[None, k0:q1]  # [Tq, Tk]
        blocks.append((q0, q1, k0, (allowed | diagonal).unsqueeze(1)))
    return blocks


def contiguous_rows(valid: torch.Tensor) -> bool:
    """True when every row's valid tokens form one run (no holes), as with left or right padding."""
    cols = torch.arange(valid.shape[1], device=valid.device)
    first = torch.where(valid, cols, valid.shape[1]).min(dim=1).values
    last = torch.where(valid, cols, -1).max(dim=1).values
    count = valid.sum(dim=1)
    return bool(((count == 0) | (last - first + 1 == count)).all())


def decode_mask(positions: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Boolean mask [B, 1, 1, S] over cache slots for one new token per row at ``positions`` [B]."""
    slots = torch.arange(num_slots, device=positions.device)
    return (slots[None, :] <= positions[:, None])[:, None, None, :]


def append_mask(
    lengths: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, window: int | None, num_slots: int
) -> torch.Tensor:
    """Boolean mask [B, 1, T, S + T] for T new tokens per row attending to S cached slots, then to themselves.

    lengths [B]: positions already cached per row; positions [B, T] = lengths + column; valid [B, T]
    (right padding: each row's new tokens are columns ``0 .. n-1``). Cached slot ``s`` is valid iff
    ``s < length``; on a sliding layer it holds position ``p_s = last - ((last - s) mod W)`` with
    ``last = length - 1`` (the newest position written to that ring slot), so the window rule
    ``q - p_s < W`` applies to it. New keys follow :func:`prefill_mask` (causal, window, diagonal).
    """
    bsz, seq = positions.shape
    slots = torch.arange(num_slots, device=positions.device)
    length = lengths[:, None]  # [B, 1]
    q_pos = positions[:, :, None]  # [B, T, 1]
    cached = (slots[None, :] < length)[:, None, :]  # [B, 1, S]
    if window is not None:
        last = length - 1
        slot_pos = last - torch.remainder(last - slots[None, :], window)  # [B, S]
        cached = cached & (q_pos - slot_pos[:, None, :] < window)  # [B, T, S]
    cached = cached.expand(bsz, seq, num_slots)
    k_pos = positions[:, None, :]  # [B, 1, T]
    new = valid[:, None, :] & (k_pos <= q_pos)  # [B, T, T]
    if window is not None:
        new = new & (q_pos - k_pos < window)
    new = new | torch.eye(seq, dtype=torch.bool, device=positions.device)
    return torch.cat([cached, new], dim=-1).unsqueeze(1)


@dataclasses.dataclass
class AttentionBatch:
    """What every layer of one forward call shares; built once by the decoder.

    ``masks`` maps a window (None = full) to its mask, or to None when plain causal attention is
    exact (no padding, window not binding), letting SDPA take its ``is_causal`` fast path.
    ``blocks`` maps a window to :func:`sliding_blocks` when a long prompt is attended blockwise.
    """

    positions: torch.Tensor  # [B, T]
    valid: torch.Tensor  # [B, T] bool, False on padding
    masks: dict[int | None, torch.Tensor | None]
    decode: bool = False
    rows: torch.Tensor | None = None  # cache rows [B]; None = 0..B-1
    cache_rows: torch.Tensor | None = None  # rows as a tensor for writes
    read_slots: dict[int | None, int] | None = None  # decode: slots to read per window
    keep: dict[int | None, torch.Tensor] | None = None  # prefill: tokens each cache layer stores
    blocks: dict[int, list[tuple[int, int, int, torch.Tensor]]] | None = None
    append: bool = False  # T new tokens per row after the rows' cached positions (chunked prefill)


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads; ``window=None`` is full causal attention.

    Inference (no autograd) projects q, k and v in one matmul over their concatenated weights
    (``fused_qkv``; rebuilt when a weight changes): one [*, H] x [H, (NH + 2 KVH) D] call instead of
    three, the same numbers up to fp32 summation order. ``matmul`` is ``F.linear`` unless the engine
    gives the layer a faster kernel (:func:`serve.engine.kernels.use_onednn_linears`).
    """

    fused_qkv = True

    def __init__(self, config: StudentConfig, layer_idx: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.window_of(layer_idx)
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.matmul = F.linear
        self._qkv: tuple | None = None  # (key, (weight [(NH + 2 KVH) D, H], bias or None)), built lazily

    def qkv_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q, k and v's weights stacked [(NH + 2 KVH) D, H] (and biases), cached until a weight changes."""
        projections = (self.q_proj, self.k_proj, self.v_proj)

        def build() -> tuple[torch.Tensor, torch.Tensor | None]:
            weight = torch.cat([m.weight for m in projections]).detach().contiguous()
            bias = None if self.q_proj.bias is None else torch.cat([m.bias for m in projections]).detach()
            return weight, bias

        params = [p for m in projections for p in (m.weight, m.bias) if p is not None]
        return cached_stack(self, "_qkv", params, build)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> q [B, T, NH * D], k and v [B, T, KVH * D]."""
        if self.fused_qkv and not torch.is_grad_enabled():
            weight, bias = self.qkv_weight()
            kv = self.num_kv_heads * self.head_dim
            q, k, v = self.matmul(x, weight, bias).split([self.num_heads * self.head_dim, kv, kv], dim=-1)
            return q, k, v
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch, cache: LayerKV | None = None
    ) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]. In decode mode T == 1 and ``cache`` is required."""
        bsz, seq, _ = x.shape
        q, k, v = self._project(x)
        q = q.view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)  # [B, NH, T, D]
        k = k.view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, T, D]
        v = v.view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        gqa = self.num_kv_heads != self.num_heads
        mask = batch.masks[self.window]
        if batch.decode:
            assert cache is not None and seq == 1, "decode takes one token per row and a cache"
            cache.write_decode(batch.cache_rows, batch.positions[:, 0], k[:, :, 0], v[:, :, 0])
            k, v = cache.read(batch.rows, batch.read_slots[self.window], bsz)  # [B, KVH, S, D]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # [B, NH, 1, D]
        elif batch.append:
            # Attend over the cached slots and the new chunk first, write the chunk afterwards: on a
            # sliding layer the chunk may overwrite ring slots that its own early queries still need.
            assert cache is not None, "append needs a cache"
            slots = batch.read_slots[self.window]
            if slots:
                k_old, v_old = cache.read(batch.cache_rows, slots)  # [B, KVH, S, D]
                keys, values = torch.cat([k_old, k], dim=2), torch.cat([v_old, v], dim=2)  # [B, KVH, S+T, D]
            else:
                keys, values = k, v
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)  # [B, NH, T, D]
            cache.write_prefill(batch.cache_rows, batch.positions, batch.keep[self.window], k, v)
        else:
            if cache is not None:
                cache.write_prefill(batch.cache_rows, batch.positions, batch.keep[self.window], k, v)
            if batch.blocks and self.window in batch.blocks:
                out = torch.cat(
                    [
                        F.scaled_dot_product_attention(
                            q[:, :, q0:q1], k[:, :, k0:q1], v[:, :, k0:q1], attn_mask=block_mask, enable_gqa=gqa
                        )
                        for q0, q1, k0, block_mask in batch.blocks[self.window]
                    ],
                    dim=2,
                )  # [B, NH, T, D]
            else:
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa
                )  # [B, NH, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim))
