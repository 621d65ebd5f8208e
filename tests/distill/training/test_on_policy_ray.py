"""On-policy stage under Ray Train: 2 workers, the tiny teacher on 2 labelling actors, one actor
SIGKILLed mid-stage; the stage completes and every step is counted once."""

from __future__ import annotations

import json
import shutil

import pytest

from distill.training.stage import run_train_stage
from tests.distill.training.callbacks import kill_labeller, trace_rows
from tests.distill.training.conftest import tiny_cfg

pytestmark = pytest.mark.integration

STEPS = 4


def test_on_policy_stage_survives_a_killed_teacher_actor(ray_session, tmp_path, tiny_data_template, sharp_teacher_dir):
    cfg = tiny_cfg(
        tmp_path / "runs",
        sharp_teacher_dir,
        "teacher.replicas=2",
        "teacher.num_cpus=0.5",
        "teacher.threads=1",
        "teacher.dtype=float32",
        "teacher.batch_size=1",
    )
    stages = [
        {
            "name": "on_policy",
            "steps": STEPS,
            "loss": {"forward_kl": 0.0, "reverse_kl": 1.0},
            "on_policy": {"max_new_tokens": 6, "temperature": 1.0, "k": 8},
        }
    ]
    train = cfg.train.model_validate(
        {
            **cfg.train.model_dump(),
            "workers": 2,
            "cpus_per_worker": 0.5,
            "threads_per_worker": 1,
            "stages": stages,
            "log_every": 1,
            "checkpoint_every": 10,
            "heldout_max_rows": 2,
            "export_qwen2_moe": False,
        }
    )
    cfg = cfg.model_copy(update={"train": train})
    run = tmp_path / "runs" / "tiny" / "r1"
    shutil.copytree(tiny_data_template / "data", run / "data")
    trace = tmp_path / "trace"
    trace.mkdir()
    callbacks = trace_rows(trace) + kill_labeller(run, step=2)
    manifest = run_train_stage(cfg, str(run), show_progress=False, callbacks=callbacks)

    assert manifest["status"] == "done" and manifest["steps"] == STEPS
    assert (run / "killed-labeller").exists()
    lines = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m and "on_policy" in m]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))  # each step once, none lost or repeated
    for m in steps:
        op = m["on_policy"]
        assert op["labelled_tokens"] > 0 and op["labelled_tokens_per_s"] > 0
        assert op["sample_s"] > 0 and op["label_s"] > 0 and op["train_s"] > 0
    assert sum(m["on_policy"]["label_retries"] for m in steps) >= 1  # the killed actor's batch was retried
    for rank in (0, 1):  # each worker traced each step once
        traced = [int(line.split()[0]) for line in (trace / f"rows-rank{rank}.txt").read_text().splitlines()]
        assert sorted(set(traced)) == list(range(1, STEPS + 1))
