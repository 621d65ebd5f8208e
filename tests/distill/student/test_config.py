"""StudentConfig validation and serialisation, and the pipeline config's ``student:`` section."""

from __future__ import annotations

import json

import pytest

from cluster.errors import ConfigError
from distill.student.config import RoutingMode, StudentConfig, default_layer_types, evenly_spaced_layers
from distill.student.section import StudentSection
from pipelines.config import load_config

SMOL = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "attention_bias": False,
}


def test_import_path_and_defaults():
    from distill.student import StudentConfig as Exported
    from distill.student import StudentForCausalLM

    assert Exported is StudentConfig and StudentForCausalLM.__name__ == "RaydistillMoeForCausalLM"
    config = StudentConfig()
    assert config.layer_types == ["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3 + [
        "full_attention"
    ]
    assert config.routing is RoutingMode.topk and config.max_k == config.num_experts


def test_default_layer_pattern_keeps_last_layer_full():
    assert default_layer_types(6) == ["sliding_attention"] * 3 + [
        "full_attention",
        "sliding_attention",
        "full_attention",
    ]
    assert default_layer_types(1) == ["full_attention"]


def test_round_trip_through_json():
    config = StudentConfig(
        routing="topp",
        top_p=0.4,
        min_k=2,
        max_k=6,
        mlp_only_layers=[0],
        shared_expert_intermediate_size=64,
        router_entropy_loss_coef=0.01,
        eos_token_id=[2, 3],
    )
    data = json.loads(config.to_json())
    assert data["routing"] == "topp" and data["layer_types"][3] == "full_attention"
    again = StudentConfig.from_dict(data)
    assert again == config and again.routing is RoutingMode.topp


@pytest.mark.parametrize(
    "kwargs, field, hint",
    [
        ({"num_attention_heads": 8, "num_key_value_heads": 3}, "num_key_value_heads", "pick one of [1, 2, 4, 8]"),
        ({"layer_types": ["full_attention"] * 3}, "layer_types", "one entry per layer"),
        ({"layer_types": ["local"] * 8}, "layer_types[0]", "allowed: full_attention, sliding_attention"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok", "use at most 8"),
        ({"routing": "topp", "min_k": 5, "max_k": 3}, "min_k", "min_k must be <= max_k"),
        ({"routing": "topp", "top_p": 1.5}, "top_p", "(0, 1]"),
        ({"routing": "topp", "max_k": 12}, "max_k", "use at most 8"),
        ({"router_entropy_loss_coef": 0.1}, "router_entropy_loss_coef", "routing: topp"),
        ({"routing": "top3"}, "routing", "allowed: topk, topp"),
        ({"head_dim": 63}, "head_dim", "even head_dim"),
        ({"mlp_only_layers": [8]}, "mlp_only_layers", "0-based"),
        ({"shared_expert_intermediate_size": -1}, "shared_expert_intermediate_size", "0 for no shared expert"),
        ({"sliding_window": 0}, "sliding_window", ">= 1"),
    ],
)
def test_bad_combinations_name_the_field_and_fix(kwargs, field, hint):
    with pytest.raises(ConfigError) as err:
        StudentConfig(**kwargs)
    assert str(err.value).startswith(f"{field}:") and hint in str(err.value)


def test_unknown_keys_are_rejected():
    with pytest.raises(ConfigError, match=r"unknown student config key\(s\) \['hidden'\]"):
        StudentConfig.from_dict({"hidden": 64})


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(30, 4) == [0, 10, 19, 29]
    assert evenly_spaced_layers(6, 6) == list(range(6))
    with pytest.raises(ConfigError, match="at most 6"):
        evenly_spaced_layers(6, 7)


def test_section_fills_gaps_from_the_teacher():
    section = StudentSection(num_experts=8, teacher_layers=[0, 9, 19, 29])
    config = section.to_student_config(SMOL)
    assert (config.vocab_size, config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (
        49152,
        576,
        9,
        3,
    )
    assert config.num_hidden_layers == 4 and config.rope_theta == 100000.0
    assert config.moe_intermediate_size == 192  # 1536 neurons / 8 experts
    assert config.eos_token_id == 2 and config.intermediate_size == 1536
    with_shared = StudentSection(num_experts=4, shared_expert_intermediate_size=512).to_student_config(SMOL)
    assert with_shared.moe_intermediate_size == 256 and with_shared.num_hidden_layers == 15  # half the teacher


def test_section_explains_an_uneven_expert_split():
    with pytest.raises(
        ConfigError, match=r"student\.moe_intermediate_size: .* does not split evenly into num_experts=7"
    ):
        StudentSection(num_experts=7).to_student_config(SMOL)


def test_section_validation_errors_carry_the_student_prefix():
    with pytest.raises(ConfigError, match=r"student\.num_key_value_heads: 4 does not divide num_attention_heads=9"):
        StudentSection(num_key_value_heads=4).to_student_config(SMOL)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["student.hidden=64"], "student.hidden: unknown key"),
        (["student.top_p=0.3"], "student.top_p: only used with routing: topp"),
        (
            ["student.routing=topp", "student.num_experts_per_tok=2"],
            "student.num_experts_per_tok: only used with routing: topk",
        ),
        (
            ["student.init=random", "student.teacher_layers=[0, 1]"],
            "student.teacher_layers: only used with init: from_teacher",
        ),
        (
            ["student.teacher_layers=[0, 1]", "student.num_hidden_layers=3"],
            "student.num_hidden_layers: 3 != len(teacher_layers)=2",
        ),
        (["student.routing=topp", "student.min_k=4", "student.max_k=2"], "student.min_k: 4 > max_k=2"),
        (["student.routing=top1"], "student.routing: invalid value 'top1'"),
        (["student.init=copy"], "student.init: invalid value 'copy'"),
        (["student.num_experts=0"], "student.num_experts"),
    ],
)
def test_pipeline_config_rejects_bad_student_sections(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_pipeline_config_accepts_student_fields():
    cfg = load_config(
        None,
        [
            "student.routing=topp",
            "student.top_p=0.4",
            "student.max_k=4",
            "student.num_experts=8",
            "student.layer_types=[sliding_attention, full_attention]",
            "student.num_hidden_layers=2",
        ],
    )
    assert isinstance(cfg.student, StudentSection)
    assert cfg.student.init == "from_teacher" and cfg.student.top_p == 0.4
    assert load_config(None).student.explicit_fields() == {}
