"""Expert selection (top-k or top-p) and the router's auxiliary losses. Legend in ``config.py``.

Probabilities are a softmax over all E experts computed in fp32 whatever the model dtype: in
bf16, near-equal router logits would round to ties and the selection would depend on rounding.

Weights of the kept experts:

* top-k: renormalised to sum to 1 iff ``norm_topk_prob`` (the Qwen2-MoE flag, so the stock
  export reproduces either choice exactly).
* top-p: always renormalised. The number of kept experts varies per token; without
  renormalisation a token that keeps one expert holding 55% of the mass would get its FFN output
  scaled by 0.55 and one that keeps four would get ~0.9, i.e. the output scale would track router
  confidence instead of content, and ``min_k``/``max_k`` clamps would change the scale abruptly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.student.config import RoutingMode, StudentConfig


@dataclasses.dataclass
class Routing:
    """Selection for N tokens in K slots; slots with ``mask`` False carry weight 0 and are skipped."""

    logits: torch.Tensor  # [N, E] fp32
    probs: torch.Tensor  # [N, E] fp32
    experts: torch.Tensor  # [N, K] long, always a valid expert id
    weights: torch.Tensor  # [N, K] fp32
    mask: torch.Tensor | None  # [N, K] bool; None = every slot used (top-k)


def select_topk(probs: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [N, E] -> weights [N, k], experts [N, k] (largest first, ``torch.topk`` tie order)."""
    weights, experts = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def select_topp(
    probs: torch.Tensor, top_p: float, min_k: int, max_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the fewest experts whose mass reaches ``top_p``, clamped to [min_k, max_k]; renormalise.

    Experts are sorted by probability; expert ``j`` in that order is kept iff the mass of the
    experts before it is < ``top_p`` (so the prefix includes the one that crosses ``top_p``).
    Returns weights, experts, mask, each [N, max_k]; unkept slots have weight 0 and keep their
    (valid) sorted expert id.
    """
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)  # [N, E]
    sorted_probs, order = sorted_probs[:, :max_k], order[:, :max_k]  # [N, max_k]
    mass_before = F.pad(torch.cumsum(sorted_probs, dim=-1)[:, :-1], (1, 0))  # [N, max_k], exclusive
    keep = mass_before < top_p  # [N, max_k]; slot 0 always (its mass before is 0 < top_p)
    if min_k > 1:
        keep[:, :min_k] = True
    weights = sorted_probs * keep
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, order, keep


class Router(nn.Module):
    """Linear router (``mlp.gate.weight [E, H]``, no bias) plus the configured selection rule."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=config.initializer_range)
        self.routing = config.routing
        self.k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.top_p, self.min_k, self.max_k = config.top_p, config.min_k, int(config.max_k)
        self.force_all_experts = False  # diagnostics: route every token to every expert

    @property
    def slots(self) -> int:
        """K: the selection slots per token (``max_k`` for top-p, ``k`` for top-k, E when forced to all)."""
        if self.force_all_experts:
            return int(self.weight.shape[0])
        return self.max_k if self.routing is RoutingMode.topp else self.k

    def forward(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> Routing:
        """x [N, H] -> :class:`Routing`. ``logits`` [N, E]: x's router logits when the caller has computed
        them already (the MoE block's dense path: one matmul with the shared-expert gate); the selection
        is the same, and forward hooks (the eval's routing records) see every call either way."""
        logits = (F.linear(x, self.weight) if logits is None else logits).float()  # [N, E]
        probs = F.softmax(logits, dim=-1)  # [N, E]
        num_experts = probs.shape[-1]
        if self.force_all_experts:
            weights, experts = select_topk(probs, num_experts, renormalize=True)
            return Routing(logits, probs, experts, weights, None)
        if self.routing is RoutingMode.topk:
            weights, experts = select_topk(probs, self.k, self.norm_topk_prob)
            return Routing(logits, probs, experts, weights, None)
        weights, experts, keep = select_topp(probs, self.top_p, self.min_k, self.max_k)
        return Routing(logits, probs, experts, weights, keep)


def per_expert(routing: Routing) -> torch.Tensor:
    """The selection's weights in expert order [N, E] fp32, 0 for an expert not chosen (unused slots
    carry weight 0). A token's K slots name distinct experts, so scattering them is exact."""
    return torch.zeros_like(routing.probs).scatter_(1, routing.experts, routing.weights)  # [N, E]


# ----------------------------------------------------------------------------- auxiliary losses
def _masked_mean(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    if token_mask is None:
        return values.mean()
    weight = token_mask.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp(min=1.0)


def expert_counts(
    experts: torch.Tensor, used: torch.Tensor | None, token_mask: torch.Tensor | None, num_experts: int
) -> torch.Tensor:
    """Selections per expert [E] over valid tokens (no gradient: counts are not differentiable).

    experts [N, K] expert ids; used [N, K] bool (None = every slot); token_mask [N] bool (None = all)."""
    weight = torch.ones(experts.shape, device=experts.device) if used is None else used.float()  # [N, K]
    if token_mask is not None:
        weight = weight * token_mask[:, None]
    counts = torch.zeros(num_experts, dtype=torch.float, device=experts.device)
    # scatter_add, not boolean indexing: no device sync on GPU.
    return counts.scatter_add_(0, experts.reshape(-1), weight.reshape(-1))


def load_balance_loss(
    routing: Routing, token_mask: torch.Tensor | None = None, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer balance loss ``E * sum_e f_e * P_e``; 1.0 when perfectly balanced.

    ``f_e`` is expert e's share of all selections (sums to 1 for top-k and top-p alike), ``P_e``
    the mean router probability; the gradient flows through ``P_e``.
    """
    if counts is None:
        counts = expert_counts(routing.experts, routing.mask, token_mask, routing.probs.shape[-1])
    share = counts / counts.sum().clamp(min=1.0)  # [E]
    if token_mask is None:
        mean_probs = routing.probs.mean(dim=0)
    else:
        weight = token_mask.to(routing.probs.dtype)[:, None]
        mean_probs = (routing.probs * weight).sum(dim=0) / weight.sum().clamp(min=1.0)
    return routing.probs.shape[-1] * torch.sum(share * mean_probs)


def z_loss(routing: Routing, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition; keeps router logits small and stable."""
    return _masked_mean(torch.logsumexp(routing.logits, dim=-1) ** 2, token_mask)


def token_entropy(routing: Routing) -> torch.Tensor:
    """Routing entropy of each token [N] (nats, fp32, with gradient to the router)."""
    log_probs = F.log_softmax(routing.logits, dim=-1)
    return -(routing.probs * log_probs).sum(dim=-1)


def entropy_loss(
    routing: Routing, token_mask: torch.Tensor | None = None, entropy: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean routing entropy (the "dynamic" loss of top-p MoE): lower entropy -> fewer experts reach p.

    ``entropy`` [N]: :func:`token_entropy` when the caller has it already.
    """
    return _masked_mean(token_entropy(routing) if entropy is None else entropy, token_mask)


# ----------------------------------------------------------------------------- vLLM
def topp_routing_function(
    hidden_states: torch.Tensor,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool,
    *,
    top_p: float,
    min_k: int,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM ``FusedMoE(custom_routing_function=...)`` for top-p students. Pure torch, no vLLM.

    vLLM kernels take a fixed ``topk`` slots per token, so ``topk`` is the student's ``max_k``.
    Slots past a token's top-p cut-off get weight 0 and the token's top-1 expert id: a valid id
    (kernels index expert weights with it), and one the token already uses, so padding touches no
    extra expert's weights. Returns weights [N, topk] fp32 and ids [N, topk] int32.
    ``renormalize`` is accepted for the signature; top-p always renormalises (module docstring).
    """
    probs = F.softmax(gating_output.float(), dim=-1)  # [N, E]
    weights, experts, keep = select_topp(probs, top_p, min_k, topk)
    experts = torch.where(keep, experts, experts[:, :1].expand_as(experts))
    return weights.float(), experts.to(torch.int32)
