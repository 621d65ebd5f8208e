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


def test_student_trains_and_scores_under_bf16_autocast():
    """``train.precision: bf16`` (the default on GPU): a student's forward and backward run under bf16
    autocast on the routed dispatch, with and without gradients, a shared expert included, and give the
    fp32 loss to bf16 precision. (Before: index_add_ of the experts' bf16 outputs into an fp32 buffer
    raised "self (Float) and source (BFloat16) must have the same scalar type".)"""
    from .conftest import tiny_student

    student = tiny_student(shared_expert_intermediate_size=16)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))

    def loss_of(autocast: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = student(input_ids=ids).logits  # [2, 24, V]: 48 tokens, the routed path
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, 96), ids[:, 1:].reshape(-1))

    want = loss_of(False)
    got = loss_of(True)
    got.backward()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad():  # scoring inside a bf16 training step (held-out rows): the inference dispatch
        torch.testing.assert_close(loss_of(True), want.detach(), rtol=2e-2, atol=2e-2)
