"""Runner semantics with fake stages: manifest, skip when up to date, reruns on change, resume, --from/--only."""

from __future__ import annotations

import pytest

from cluster import storage
from cluster.errors import ConfigError
from pipelines.config import load_config
from pipelines.manifest import fingerprint
from pipelines.runner import run_pipeline
from pipelines.section import STAGE_ORDER
from tests.pipelines.fakes import FakeStages, read_manifest


def _cfg(tmp_path, *extra):
    return load_config(None, [f"workdir={tmp_path}", "name=fake", *extra])


def _run(cfg, fakes, **kw):
    return run_pipeline(cfg, stages=fakes.mapping(), live=False, **kw)


def test_manifest_lists_every_stage_with_outputs(tmp_path):
    fakes = FakeStages()
    out = _run(_cfg(tmp_path), fakes, run_id="r1")
    assert out.status == "done" and out.ok
    assert fakes.names() == list(STAGE_ORDER)
    data = read_manifest(out.run_dir)
    assert [s["name"] for s in data["stages"]] == list(STAGE_ORDER)
    for entry in data["stages"]:
        assert entry["status"] == "done" and entry["outcome"] == "done"
        assert entry["outputs"] == [storage.join(out.run_dir, entry["name"])]
        assert entry["config_hash"] and entry["started_at"] and entry["ended_at"]
        assert entry["rows"] == 10 and entry["tokens"] == 100 and entry["duration_s"] >= 0
    # inputs are fingerprinted: filter consumed generate's folder
    assert data["stages"][1]["inputs"] == {
        storage.join(out.run_dir, "generate"): fingerprint(storage.join(out.run_dir, "generate"))
    }
    assert data["status"] == "done" and data["finished_at"]
    assert out.summary["base_url"] == "http://fake"
    assert [s["name"] for s in out.summary["stages"]] == list(STAGE_ORDER)


def test_rerun_skips_unchanged_stages(tmp_path):
    cfg = _cfg(tmp_path)
    _run(cfg, FakeStages(), run_id="r1")
    again = FakeStages()
    out = _run(cfg, again, run_id="r1")
    assert again.names() == []
    assert {s["status"] for s in read_manifest(out.run_dir)["stages"]} == {"skipped"}
    assert out.status == "done"


def test_missing_output_marker_reruns_that_stage_only(tmp_path):
    cfg = _cfg(tmp_path)
    out = _run(cfg, FakeStages(), run_id="r1")
    storage.remove(storage.join(out.run_dir, "eval", "manifest.json"))
    again = FakeStages()
    _run(cfg, again, run_id="r1")
    # eval rewrites identical bytes, so gate and later stay up to date
    assert again.names() == ["eval"]


def test_config_change_reruns_that_stage_and_later(tmp_path):
    _run(_cfg(tmp_path), FakeStages(), run_id="r1")
    again = FakeStages()
    _run(_cfg(tmp_path, "filter.min_quality=5"), again, run_id="r1")
    assert again.names() == ["filter", "train", "eval", "gate", "export", "deploy"]
    # the rerun stages do not resume: their config/inputs changed
    assert all(resume is False for _, resume in again.calls)


def test_change_in_a_section_no_stage_depends_on_reruns_nothing(tmp_path):
    # Each stage hashes only its own sections (fake stages here ignore `teacher`).
    _run(_cfg(tmp_path), FakeStages(), run_id="r1")
    again = FakeStages()
    _run(_cfg(tmp_path, "teacher.replicas=2"), again, run_id="r1")
    assert again.names() == []


def test_failure_midway_then_rerun_resumes_at_failed_stage(tmp_path):
    cfg = _cfg(tmp_path)
    first = FakeStages(fail={"train"})
    out = _run(cfg, first, run_id="r1")
    assert out.status == "failed" and not out.ok
    assert first.names() == ["generate", "filter", "train"]
    data = read_manifest(out.run_dir)
    by = {s["name"]: s for s in data["stages"]}
    assert by["train"]["status"] == "failed" and "injected failure in train" in by["train"]["message"]
    assert by["eval"]["status"] == "pending"
    # a plain rerun (no --run) picks the unfinished run and resumes at train
    second = FakeStages()
    again = _run(cfg, second)
    assert again.run_id == "r1" and again.status == "done"
    assert second.calls[0] == ("train", True)  # same config and inputs: the stage may resume its own work
    assert second.names() == ["train", "eval", "gate", "export", "deploy"]
    assert by["train"]["attempts"] == 1 and read_manifest(out.run_dir)["stages"][2]["attempts"] == 2
    # once complete, a plain run starts a fresh run
    third = FakeStages()
    fresh = _run(cfg, third)
    assert fresh.run_id != "r1" and third.names() == list(STAGE_ORDER)


def test_from_and_only(tmp_path):
    cfg = _cfg(tmp_path)
    _run(cfg, FakeStages(), run_id="r1")
    f = FakeStages()
    _run(cfg, f, from_stage="eval")
    assert f.names() == ["eval", "gate", "export", "deploy"] and all(not r for _, r in f.calls)
    o = FakeStages()
    out = _run(cfg, o, only="filter")
    assert o.names() == ["filter"] and out.run_id == "r1"
    with pytest.raises(ConfigError, match="--only nope: not one of pipeline.stages"):
        _run(cfg, FakeStages(), only="nope")
    with pytest.raises(ConfigError, match="exclude each other"):
        _run(cfg, FakeStages(), only="filter", from_stage="eval")


def test_only_needs_an_existing_run(tmp_path):
    with pytest.raises(Exception, match="no runs of 'fake' yet"):
        _run(_cfg(tmp_path), FakeStages(), only="filter")


def test_refused_gate_skips_export_and_deploy(tmp_path):
    cfg = _cfg(tmp_path)
    fakes = FakeStages(refuse=True)
    out = _run(cfg, fakes, run_id="r1")
    assert out.status == "refused" and out.ok
    assert fakes.names() == ["generate", "filter", "train", "eval", "gate"]
    by = {s["name"]: s for s in read_manifest(out.run_dir)["stages"]}
    assert by["gate"]["status"] == "refused" and "worse than baseline" in by["gate"]["message"]
    assert by["deploy"]["status"] == "skipped" and "gate refused" in by["deploy"]["message"]
    assert "base_url" not in out.summary
    # an unchanged rerun stays refused without re-running anything
    again = FakeStages()
    assert _run(cfg, again, run_id="r1").status == "refused" and again.names() == []


def test_subset_of_stages_and_cost(tmp_path):
    cfg = _cfg(tmp_path, "pipeline.stages=[generate, filter]", "pipeline.cost_per_hour=3600")
    fakes = FakeStages()
    out = _run(cfg, fakes, run_id="r1")
    assert fakes.names() == ["generate", "filter"] and out.status == "done"
    stages = read_manifest(out.run_dir)["stages"]
    # cost = duration hours x price (3600/h = 1 per second)
    assert all(abs(s["cost"] - s["duration_s"]) < 0.02 for s in stages)


def test_a_run_driven_by_a_live_process_is_not_resumed_twice(tmp_path):
    import os
    import socket

    cfg = _cfg(tmp_path)
    out = _run(cfg, FakeStages(fail={"train"}), run_id="r1")
    data = read_manifest(out.run_dir)
    data["status"] = "running"
    data["invocations"][-1].update(status="running", pid=os.getppid(), host=socket.gethostname())
    storage.atomic_write_json(storage.join(out.run_dir, "manifest.json"), data)
    with pytest.raises(Exception, match=f"being run by process {os.getppid()}"):
        _run(cfg, FakeStages(), run_id="r1")
    # a killed driver (pid gone) left the same state: that run resumes
    data["invocations"][-1]["pid"] = 2**22 + 12345
    storage.atomic_write_json(storage.join(out.run_dir, "manifest.json"), data)
    again = FakeStages()
    assert _run(cfg, again).run_id == "r1" and again.names()[0] == "train"


def test_live_table_and_summary(tmp_path):
    import io

    from rich.console import Console

    from pipelines.runner import print_summary
    from pipelines.stages import StageResult, eval_metrics

    fakes = FakeStages()
    mapping = fakes.mapping()
    report = {
        "models": {
            "student": {"metrics": {"bpb_heldout": 1.25, "decode_tokens_per_s": 300.0}},
            "teacher": {"metrics": {"bpb_heldout": 1.0, "decode_tokens_per_s": 100.0}},
        },
        "comparison": {"decode_speedup": 3.0},
        "gate": {"passed": True, "reason": "within margin"},
        "paths": {"html": "/x/report.html"},
        "samples": [
            {"prompt": "Why?", "answers": {"teacher": "Because.", "student": "Since.", "init": "So so"}},
            {"prompt": "How?", "answers": {"teacher": "Thus.", "student": "Like so."}},
        ],
        "sample_settings": {"decoding": "greedy", "repetition_penalty": 1.0, "max_new_tokens": 48},
    }
    base_eval = mapping["eval"].run

    def eval_run(ctx):
        base_eval(ctx)
        return StageResult(metrics=eval_metrics(report))

    import dataclasses

    mapping["eval"] = dataclasses.replace(mapping["eval"], run=eval_run)
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=200)
    out = run_pipeline(_cfg(tmp_path), run_id="r1", stages=mapping, live=True, console=console)
    assert out.status == "done"
    assert out.summary["student_bpb_heldout"] == 1.25 and out.summary["decode_speedup"] == 3.0
    assert out.summary["teacher_tokens_per_s"] == 50.0 and out.summary["report"] == "/x/report.html"
    first = {"prompt": "Why?", "teacher": "Because.", "student": "Since.", "repetition_penalty": 1.0}
    assert out.summary["heldout_sample"] == first  # the first held-out prompt, teacher and student
    text = io.StringIO()
    print_summary(out, Console(file=text, width=200))
    printed = text.getvalue()
    assert "1.250 vs 1.000" in printed and "300.0 vs 100.0  (3.00x)" in printed
    assert "passed: within margin" in printed and "http://fake" in printed
    assert "eval, greedy) 'Why?' ->\nteacher: Because.\nstudent: Since." in printed  # penalty 1: not mentioned
    assert printed.count("done") >= 7


def test_refusal_after_a_promotion_does_not_report_the_old_deploy(tmp_path):
    cfg = _cfg(tmp_path)
    assert _run(cfg, FakeStages(), run_id="r1").base_url == "http://fake"
    out = _run(cfg, FakeStages(refuse=True), run_id="r1", from_stage="gate")
    assert out.status == "refused" and out.base_url is None
    by = {s["name"]: s for s in read_manifest(out.run_dir)["stages"]}
    assert by["deploy"]["status"] == "skipped" and by["deploy"]["outcome"] is None


def test_summary_holds_each_ratio_against_its_target_and_shows_the_sample():
    import io

    from rich.console import Console

    from pipelines.runner import print_summary, target_rows
    from pipelines.section import TargetsSection

    summary = {
        "student_bpb_human": 2.4,
        "teacher_bpb_human": 2.0,
        "student_bpb_heldout": 1.0,
        "teacher_bpb_heldout": 0.8,
        "student_bpb_heldout_in_context": 0.9,
        "teacher_bpb_heldout_in_context": 0.4,
        "init_bpb_human": 3.2,
        "student_decode_tokens_per_s": 190.0,
        "teacher_decode_tokens_per_s": 100.0,
        "student_ttft_s": 0.3,
        "teacher_ttft_s": 1.0,
        "student_experts_per_token": 2.0,
        "student_max_k": 4,
        "student_hard_minus_easy": -0.1,
    }
    rows = {name.split(" (")[0]: (value, target, ok) for name, value, target, ok in target_rows(summary, None)}
    assert rows["bits/byte human text, student / teacher"] == ("1.200", "<= 1.25", True)
    assert rows["bits/byte held-out teacher text, student / teacher"] == ("1.250", "<= 1.6", True)
    # shown, no target by default
    assert rows["bits/byte held-out teacher text after its prompt, student / teacher"] == ("2.250", "-", None)
    assert rows["bits/byte human text, init / teacher"] == ("1.600", "<= 1.5", False)
    assert rows["decode tokens/s, student / teacher"] == ("1.900", ">= 1.8", True)
    assert rows["time to first token, student / teacher"] == ("0.300", "<= 0.6", True)
    assert rows["experts per token / max_k"] == ("0.500", "<= 0.7", True)
    assert rows["difficulty curve: hard - easy"] == ("-0.100", "> 0", False)
    strict = TargetsSection(bpb_human_ratio=1.1, decode_speedup=None, bpb_heldout_in_context_ratio=2.0)
    rows = {name: (target, ok) for name, _, target, ok in target_rows(summary, strict)}
    assert rows["bits/byte held-out teacher text after its prompt, student / teacher"] == ("<= 2", False)
    assert rows["bits/byte human text, student / teacher"] == ("<= 1.1", False)
    assert rows["decode tokens/s, student / teacher"] == ("-", None)
    assert len(target_rows({"student_bpb_human": 2.0}, None)) == 0  # no teacher figure: no ratio row
    text = io.StringIO()
    print_summary({**summary, "stages": []}, Console(file=text, width=200), sample=("Hi?", "Hello there."))
    printed = text.getvalue()
    assert "MISSED" in printed and "1.200" in printed
    assert "bits/byte held-out, after its prompt: student vs teacher" in printed and "0.900 vs 0.400" in printed
    assert "sample answer" in printed and "'Hi?'" in printed and "Hello there." in printed
    assert "(served student, greedy)" in printed
    assert "held-out prompt" not in printed  # no eval samples: no line

    heldout = {"prompt": "Say [bold]hi[/bold]", "teacher": "Hi [there].", "student": "Hi hi", "repetition_penalty": 1.1}
    text = io.StringIO()
    print_summary({**summary, "stages": [], "heldout_sample": heldout}, Console(file=text, width=200))
    printed = text.getvalue()
    assert "held-out prompt (never trained on; eval, greedy, repetition_penalty 1.1)" in printed
    # model text printed as written, not read as rich markup
    assert "'Say [bold]hi[/bold]'" in printed and "teacher: Hi [there]." in printed and "student: Hi hi" in printed


def test_the_sample_says_which_serving_defaults_it_got():
    from pipelines.config import PipelineConfig
    from pipelines.runner import sample_settings

    plain = PipelineConfig(name="p")
    assert sample_settings(plain) == "greedy"
    tuned = PipelineConfig(name="p", serve={"sampling_defaults": {"repetition_penalty": 1.1, "temperature": 0.7}})
    assert sample_settings(tuned) == "greedy, repetition_penalty 1.1"  # the sample asks for temperature 0
