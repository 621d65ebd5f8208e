"""oneDNN's fp32 linear on CPU (``torch.ops.mkldnn._linear_pointwise``), where MKL's sgemm is slow.

``F.linear`` on CPU calls MKL's sgemm, which on the 2-core AMD EPYC dev machine runs the vocabulary
projection ([*, 576] x [576, 49152]) at half oneDNN's speed or less: the engine's decode head (see
:mod:`serve.engine.kernels`, which also packs weights) and the distillation loss's projection in
training (:func:`project`). Plain PyTorch, no I/O; callers fall back to ``F.linear`` / ``@`` where
:func:`onednn_linear_works` is False.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("raydistill.onednn")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by oneDNN: x ``[*, in]`` fp32 CPU, weight ``[out, in]`` (plain, or
    packed by ``torch.ops.mkldnn._reorder_linear_weight``). No autograd."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def agrees_with_linear(linear: Callable[..., torch.Tensor]) -> bool:
    """``linear(x, weight, bias)`` runs and matches ``F.linear`` on a small fp32 case (a torch without
    the op, or a broken one, gives False)."""
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=gen) for s in ((3, 2, 64), (96, 64), (96,)))
        with torch.inference_mode():
            return torch.allclose(linear(x, w, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    except Exception as exc:  # noqa: BLE001 - keep F.linear
        log.info("oneDNN linear unavailable (%s); keeping F.linear", exc)
        return False


@functools.cache
def onednn_linear_works() -> bool:
    """oneDNN is built in, the op exists with the signature above, and it agrees with ``F.linear``."""
    return torch.backends.mkldnn.is_available() and agrees_with_linear(onednn_linear)


class _Projection(torch.autograd.Function):
    """``hidden @ weight.T`` with the forward on oneDNN; the gradients are plain matmuls (MKL is as fast
    as oneDNN on those shapes: [C, V] x [V, H] and [V, C] x [C, H])."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight)
        return onednn_linear(hidden, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        hidden, weight = ctx.saved_tensors
        d_hidden = grad @ weight if ctx.needs_input_grad[0] else None
        d_weight = grad.t() @ hidden if ctx.needs_input_grad[1] else None
        return d_hidden, d_weight


def project(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits ``[C, V]`` = hidden ``[C, H]`` x weight ``[V, H]``ᵀ, differentiable in both.

    On CPU in fp32 the forward runs on oneDNN: [C, 576] x [576, 49152] at C = 100 / 340 / 512 took
    53 / 217 / 264 ms against sgemm's 120 / 265 / 363 ms (2 threads, the dev machine, 2026-11-29).
    Elsewhere (GPU, other dtypes, no oneDNN) it is ``hidden @ weight.t()``.
    """
    if (
        hidden.device.type == "cpu"
        and hidden.dtype == torch.float32
        and weight.dtype == torch.float32
        and hidden.dim() == 2
        and onednn_linear_works()
    ):
        return _Projection.apply(hidden, weight)
    return hidden @ weight.t()


HEAD_BLOCK_ROWS = 128  # rows per LM-head projection + log-softmax: [128, V] fp32 is 25 MB at V = 49152


def head_logits(hidden: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
    """An LM head ``head`` (weight [V, H], optional bias [V]) on hidden [C, H] -> logits [C, V], the
    projection by :func:`project` (oneDNN for fp32 on CPU)."""
    logits = project(hidden, head.weight)  # [C, V]
    return logits if head.bias is None else logits + head.bias
