"""The gate passes and fails where it should: direction, margin, reference choice, missing numbers."""

from __future__ import annotations

import pytest

from cluster.errors import ConfigError
from distill.eval.gate import choose_reference, evaluate_gate, verdict
from pipelines.config import load_config


@pytest.mark.parametrize(
    "direction, margin, value, reference, passed",
    [
        ("lower", 0.0, 1.20, 1.30, True),  # better
        ("lower", 0.0, 1.30, 1.30, True),  # equal passes at margin 0
        ("lower", 0.0, 1.31, 1.30, False),  # worse
        ("lower", 0.05, 1.34, 1.30, True),  # worse, within the slack
        ("lower", 0.05, 1.36, 1.30, False),  # worse than the slack allows
        ("lower", -0.05, 1.27, 1.30, False),  # negative margin: must improve by 0.05
        ("lower", -0.05, 1.24, 1.30, True),
        ("higher", 0.0, 0.80, 0.70, True),
        ("higher", 0.0, 0.69, 0.70, False),
        ("higher", 0.02, 0.69, 0.70, True),
        ("higher", -0.05, 0.72, 0.70, False),
    ],
)
def test_verdict_direction_and_margin(direction, margin, value, reference, passed):
    out = verdict("bpb_heldout", direction, margin, value, reference, "baseline")
    assert out["passed"] is passed
    assert out["value"] == value and out["reference"] == reference and out["against"] == "baseline"
    assert out["reason"].startswith("PASS" if passed else "FAIL")
    assert f"{value:.6g}" in out["reason"]


def test_missing_numbers_fail_closed():
    out = verdict("decode_tokens_per_s", "higher", 0.0, None, 100.0, "teacher")
    assert out["passed"] is False and "not available for the student" in out["reason"]
    out = verdict("kl", "lower", 0.0, 0.1, float("nan"), "init")
    assert out["passed"] is False and "init" in out["reason"]


def test_reference_choice():
    models = {"teacher": {}, "init": {}}
    assert choose_reference("auto", models) == "init"
    assert choose_reference("auto", {**models, "baseline": {}}) == "baseline"
    assert choose_reference("auto", {"teacher": {}}) == "teacher"
    assert choose_reference("baseline", models) is None
    assert choose_reference("teacher", models) == "teacher"


def test_evaluate_gate_from_config():
    cfg = load_config(None, ["eval.gate.metric=kl", "eval.gate.margin=0.01", "eval.gate.against=init"])
    metrics = {"student": {"kl": 0.20}, "init": {"kl": 0.30}, "teacher": {"kl": 0.0}}
    out = evaluate_gate(cfg.eval.gate, metrics)
    assert out["passed"] and out["against"] == "init" and out["reference"] == 0.30
    metrics["student"]["kl"] = 0.32
    assert not evaluate_gate(cfg.eval.gate, metrics)["passed"]
    cfg = load_config(None, ["eval.gate.against=baseline"])
    out = evaluate_gate(cfg.eval.gate, metrics)
    assert not out["passed"] and "no reference model 'baseline'" in out["reason"]


def test_bad_gate_config_names_the_field():
    with pytest.raises(ConfigError, match=r"eval.gate.metric.*unknown gate metric 'accuracy'"):
        load_config(None, ["eval.gate.metric=accuracy"])
    with pytest.raises(ConfigError, match=r"eval.gate.direction"):
        load_config(None, ["eval.gate.direction=up"])
    with pytest.raises(ConfigError, match=r"eval.speed.batch_sizes"):
        load_config(None, ["eval.speed.batch_sizes=[0]"])
