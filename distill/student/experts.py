"""SwiGLU feed-forward blocks and the routed-expert dispatch. Legend in ``config.py``.

Experts are an ``nn.ModuleList`` of ordinary SwiGLU MLPs so that tensor names are the standard
Hugging Face ones (``mlp.experts.3.gate_proj.weight``) with no renaming at save or export time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: the Llama/Qwen2 FFN, used for dense layers, experts and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.ModuleList):
    """E routed experts; :meth:`dispatch` runs each expert only on the tokens routed to it.

    Inference on at most ``grouped_max_tokens`` tokens whose selections cover at least E slots (a
    decode step of several streams) takes the grouped path instead: the routed tokens are laid out
    in one zero-padded block per expert, [E, C, H] with C the largest expert's token count, and two
    batched matmuls over the stacked expert weights replace the per-expert loop, whose fixed cost
    dominates a small step. Work is E * C token-expert pairs (16 streams, ~2.3 of 8 experts each:
    C ~ 8 vs N = 16 for running every expert on every token). A single stream (N*K < E) keeps the
    sparse path: it reads only its experts' weights.
    """

    grouped_max_tokens = 32

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__([SwiGLU(hidden_size, intermediate_size) for _ in range(num_experts)])
        self._stacked: tuple | None = None  # (key, gate_up [E, H, 2I], down [E, I, H]), built lazily

    def _stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [E, H, 2I] and down [E, I, H], laid out for ``bmm``; rebuilt when a weight changes."""
        params = [p for e in self for p in (e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight)]
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._stacked is None or self._stacked[0] != key:
            gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]).t() for e in self])
            down = torch.stack([e.down_proj.weight.t() for e in self])
            self._stacked = (key, gate_up.detach().contiguous(), down.detach().contiguous())
        return self._stacked[1], self._stacked[2]

    def _grouped(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, used: torch.Tensor | None
    ) -> torch.Tensor:
        """x [N, H] -> [N, H]: each expert on its own tokens, as one zero-padded batch per expert."""
        gate_up, down = self._stacked_weights()  # [E, H, 2I], [E, I, H]
        n_exp, size = len(self), down.shape[1]
        w = weights.to(x.dtype) if used is None else torch.where(used, weights.to(x.dtype), 0)
        dense_w = x.new_zeros(x.shape[0], n_exp).scatter_add_(1, experts, w).t()  # [E, N]
        expert, token = (dense_w != 0).nonzero(as_tuple=True)  # [M] pairs, grouped by expert
        counts = torch.bincount(expert, minlength=n_exp)  # [E]
        pos = torch.arange(expert.shape[0], device=x.device) - (counts.cumsum(0) - counts)[expert]  # [M]
        capacity = int(counts.max()) if expert.numel() else 0  # C; the one host sync
        xp = x.new_zeros(n_exp, capacity, x.shape[1])  # [E, C, H]
        xp[expert, pos] = x.index_select(0, token)
        h = torch.bmm(xp, gate_up)  # [E, C, 2I]
        act = F.silu(h[..., :size]).mul_(h[..., size:])  # [E, C, I]
        scale = x.new_zeros(n_exp, capacity)  # [E, C]; padding rows stay 0
        scale[expert, pos] = dense_w[expert, token]
        out = torch.bmm(act.mul_(scale.unsqueeze(2)), down)  # [E, C, H]
        return torch.zeros_like(x).index_add_(0, token, out[expert, pos])

    def _expert_into(self, index: int, xe: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
        """Inference, one expert: ``out = down(silu(gate(xe)) * up(xe) * scale)``, activation in place.

        xe [c, H], scale [c, 1], out [c, H] (rows of the caller's buffer)."""
        expert = self[index]
        h = F.silu(F.linear(xe, expert.gate_proj.weight), inplace=True)  # [c, I]
        h.mul_(F.linear(xe, expert.up_proj.weight)).mul_(scale)
        torch.mm(h, expert.down_proj.weight.t(), out=out)

    def dispatch(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, used: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Weighted sum of the selected experts' outputs.

        x [N, H]; experts, weights [N, K]; used [N, K] bool (None = all slots) -> [N, H].

        Sort the (token, slot) pairs by expert id once, gather the tokens into one contiguous
        block per expert, run each non-empty expert on its block, and scatter-add the weighted
        results back. Work is proportional to the routed pairs, never E * N, and the only host
        sync is reading the per-expert counts. The routing weight scales the [c, I] activations
        before the down projection rather than the [c, H] outputs (I < H for fine experts).
        """
        if (
            not torch.is_grad_enabled()
            and x.shape[0] <= self.grouped_max_tokens
            and x.shape[0] * experts.shape[1] >= len(self)
        ):
            return self._grouped(x, experts, weights, used)
        slots = experts.shape[1]
        flat_experts = experts.reshape(-1)  # [N*K]
        flat_weights = weights.reshape(-1)  # [N*K]
        if used is not None:
            pick = used.reshape(-1).nonzero().squeeze(1)  # [M] indices of used pairs
            flat_experts, flat_weights = flat_experts.index_select(0, pick), flat_weights.index_select(0, pick)
        order = torch.argsort(flat_experts, stable=True)  # [M]
        pair = order if used is None else pick.index_select(0, order)  # [M] flat (token, slot) index
        tokens = torch.div(pair, slots, rounding_mode="floor")  # [M]
        counts = flat_experts.new_zeros(len(self)).scatter_add_(0, flat_experts, torch.ones_like(flat_experts))
        counts = counts.tolist()  # the one host sync: Python needs the block sizes
        routed = x.index_select(0, tokens)  # [M, H], grouped by expert
        scale = flat_weights.index_select(0, order).to(x.dtype).unsqueeze(1)  # [M, 1]
        grad = torch.is_grad_enabled()
        out = None if grad else torch.empty_like(routed)
        pieces = []
        start = 0
        for index, (expert, count) in enumerate(zip(self, counts)):
            if not count:
                continue
            end = start + count
            xe = routed[start:end]  # [c, H]
            if grad:
                h = F.silu(F.linear(xe, expert.gate_proj.weight)) * F.linear(xe, expert.up_proj.weight)
                pieces.append(F.linear(h * scale[start:end], expert.down_proj.weight))
            else:
                self._expert_into(index, xe, scale[start:end], out[start:end])
            start = end
        if grad:
            out = torch.cat(pieces) if pieces else routed.new_zeros(0, x.shape[1])
        y = torch.zeros_like(x).index_add_(0, tokens, out)  # [N, H]
        if grad and not all(counts):
            # An expert with no tokens still joins the graph, with a zero contribution: every parameter
            # then gets a gradient (0) in every step, so DDP's reducer sees the same parameters each step
            # (else: "Expected to have finished reduction in the prior iteration" on the next step).
            # Cheaper and stricter than find_unused_parameters=True (no graph walk per step); static_graph
            # would be wrong, since which experts get tokens changes from step to step.
            idle = [p for expert, count in zip(self, counts) if not count for p in expert.parameters()]
            y = y + sum(p.sum() for p in idle).to(y.dtype) * 0.0
        return y
