"""The MoE student decoder, plain PyTorch: no Ray, no I/O, no transformers.

Legend in ``config.py``. Three ways to run it:

* ``forward`` (training / scoring): full sequences, optional padding via ``attention_mask``.
* ``prefill(input_ids, attention_mask, cache, rows)``: prompts of different lengths (left or
  right padded) fill cache rows and return each row's next-token logits.
* ``decode_step(tokens, cache, rows)``: one new token per row; rows may sit at different positions.

Hugging Face wrapping (config.json, safetensors, ``generate``) lives in ``hf.py``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from distill.student.attention import (
    Attention,
    AttentionBatch,
    append_mask,
    contiguous_rows,
    decode_mask,
    prefill_mask,
    rope_cos_sin,
    sliding_blocks,
)
from distill.student.cache import KVCache, LayerKV
from distill.student.config import StudentConfig
from distill.student.experts import SwiGLU
from distill.student.moe import MoEAux, MoEBlock, RoutingStats


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, exactly as Llama/Qwen2 do, so exported
        # logits match to rounding.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class DecoderLayer(nn.Module):
    def __init__(self, config: StudentConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp: nn.Module = (
            MoEBlock(config, layer_idx)
            if config.is_moe_layer(layer_idx)
            else SwiGLU(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: AttentionBatch,
        cache: LayerKV | None,
        compute_aux: bool = True,
    ) -> tuple[torch.Tensor, MoEAux | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, cache)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoEBlock):
            out, aux = self.mlp(h, batch.valid, compute_aux)
            return x + out, aux
        return x + self.mlp(h), None


@dataclasses.dataclass
class DecoderOutput:
    last_hidden_state: torch.Tensor  # [B, T, H]
    aux_loss: torch.Tensor | None  # [] weighted sum of the aux losses, averaged over MoE layers
    aux_losses: dict[str, torch.Tensor]  # un-weighted means over MoE layers: load_balance, z, entropy
    routing: list[RoutingStats]  # one per MoE layer
    router_entropy: torch.Tensor | None = None  # [B, T] routing entropy per position, mean over MoE layers


class StudentModel(nn.Module):
    """Embeddings, decoder layers, final norm (``model.*`` tensor names).

    Activation checkpointing: with ``gradient_checkpointing`` set (Hugging Face's
    ``gradient_checkpointing_enable()`` sets it and ``_gradient_checkpointing_func``, a
    ``torch.utils.checkpoint.checkpoint`` partial) each decoder layer's activations are recomputed
    in backward when training with gradients and no KV cache. The layer returns the MoE aux
    losses inside a dataclass, so the checkpoint must be non-reentrant (the transformers default).
    """

    gradient_checkpointing = False
    _gradient_checkpointing_func = None

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def windows(self) -> set[int | None]:
        return {self.config.window_of(i) for i in range(self.config.num_hidden_layers)}

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        rows: torch.Tensor | None = None,
        decode: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        compute_aux: bool = True,
        append: bool = False,
    ) -> DecoderOutput:
        """Run the decoder.

        input_ids [B, T] (or inputs_embeds [B, T, H]); attention_mask [B, T] (1 = token, 0 = pad).
        Without ``decode``: positions come from ``position_ids`` or the mask (0 at each row's
        first token), and with a ``cache`` the rows ``rows`` (default 0..B-1) are overwritten by
        these prompts. With ``decode``: T == 1, positions are the rows' cache lengths.
        With ``append`` (chunked prefill): the T tokens of each row continue the row's cached
        sequence at positions ``length .. length+T-1``; ``attention_mask`` marks them right padded
        (a row may add fewer than T). ``compute_aux=False`` (serving) skips the router aux losses;
        ``aux_loss`` is then None.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, H]
        bsz, seq = x.shape[:2]
        device = x.device
        cache_rows = torch.arange(bsz, device=device) if rows is None else rows.to(device)
        if append:
            if cache is None or decode:
                raise ValueError("append needs a cache and excludes decode")
            valid = (
                attention_mask.bool()
                if attention_mask is not None
                else torch.ones(bsz, seq, dtype=torch.bool, device=device)
            )
            lengths = cache.lengths[cache_rows]  # [B]
            positions = lengths[:, None] + torch.arange(seq, device=device)[None, :]  # [B, T]
            new_lengths = lengths + valid.sum(-1)  # [B]
            cache.ensure_capacity(int(new_lengths.max()))
            max_len = int(lengths.max())
            read_slots = {w: (max_len if w is None else min(w, max_len)) for w in self.windows()}
            masks = {w: append_mask(lengths, positions, valid, w, s) for w, s in read_slots.items()}
            batch = AttentionBatch(
                positions, valid, masks, rows=cache_rows, cache_rows=cache_rows, read_slots=read_slots, append=True
            )
            # Sliding layers keep only each row's last W positions (distinct ring slots).
            batch.keep = {
                w: valid if w is None else valid & (positions >= (new_lengths[:, None] - w)) for w in self.windows()
            }
        elif decode:
            if cache is None or seq != 1:
                raise ValueError("decode needs a cache and exactly one token per row")
            positions = cache.lengths[cache_rows][:, None]  # [B, 1]
            valid = torch.ones(bsz, 1, dtype=torch.bool, device=device)
            max_pos = int(positions.max())
            cache.ensure_capacity(max_pos + 1)
            read_slots = {w: (max_pos + 1 if w is None else min(w, max_pos + 1)) for w in self.windows()}
            # All slots valid in every row -> no mask needed (rows at equal lengths, or full rings).
            masks = {
                w: (None if bool((positions[:, 0] >= s - 1).all()) else decode_mask(positions[:, 0], s))
                for w, s in read_slots.items()
            }
            batch = AttentionBatch(
                positions, valid, masks, decode=True, rows=rows, cache_rows=cache_rows, read_slots=read_slots
            )
        else:
            valid = (
                attention_mask.bool()
                if attention_mask is not None
                else torch.ones(bsz, seq, dtype=torch.bool, device=device)
            )
            derived = position_ids is None
            if not derived and cache is not None:
                raise ValueError(
                    "filling a cache takes positions from attention_mask (0 at each row's first "
                    "token); do not pass position_ids"
                )
            if derived:
                position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
            positions = position_ids.expand(bsz, seq)
            # Packed sequences: position ids restart at 0 where a new document begins; tokens
            # attend only within their document.
            segments = None if derived else (positions == 0).long().cumsum(-1)  # [B, T]
            padded = not bool(valid.all()) or segments is not None
            # Sliding layers attend blockwise when the prompt is at least two windows long and
            # positions advance one per column (see sliding_blocks).
            blockwise = {w for w in self.windows() if w is not None and seq >= 2 * w} if derived else set()
            if blockwise and not contiguous_rows(valid):
                blockwise = set()
            masks = {
                w: (
                    prefill_mask(positions, valid, w, segments)
                    if (padded or (w is not None and w < seq)) and w not in blockwise
                    else None
                )
                for w in self.windows()
            }
            batch = AttentionBatch(
                positions, valid, masks, blocks={w: sliding_blocks(positions, valid, w) for w in blockwise}
            )
            if cache is not None:
                lengths = valid.sum(-1)  # [B]
                cache.ensure_capacity(int(lengths.max()))
                batch.cache_rows = cache_rows
                # Sliding layers keep only the last W prompt positions of each row.
                batch.keep = {
                    w: valid if w is None else valid & (positions >= (lengths[:, None] - w)) for w in self.windows()
                }
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)

        auxes: list[MoEAux] = []
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        if checkpointed and getattr(self._gradient_checkpointing_func, "keywords", {}).get("use_reentrant"):
            raise ValueError(
                "the student's decoder layers need non-reentrant activation checkpointing "
                "(gradient_checkpointing_kwargs={'use_reentrant': False}, the default)"
            )
        for i, layer in enumerate(self.layers):
            if checkpointed:
                x, aux = self._gradient_checkpointing_func(layer, x, cos, sin, batch, None, compute_aux)
            else:
                x, aux = layer(x, cos, sin, batch, cache.layers[i] if cache is not None else None, compute_aux)
            if aux is not None:
                auxes.append(aux)
        if cache is not None:
            if append:
                cache.lengths[cache_rows] = new_lengths
            elif decode:
                cache.lengths[cache_rows] += 1
            else:
                cache.lengths[cache_rows] = valid.sum(-1)
        if not compute_aux:
            return DecoderOutput(self.norm(x), None, {}, [a.stats for a in auxes])
        total, losses, stats = self._combine_aux(auxes, x)
        entropy = (
            torch.stack([a.token_entropy for a in auxes]).mean(0).reshape(x.shape[:2]) if auxes else None
        )  # [B, T]
        return DecoderOutput(self.norm(x), total, losses, stats, entropy)

    def _combine_aux(self, auxes: list[MoEAux], like: torch.Tensor):
        cfg = self.config
        if not auxes:
            zero = like.new_zeros((), dtype=torch.float)
            return zero, {"load_balance": zero, "z": zero, "entropy": zero}, []
        losses = {
            name: torch.stack([getattr(a, name) for a in auxes]).mean() for name in ("load_balance", "z", "entropy")
        }
        total = (
            cfg.router_aux_loss_coef * losses["load_balance"]
            + cfg.router_z_loss_coef * losses["z"]
            + cfg.router_entropy_loss_coef * losses["entropy"]
        )
        return total, losses, [a.stats for a in auxes]


class CausalLMMixin:
    """Serving entry points shared by :class:`StudentLM` and the HF class; needs ``self.model``, ``self.lm_head``."""

    model: StudentModel
    lm_head: nn.Linear

    def new_cache(
        self,
        batch_size: int,
        max_seq_len: int = 256,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty cache; full layers start with room for ``max_seq_len`` positions and grow past it."""
        weight = self.model.embed_tokens.weight
        return KVCache(self.model.config, batch_size, max_seq_len, dtype or weight.dtype, device or weight.device)

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Fill cache rows with prompts; returns the logits after each row's last token [B, V] and the cache.

        input_ids, attention_mask [B, T]; padding may be on either side. ``rows`` picks the cache
        rows to (re)fill (default 0..B-1; a new cache of B rows is made when ``cache`` is None).
        """
        if cache is None:
            cache = self.new_cache(input_ids.shape[0], max_seq_len=input_ids.shape[1])
        out = self.model(input_ids, attention_mask, cache=cache, rows=rows, compute_aux=False)
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        cols = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = torch.where(valid, cols, -1).argmax(dim=-1)  # [B] column of each row's last token
        hidden = out.last_hidden_state[torch.arange(input_ids.shape[0], device=input_ids.device), last]  # [B, H]
        return self.lm_head(hidden), cache

    @torch.no_grad()
    def append(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: KVCache,
        rows: torch.Tensor | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Chunked prefill: append T tokens to each row at its current length.

        input_ids, attention_mask [B, T] (right padded; a row may add fewer than T tokens). Returns
        the logits after each row's last new token [B, V], or for every column [B, T, V] with
        ``all_logits``. Appending a prompt in chunks equals prefilling it at once (to rounding).
        """
        out = self.model(input_ids, attention_mask, cache=cache, rows=rows, compute_aux=False, append=True)
        hidden = out.last_hidden_state  # [B, T, H]
        if all_logits:
            return self.lm_head(hidden)
        count = (
            attention_mask.long().sum(-1)
            if attention_mask is not None
            else torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
        )
        last = (count - 1).clamp(min=0)  # [B]
        return self.lm_head(hidden[torch.arange(input_ids.shape[0], device=input_ids.device), last])

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, cache: KVCache, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Append one token per row (tokens [B] or [B, 1]) and return next-token logits [B, V]."""
        out = self.model(tokens.reshape(-1, 1), cache=cache, rows=rows, decode=True, compute_aux=False)
        return self.lm_head(out.last_hidden_state[:, 0])


class StudentLM(CausalLMMixin, nn.Module):
    """Decoder + LM head without Hugging Face; same tensor names as the HF class (``model.*``, ``lm_head``)."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.config = config
        self.model = StudentModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, DecoderOutput]:
        """Logits [B, T, V] and the decoder output (aux losses, routing stats)."""
        out = self.model(input_ids, attention_mask)
        return self.lm_head(out.last_hidden_state), out
