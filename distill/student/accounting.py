"""Size and cost of a student from its config: parameters, active parameters, FLOPs, KV-cache bytes.

Counted analytically so that ``raydistill student info`` works from config.json alone; a test
checks the totals against a built model's ``numel`` and a filled cache's bytes.
Legend in ``config.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from distill.student.config import LayerType, RoutingMode, StudentConfig


@dataclasses.dataclass
class ParamCounts:
    embedding: int  # input embeddings
    lm_head: int  # 0 when tied to the embeddings
    attention: int  # q/k/v/o (+ q/k/v bias) over all layers
    norms: int
    dense_ffn: int  # mlp_only_layers
    router: int
    shared_experts: int  # shared expert + its sigmoid gate
    routed_experts: int  # all experts of all MoE layers
    per_expert: int  # one expert of one layer

    @property
    def total(self) -> int:
        return (
            self.embedding
            + self.lm_head
            + self.attention
            + self.norms
            + self.dense_ffn
            + self.router
            + self.shared_experts
            + self.routed_experts
        )


def count_parameters(config: StudentConfig) -> ParamCounts:
    h, d = config.hidden_size, config.head_dim
    q_out, kv_out = config.num_attention_heads * d, config.num_key_value_heads * d
    attn = h * q_out + 2 * h * kv_out + q_out * h
    if config.attention_bias:
        attn += q_out + 2 * kv_out
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    dense_layers = config.num_hidden_layers - moe_layers
    per_expert = 3 * h * config.moe_intermediate_size
    shared = 3 * h * config.shared_expert_intermediate_size + h if config.shared_expert_intermediate_size else 0
    return ParamCounts(
        embedding=config.vocab_size * h,
        lm_head=0 if config.tie_word_embeddings else config.vocab_size * h,
        attention=config.num_hidden_layers * attn,
        norms=(2 * config.num_hidden_layers + 1) * h,
        dense_ffn=dense_layers * 3 * h * config.intermediate_size,
        router=moe_layers * config.num_experts * h,
        shared_experts=moe_layers * shared,
        routed_experts=moe_layers * config.num_experts * per_expert,
        per_expert=per_expert,
    )


def _experts_per_layer(config: StudentConfig, experts_per_token: float | Sequence[float] | None) -> list[float]:
    """Expected experts per token for each MoE layer: given (one value or one per MoE layer), else k.

    For top-p without measurements the upper bound ``max_k`` is used (callers label it as such).
    """
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    if experts_per_token is None:
        k = config.num_experts_per_tok if config.routing is RoutingMode.topk else config.max_k
        return [float(k)] * len(moe_layers)
    if isinstance(experts_per_token, (int, float)):
        return [float(experts_per_token)] * len(moe_layers)
    values = [float(v) for v in experts_per_token]
    if len(values) != len(moe_layers):
        raise ValueError(f"experts_per_token has {len(values)} values for {len(moe_layers)} MoE layers")
    return values


def active_parameters(
    config: StudentConfig, experts_per_token: float | Sequence[float] | None = None, include_embedding: bool = False
) -> float:
    """Expected parameters used per token: everything but the unchosen experts.

    The input embedding is a lookup, not compute, so it is excluded unless asked for; the LM head
    is included (a tied head counts once, as the head).
    """
    counts = count_parameters(config)
    per_layer = _experts_per_layer(config, experts_per_token)
    head = counts.lm_head or counts.embedding
    active = (
        head
        + counts.attention
        + counts.norms
        + counts.dense_ffn
        + counts.router
        + counts.shared_experts
        + sum(k * counts.per_expert for k in per_layer)
    )
    if include_embedding and counts.lm_head:
        active += counts.embedding
    return active


def flops_per_token(
    config: StudentConfig, context_len: int, experts_per_token: float | Sequence[float] | None = None
) -> float:
    """Forward FLOPs for one token at position ``context_len`` (2 per multiply-add).

    Matmuls: 2 x active parameters (norms aside). Attention: QK^T and AV, 2 * 2 * NH * D per key,
    over ``context_len`` keys on full layers and ``min(context_len, W)`` on sliding ones.
    """
    counts = count_parameters(config)
    matmul = active_parameters(config, experts_per_token) - counts.norms
    per_key = 4 * config.num_attention_heads * config.head_dim
    keys = sum(
        context_len if config.window_of(i) is None else min(context_len, config.sliding_window)
        for i in range(config.num_hidden_layers)
    )
    return 2.0 * matmul + per_key * keys


def kv_bytes_per_token(config: StudentConfig, dtype_bytes: int = 2) -> int:
    """K and V bytes one position costs in one layer's cache."""
    return 2 * config.num_key_value_heads * config.head_dim * dtype_bytes


def kv_cache_bytes(
    config: StudentConfig, context_len: int, batch_size: int = 1, dtype_bytes: int = 2
) -> dict[str, int]:
    """KV-cache bytes by layer type for sequences of ``context_len`` tokens (sliding rings hold min(L, W))."""
    per = kv_bytes_per_token(config, dtype_bytes) * batch_size
    full = sum(1 for t in config.layer_types if t == LayerType.full.value)
    sliding = config.num_hidden_layers - full
    out = {
        LayerType.full.value: full * per * context_len,
        LayerType.sliding.value: sliding * per * min(context_len, config.sliding_window),
    }
    out["total"] = out[LayerType.full.value] + out[LayerType.sliding.value]
    return out


def summary(
    config: StudentConfig, context_len: int = 2048, experts_per_token=None, dtype_bytes: int = 2
) -> list[tuple[str, str]]:
    """Rows for ``raydistill student info``."""
    counts = count_parameters(config)
    topp_bound = config.routing is RoutingMode.topp and experts_per_token is None
    rows = [
        (
            "layers",
            " ".join("F" if t == LayerType.full.value else "S" for t in config.layer_types)
            + f"  (S = sliding window {config.sliding_window}, F = full)",
        ),
        (
            "routing",
            f"top-k, k={config.num_experts_per_tok}"
            if config.routing is RoutingMode.topk
            else f"top-p, p={config.top_p}, k in [{config.min_k}, {config.max_k}]",
        ),
        (
            "experts",
            f"{config.num_experts} x {config.moe_intermediate_size}"
            + (f" + shared {config.shared_expert_intermediate_size}" if config.shared_expert_intermediate_size else ""),
        ),
        ("total parameters", f"{counts.total:,}"),
        (
            "  embedding / lm_head",
            f"{counts.embedding:,} / {counts.lm_head:,}" + (" (tied)" if not counts.lm_head else ""),
        ),
        ("  attention", f"{counts.attention:,}"),
        ("  routed experts", f"{counts.routed_experts:,}"),
        ("  shared experts + dense FFN + router", f"{counts.shared_experts + counts.dense_ffn + counts.router:,}"),
        (
            "active parameters / token" + (" (upper bound, k=max_k)" if topp_bound else ""),
            f"{active_parameters(config, experts_per_token):,.0f} (embedding lookup excluded)",
        ),
        (f"FLOPs / token at {context_len}", f"{flops_per_token(config, context_len, experts_per_token):,.0f}"),
        (f"KV bytes / token / layer ({8 * dtype_bytes}-bit)", f"{kv_bytes_per_token(config, dtype_bytes):,}"),
    ]
    kv = kv_cache_bytes(config, context_len, dtype_bytes=dtype_bytes)
    all_full = kv_bytes_per_token(config, dtype_bytes) * config.num_hidden_layers * context_len
    rows += [
        (f"KV cache at {context_len} tokens: full layers", f"{kv[LayerType.full.value]:,} B"),
        (
            f"KV cache at {context_len} tokens: sliding layers",
            f"{kv[LayerType.sliding.value]:,} B (capped at {config.sliding_window} tokens)",
        ),
        (f"KV cache at {context_len} tokens: total", f"{kv['total']:,} B ({kv['total'] / all_full:.2f}x all-full)"),
    ]
    return rows
