"""The plain-PyTorch loop (no Ray): loss goes down, stages run in order, checkpoints resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.training.stage import run_train_stage
from tests.distill.training.conftest import tiny_cfg


def metrics(run: str) -> list[dict]:
    return [json.loads(l) for l in (Path(run) / "train" / "metrics.jsonl").read_text().splitlines() if l.strip()]


def test_local_loop_trains_three_stages_and_publishes_the_student(tiny_run):
    cfg, run = tiny_run
    cfg = cfg.model_copy(update={"train": cfg.train.model_validate({**cfg.train.model_dump(), "stages": [
        {"name": "ce", "steps": 4, "loss": {"ce": 1.0, "forward_kl": 0.0}},
        {"name": "kd", "steps": 8, "loss": {"forward_kl": 1.0}, "mixture": [{"source": "a", "weight": 2}, {"source": "b"}]},
        {"name": "anneal", "steps": 2, "lr": 1e-3, "mixture": [{"min_quality": 5}], "loss": {"forward_kl": 1.0, "ce": 0.1}},
    ]})})
    manifest = run_train_stage(cfg, run, use_ray=False, show_progress=False)
    assert manifest["status"] == "done" and manifest["steps"] == 14
    assert [s["name"] for s in manifest["stages"]] == ["ce", "kd", "anneal"]
    lines = [m for m in metrics(run) if "loss" in m]
    assert [m["stage_name"] for m in lines][:2] == ["ce", "ce"]
    held = [m for m in metrics(run) if m.get("event") == "heldout"]
    assert [h["stage_name"] for h in held] == ["ce", "kd", "anneal"] and all(h["tokens"] > 0 for h in held)
    assert held[1]["kl"] < held[0]["kl"]  # the KD stage moves the student towards the teacher on held-out rows
    student = Path(run) / "student"
    assert (student / "model.safetensors").exists() and (student / "tokenizer.json").exists()
    assert json.loads((student / "stages.json").read_text())["steps"] == 14
    assert (Path(run) / "student-qwen2moe" / "config.json").exists()
