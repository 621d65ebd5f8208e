"""The mixture-of-experts FFN block (Qwen2-MoE layout) with its aux losses and routing statistics.

    y = sum_k w_k * expert_k(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x)

Legend in ``config.py``. Tensor names match Qwen2-MoE: ``mlp.gate.weight`` (router),
``mlp.experts.E.{gate,up,down}_proj.weight``, ``mlp.shared_expert.*``, ``mlp.shared_expert_gate.weight``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from distill.student.config import StudentConfig
from distill.student.experts import Experts, SwiGLU
from distill.student.router import (
    Router,
    Routing,
    entropy_loss,
    expert_counts,
    load_balance_loss,
    per_expert,
    token_entropy,
    z_loss,
)
from distill.student.stacked import cached_stack


@dataclasses.dataclass
class RoutingStats:
    """One MoE layer's routing over the valid tokens of a forward call (detached).

    Only the counts are computed in the forward pass; the ratios are derived when read (a serving
    step never reads them)."""

    layer: int
    tokens: torch.Tensor  # [] valid tokens routed
    counts: torch.Tensor  # [E] selections per expert

    @property
    def experts_per_token(self) -> torch.Tensor:
        """[] mean experts actually used per token."""
        return self.counts.sum() / self.tokens.clamp(min=1.0)

    @property
    def expert_load(self) -> torch.Tensor:
        """[E] share of selections per expert, sums to 1."""
        return self.counts / self.counts.sum().clamp(min=1.0)

    # Tensors, not Python numbers: reading them would force a device sync in every layer.
    def as_dict(self) -> dict:
        return {
            "layer": self.layer,
            "tokens": int(self.tokens),
            "experts_per_token": float(self.experts_per_token),
            "expert_load": [round(float(v), 6) for v in self.expert_load],
        }


@dataclasses.dataclass
class MoEAux:
    """Un-weighted aux losses of one layer (with gradients to the router) and its stats."""

    load_balance: torch.Tensor | None  # None when computed with compute_aux=False (serving)
    z: torch.Tensor | None
    entropy: torch.Tensor | None
    stats: RoutingStats
    token_entropy: torch.Tensor | None = None  # [N] each token's routing entropy (grad to the router)


class MoEBlock(nn.Module):
    """Router, routed experts and the optional shared expert of one layer.

    Inference on at most ``dense_max_tokens`` tokens whose selections can cover every expert (a
    decode step of several streams: N * max_k >= E) runs every expert and the shared expert as one
    dense SwiGLU of width W = E * I + S, its activations scaled per token by the routing weights (0
    for the experts the token did not choose) and the shared-expert gate. That is the same sum as the
    routed dispatch, in two large matmuls; the first also yields the router logits and the
    shared-expert gate (their rows are stacked under the experts' gate and up rows). At this size
    nearly every expert is chosen by some token, so the routed path reads the same weights, in
    3 * (E + 1) small matmuls plus gathers and scatters; the dense FFN of the same bytes is faster
    (``bench/moe_decode.py``). A single stream keeps the routed path: it reads only its own experts.
    ``matmul`` is ``F.linear`` unless the engine gives the block a faster kernel
    (:func:`serve.engine.kernels.use_onednn_linears`).
    """

    dense_max_tokens = 32

    def __init__(self, config: StudentConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.matmul = F.linear
        self._dense: tuple | None = None  # (key, (gate_up [2W, H], down [H, W])), built lazily
        self.gate = Router(config)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = SwiGLU(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None
            self.shared_expert_gate = None

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None, compute_aux: bool = True
    ) -> tuple[torch.Tensor, MoEAux]:
        """x [B, T, H], token_mask [B, T] (False = padding: not dispatched, not in losses) -> [B, T, H].

        ``compute_aux=False`` skips the aux losses (serving); routing stats are always returned.
        """
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, H]
        flat_mask = token_mask.reshape(-1) if token_mask is not None else None  # [N]
        if self._dense_path(flat):
            out, routing = self._dense_forward(flat, flat_mask)  # [N, H]
        else:
            routing = self.gate(flat)
            used = routing.mask
            if flat_mask is not None:
                used = flat_mask[:, None] if used is None else used & flat_mask[:, None]
                used = used.expand_as(routing.experts)
            out = self.experts.dispatch(flat, routing.experts, routing.weights, used)  # [N, H]
            if self.shared_expert is not None:
                out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)

        counts = expert_counts(routing, flat_mask)  # [E]
        tokens = (
            flat_mask.sum(dtype=torch.float)
            if flat_mask is not None
            else torch.tensor(float(len(flat)), device=flat.device)
        )
        stats = RoutingStats(self.layer_idx, tokens, counts.detach())
        if not compute_aux:
            return out.reshape(shape), MoEAux(None, None, None, stats)
        entropy = token_entropy(routing)  # [N]
        aux = MoEAux(
            load_balance_loss(routing, flat_mask, counts),
            z_loss(routing, flat_mask),
            entropy_loss(routing, flat_mask, entropy),
            stats,
            entropy,
        )
        return out.reshape(shape), aux

    def _dense_path(self, flat: torch.Tensor) -> bool:
        n = flat.shape[0]
        return (
            not torch.is_grad_enabled() and 0 < n <= self.dense_max_tokens and n * self.gate.slots >= len(self.experts)
        )

    def mlps(self) -> list[SwiGLU]:
        """The routed experts, then the shared expert (if any): the dense path's column order."""
        return [*self.experts, *([self.shared_expert] if self.shared_expert is not None else [])]

    def _dense_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fused [2W + E (+ 1), H] and down [H, W]. ``fused`` stacks every expert's and the shared
        expert's gate rows (W), their up rows (W), the router (E) and the shared-expert gate (1): one
        matmul gives the FFN's input projections and the routing logits. Rebuilt when a weight changes
        (a model swap, a load_state_dict)."""
        mlps = self.mlps()
        extra = [self.gate.weight] + ([self.shared_expert_gate.weight] if self.shared_expert_gate is not None else [])

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            fused = torch.cat([m.gate_proj.weight for m in mlps] + [m.up_proj.weight for m in mlps] + extra)
            down = torch.cat([m.down_proj.weight for m in mlps], dim=1)
            return fused.detach().contiguous(), down.detach().contiguous()

        params = [p for m in mlps for p in (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)] + extra
        return cached_stack(self, "_dense", params, build)

    def _dense_forward(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> tuple[torch.Tensor, Routing]:
        """x [N, H], token_mask [N] or None -> out [N, H] and the routing; every expert run densely.

        The activations of each expert's columns are scaled by the token's routing weight for that
        expert (0 where not chosen, or for a padding token), the shared expert's by its gate: the
        same sum as the routed dispatch."""
        fused, down = self._dense_weights()  # [2W + E (+ 1), H], [H, W]
        n, width, num_experts = x.shape[0], down.shape[1], len(self.experts)
        h = self.matmul(x, fused, None)  # [N, 2W + E (+ 1)]
        routing = self.gate(x, logits=h[:, 2 * width : 2 * width + num_experts])
        weights = per_expert(routing)  # [N, E]
        if token_mask is not None:
            weights = weights * token_mask[:, None]
        act = F.silu(h[:, :width]).mul_(h[:, width : 2 * width])  # [N, W]
        routed = num_experts * self.experts[0].down_proj.in_features  # E * I
        act[:, :routed].view(n, num_experts, -1).mul_(weights.to(x.dtype).unsqueeze(-1))  # [N, E, I]
        if self.shared_expert is not None:
            act[:, routed:].mul_(torch.sigmoid(h[:, 2 * width + num_experts :]))  # [N, S] x [N, 1]
        return self.matmul(act, down, None), routing  # [N, H]


@contextlib.contextmanager
def all_experts_active(model: nn.Module) -> Iterator[None]:
    """Route every token to every expert (weights = the full softmax) inside the block; diagnostics.

    With a student fresh from :func:`~distill.student.init.init_from_teacher` this reproduces the
    pruned teacher's FFNs, which is how the initialisation is tested.
    """
    routers = [m for m in model.modules() if isinstance(m, Router)]
    previous = [r.force_all_experts for r in routers]
    for r in routers:
        r.force_all_experts = True
    try:
        yield
    finally:
        for r, old in zip(routers, previous):
            r.force_all_experts = old
