"""Initialisation from a Llama teacher: exact FFN reproduction with all experts on, same greedy tokens."""

from __future__ import annotations

import pytest
import torch

from cluster.errors import ConfigError
from distill.student.init import init_from_teacher, load_teacher, neuron_partition, prune_teacher
from distill.student.moe import all_experts_active
from distill.student.section import StudentSection


def _student_config(teacher, **fields):
    return StudentSection(**fields).to_student_config(teacher.config)


@pytest.mark.parametrize(
    "fields",
    [
        {"num_experts": 4, "teacher_layers": [0, 2, 3, 5]},
        {"num_experts": 4, "shared_expert_intermediate_size": 32, "num_hidden_layers": 3, "mlp_only_layers": [1]},
        {"num_experts": 8, "routing": "topp", "top_p": 0.5, "teacher_layers": [5, 1]},
    ],
)
def test_all_experts_active_reproduces_the_pruned_teachers_ffn(tiny_teacher_dir, fields):
    teacher = load_teacher(tiny_teacher_dir)
    config = _student_config(teacher, **fields)
    layers = fields.get("teacher_layers") or [0, 3, 5]  # evenly spaced 3 of 6
    student = init_from_teacher(tiny_teacher_dir, config, fields.get("teacher_layers"))
    x = torch.randn(3, 10, 64)
    with torch.no_grad(), all_experts_active(student):
        for i, t in enumerate(layers):
            want = teacher.model.layers[t].mlp(x)
            got = student.model.layers[i].mlp(x)
            got = got[0] if isinstance(got, tuple) else got
            assert (got - want).abs().max().item() < 1e-5, (i, t)
            assert want.abs().max().item() > 1e-2  # not trivially zero
            torch.testing.assert_close(
                student.model.layers[i].self_attn.q_proj.weight, teacher.model.layers[t].self_attn.q_proj.weight
            )
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert student.config.eos_token_id == 2


def test_default_layers_are_evenly_spaced_and_prune_teacher_matches(tiny_teacher_dir):
    teacher = load_teacher(tiny_teacher_dir)
    student = init_from_teacher(teacher, _student_config(teacher, num_experts=4, num_hidden_layers=3))
    pruned = prune_teacher(teacher, [0, 3, 5])
    assert pruned.config.num_hidden_layers == 3
    for i, t in enumerate([0, 3, 5]):
        torch.testing.assert_close(
            student.model.layers[i].self_attn.o_proj.weight, teacher.model.layers[t].self_attn.o_proj.weight
        )
    torch.testing.assert_close(pruned.model.layers[2].mlp.up_proj.weight, teacher.model.layers[5].mlp.up_proj.weight)


@pytest.mark.parametrize(
    "fields",
    [
        {"num_experts": 4, "num_hidden_layers": 3},
        {"num_experts": 4, "shared_expert_intermediate_size": 64, "num_hidden_layers": 4},
    ],
)
def test_student_from_teacher_greedy_tokens_match_pruned_teacher(tiny_teacher_dir, fields):
    teacher = load_teacher(tiny_teacher_dir)
    config = _student_config(teacher, **fields)
    student = init_from_teacher(teacher, config)
    from distill.student.config import evenly_spaced_layers

    pruned = prune_teacher(teacher, evenly_spaced_layers(6, config.num_hidden_layers))
    prompts = [[1, 17, 42, 8, 9], [1, 60, 61], [1, 5, 5, 5, 5, 5, 5, 5, 5, 5, 90]]
    for prompt in prompts:
        ids = torch.tensor([prompt])
        want = pruned.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        with all_experts_active(student):
            got = student.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
            with torch.no_grad():
                diff = (student(want).logits - pruned(want).logits).abs().max().item()
        assert got.tolist() == want.tolist()
        assert diff < 1e-4


def test_topk_student_from_teacher_routes_tokens_to_different_experts(tiny_teacher_dir):
    """The near-uniform router still breaks ties per token, so load is spread (not experts 0..k-1 for all)."""
    torch.manual_seed(0)  # the random inputs below, independent of the tests that ran before
    teacher = load_teacher(tiny_teacher_dir)
    student = init_from_teacher(
        teacher, _student_config(teacher, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2)
    )
    probs = torch.softmax(student.model.layers[0].mlp.gate(torch.randn(200, 64)).logits, -1)
    assert (probs - 1 / 8).abs().max().item() < 1e-5
    with torch.no_grad():
        out = student(torch.randint(3, 96, (4, 50)))
    load = out.routing_stats[0].expert_load
    assert (load > 0).all() and load.max().item() < 0.3


def test_neuron_partition_covers_every_neuron_once():
    gate, up, down = torch.randn(40, 8), torch.randn(40, 8), torch.randn(8, 40)
    shared, experts = neuron_partition(gate, up, down, 4, 8, 8, expert_split="random", seed=3)
    everything = torch.cat([shared] + experts).sort().values
    assert everything.tolist() == list(range(40))
    importance = gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)
    assert set(shared.tolist()) == set(importance.topk(8).indices.tolist())
    with pytest.raises(ConfigError, match="the teacher FFN has 40 neurons"):
        neuron_partition(gate, up, down, 4, 9, 0)


def test_incompatible_student_config_is_explained(tiny_teacher_dir):
    teacher = load_teacher(tiny_teacher_dir)
    config = _student_config(teacher, num_experts=4, num_hidden_layers=2).replace(hidden_size=32, head_dim=8)
    with pytest.raises(ConfigError, match=r"student.hidden_size=32 differs from the teacher's 64"):
        init_from_teacher(teacher, config)
    config = _student_config(teacher, num_experts=4, num_hidden_layers=2)
    with pytest.raises(ConfigError, match="teacher_layers has 3 entries but num_hidden_layers=2"):
        init_from_teacher(teacher, config, [0, 1, 2])
    with pytest.raises(ConfigError, match="moe_intermediate_size=16 x num_experts=4"):
        init_from_teacher(teacher, config.replace(moe_intermediate_size=16))


@pytest.mark.slow
def test_smollm2_student_first_greedy_tokens_match_pruned_teacher(builtin_teacher_dir, builtin_teacher_model):
    from transformers import AutoTokenizer

    model_dir = builtin_teacher_dir

    teacher = load_teacher(builtin_teacher_model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = StudentSection(num_experts=8, num_hidden_layers=10).to_student_config(teacher.config)
    assert config.moe_intermediate_size == 192
    student = init_from_teacher(teacher, config)
    from distill.student.config import evenly_spaced_layers

    pruned = prune_teacher(teacher, evenly_spaced_layers(30, 10))
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        want = pruned.generate(ids, max_new_tokens=5, do_sample=False)
        with all_experts_active(student):
            got = student.generate(ids, max_new_tokens=5, do_sample=False)
        assert got.tolist() == want.tolist(), text
