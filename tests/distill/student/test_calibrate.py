"""Calibrated init: layers by importance, experts from co-active neurons, routers fitted to contributions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cluster.errors import ConfigError
from distill.student import calibrate
from distill.student.config import evenly_spaced_layers
from distill.student.init import CalibrationOptions, build_from_teacher, load_teacher, prune_teacher
from distill.student.section import StudentSection


def _samples(model, count: int, length: int, seed: int) -> list[list[int]]:
    """Text the model itself writes: its own NLL on it is low, so pruning damage shows."""
    torch.manual_seed(seed)
    start = torch.full((count, 1), 1, dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            start,
            attention_mask=torch.ones_like(start),
            do_sample=True,
            max_new_tokens=length - 1,
            min_new_tokens=length - 1,
            pad_token_id=0,
            top_k=0,
            top_p=1.0,
        )
    return out.tolist()


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_teacher(tiny_teacher_dir)


@pytest.fixture(scope="module")
def calibration(teacher):
    return _samples(teacher, 24, 48, seed=0)


@pytest.fixture(scope="module")
def heldout(teacher):
    return _samples(teacher, 16, 48, seed=1)


def test_importance_finds_planted_redundant_layers_and_beats_evenly_spaced(tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    # 6 layers; layers 1 and 4 are planted near-redundant (their residual branches ~ 0).
    with torch.no_grad():
        for i in (1, 4):
            model.model.layers[i].self_attn.o_proj.weight.mul_(0.01)
            model.model.layers[i].mlp.down_proj.weight.mul_(0.01)
    calib = calibrate.batches(_samples(model, 16, 48, seed=0), 48, 10_000)
    evaluation = calibrate.batches(_samples(model, 16, 48, seed=1), 48, 10_000)
    choice = calibrate.layer_importance(model, calib, keep=3)
    even = evenly_spaced_layers(6, 3)  # [0, 2, 5]: keeps no planted layer, drops two real ones
    assert 1 not in choice.layers and 4 not in choice.layers
    assert len(choice.layers) == 3 and choice.layers == sorted(choice.layers)
    assert max(choice.importance[1], choice.importance[4]) < min(choice.importance[i] for i in choice.layers)
    chosen_nll = calibrate.mean_nll(prune_teacher(model, choice.layers), evaluation)
    even_nll = calibrate.mean_nll(prune_teacher(model, even), evaluation)
    assert chosen_nll < even_nll
    # The iterative variant, and the loss criterion, also drop both planted layers first.
    assert not {1, 4} & set(calibrate.layer_importance(model, calib, keep=4, rounds=2).layers)
    assert not {1, 4} & set(calibrate.layer_importance(model, calib, keep=4, criterion="nll").layers)


@pytest.mark.parametrize("block_rows", [calibrate.HEAD_BLOCK_ROWS, 7])  # one block per chunk; blocks across rows
@pytest.mark.parametrize("criterion", ["kl", "nll"])
def test_drop_one_matches_pruned_models(tiny_teacher_dir, criterion, block_rows):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    chunks = calibrate.batches(_samples(model, 8, 24, seed=2), 24, 10_000)
    base, damage = calibrate.drop_one(model, chunks, criterion, block_rows=block_rows)
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        for i in (0, layers - 1):
            pruned = prune_teacher(model, [j for j in range(layers) if j != i])
            if criterion == "nll":
                expected = calibrate.mean_nll(pruned, chunks)
            else:  # KL(full || pruned) over every position, averaged
                kls = []
                for ids in chunks:
                    ref = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
                    logp = torch.log_softmax(pruned(input_ids=ids).logits.double(), -1)
                    kls.append((ref.exp() * (ref - logp)).sum(-1).reshape(-1))
                expected = torch.cat(kls).mean().item()
            assert damage[i] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert base == (pytest.approx(calibrate.mean_nll(model, chunks), rel=1e-5) if criterion == "nll" else 0.0)
    assert min(damage) > 0


def test_next_token_entropy_is_the_full_models_entropy_at_every_position(tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    chunks = calibrate.batches(_samples(model, 8, 24, seed=3), 24, 10_000)
    with torch.no_grad():
        logp = [torch.log_softmax(model(input_ids=ids).logits.double(), -1) for ids in chunks]
    expected = torch.cat([-(lp.exp() * lp).sum(-1).reshape(-1) for lp in logp])  # [N] in chunk, row, position order
    got = calibrate.next_token_entropy(model, chunks)
    assert got.shape == (sum(ids.numel() for ids in chunks),)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_cluster_neurons_partitions_and_groups_co_active_neurons():
    # 4 groups of 8 neurons; each token activates one group strongly.
    torch.manual_seed(0)
    tokens, groups, size = 400, 4, 8
    which = torch.randint(0, groups, (tokens,))
    contrib = torch.rand(tokens, groups * size) * 0.05
    for g in range(groups):
        contrib[which == g, g * size : (g + 1) * size] += 1.0
    perm = torch.randperm(groups * size)  # hide the groups' order
    contrib = contrib[:, perm]
    shared, experts = calibrate.cluster_neurons(
        contrib, num_experts=4, expert_size=8, shared_size=0, active_fraction=0.25
    )
    assert shared.numel() == 0 and all(e.numel() == 8 for e in experts)
    assert sorted(torch.cat(experts).tolist()) == list(range(32))
    for e in experts:
        assert len({int(perm[j]) // size for j in e}) == 1  # each expert is one co-active group
    # The shared expert takes the most frequently active neurons.
    contrib[:, :3] += 2.0  # neurons 0..2 are strong for every token
    shared, experts = calibrate.cluster_neurons(contrib, num_experts=29, expert_size=1, shared_size=3)
    assert shared.tolist() == [0, 1, 2]


def _greedy_pair_walk(similarity: torch.Tensor, capacity: int) -> torch.Tensor:
    """The definition of the balanced assignment: walk every (item, cluster) pair, best first."""
    items, clusters = similarity.shape
    assign = torch.full((items,), -1, dtype=torch.long)
    room = [capacity] * clusters
    for flat in torch.argsort(similarity.reshape(-1), descending=True).tolist():
        j, e = divmod(flat, clusters)
        if assign[j] < 0 and room[e]:
            assign[j], room[e] = e, room[e] - 1
    return assign


@pytest.mark.parametrize("seed", range(6))
def test_balanced_assignment_equals_the_best_first_pair_walk(seed):
    gen = torch.Generator().manual_seed(seed)
    clusters, capacity = [(4, 8), (8, 16), (3, 5)][seed % 3]
    # Skewed similarities: most items prefer the same cluster, so clusters fill and items are re-placed.
    similarity = torch.rand(clusters * capacity, clusters, generator=gen) + torch.linspace(0.6, 0, clusters)
    got = calibrate._balanced_assign(similarity, capacity)
    assert torch.equal(got, _greedy_pair_walk(similarity, capacity))
    assert torch.bincount(got, minlength=clusters).tolist() == [capacity] * clusters


def test_cluster_neurons_prunes_the_least_contributing_neurons_when_asked_for_fewer():
    torch.manual_seed(0)
    contrib = torch.rand(300, 24)
    contrib[:, [3, 10, 17, 20]] *= 0.01  # four neurons that barely move any token's output
    shared, experts = calibrate.cluster_neurons(contrib, num_experts=4, expert_size=4, shared_size=4)
    kept = sorted(shared.tolist() + torch.cat(experts).tolist())
    assert kept == [j for j in range(24) if j not in (3, 10, 17, 20)]
    assert all(e.numel() == 4 for e in experts) and shared.numel() == 4
    with pytest.raises(ValueError, match="> 24 neurons"):
        calibrate.cluster_neurons(contrib, num_experts=4, expert_size=6, shared_size=4)


def test_sequential_samples_follow_the_ffns_the_student_actually_got(teacher, calibration):
    import copy

    layers = [0, 2, 3, 5]
    chunks = calibrate.batches(calibration, 48, 10_000)
    pruned = prune_teacher(teacher, layers)
    # Advancing with the dense FFNs reproduces the model's own forward, layer by layer.
    dense = calibrate.capture_ffn(pruned, chunks)
    seq = calibrate.SequentialFFN(pruned, chunks)
    for i, layer in enumerate(pruned.model.layers):
        torch.testing.assert_close(seq.sample(i).x, dense[i].x, rtol=1e-5, atol=1e-5)
        seq.advance(layer.mlp)
    # correct=True: the target is what layer i's FFN must add to land on the dense model's stream; with the
    # dense FFNs so far that is just the dense FFN's output; after a changed FFN it also undoes the change.
    seq = calibrate.SequentialFFN(pruned, chunks, correct=True)
    for i, layer in enumerate(pruned.model.layers):
        sample = seq.sample(i)
        torch.testing.assert_close(seq.target, layer.mlp(sample.x), rtol=1e-4, atol=1e-4)
        seq.advance(layer.mlp)
    # Advancing with another FFN gives the inputs of a model whose FFN was replaced by it.
    halved = copy.deepcopy(pruned)
    halved.model.layers[1].mlp.down_proj.weight.data.mul_(0.5)
    want = calibrate.capture_ffn(halved, chunks)
    seq = calibrate.SequentialFFN(pruned, chunks)
    for i in range(len(pruned.model.layers)):
        got = seq.sample(i).x
        torch.testing.assert_close(got, want[i].x, rtol=1e-5, atol=1e-5)
        if i == 2:
            assert (got - dense[i].x).abs().max() > 1e-2  # the change really reached later layers
        seq.advance(halved.model.layers[i].mlp)
    seq = calibrate.SequentialFFN(pruned, chunks, correct=True)
    seq.sample(0)
    seq.advance(pruned.model.layers[0].mlp)
    seq.sample(1)
    seq.advance(halved.model.layers[1].mlp)  # this layer's FFN now adds half of what the dense one does
    seq.sample(2)
    # An FFN that adds exactly the target puts the student back on the dense model's stream.
    pieces = iter(seq.target.split([c.numel() for c in chunks]))
    seq.advance(lambda x: next(pieces).reshape(x.shape))
    torch.testing.assert_close(seq.sample(3).x, dense[3].x, rtol=1e-4, atol=1e-4)


def test_sequential_calibration_fits_layers_to_the_students_own_inputs(teacher, calibration, heldout):
    layers = [0, 2, 3, 5]
    config = _config(teacher, num_experts=4, teacher_layers=layers, routing="topp", top_p=0.6, max_k=3)
    built = {
        flag: build_from_teacher(
            teacher, config, layers, calibration=calibration, options=CalibrationOptions(seq_len=48, sequential=flag)
        ).model
        for flag in (False, True)
    }
    # Layer 0 sees the same inputs either way: identical; later layers were fitted on other inputs.
    state = {flag: m.state_dict() for flag, m in built.items()}
    assert all(torch.equal(state[True][k], v) for k, v in state[False].items() if k.startswith("model.layers.0."))
    assert any(
        not torch.equal(state[True][k], v) for k, v in state[False].items() if k.startswith("model.layers.3.mlp")
    )
    chunks = calibrate.batches(heldout, 48, 10_000)
    for model in built.values():
        assert math.isfinite(calibrate.mean_nll(model, chunks))


def _layer_sample(teacher, calibration, layer):
    pruned = prune_teacher(teacher, list(range(teacher.config.num_hidden_layers)))
    return calibrate.capture_ffn(pruned, calibrate.batches(calibration, 48, 10_000))[layer]


@pytest.mark.parametrize("layer", [1, 4])
def test_router_init_ranks_experts_by_their_actual_contribution(teacher, calibration, heldout, layer):
    mlp = teacher.model.layers[layer].mlp
    down = mlp.down_proj.weight
    fit = _layer_sample(teacher, calibration, layer)
    _, experts = calibrate.cluster_neurons(calibrate.neuron_contributions(fit.act, down), 4, 32, 0)
    router = calibrate.fit_router(fit.x, calibrate.expert_outputs(fit.act, down, experts))
    test = _layer_sample(teacher, heldout, layer)
    actual = calibrate.expert_outputs(test.act, down, experts).norm(dim=-1)  # [N, E]
    logits = test.x @ router.t()  # [N, E]

    def rank_corr(a, b):
        ra, rb = a.argsort(1).argsort(1).float(), b.argsort(1).argsort(1).float()
        ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
        return ((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp(min=1e-9)).mean().item()

    top1 = (logits.argmax(1) == actual.argmax(1)).float().mean().item()
    assert rank_corr(logits, actual) > 0.5, rank_corr(logits, actual)
    assert top1 > 0.5  # chance is 0.25 with 4 experts
    generator = torch.Generator().manual_seed(0)
    chance = sum(rank_corr(test.x @ torch.randn(router.shape, generator=generator).t(), actual) for _ in range(16)) / 16
    assert abs(chance) < 0.2  # a random router ranks experts no better than chance on average


def _config(teacher, **fields):
    return StudentSection(**fields).to_student_config(teacher.config)


def test_calibrated_topp_routes_a_different_number_of_experts_per_token(teacher, calibration, heldout):
    config = _config(teacher, num_experts=4, num_hidden_layers=4, routing="topp", top_p=0.6, min_k=1, max_k=4)
    result = build_from_teacher(
        teacher, config, calibration=calibration, options=CalibrationOptions(seq_len=48, importance_tokens=512)
    )
    assert result.calibration_tokens > 0 and len(result.layer_importance) == 6
    inputs = []
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda m, a: inputs.append((m, a[0].reshape(-1, a[0].shape[-1]))))
        for layer in result.model.model.layers
    ]
    with torch.no_grad():
        result.model(torch.tensor(heldout))
    for h in hooks:
        h.remove()
    for block, x in inputs:
        kept = block.gate(x).mask.sum(1)  # [N] experts used per token
        assert len(set(kept.tolist())) >= 2, kept.unique()
        assert kept.float().mean().item() < 4
    # Data-free, the near-uniform router keeps max_k for every token: what calibration fixes.
    free = build_from_teacher(teacher, config, result.layers).model
    x = inputs[0][1]
    assert set(free.model.layers[0].mlp.gate(x).mask.sum(1).tolist()) == {3}  # 1/4 each: 3 needed to pass 0.6


@pytest.mark.parametrize(
    "routing", [{"routing": "topp", "top_p": 0.6, "max_k": 3}, {"routing": "topk", "num_experts_per_tok": 2}]
)
def test_calibrated_routed_block_approximates_the_dense_ffn_better_than_data_free(
    teacher, calibration, heldout, routing
):
    layers = [0, 2, 3, 5]
    config = _config(teacher, num_experts=4, teacher_layers=layers, **routing)
    calibrated = build_from_teacher(
        teacher, config, layers, calibration=calibration, options=CalibrationOptions(seq_len=48)
    ).model
    free = build_from_teacher(teacher, config, layers).model
    pruned = prune_teacher(teacher, layers)
    captured = calibrate.capture_ffn(pruned, calibrate.batches(heldout, 48, 10_000))
    for i, t in enumerate(layers):
        x = captured[i].x
        dense = teacher.model.layers[t].mlp(x)
        errors = {}
        for name, model in (("calibrated", calibrated), ("free", free)):
            with torch.no_grad():
                out, _ = model.model.layers[i].mlp(x[None])
            errors[name] = ((out[0] - dense).norm() / dense.norm()).item()
        assert errors["calibrated"] < errors["free"], (i, errors)
        assert errors["calibrated"] < 0.9, (i, errors)


def _refit_or_not(teacher, config, layers, calibration, heldout) -> dict:
    """Students built without (ridge None) and with the down-projection refit; asserts that on held-out text
    each refitted block reproduces the teacher's dense FFN better. Returns {ridge: model}."""
    models = {
        ridge: build_from_teacher(
            teacher, config, layers, calibration=calibration, options=CalibrationOptions(seq_len=48, down_ridge=ridge)
        ).model
        for ridge in (None, 1e-2)
    }
    captured = calibrate.capture_ffn(prune_teacher(teacher, layers), calibrate.batches(heldout, 48, 10_000))
    for i, t in enumerate(layers):
        x = captured[i].x
        dense = teacher.model.layers[t].mlp(x)
        errors = {}
        for ridge, model in models.items():
            with torch.no_grad():
                out, _ = model.model.layers[i].mlp(x[None])
            errors[ridge] = ((out[0] - dense).norm() / dense.norm()).item()
        assert errors[1e-2] < errors[None], (i, errors)
    return models


def test_refitted_down_projections_reproduce_the_dense_ffn_better_on_heldout_text(teacher, calibration, heldout):
    layers = [0, 2, 3, 5]
    config = _config(teacher, num_experts=4, teacher_layers=layers, routing="topp", top_p=0.6, max_k=3)
    models = _refit_or_not(teacher, config, layers, calibration, heldout)
    # The routers and the neurons in each expert are the same; only the down projections moved.
    for name, value in models[None].state_dict().items():
        if "down_proj" not in name:
            torch.testing.assert_close(models[1e-2].state_dict()[name], value, msg=name)


def test_width_pruned_init_keeps_the_asked_neurons_and_the_refit_makes_up_for_the_rest(teacher, calibration, heldout):
    layers = [0, 2, 3, 5]
    total = teacher.config.intermediate_size
    shared, num_experts = total // 8, 4
    expert_size = (total - shared) // num_experts * 3 // 4  # a quarter of the routed neurons pruned
    config = _config(
        teacher,
        num_experts=num_experts,
        teacher_layers=layers,
        routing="topp",
        top_p=0.6,
        max_k=3,
        shared_expert_intermediate_size=shared,
        moe_intermediate_size=expert_size,
    )
    block = _refit_or_not(teacher, config, layers, calibration, heldout)[1e-2].model.layers[0].mlp
    assert block.experts[0].gate_proj.weight.shape[0] == expert_size and len(block.experts) == num_experts
    assert block.shared_expert.up_proj.weight.shape[0] == shared
    with pytest.raises(ConfigError, match="data-free init partitions the neurons exactly"):
        build_from_teacher(teacher, config, layers)


def test_fit_down_projections_recovers_known_projections_and_the_ridge_pulls_to_the_initial():
    torch.manual_seed(0)
    act = torch.randn(400, 10)  # [N, J]: 2 shared neurons, 2 experts of 4
    shared, experts = torch.tensor([0, 5]), [torch.tensor([1, 2, 3, 4]), torch.tensor([6, 7, 8, 9])]
    weights = F.softmax(torch.randn(400, 2), dim=1) * (torch.rand(400, 2) < 0.7)  # [N, E], 0 = not chosen
    truth = torch.randn(3, 10)  # [H, S + E*m] in the function's column order
    features = torch.cat([act[:, shared]] + [act[:, idx] * weights[:, e : e + 1] for e, idx in enumerate(experts)], 1)
    target = features @ truth.t()  # [N, H]
    initial = torch.zeros(3, 10)
    fitted = calibrate.fit_down_projections(act, weights, shared, experts, initial, target, ridge=1e-9)
    torch.testing.assert_close(fitted, truth, rtol=1e-4, atol=1e-4)
    stiff = calibrate.fit_down_projections(act, weights, shared, experts, initial + 1.0, target, ridge=1e6)
    torch.testing.assert_close(stiff, initial + 1.0, rtol=1e-3, atol=1e-3)


def test_fit_expert_scales_recovers_known_scales():
    torch.manual_seed(0)
    outputs = torch.randn(200, 3, 5)
    weights = F.softmax(torch.randn(200, 3), dim=1)
    truth = torch.tensor([2.0, 0.5, 3.0])
    target = (weights[:, :, None] * truth[None, :, None] * outputs).sum(1)
    torch.testing.assert_close(
        calibrate.fit_expert_scales(weights, outputs, target, ridge=1e-8), truth, rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("shared", [0, 48])
@pytest.mark.parametrize("routing", [{"routing": "topp", "top_p": 0.5, "max_k": 3}, {"routing": "topk"}])
def test_dense_small_batch_path_equals_the_routed_dispatch(routing, shared):
    """A decode step of a few streams runs every expert densely, scaled by the routing weights: the same
    output as the routed dispatch, padding tokens included; rebuilt after an in-place weight change; a
    single stream (N * max_k < E) and autograd keep the routed path."""
    from distill.student.moe import MoEBlock

    from .conftest import tiny_config

    torch.manual_seed(0)
    block = MoEBlock(tiny_config(initializer_range=0.2, shared_expert_intermediate_size=shared, **routing), 0).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 12, 64)
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[0, 3] = mask[0, 7] = False
    calls = []
    block.matmul = lambda *args: calls.append(args[1].shape) or F.linear(*args)

    def both(inputs, token_mask=None):
        block.dense_max_tokens = 0
        routed, routed_aux = block(inputs, token_mask, compute_aux=False)
        block.dense_max_tokens = 32
        dense, dense_aux = block(inputs, token_mask, compute_aux=False)
        # The routing statistics agree too (the dense path counts its choices in expert order).
        for name in ("tokens", "experts_per_token", "expert_load"):
            torch.testing.assert_close(getattr(dense_aux.stats, name), getattr(routed_aux.stats, name))
        return routed, dense

    hooked = []  # the eval records routing with forward hooks on the router: both paths must call it
    block.gate.register_forward_hook(lambda _m, _i, out: hooked.append(out.experts.shape))
    with torch.no_grad():
        routed, dense = both(x)
        assert len(hooked) == 2 and hooked[0] == hooked[1]
        torch.testing.assert_close(dense, routed, rtol=1e-5, atol=1e-5)
        width = 4 * block.experts[0].down_proj.in_features + shared  # every expert side by side
        # One matmul for every expert's gate and up rows, one for the projection back; the router's 4 rows
        # and the shared-expert gate's stay out of the first (an odd width slows oneDNN).
        assert calls == [(2 * width, 64), (64, width)]
        routed_masked, dense_masked = both(x, mask)
        torch.testing.assert_close(dense_masked, routed_masked, rtol=1e-5, atol=1e-5)
        block.experts[1].down_proj.weight.mul_(2.0)  # in-place weight change: the dense copy is rebuilt
        routed2, dense2 = both(x)
        torch.testing.assert_close(dense2, routed2, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(routed, routed2)
        block.gate.weight.mul_(-1.0)  # so is a router change: other experts chosen, the same on both paths
        routed3, dense3 = both(x)
        torch.testing.assert_close(dense3, routed3, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(routed2, routed3)
        calls.clear()
        both(x[:, :1])  # one stream: 1 x max_k < 4 experts, the routed path
    assert calls == []
    block.train()
    block(x, compute_aux=False)[0].sum().backward()  # autograd: the routed path, gradients to every expert
    assert calls == []
    assert all(p.grad is not None for p in block.experts.parameters())


def test_difficulty_sharpness_is_flatter_for_harder_tokens():
    d = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0])
    s = calibrate.difficulty_sharpness(3.0, d, 1.0)
    assert s.shape == (5,) and bool((s[1:] < s[:-1]).all())  # harder -> lower sharpness -> flatter target
    assert float(s[0]) > 3.0 > float(s[-1])
    assert calibrate.difficulty_sharpness(3.0, d, 0.0) == 3.0 and calibrate.difficulty_sharpness(3.0, None, 1.0) == 3.0


def test_router_fitted_with_difficulty_routes_harder_tokens_to_more_experts():
    """Difficulty readable from the router input (here its norm): harder tokens end up with more experts."""
    torch.manual_seed(0)
    n, h, e = 2000, 16, 8
    direction = F.normalize(torch.randn(n, h), dim=1) * h**0.5  # which experts contribute
    magnitude = torch.rand(n, 1) + 0.5
    x = direction * magnitude  # [N, H]
    shares = (direction @ torch.randn(h, e) * 0.5).exp()  # [N, E] expert output norms, set by the direction
    outputs = shares.unsqueeze(-1) * torch.ones(n, e, h) / h**0.5  # [N, E, H]
    difficulty = -magnitude.squeeze(1)  # small inputs are the "hard" tokens
    hard, easy = difficulty > difficulty.quantile(0.8), difficulty < difficulty.quantile(0.2)

    def experts_used(scale: float) -> torch.Tensor:
        sharp = calibrate.difficulty_sharpness(3.0, difficulty, scale)
        router = calibrate.fit_router(x, outputs, sharp, steps=100)
        return (calibrate.route(x @ router.t(), "topp", 2, 0.4, 1, 4, True) > 0).sum(1).float()

    gaps = []
    for scale in (0.0, 1.0, 2.0):
        used = experts_used(scale)
        gaps.append(float(used[hard].mean() - used[easy].mean()))
    # measured: 0.16, 0.21, 0.42 (seed 0); 0.17, 0.26, 0.48 (seed 1)
    assert gaps[0] < gaps[1] < gaps[2] and gaps[2] > gaps[0] + 0.15
