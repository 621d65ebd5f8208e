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

    Nothing is computed in the forward pass unless the caller has the counts already (training's
    balance loss): ``counts`` and ``tokens`` are derived when first read, so a serving step, which
    never reads them, spends no op on them (each small op costs ~20 us in a decode step's layer)."""

    layer: int
    experts: torch.Tensor  # [N, K] expert id of each slot
    used: torch.Tensor | None  # [N, K] bool: slot used (top-p prefix); None = every slot (top-k)
    token_mask: torch.Tensor | None  # [N] bool: valid token; None = all
    num_experts: int
    _counts: torch.Tensor | None = None  # [E], when the forward pass computed it anyway

    @property
    def counts(self) -> torch.Tensor:
        """[E] selections per expert over the valid tokens."""
        if self._counts is None:
            self._counts = expert_counts(self.experts, self.used, self.token_mask, self.num_experts)
        return self._counts

    @property
    def tokens(self) -> torch.Tensor:
        """[] valid tokens routed."""
        if self.token_mask is None:
            return torch.tensor(float(len(self.experts)), device=self.experts.device)
        return self.token_mask.sum(dtype=torch.float)

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
    routed dispatch, in two large matmuls (and a tiny one for the router logits and the shared-expert
    gate). At this size
    nearly every expert is chosen by some token, so the routed path reads the same weights, in
    3 * (E + 1) small matmuls plus gathers and scatters; the dense FFN of the same bytes is faster
    (``bench/moe_decode.py``). A single stream keeps the routed path: it reads only its own experts.
    The same holds for a short prefill: each of E experts gets ~N * k / E tokens, too few for an
    efficient matmul, so the dense FFN's extra FLOPs cost less than the dispatch up to ~96 tokens
    (``bench/moe_decode.py --prompt-tokens``, the quickstart student, experts of 144 neurons, one
    prompt's time to first token, dense / routed: 0.75 at 32 tokens, 0.85 at 64, 1.02 at 96, 1.05
    at 128; with experts of 96 neurons the MoE blocks alone break even later, 0.96 at 128 tokens).
    ``matmul`` is ``F.linear`` unless the engine gives the block a faster kernel
    (:func:`serve.engine.kernels.use_onednn_linears`).
    """

    dense_max_tokens = 96

    def __init__(self, config: StudentConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.matmul = F.linear
        self._dense: tuple | None = None  # (key, (gate_up [2W, H], gates [E (+ 1), H], down [H, W])), built lazily
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

        stats = RoutingStats(self.layer_idx, routing.experts, routing.mask, flat_mask, len(self.experts))
        if not compute_aux:
            return out.reshape(shape), MoEAux(None, None, None, stats)
        counts = stats.counts  # [E], for the balance loss too
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

    def _dense_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate_up [2W, H], gates [E (+ 1), H] and down [H, W]. ``gate_up`` stacks every expert's and the
        shared expert's gate rows (W), then their up rows (W); ``gates`` the router (E) and the
        shared-expert gate (1). They stay two matmuls: a width of 2W + E + 1 (3,081 for the quickstart
        student) runs oneDNN 9-21% slower than 2W (3,072) at 16-64 rows, more than a second, tiny
        matmul costs. Rebuilt when a weight changes (a model swap, a load_state_dict)."""
        mlps = self.mlps()  # fresh each call: load_state_dict(assign=True) puts new tensors in the modules
        gate_up = [m.gate_proj.weight for m in mlps] + [m.up_proj.weight for m in mlps]
        gates = [self.gate.weight] + ([self.shared_expert_gate.weight] if self.shared_expert_gate is not None else [])
        down = [m.down_proj.weight for m in mlps]

        def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return (
                torch.cat(gate_up).detach().contiguous(),
                torch.cat(gates).detach().contiguous(),
                torch.cat(down, dim=1).detach().contiguous(),
            )

        return cached_stack(self, "_dense", gate_up + gates + down, build)

    def _dense_forward(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> tuple[torch.Tensor, Routing]:
        """x [N, H], token_mask [N] or None -> out [N, H] and the routing; every expert run densely.

        The activations of each expert's columns are scaled by the token's routing weight for that
        expert (0 where not chosen, or for a padding token), the shared expert's by its gate: the
        same sum as the routed dispatch."""
        gate_up, gates, down = self._dense_weights()  # [2W, H], [E (+ 1), H], [H, W]
        n, width, num_experts = x.shape[0], down.shape[1], len(self.experts)
        h = self.matmul(x, gate_up, None)  # [N, 2W]
        small = F.linear(x, gates)  # [N, E (+ 1)]: router logits, shared-expert gate
        routing = self.gate(x, logits=small[:, :num_experts])
        weights = per_expert(routing)  # [N, E]
        if token_mask is not None:
            weights = weights.mul_(token_mask[:, None])
        act = F.silu(h[:, :width]).mul_(h[:, width:])  # [N, W]
        routed = num_experts * self.experts[0].down_proj.in_features  # E * I
        act[:, :routed].view(n, num_experts, -1).mul_(weights.to(x.dtype).unsqueeze(-1))  # [N, E, I]
        if self.shared_expert is not None:
            act[:, routed:].mul_(torch.sigmoid(small[:, num_experts:]))  # [N, S] x [N, 1]
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
