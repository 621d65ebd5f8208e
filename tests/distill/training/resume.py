"""Resume equivalence: a run that failed at step k and resumed must end where a straight run ends.

Compared: the published student's weights, the last checkpoint's optimizer state and step counters,
and every metric line (timing fields aside; the ``resumed`` event is the only extra line).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

# Wall-clock rates differ between any two runs; everything else a metric line holds must match.
VOLATILE = {"completion_tokens_per_s", "tokens_per_s", "wall_seconds"}


def metric_lines(run: str | Path) -> list[dict[str, Any]]:
    text = (Path(run) / "train" / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def comparable(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in line.items() if k not in VOLATILE} for line in lines if line.get("event") != "resumed"]


def assert_close_values(a: Any, b: Any, where: str, rtol: float, atol: float) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_close_values(a[key], b[key], f"{where}.{key}", rtol, atol)
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_values(x, y, f"{where}[{i}]", rtol, atol)
    elif isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), f"{where}: {a!r} vs {b!r}"
        assert math.isclose(a, b, rel_tol=rtol, abs_tol=atol) or (math.isnan(a) and math.isnan(b)), (
            f"{where}: {a!r} != {b!r}"
        )
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_tensors_close(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str, rtol: float, atol: float
) -> None:
    assert sorted(a) == sorted(b), f"{what}: different tensor names"
    for name in a:
        torch.testing.assert_close(
            a[name], b[name], rtol=rtol, atol=atol, msg=lambda m, name=name: f"{what} {name}: {m}"
        )


def assert_same_training(
    straight: dict[str, Any],
    resumed: dict[str, Any],
    straight_run: str | Path,
    resumed_run: str | Path,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """``straight``/``resumed`` are the two runs' train manifests."""
    assert straight["steps"] == resumed["steps"], "steps"
    assert straight["tokens"] == resumed["tokens"], "tokens trained on"
    a, b = comparable(metric_lines(straight_run)), comparable(metric_lines(resumed_run))
    assert [m.get("step") for m in a] == [m.get("step") for m in b], "metric lines: different steps"
    assert_close_values(a, b, "metrics", rtol, atol)
    assert_close_values(straight["stages"], resumed["stages"], "manifest.stages", rtol, atol)
    assert_tensors_close(
        load_file(str(Path(straight["student_dir"]) / "model.safetensors")),
        load_file(str(Path(resumed["student_dir"]) / "model.safetensors")),
        "student",
        rtol,
        atol,
    )
    ca, cb = Path(straight["checkpoint"]), Path(resumed["checkpoint"])
    assert ca.name == cb.name
    assert_tensors_close(
        load_file(str(ca / "optimizer.safetensors")),
        load_file(str(cb / "optimizer.safetensors")),
        "optimizer",
        rtol,
        atol,
    )
    sa, sb = json.loads((ca / "state.json").read_text()), json.loads((cb / "state.json").read_text())
    for key in ("step", "stage", "stage_step", "tokens", "optimizer_scalars", "optimizer_groups"):
        assert_close_values(sa.get(key), sb.get(key), f"state.{key}", rtol, atol)
