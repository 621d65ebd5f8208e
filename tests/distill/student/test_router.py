"""Routing math, expert dispatch, aux-loss gradients, routing stats, and the vLLM top-p routing function."""

from __future__ import annotations

import functools

import pytest
import torch

from distill.student.moe import MoEBlock, all_experts_active
from distill.student.router import (
    Router,
    Routing,
    entropy_loss,
    load_balance_loss,
    select_topk,
    select_topp,
    topp_routing_function,
    z_loss,
)

from .conftest import tiny_config

PROBS = torch.tensor([[0.50, 0.30, 0.15, 0.05], [0.05, 0.15, 0.30, 0.50], [0.25, 0.25, 0.25, 0.25]])


@pytest.mark.parametrize(
    "top_p, min_k, max_k, expected_counts",
    [
        (0.50, 1, 4, [1, 1, 2]),  # mass before the 2nd expert (0.5) is not < 0.5: stop at one
        (0.60, 1, 4, [2, 2, 3]),  # 0.5 < 0.6 -> two; uniform needs 0.75 >= 0.6 -> three
        (0.90, 1, 4, [3, 3, 4]),  # 0.8 < 0.9 -> three
        (1.00, 1, 4, [4, 4, 4]),
        (0.10, 2, 4, [2, 2, 2]),  # min_k clamps up
        (0.99, 1, 2, [2, 2, 2]),  # max_k clamps down
    ],
)
def test_topp_selection_math(top_p, min_k, max_k, expected_counts):
    weights, experts, keep = select_topp(PROBS, top_p, min_k, max_k)
    assert weights.shape == experts.shape == keep.shape == (3, max_k)
    assert keep.sum(-1).tolist() == expected_counts
    # Kept slots are the largest probabilities in order; weights renormalised over them; others 0.
    assert experts[0, :2].tolist() == [0, 1] and experts[1, :2].tolist() == [3, 2]
    for row in range(3):
        n = expected_counts[row]
        kept = PROBS[row, experts[row, :n]]
        torch.testing.assert_close(weights[row, :n], kept / kept.sum())
        assert torch.all(weights[row, n:] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))


def test_topk_selection_renormalisation():
    weights, experts = select_topk(PROBS, 2, renormalize=False)
    assert experts.tolist()[:2] == [[0, 1], [3, 2]]
    torch.testing.assert_close(weights[0], torch.tensor([0.5, 0.3]))
    weights, _ = select_topk(PROBS, 2, renormalize=True)
    torch.testing.assert_close(weights[0], torch.tensor([0.625, 0.375]))


def test_router_softmax_is_fp32_for_bf16_inputs():
    router = Router(tiny_config()).to(torch.bfloat16)
    torch.nn.init.normal_(router.weight)
    routing = router(torch.randn(5, 64, dtype=torch.bfloat16))
    assert routing.logits.dtype == routing.probs.dtype == routing.weights.dtype == torch.float32
    assert routing.experts.shape == (5, 2) and routing.mask is None


def _reference_moe(block: MoEBlock, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Every expert on every token, masked by the routing: the dense definition."""
    out = torch.zeros_like(x)
    used = torch.ones_like(routing.experts, dtype=torch.bool) if routing.mask is None else routing.mask
    for e, expert in enumerate(block.experts):
        w = ((routing.experts == e) & used).float().mul(routing.weights).sum(-1, keepdim=True)  # [N, 1]
        out += w * expert(x)
    if block.shared_expert is not None:
        out += torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"norm_topk_prob": False, "shared_expert_intermediate_size": 16},
        {"routing": "topp", "top_p": 0.5, "min_k": 1, "max_k": 3},
    ],
)
def test_dispatch_equals_dense_reference(overrides):
    torch.manual_seed(0)
    config = tiny_config(**overrides)
    block = MoEBlock(config, 0)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        got, aux = block(x)
        want = _reference_moe(block, x.reshape(-1, 64), block.gate(x.reshape(-1, 64)))
    torch.testing.assert_close(got.reshape(-1, 64), want, atol=1e-5, rtol=1e-5)
    assert aux.stats.expert_load.shape == (4,)
    torch.testing.assert_close(aux.stats.expert_load.sum(), torch.tensor(1.0))
    if config.routing.value == "topk":
        assert float(aux.stats.experts_per_token) == 2.0
    else:
        assert 1.0 <= float(aux.stats.experts_per_token) <= 3.0


def test_padding_tokens_are_not_dispatched_or_counted():
    torch.manual_seed(0)
    block = MoEBlock(tiny_config(), 0)
    torch.nn.init.normal_(block.gate.weight, std=0.5)
    x = torch.randn(1, 6, 64)
    mask = torch.tensor([[True, True, True, False, False, False]])
    with torch.no_grad():
        out, aux = block(x, mask)
        alone, alone_aux = block(x[:, :3])
    assert torch.all(out[0, 3:] == 0)
    torch.testing.assert_close(out[:, :3], alone)
    assert int(aux.stats.tokens) == 3
    torch.testing.assert_close(aux.load_balance, alone_aux.load_balance)


def test_all_experts_active_uses_every_expert():
    torch.manual_seed(0)
    block = MoEBlock(tiny_config(), 0)
    with torch.no_grad(), all_experts_active(block):
        _, aux = block(torch.randn(1, 5, 64))
    assert float(aux.stats.experts_per_token) == 4.0
    assert block.gate.force_all_experts is False  # restored


@pytest.mark.parametrize("routing", ["topk", "topp"])
def test_aux_losses_have_gradients_to_the_router(routing):
    torch.manual_seed(0)
    extra = {"top_p": 0.5, "router_entropy_loss_coef": 0.01} if routing == "topp" else {}
    block = MoEBlock(tiny_config(routing=routing, **extra), 0)
    torch.nn.init.normal_(block.gate.weight, std=0.5)
    x = torch.randn(2, 9, 64)
    _, aux = block(x)
    for name in ("load_balance", "z", "entropy"):
        block.zero_grad()
        loss = getattr(aux, name)
        assert loss.requires_grad and torch.isfinite(loss)
        loss.backward(retain_graph=True)
        grad = block.gate.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_aux_loss_values():
    uniform = torch.full((8, 4), 0.25)
    experts = torch.arange(8).remainder(4).reshape(8, 1)  # each expert picked twice
    routing = Routing(torch.zeros(8, 4), uniform, experts, torch.ones(8, 1), None)
    assert load_balance_loss(routing).item() == pytest.approx(1.0)
    assert entropy_loss(routing).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())
    assert z_loss(routing).item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)
    collapsed = Routing(
        torch.zeros(8, 4),
        torch.tensor([[1.0, 0, 0, 0]]).expand(8, 4),
        torch.zeros(8, 1, dtype=torch.long),
        torch.ones(8, 1),
        None,
    )
    assert load_balance_loss(collapsed).item() == pytest.approx(4.0)  # E when all mass on one expert


def test_model_aux_loss_is_the_weighted_sum():
    from .conftest import tiny_student

    model = tiny_student(
        routing="topp", top_p=0.5, router_entropy_loss_coef=0.1, router_z_loss_coef=0.01, router_aux_loss_coef=0.02
    )
    out = model(torch.randint(0, 96, (2, 10)), labels=torch.randint(0, 96, (2, 10)))
    parts = out.aux_losses
    expected = 0.02 * parts["load_balance"] + 0.01 * parts["z"] + 0.1 * parts["entropy"]
    torch.testing.assert_close(out.aux_loss, expected)
    assert len(out.routing_stats) == 4 and out.loss.requires_grad
    out.loss.backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0


def test_vllm_topp_routing_function_pads_with_valid_ids_and_zero_weight():
    logits = torch.log(PROBS)
    fn = functools.partial(topp_routing_function, top_p=0.6, min_k=1)
    weights, ids = fn(hidden_states=torch.zeros(3, 8), gating_output=logits, topk=3, renormalize=True)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (3, 3)
    ref_w, ref_ids, keep = select_topp(PROBS, 0.6, 1, 3)
    torch.testing.assert_close(weights, ref_w)
    assert ids[keep].tolist() == ref_ids[keep].tolist()
    # Padded slots: weight exactly 0, id = the token's top-1 expert (valid, already in use).
    assert torch.all(weights[~keep] == 0)
    assert torch.all(ids[~keep] == ids[:, :1].expand_as(ids)[~keep])
    assert ids.min() >= 0 and ids.max() < 4
    # Same output as the student's own block: sum of weight * expert over slots (duplicates add 0).
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
