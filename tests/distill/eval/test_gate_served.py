"""The real eval + gate against the served model (the registry's current entry), at margin 0.

Baselines are tiny students whose held-out bits per byte are measured here (not written into a
report): one genuinely better than the run's student, one genuinely worse. When the served model
changes, the next pipeline run re-evaluates against the new one.
"""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from pipelines.config import load_config
from tests.distill.eval.conftest import save, student_config


def _stages(manifest: dict) -> dict[str, dict]:
    return {s["name"]: s for s in manifest["stages"]}


def _bpb(model_dir: str, texts: list[str]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import distill.student.hf  # noqa: F401 - registers the student model type
    from distill.eval import metrics as M

    model = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    return M.bits_per_byte(model, AutoTokenizer.from_pretrained(model_dir), texts, window=64)["bits_per_byte"]


def test_gate_at_margin_zero_against_the_served_model_refuses_better_promotes_worse_and_re_evaluates(
    fake_run, tokenizer, tmp_path
):
    from distill.student.init import init_from_teacher
    from pipelines.registry import Registry
    from pipelines.runner import run_pipeline

    run = tmp_path / "runs" / "t" / "run1"
    shutil.copytree(fake_run["run"], run, ignore=shutil.ignore_patterns("eval"))
    rows = pq.read_table(str(run / "data" / "generate" / "part-0.parquet")).to_pylist()
    held = set(fake_run["heldout"])
    texts = [r["completion"] for r in sorted(rows, key=lambda r: r["prompt_id"]) if r["prompt_id"] in held]
    student_bpb = _bpb(str(run / "student"), texts)

    # Candidate served models: tiny students of other seeds; measured, then the best and the worst chosen.
    measured = {}
    for seed in range(2, 10):
        out = tmp_path / "served" / f"seed{seed}"
        save(init_from_teacher(fake_run["teacher"], student_config(len(tokenizer)), seed=seed), tokenizer, out)
        measured[str(out)] = _bpb(str(out), texts)
    better = min(measured, key=measured.get)
    worse = max(measured, key=measured.get)
    assert measured[better] < student_bpb < measured[worse], (student_bpb, measured)

    cfg = load_config(
        fake_run["config"],
        [
            f"workdir={tmp_path / 'runs'}",
            "pipeline.stages=[eval,gate]",
            "pipeline.live=false",
            "eval.gate.margin=0",
            "eval.gate.against=baseline",
            "eval.models=[student,baseline]",
            "eval.speed.enabled=false",
        ],
    )
    registry = Registry.for_config(cfg)
    registry.promote(better, run_id="served-better")

    refused = run_pipeline(cfg, run_id="run1", show_progress=False)
    assert refused.status == "refused", refused.manifest
    gate = _stages(refused.manifest)["gate"]
    assert gate["status"] == "refused" and "FAIL" in gate["message"]
    verdict = json.loads((run / "eval" / "report.json").read_text())["gate"]
    assert verdict["against"] == "baseline" and verdict["margin"] == 0.0 and verdict["passed"] is False
    assert verdict["value"] == pytest.approx(student_bpb, rel=1e-4)
    assert verdict["reference"] == pytest.approx(measured[better], rel=1e-4)

    # The served model changes (a worse one is now current): the rerun evaluates again and promotes.
    registry.promote(worse, run_id="served-worse")
    passed = run_pipeline(cfg, run_id="run1", show_progress=False)
    stages = _stages(passed.manifest)
    assert passed.status == "done", passed.manifest
    assert stages["eval"]["status"] == "done" and stages["eval"]["attempts"] == 2  # re-run, not skipped
    assert stages["gate"]["status"] == "done" and "PASS" in stages["gate"]["message"]
    verdict = json.loads((run / "eval" / "report.json").read_text())["gate"]
    assert verdict["passed"] is True and verdict["reference"] == pytest.approx(measured[worse], rel=1e-4)
    assert verdict["value"] == pytest.approx(student_bpb, rel=1e-4)
