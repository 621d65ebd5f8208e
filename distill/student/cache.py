"""Decode-time key/value cache: full layers keep every position, sliding layers a ring of W slots.

Rows of the cache are sequences. Each row has its own length, so a serving engine can decode a
batch of sequences that sit at different positions, and can (re)fill any subset of rows with a new
prompt while the other rows keep decoding (``rows=`` on :meth:`StudentLM.prefill`).

Slot layout (legend in ``config.py``):

* full attention layer: ``k, v [B, KVH, C, D]``; position ``p`` lives in slot ``p``; ``C`` grows
  (doubling) when a row passes it, so a sequence of length L costs O(L).
* sliding layer: ``k, v [B, KVH, W, D]``; position ``p`` lives in slot ``p % W``. After writing
  position ``p`` the ring holds exactly positions ``p-W+1 .. p``, which is the window of the query
  at ``p`` (W keys, itself included, as in Mistral/Qwen2 ``sliding_window``). Cost O(W).

Slot ``s`` of a row whose newest position is ``p`` is valid iff ``s <= p``: for full layers that is
the prefix; for rings it excludes slots not written yet (``p < W - 1``) and is all slots afterwards.
Stale data from a previous occupant of a row therefore never leaks: it sits in slots ``> p``.
"""

from __future__ import annotations

import torch

from distill.student.config import LayerType, StudentConfig


class LayerKV:
    """One layer's keys and values (post-RoPE) for all rows."""

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        window: int | None,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ):
        self.window = window
        slots = window if window is not None else max(1, capacity)
        self.k = torch.zeros(batch_size, num_kv_heads, slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    @property
    def num_slots(self) -> int:
        return self.k.shape[2]

    def ensure_capacity(self, needed: int) -> None:
        """Grow a full layer's slot dimension to at least ``needed`` (amortised doubling)."""
        if self.window is not None or needed <= self.num_slots:
            return
        new = max(needed, 2 * self.num_slots)
        grown_k = self.k.new_zeros(self.k.shape[0], self.k.shape[1], new, self.k.shape[3])
        grown_v = torch.zeros_like(grown_k)
        grown_k[:, :, : self.num_slots] = self.k
        grown_v[:, :, : self.num_slots] = self.v
        self.k, self.v = grown_k, grown_v

    def slot_of(self, positions: torch.Tensor) -> torch.Tensor:
        return positions % self.window if self.window is not None else positions

    def write_prefill(
        self, rows: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store the prompt tokens flagged in ``keep``.

        rows [B]; positions, keep [B, T]; k, v [B, KVH, T, D].
        """
        b, t = keep.nonzero(as_tuple=True)  # [n], [n]
        if b.numel() == 0:
            return
        slots = self.slot_of(positions[b, t])  # [n]
        # Advanced indices around a slice put the indexed dim first: both sides are [n, KVH, D].
        self.k[rows[b], :, slots] = k[b, :, t]
        self.v[rows[b], :, slots] = v[b, :, t]

    def write_decode(self, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """rows, positions [B]; k, v [B, KVH, D]."""
        slots = self.slot_of(positions)
        self.k[rows, :, slots] = k
        self.v[rows, :, slots] = v

    def read(
        self, rows: torch.Tensor | None, num_slots: int, batch_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``num_slots`` slots: [B, KVH, S, D] each.

        ``rows=None`` means rows ``0..B-1`` (B = ``batch_size``, default all rows) and reads a view
        (no copy), the common decode case: a serving engine keeps its decoding rows first.
        """
        if rows is None:
            b = self.k.shape[0] if batch_size is None else batch_size
            return self.k[:b, :, :num_slots], self.v[:b, :, :num_slots]
        return self.k[rows, :, :num_slots], self.v[rows, :, :num_slots]


class KVCache:
    """Per-layer :class:`LayerKV` plus each row's length (number of positions seen).

    It also carries the few attributes Hugging Face ``generate()`` probes on a cache object.
    """

    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        config: StudentConfig,
        batch_size: int,
        max_seq_len: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        self.config = config
        self.layers = [
            LayerKV(
                batch_size, config.num_key_value_heads, config.head_dim, max_seq_len, config.window_of(i), dtype, device
            )
            for i in range(config.num_hidden_layers)
        ]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def ensure_capacity(self, num_positions: int) -> None:
        """Make full layers hold positions ``0 .. num_positions-1`` (called once per step, not per layer)."""
        for layer in self.layers:
            layer.ensure_capacity(num_positions)

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget rows (all by default); their slots become invalid, no memory is released."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[rows] = 0

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange the contents (keys, values, length) of rows ``a`` and ``b`` (a serving engine compacting rows)."""
        if a == b:
            return
        pair, flipped = torch.tensor([a, b]), torch.tensor([b, a])
        for layer in self.layers:
            layer.k[pair] = layer.k[flipped]
            layer.v[pair] = layer.v[flipped]
        self.lengths[pair] = self.lengths[flipped]

    def move_row(self, src: int, dst: int) -> None:
        """Copy row ``src`` into row ``dst`` (only its used slots) and forget ``src``."""
        if src == dst:
            return
        used = int(self.lengths[src])
        for layer in self.layers:
            n = min(used, layer.num_slots)
            layer.k[dst, :, :n] = layer.k[src, :, :n]
            layer.v[dst, :, :n] = layer.v[src, :, :n]
        self.lengths[dst] = self.lengths[src]
        self.lengths[src] = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i takes the content of row ``beam_idx[i]``."""
        for layer in self.layers:
            layer.k = layer.k.index_select(0, beam_idx.to(layer.k.device))
            layer.v = layer.v.index_select(0, beam_idx.to(layer.v.device))
        self.lengths = self.lengths.index_select(0, beam_idx.to(self.lengths.device))

    def nbytes_by_layer_type(self) -> dict[str, int]:
        """Allocated bytes of keys and values, summed per layer type."""
        out = {LayerType.sliding.value: 0, LayerType.full.value: 0}
        for i, layer in enumerate(self.layers):
            out[self.config.layer_types[i]] += layer.k.nbytes + layer.v.nbytes
        return out

    def nbytes(self) -> int:
        return sum(self.nbytes_by_layer_type().values())
