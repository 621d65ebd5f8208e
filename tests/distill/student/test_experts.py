"""SwiGLU's fused inference path (gate and up in one matmul) and the routed-expert dispatch that uses it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.student.experts import Experts, SwiGLU


def test_swiglu_inference_fuses_gate_and_up_with_the_same_result():
    """Without autograd gate and up come from one matmul over their stacked weights: the same output as
    two projections, rebuilt after an in-place weight change; with autograd the projections run as
    they are and get their gradients."""
    torch.manual_seed(0)
    mlp = SwiGLU(32, 48)
    calls = []
    mlp.matmul = lambda x, w, b: calls.append(tuple(w.shape)) or F.linear(x, w, b)
    x = torch.randn(3, 5, 32)

    def both():
        mlp.fused_gate_up = False
        separate = mlp(x)
        mlp.fused_gate_up = True
        return separate, mlp(x)

    with torch.no_grad():
        separate, fused = both()
        torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
        assert calls == [(96, 32)]  # gate and up stacked: [2I, H]
        mlp.up_proj.weight.mul_(-2.0)  # in-place change: the stacked copy follows
        separate2, fused2 = both()
        torch.testing.assert_close(fused2, separate2, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(separate, separate2)
    calls.clear()
    mlp(x).sum().backward()
    assert calls == [] and mlp.gate_proj.weight.grad is not None and mlp.up_proj.weight.grad is not None


def test_routed_dispatch_in_inference_equals_the_autograd_path():
    """The inference dispatch (fused gate/up per expert, activations written into one buffer) computes
    the same weighted sum as the training path, with a slot left unused and an expert left idle."""
    torch.manual_seed(0)
    experts = Experts(4, 16, 8)
    x = torch.randn(6, 16)
    chosen = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0], [2, 1]])  # expert 3 gets no token
    weights = torch.rand(6, 2)
    used = torch.ones(6, 2, dtype=torch.bool)
    used[4, 1] = False
    want = experts.dispatch(x, chosen, weights, used)  # autograd on: the training path
    with torch.no_grad():
        got = experts.dispatch(x, chosen, weights, used)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    by_hand = torch.stack(
        [
            sum(float(w) * experts[int(e)](x[n]) for e, w, u in zip(chosen[n], weights[n], used[n]) if u)
            for n in range(6)
        ]
    )
    torch.testing.assert_close(got, by_hand.detach(), rtol=1e-5, atol=1e-5)
