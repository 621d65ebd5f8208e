"""distill.onednn: the loss's vocabulary projection on oneDNN equals the plain matmul, values and gradients."""

from __future__ import annotations

import pytest
import torch

import distill.onednn as onednn


@pytest.mark.parametrize("weight_grad", [False, True])
def test_project_equals_the_matmul_and_its_gradients(monkeypatch, weight_grad):
    if not onednn.onednn_linear_works():
        pytest.skip("no oneDNN in this torch build")
    calls = []
    real = onednn.onednn_linear
    monkeypatch.setattr(onednn, "onednn_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 24, generator=gen).requires_grad_()
    weight = torch.randn(300, 24, generator=gen).requires_grad_(weight_grad)
    upstream = torch.randn(37, 300, generator=gen)

    logits = onednn.project(hidden, weight)
    assert calls == [torch.Size([37, 24])]  # the forward went through oneDNN
    got = torch.autograd.grad(logits, [t for t in (hidden, weight) if t.requires_grad], upstream)
    ref_logits = hidden @ weight.t()
    ref = torch.autograd.grad(ref_logits, [t for t in (hidden, weight) if t.requires_grad], upstream)

    assert logits.shape == (37, 300)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert len(got) == (2 if weight_grad else 1)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_project_off_fp32_cpu_is_the_plain_matmul(monkeypatch):
    monkeypatch.setattr(onednn, "onednn_linear", lambda *a: pytest.fail("oneDNN used for a float64 projection"))
    hidden, weight = torch.randn(5, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    torch.testing.assert_close(onednn.project(hidden, weight), hidden @ weight.t())
