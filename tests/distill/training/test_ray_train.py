"""Ray Train integration: 2 CPU workers, disjoint rows, checkpoints in storage, failure recovery, resume."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from cluster.errors import RaydistillError
from distill.training.stage import run_train_stage

pytestmark = pytest.mark.integration


def metrics(run: str) -> list[dict]:
    return [json.loads(l) for l in (Path(run) / "train" / "metrics.jsonl").read_text().splitlines() if l.strip()]


def two_stage(cfg, *extra):
    stages = [{"name": "warm", "steps": 4, "loss": {"ce": 1.0, "forward_kl": 1.0}},
              {"name": "kd", "steps": 6, "loss": {"forward_kl": 1.0}}]
    train = cfg.train.model_validate({**cfg.train.model_dump(), "workers": 2, "stages": stages, **dict(extra)})
    return cfg.model_copy(update={"train": train})


def test_two_workers_train_on_disjoint_rows_and_checkpoint_to_storage(ray_session, tiny_run, tmp_path):
    cfg, run = tiny_run
    cfg = two_stage(cfg)
    trace = tmp_path / "trace"
    trace.mkdir()
    manifest = run_train_stage(cfg, run, show_progress=False, trace_dir=str(trace))
    assert manifest["steps"] == 10 and manifest["workers"] == 2
    seen = {}
    for rank in (0, 1):
        seen[rank] = {line.split()[1] for line in (trace / f"rows-rank{rank}.txt").read_text().splitlines()}
    assert seen[0] and seen[1] and not (seen[0] & seen[1])
    lines = [m for m in metrics(run) if "loss" in m]
    assert all(m["world_size"] == 2 for m in lines)
    held = [m for m in metrics(run) if m.get("event") == "heldout"]
    assert held[-1]["kl"] < held[0]["kl"] or lines[-1]["loss"] < lines[0]["loss"]
    assert lines[-1]["kl"] < lines[0]["kl"]
    checkpoints = sorted(p.name for p in (Path(run) / "train" / "ray").glob("checkpoint_*") if p.is_dir())
    assert checkpoints and checkpoints[-1] == "checkpoint_0000010"
    assert (Path(run) / "train" / "ray" / checkpoints[-1] / "model.safetensors").exists()
    assert (Path(run) / "student" / "config.json").exists()
    assert json.loads((Path(run) / "train" / "manifest.json").read_text())["status"] == "done"


def test_worker_failure_resumes_from_the_last_checkpoint(ray_session, tiny_run):
    cfg, run = tiny_run
    cfg = two_stage(cfg, ("checkpoint_every", 3), ("max_failures", 1))
    manifest = run_train_stage(cfg, run, show_progress=False, fail_at_step=5)
    assert (Path(run) / "train" / ".injected-failure").exists()
    assert manifest["steps"] == 10
    events = metrics(run)
    resumed = [m for m in events if m.get("event") == "resumed"]
    assert resumed and resumed[0]["step"] == 4  # the stage-end checkpoint of "warm", not a restart from scratch
    steps = [m["step"] for m in events if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 10  # no duplicated lines after the resume


def test_failed_run_resumes_when_rerun(ray_session, tiny_run):
    cfg, run = tiny_run
    cfg = two_stage(cfg, ("checkpoint_every", 3), ("max_failures", 0))
    with pytest.raises(RaydistillError, match="training failed"):
        run_train_stage(cfg, run, show_progress=False, fail_at_step=8)
    with pytest.raises(Exception, match="--resume"):
        run_train_stage(cfg, run, show_progress=False, resume=False)
    manifest = run_train_stage(cfg, run, show_progress=False, resume=True)
    assert manifest["steps"] == 10
    resumed = [m for m in metrics(run) if m.get("event") == "resumed"]
    assert resumed and resumed[-1]["step"] == 6
