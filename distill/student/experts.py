"""SwiGLU feed-forward blocks and the routed-expert dispatch. Legend in ``config.py``.

Experts are an ``nn.ModuleList`` of ordinary SwiGLU MLPs so that tensor names are the standard
Hugging Face ones (``mlp.experts.3.gate_proj.weight``) with no renaming at save or export time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.student.stacked import cached_stack


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: the Llama/Qwen2 FFN, used for dense layers, experts and the shared expert.

    Inference (no autograd) computes gate and up in one matmul over their stacked weights
    (``fused_gate_up``; a cached copy, rebuilt when a weight changes), like attention's fused q/k/v:
    one [*, H] x [H, 2I] call instead of two. ``matmul`` is ``F.linear`` unless the engine gives the
    block a faster kernel (:func:`serve.engine.kernels.use_onednn_linears`).
    """

    fused_gate_up = True

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.matmul = F.linear
        self._gate_up: tuple | None = None  # (key, weight [2I, H]), built lazily

    def gate_up_weight(self) -> torch.Tensor:
        """gate and up stacked [2I, H], cached until either weight changes."""
        params = (self.gate_proj.weight, self.up_proj.weight)
        return cached_stack(self, "_gate_up", params, lambda: torch.cat(params).detach().contiguous())

    def gate_up(self, x: torch.Tensor) -> torch.Tensor:
        """x [*, H] -> silu(gate(x)) * up(x) [*, I]; one fused matmul in inference."""
        if self.fused_gate_up and not torch.is_grad_enabled():
            h = self.matmul(x, self.gate_up_weight(), None)  # [*, 2I]
            size = self.gate_proj.out_features
            return F.silu(h[..., :size]).mul_(h[..., size:])
        return F.silu(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up(x))


class Experts(nn.ModuleList):
    """E routed experts; :meth:`dispatch` runs each expert only on the tokens routed to it.

    (A decode step of a few streams does not come here: :class:`~distill.student.moe.MoEBlock` runs
    every expert densely at that size.)
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__([SwiGLU(hidden_size, intermediate_size) for _ in range(num_experts)])

    def _expert_into(self, index: int, xe: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
        """Inference, one expert: ``out = down(silu(gate(xe)) * up(xe) * scale)``, activation in place.

        xe [c, H], scale [c, 1], out [c, H] (rows of the caller's buffer)."""
        expert = self[index]
        h = expert.gate_up(xe).mul_(scale)  # [c, I]
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
        # Autograd or autocast: F.linear per expert (autocast picks each matmul's dtype); else each expert
        # writes into one preallocated buffer.
        grad = torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type)
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
        y = torch.zeros_like(x, dtype=out.dtype).index_add_(0, tokens, out)  # [N, H]; bf16 under bf16 autocast
        if grad and not all(counts):
            # An expert with no tokens still joins the graph, with a zero contribution: every parameter
            # then gets a gradient (0) in every step, so DDP's reducer sees the same parameters each step
            # (else: "Expected to have finished reduction in the prior iteration" on the next step).
            # Cheaper and stricter than find_unused_parameters=True (no graph walk per step); static_graph
            # would be wrong, since which experts get tokens changes from step to step.
            idle = [p for expert, count in zip(self, counts) if not count for p in expert.parameters()]
            y = y + sum(p.sum() for p in idle).to(y.dtype) * 0.0
        return y
