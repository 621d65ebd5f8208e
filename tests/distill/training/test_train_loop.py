"""The plain-PyTorch loop (no Ray): loss goes down, stages run in order, checkpoints resume exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from distill.training.stage import run_train_stage
from tests.distill.training import callbacks as cb
from tests.distill.training.callbacks import fail_once
from tests.distill.training.conftest import tiny_cfg


def metrics(run: str) -> list[dict]:
    return [
        json.loads(line) for line in (Path(run) / "train" / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]


def test_local_loop_trains_three_stages_and_publishes_the_student(tiny_run):
    cfg, run = tiny_run
    cfg = cfg.model_copy(
        update={
            "train": cfg.train.model_validate(
                {
                    **cfg.train.model_dump(),
                    "stages": [
                        {"name": "ce", "steps": 4, "loss": {"ce": 1.0, "forward_kl": 0.0}},
                        {
                            "name": "kd",
                            "steps": 8,
                            "loss": {"forward_kl": 1.0},
                            "mixture": [{"source": "a", "weight": 2}, {"source": "b"}],
                        },
                        {
                            "name": "anneal",
                            "steps": 2,
                            "lr": 1e-3,
                            "mixture": [{"min_quality": 5}],
                            "loss": {"forward_kl": 1.0, "ce": 0.1},
                        },
                    ],
                }
            )
        }
    )
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


def test_from_teacher_init_is_calibrated_on_the_runs_training_rows(tiny_run, capsys, monkeypatch):
    from distill.data import calibration
    from distill.training.data import heldout_mask, read_table

    cfg, run = tiny_run
    cfg = cfg.model_copy(
        update={
            "student": cfg.student.model_validate(
                {
                    **cfg.student.model_dump(),
                    "init": "from_teacher",
                    "num_experts": 4,
                    "num_experts_per_tok": None,
                    "moe_intermediate_size": None,
                    "routing": "topp",
                    "top_p": 0.6,
                    "max_k": 3,
                    "calibration": {"heldout_tokens": 64},
                }
            ),
            "train": cfg.train.model_validate(
                {**cfg.train.model_dump(), "stages": [{"name": "kd", "steps": 2, "loss": {"forward_kl": 1.0}}]}
            ),
        }
    )
    seen = []
    real = calibration._parquet_sequences
    monkeypatch.setattr(calibration, "_parquet_sequences", lambda d, keep: seen.extend(real(d, keep)) or real(d, keep))
    manifest = run_train_stage(cfg, run, use_ray=False, show_progress=False)
    assert manifest["status"] == "done"
    record = json.loads((Path(run) / "train" / "init" / "student_init.json").read_text())
    assert len(record["teacher_layers"]) == 2 and len(record["layer_importance"]) == 2  # the tiny teacher's 2 layers
    assert record["calibration_tokens"] > 0 and record["heldout"]["tokens"] > 0
    printed = capsys.readouterr().out
    assert "student init: teacher layers kept (by measured importance)" in printed
    assert "student init: held-out calibration text" in printed
    # Calibration read only training rows: none of the held-out prompts' token ids.
    table = read_table(sorted(str(p) for p in (Path(run) / "data" / "generate").glob("*.parquet")))
    held = {
        tuple(ids)
        for ids, out in zip(
            table["input_ids"].to_pylist(), heldout_mask(table, cfg.train.heldout_fraction, cfg.train.seed)
        )
        if out
    }
    assert held and seen and not held & {tuple(s) for s in seen}


# Two stages; the second mixes sources a and b (the mixture's RNG and both components' positions are
# part of the data state). Checkpoints every 3 steps: the failure at step 9 resumes from step 6, in
# the middle of "kd", after step 8's metric line was written.
RESUME_STAGES = [
    {"name": "warm", "steps": 4, "loss": {"ce": 1.0, "forward_kl": 1.0}},
    {"name": "kd", "steps": 6, "loss": {"forward_kl": 1.0}, "mixture": [{"source": "a", "weight": 2}, {"source": "b"}]},
]


def test_a_minutes_stage_ends_after_the_step_that_reaches_its_time_and_decays_over_it(tiny_run, monkeypatch):
    """``minutes``: a wall-clock budget per stage. On a fake clock where each step takes 10 s, a
    0.5-minute stage is exactly 3 steps, its cosine decay spans those 30 s, and the next stage follows."""
    import distill.training.loop as loop

    cfg, run = tiny_run
    monkeypatch.setattr(loop, "time", cb.CLOCK)
    stages = [
        {"name": "timed", "minutes": 0.5, "warmup_steps": 0, "lr": 1e-3, "min_lr_ratio": 0.0},
        {"name": "after", "steps": 2},
    ]
    cfg = cfg.model_copy(
        update={"train": cfg.train.model_validate({**cfg.train.model_dump(), "log_every": 1, "stages": stages})}
    )
    callbacks = [{"target": "tests.distill.training.callbacks:AdvanceClock", "kwargs": {"seconds": 10.0}}]
    manifest = run_train_stage(cfg, run, use_ray=False, show_progress=False, callbacks=callbacks)
    timed, after = manifest["stages"]
    assert (timed["steps"], timed["seconds"], after["steps"]) == (3, 30.0, 2)
    assert "seconds" not in after  # only a time-limited stage records its time
    lrs = [m["lr"] for m in metrics(run) if "loss" in m and m["stage_name"] == "timed"]
    # progress before each step is 0, 1/3, 2/3 of the 30 s: cosine from the peak towards 0
    assert lrs == pytest.approx([1e-3, 0.75e-3, 0.25e-3])


def test_a_stage_takes_one_length_only():
    from distill.training.section import TrainStage

    with pytest.raises(ValueError, match="gives steps and minutes; give only one of steps, tokens, minutes"):
        TrainStage.model_validate({"name": "x", "steps": 3, "minutes": 1.0})
    assert TrainStage.model_validate({"minutes": 2}).steps is None


def resume_cfg(cfg):
    train = cfg.train.model_validate(
        {**cfg.train.model_dump(), "stages": RESUME_STAGES, "checkpoint_every": 3, "export_qwen2_moe": False}
    )
    return cfg.model_copy(update={"train": train})


def test_local_loop_resumed_after_a_failure_ends_where_a_straight_run_ends(
    tmp_path, tiny_data_template, sharp_teacher_dir
):
    from tests.distill.training.resume import assert_same_training, metric_lines

    runs = {}
    for name in ("straight", "failed"):
        cfg = resume_cfg(tiny_cfg(tmp_path / name, sharp_teacher_dir))
        run = tmp_path / name / "tiny" / "r1"
        shutil.copytree(tiny_data_template / "data", run / "data")
        runs[name] = (cfg, str(run))
    cfg, run = runs["straight"]
    straight = run_train_stage(cfg, run, use_ray=False, show_progress=False)
    assert straight["steps"] == 10

    cfg, run = runs["failed"]
    with pytest.raises(RuntimeError, match="injected failure at step 9"):
        run_train_stage(cfg, run, use_ray=False, show_progress=False, callbacks=fail_once(run, 9))
    assert [m["step"] for m in metric_lines(run) if "loss" in m] == [2, 4, 6, 8]  # step 8 was logged, then lost
    resumed = run_train_stage(cfg, run, use_ray=False, show_progress=False, resume=True)
    events = [m for m in metric_lines(run) if m.get("event") == "resumed"]
    assert [(e["step"], e["stage"]) for e in events] == [(6, 1)]  # mid-"kd", from the step-6 checkpoint
    assert_same_training(straight, resumed, runs["straight"][1], run)


def test_heldout_every_scores_the_budget_curve_with_the_teachers_nll_on_the_same_tokens(tiny_run):
    from distill.eval.report import plot_budget

    cfg, run = tiny_run
    cfg = cfg.model_copy(
        update={
            "train": cfg.train.model_validate(
                {**cfg.train.model_dump(), "heldout_every": 2, "stages": [{"name": "kd", "steps": 6}]}
            )
        }
    )
    run_train_stage(cfg, run, use_ray=False, show_progress=False)
    held = [m for m in metrics(run) if m.get("event") == "heldout"]
    assert [h["step"] for h in held] == [2, 4, 6]  # every 2 steps, the stage end once
    tokens = [h["train_tokens"] for h in held]
    assert tokens == sorted(tokens) and tokens[0] > 0 and len(set(tokens)) == 3
    assert all(h["teacher_ce"] > 0 and h["ce"] > 0 and h["tokens"] == held[0]["tokens"] for h in held)
    assert plot_budget(metrics(run))[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_budget(held[:1]) is None  # one point is no curve


def test_on_policy_stages_refuse_fsdp_across_workers():
    from distill.training.section import TrainSection

    stage = {"name": "gkd", "steps": 2, "on_policy": {}}
    with pytest.raises(ValueError, match=r"on-policy stages \['gkd'\] need train.strategy: ddp"):
        TrainSection.model_validate({"strategy": "fsdp", "workers": 2, "stages": [stage]})
    assert TrainSection.model_validate({"strategy": "fsdp", "workers": 1, "stages": [stage]}).workers == 1
    assert TrainSection.model_validate({"strategy": "ddp", "workers": 2, "stages": [stage]}).workers == 2


def test_train_freeze_leaves_the_tied_embedding_untouched_and_trains_the_rest(tiny_run):
    """``train.freeze``: the matched parameters (the embedding, tied to the LM head: matched by either
    name) end as they started and get no optimizer state; every other weight trains. A pattern that
    matches nothing is refused, naming the setting."""
    import torch
    from safetensors.torch import load_file

    from cluster.errors import ConfigError
    from distill.training.loop import build_optimizer, freeze_parameters
    from tests.distill.training.tiny import tiny_model

    cfg, run = tiny_run
    section = {**cfg.train.model_dump(), "freeze": ["lm_head.weight"], "stages": [{"name": "kd", "steps": 3}]}
    cfg = cfg.model_copy(update={"train": cfg.train.model_validate({**section, "lr": 1e-2})})
    run_train_stage(cfg, run, use_ray=False, show_progress=False)
    init = load_file(str(Path(run) / "train" / "init" / "model.safetensors"))
    final = load_file(str(Path(run) / "student" / "model.safetensors"))
    assert torch.equal(final["model.embed_tokens.weight"], init["model.embed_tokens.weight"])
    moved = [name for name in init if name != "model.embed_tokens.weight" and not torch.equal(final[name], init[name])]
    assert "model.layers.0.self_attn.q_proj.weight" in moved and "model.norm.weight" in moved

    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert set(freeze_parameters(model, ["lm_head.*"])) == {"lm_head.weight"}
    optimizer = build_optimizer(model, cfg.train)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(model.model.embed_tokens.weight) not in held and len(held) == len(list(model.parameters())) - 1
    assert freeze_parameters(tiny_model(), ["*.norm.weight"]) == ["model.norm.weight"]
    with pytest.raises(ConfigError, match=r"train.freeze: 'embed\*' matches no parameter"):
        freeze_parameters(tiny_model(), ["embed*"])
