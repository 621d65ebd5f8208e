"""Ray Train integration: 2 CPU workers, disjoint rows, checkpoints in storage, failure recovery, resume.

The failure tests compare against one straight run of the same config: a run that lost a worker
(an exception, or the process dying) or the whole driver and resumed from its last checkpoint must
end with the same weights, optimizer state and metric lines.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cluster.errors import RaydistillError
from distill.training.stage import run_train_stage
from tests.distill.training.callbacks import fail_once, trace_rows
from tests.distill.training.conftest import tiny_cfg
from tests.distill.training.resume import assert_same_training, metric_lines

pytestmark = pytest.mark.integration  # (every test here uses the session's Ray)


def two_stage(cfg, *extra):
    # "kd" mixes sources a and b; checkpoints at steps 3, 4 (stage end), 6, 9, 10.
    stages = [
        {"name": "warm", "steps": 4, "loss": {"ce": 1.0, "forward_kl": 1.0}},
        {
            "name": "kd",
            "steps": 6,
            "loss": {"forward_kl": 1.0},
            "mixture": [{"source": "a", "weight": 2}, {"source": "b"}],
        },
    ]
    train = cfg.train.model_validate(
        {
            **cfg.train.model_dump(),
            "workers": 2,
            "stages": stages,
            "checkpoint_every": 3,
            "export_qwen2_moe": False,
            **dict(extra),
        }
    )
    return cfg.model_copy(update={"train": train})


def new_run(root: Path, data_template: Path, teacher: str, *extra):
    cfg = two_stage(tiny_cfg(root / "runs", teacher), *extra)
    run = root / "runs" / "tiny" / "r1"
    shutil.copytree(data_template / "data", run / "data")
    return cfg, str(run)


@pytest.fixture(scope="module")
def straight(ray_session, tmp_path_factory, tiny_data_template, sharp_teacher_dir):
    """(manifest, run dir, trace dir) of the straight-through run every failure test compares with."""
    root = tmp_path_factory.mktemp("straight")
    cfg, run = new_run(root, tiny_data_template, sharp_teacher_dir)
    trace = root / "trace"
    trace.mkdir()
    manifest = run_train_stage(cfg, run, show_progress=False, callbacks=trace_rows(trace))
    return manifest, run, trace


def test_two_workers_train_on_disjoint_rows_and_checkpoint_to_storage(straight):
    manifest, run, trace = straight
    assert manifest["steps"] == 10 and manifest["workers"] == 2
    seen = {}
    for rank in (0, 1):
        seen[rank] = {line.split()[1] for line in (trace / f"rows-rank{rank}.txt").read_text().splitlines()}
    assert seen[0] and seen[1] and not (seen[0] & seen[1])
    lines = [m for m in metric_lines(run) if "loss" in m]
    assert [m["step"] for m in lines] == [2, 4, 6, 8, 10] and all(m["world_size"] == 2 for m in lines)
    assert lines[-1]["kl"] < lines[0]["kl"]
    checkpoints = sorted(p.name for p in (Path(run) / "train" / "ray").glob("checkpoint_*") if p.is_dir())
    assert checkpoints and checkpoints[-1] == "checkpoint_0000010"
    assert (Path(run) / "train" / "ray" / checkpoints[-1] / "model.safetensors").exists()
    for name in checkpoints:  # rank 0 marks each checkpoint whole once its upload returned
        marker = Path(run) / "train" / "ray" / name / "complete.json"
        assert json.loads(marker.read_text()) == {"step": int(name[11:])}
    assert (Path(run) / "student" / "config.json").exists()
    assert json.loads((Path(run) / "train" / "manifest.json").read_text())["status"] == "done"


@pytest.mark.slow
def test_worker_failures_restart_in_the_fit_and_a_failed_run_resumes_when_rerun_ending_like_a_straight_run(
    straight, tmp_path, tiny_data_template, sharp_teacher_dir
):
    """One run, three injected failures, each one step after a checkpoint (3, 6, 9): well inside Ray's 2 s
    poll of the workers, so Ray's controller may not have registered that checkpoint yet, and each restart
    must still start from it.

    1. a worker raises before step 4, and 2. a worker's process dies before step 7 (os._exit: no exception,
    no cleanup): Ray Train restarts the workers inside the same fit (train.max_failures 2);
    3. a worker raises before step 10: past max_failures, the stage fails, a rerun without --resume is
    refused, and a rerun with it resumes. The run ends like the straight run."""
    cfg, run = new_run(tmp_path, tiny_data_template, sharp_teacher_dir, ("max_failures", 2))
    injected = Path(run) / "train"
    callbacks = (
        fail_once(run, 4, "raise", ".injected-raise")
        + fail_once(run, 7, "exit", ".injected-exit")
        + fail_once(run, 10, "raise", ".injected-fatal")
    )
    with pytest.raises(RaydistillError, match="training failed"):
        run_train_stage(cfg, run, show_progress=False, callbacks=callbacks)
    assert "failed at step 4" in (injected / ".injected-raise").read_text()
    assert "failed at step 7" in (injected / ".injected-exit").read_text()
    assert "failed at step 10" in (injected / ".injected-fatal").read_text()
    resumed = [m for m in metric_lines(run) if m.get("event") == "resumed"]
    # the two restarts inside the fit: mid-"warm" and mid-"kd", each from the checkpoint just before its failure
    assert [(m["step"], m["stage"]) for m in resumed] == [(3, 0), (6, 1)]
    with pytest.raises(Exception, match="--resume"):
        run_train_stage(cfg, run, show_progress=False, resume=False)
    manifest = run_train_stage(cfg, run, show_progress=False, resume=True)
    resumed = [m for m in metric_lines(run) if m.get("event") == "resumed"]
    assert [(m["step"], m["stage"]) for m in resumed] == [(3, 0), (6, 1), (9, 1)]
    assert_same_training(straight[0], manifest, straight[1], run)
