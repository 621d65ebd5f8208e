"""The promotion gate: one metric, a direction and a margin against a reference model."""

from __future__ import annotations

import math
from typing import Any

from distill.eval.section import GATE_METRICS, GateSection


def choose_reference(against: str, available: dict[str, dict]) -> str | None:
    """The reference model's name: ``against`` itself, or for ``auto`` baseline > init > teacher."""
    if against != "auto":
        return against if against in available else None
    for name in ("baseline", "init", "teacher"):
        if name in available:
            return name
    return None


def verdict(
    metric: str, direction: str, margin: float, value: float | None, reference: float | None, against: str
) -> dict[str, Any]:
    """Pass/fail with the numbers.

    ``lower``: passes iff ``value <= reference + margin``; ``higher``: iff ``value >= reference - margin``.
    A missing or NaN number fails with the reason (a gate that cannot measure must not promote).
    """
    out = {
        "metric": metric,
        "direction": direction,
        "margin": float(margin),
        "value": value,
        "reference": reference,
        "against": against,
    }
    if metric not in GATE_METRICS:
        return {**out, "passed": False, "reason": f"unknown metric {metric!r}; allowed: {sorted(GATE_METRICS)}"}
    if value is None or reference is None or any(isinstance(v, float) and math.isnan(v) for v in (value, reference)):
        missing = "student" if value is None else against
        return {
            **out,
            "passed": False,
            "reason": f"{metric} is not available for the {missing} model; the gate fails closed",
        }
    if direction == "lower":
        limit = reference + margin
        passed = value <= limit
        rel = "<=" if passed else ">"
    elif direction == "higher":
        limit = reference - margin
        passed = value >= limit
        rel = ">=" if passed else "<"
    else:
        return {**out, "passed": False, "reason": f"direction must be lower or higher, got {direction!r}"}
    reason = (
        f"{'PASS' if passed else 'FAIL'}: student {metric} {value:.6g} {rel} {limit:.6g} "
        f"({against} {reference:.6g} {'+' if direction == 'lower' else '-'} margin {margin:g}; "
        f"{direction} is better)"
    )
    return {**out, "passed": bool(passed), "reason": reason}


def evaluate_gate(gate_cfg: GateSection, metrics_by_model: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Apply ``eval.gate`` to ``{model name: metrics}`` (the student must be present)."""
    available = {k: v for k, v in metrics_by_model.items() if k != "student"}
    against = choose_reference(gate_cfg.against, available)
    if against is None:
        return {
            "passed": False,
            "metric": gate_cfg.metric,
            "direction": gate_cfg.direction,
            "margin": float(gate_cfg.margin),
            "value": None,
            "reference": None,
            "against": gate_cfg.against,
            "reason": f"no reference model {gate_cfg.against!r} was evaluated; the gate fails closed",
        }
    value = metrics_by_model.get("student", {}).get(gate_cfg.metric)
    reference = available[against].get(gate_cfg.metric)
    return verdict(gate_cfg.metric, gate_cfg.direction, gate_cfg.margin, value, reference, against)
