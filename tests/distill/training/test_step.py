"""One optimizer step's forward/backward (``train_step``) and its logged metrics, in one process."""

from __future__ import annotations

import torch

from distill.losses import LossWeights
from distill.training.loop import DistillModule, step_metrics, train_step
from tests.distill.training.tiny import batch, grads, row, tiny_model

NO_AUX = dict(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)  # the KD terms alone decide the gradient


def test_micro_batches_weigh_every_target_token_the_same():
    """A short and a long micro-batch give the gradient of one batch holding both: the step's token mean."""
    torch.manual_seed(0)
    short, long = row(1, prompt_len=4, completion_len=3), row(2, prompt_len=3, completion_len=24)
    weights = LossWeights(forward_kl=1.0, ce=0.3)
    device = torch.device("cpu")

    model = tiny_model(**NO_AUX)
    module = DistillModule(model, chunk_size=16)
    result = train_step(module, [batch([[short]]), batch([[long]])], weights, world=1, device=device)
    got = grads(model)
    metrics = step_metrics(result, 1, device)

    model.zero_grad(set_to_none=True)
    both = batch([[short], [long]])
    losses, _ = module(
        both.input_ids,
        both.attention_mask,
        both.position_ids,
        both.pred_index,
        both.targets,
        both.topk_ids,
        both.topk_logprobs,
        weights=weights,
    )
    losses.loss.backward()
    ref = grads(model)

    assert result.global_tokens == both.tokens == 3 + 24
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # the logged values are the step's token-weighted means, not the last micro-batch's
    assert abs(metrics["loss"] - float(losses.loss.detach())) < 1e-5
    assert abs(metrics["kl"] - float(losses.parts["kl"])) < 1e-5
    assert abs(metrics["parts"]["ce"] - float(losses.parts["ce"])) < 1e-5
    assert abs(metrics["top1"] - float(losses.top1_agreement)) < 1e-6


def test_aux_losses_are_averaged_over_micro_batches():
    model = tiny_model(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    module = DistillModule(model, chunk_size=16)
    a, b = batch([[row(3, 2, 5)]]), batch([[row(4, 2, 9)]])
    result = train_step(module, [a, b], LossWeights(), world=1, device=torch.device("cpu"))
    metrics = step_metrics(result, 1, torch.device("cpu"))
    with torch.no_grad():
        auxes = [
            module(
                x.input_ids,
                x.attention_mask,
                x.position_ids,
                x.pred_index,
                x.targets,
                x.topk_ids,
                x.topk_logprobs,
                weights=LossWeights(),
            )[1]
            for x in (a, b)
        ]
    expected = {k: sum(float(o.aux_losses[k]) for o in auxes) / 2 for k in auxes[0].aux_losses}
    assert metrics["aux"].keys() == expected.keys()
    for k in expected:
        assert abs(metrics["aux"][k] - expected[k]) < 1e-6
    kd = metrics["parts"]["forward_kl"]
    assert abs(metrics["loss"] - kd - sum(float(o.aux_loss) for o in auxes) / 2) < 1e-5


def test_difficulty_routing_term_joins_the_aux_loss_with_its_coefficient():
    from distill.losses import difficulty_routing_loss, teacher_entropy

    model = tiny_model(routing="topp", top_p=0.5, **NO_AUX)
    module = DistillModule(model, chunk_size=16)
    b = batch([[row(5, 3, 12)], [row(6, 2, 10)]])
    args = (b.input_ids, b.attention_mask, b.position_ids, b.pred_index, b.targets, b.topk_ids, b.topk_logprobs)
    _, plain = module(*args, weights=LossWeights())
    _, with_term = module(*args, weights=LossWeights(), difficulty_coef=0.5)
    assert "difficulty" not in plain.aux_losses
    expected = difficulty_routing_loss(
        with_term.router_entropy.reshape(-1)[b.pred_index], teacher_entropy(b.topk_ids, b.topk_logprobs)
    )
    got, total, base = (
        float(t.detach()) for t in (with_term.aux_losses["difficulty"], with_term.aux_loss, plain.aux_loss)
    )
    assert abs(got - float(expected.detach())) < 1e-6 and got != 0.0
    assert abs(total - base - 0.5 * got) < 1e-6
    # its gradient reaches every router, and nothing computed after the last router (last experts, head)
    model.zero_grad(set_to_none=True)
    with_term.aux_losses["difficulty"].backward()
    touched = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"} <= touched
    assert not any(n.startswith(("model.layers.1.mlp.experts", "lm_head", "model.norm")) for n in touched)


def test_an_optimizer_step_reaches_the_weights_the_no_grad_forward_uses():
    """The optimizer is fused on CPU, and the fused kernel leaves version counters alone: the no-grad
    forward (held-out scoring) must still use the stepped weights, not the fused q/k/v and gate/up
    stacks it cached before the step."""
    from distill.training.loop import build_optimizer, clip_and_step
    from distill.training.section import TrainSection

    torch.manual_seed(0)
    model = tiny_model(**NO_AUX)
    module = DistillModule(model, chunk_size=16)
    section = TrainSection.model_validate({"lr": 1e-2, "stages": [{"name": "kd", "steps": 1}]})
    optimizer = build_optimizer(module, section)
    assert all(group["fused"] for group in optimizer.param_groups)
    ids = torch.randint(3, 64, (1, 12))
    with torch.no_grad():
        model(input_ids=ids)  # builds the stacks from the weights before the step
    train_step(
        module, [batch([[row(1, prompt_len=4, completion_len=8)]])], LossWeights(forward_kl=1.0), 1, torch.device("cpu")
    )
    clip_and_step(module, optimizer, [], grad_clip=1.0)
    with torch.no_grad():
        stepped = model(input_ids=ids).logits
        for m in model.modules():  # the reference: every stack dropped, rebuilt from the current weights
            for attr in ("_qkv", "_gate_up", "_dense"):
                if hasattr(m, attr):
                    delattr(m, attr)
        rebuilt = model(input_ids=ids).logits
    torch.testing.assert_close(stepped, rebuilt)
