"""The real stage adapters that need no model: filter (real), gate, export, deploy (fake Serve), rollback."""

from __future__ import annotations

import json
import types

import pytest

from cluster import storage
from pipelines import runner, stages
from pipelines.config import load_config
from pipelines.registry import Registry
from pipelines.runner import run_pipeline
from tests.pipelines.fakes import make_generated_run, read_manifest


def _cfg(tmp_path, *extra):
    return load_config(None, [f"workdir={tmp_path}", "name=real", *extra])


def _run_dir(cfg, run_id="r1"):
    from cluster.runs import run_dir

    return run_dir(cfg, run_id, create=True)


def test_only_filter_on_a_generated_run(tmp_path):
    cfg = _cfg(tmp_path)
    run = _run_dir(cfg)
    make_generated_run(run, rows=8)
    out = run_pipeline(cfg, only="filter", live=False)
    assert out.run_id == "r1" and out.status == "partial"
    entry = {s["name"]: s for s in read_manifest(run)["stages"]}["filter"]
    assert entry["status"] == "done" and entry["rows"] == 8 and entry["tokens"] == 32
    assert entry["outputs"] == [storage.join(run, "data", "filtered")]
    assert storage.exists(storage.join(run, "data", "filtered", "manifest.json"))
    assert read_manifest(run)["stages"][0]["status"] == "pending"  # generate never ran through the pipeline


def _report(run, passed, reason="bpb_heldout 1.2 vs 1.1"):
    storage.atomic_write_json(
        storage.join(run, "eval", "report.json"),
        {
            "gate": {"passed": passed, "reason": reason, "metric": "bpb_heldout"},
            "models": {"student": {"metrics": {"bpb_heldout": 1.2}}},
            "paths": {"html": storage.join(run, "eval", "report.html")},
        },
    )


def _ctx(cfg, run, registry=None):
    return stages.StageContext(
        cfg=cfg,
        run_dir=run,
        run_id=run.rsplit("/", 1)[-1],
        resume=False,
        show_progress=False,
        previous={},
        registry=registry or Registry.for_config(cfg),
    )


def test_gate_reads_the_eval_verdict(tmp_path):
    cfg = _cfg(tmp_path)
    run = _run_dir(cfg)
    with pytest.raises(Exception, match="run the eval stage first"):
        stages.STAGES["gate"].run(_ctx(cfg, run))
    registry = Registry.for_config(cfg)
    registry.promote("/served/old", run_id="r0")
    _report(run, passed=False)
    result = stages.STAGES["gate"].run(_ctx(cfg, run, registry))
    assert result.status == "refused" and "bpb_heldout 1.2 vs 1.1" in result.message
    assert "/served/old keeps serving" in result.message
    record = storage.read_json(storage.join(run, "gate", "manifest.json"))
    assert record["passed"] is False and record["served_before"] == "/served/old"
    _report(run, passed=True, reason="ok")
    assert stages.STAGES["gate"].run(_ctx(cfg, run, registry)).status == "done"


def test_export_topk_and_topp(tmp_path):
    from tests.distill.student.conftest import tiny_student

    cfg = _cfg(tmp_path)
    run = _run_dir(cfg)
    tiny_student().save_pretrained(storage.join(run, "student"))
    result = stages.STAGES["export"].run(_ctx(cfg, run))
    out = storage.join(run, "student-qwen2moe")
    assert (
        result.metrics["exported"]
        and json.loads(storage.read_text(storage.join(out, "config.json")))["model_type"] == "qwen2_moe"
    )
    assert storage.read_json(storage.join(run, "export", "manifest.json"))["dir"] == out
    assert not [p for p in storage.listdir(run) if ".tmp-" in p]  # staged folder renamed into place

    run2 = _run_dir(cfg, "r2")
    storage.atomic_write_json(storage.join(run2, "student", "config.json"), {"routing": "topp"})
    result = stages.STAGES["export"].run(_ctx(cfg, run2))
    assert not result.metrics["exported"] and not storage.exists(storage.join(run2, "student-qwen2moe"))
    assert "routing topp" in storage.read_json(storage.join(run2, "export", "manifest.json"))["reason"]


class FakeServe(types.SimpleNamespace):
    """Stands in for serve.app: records deploy/update calls, serves one app."""

    def __init__(self):
        super().__init__(calls=[], running=None)

    def status(self, name=None):
        return {"status": "RUNNING"} if self.running else None

    def deploy(self, model_dir, section, *, name=None):
        self.calls.append(("deploy", model_dir, name))
        self.running = model_dir
        return "http://127.0.0.1:8000"

    def update_model(self, model_dir, section, *, name=None):
        self.calls.append(("update", model_dir, name))
        self.running = model_dir

    def base_url(self, section):
        return "http://127.0.0.1:8000"

    def served_model_dir(self, name=None):
        return getattr(self, "running", None)


@pytest.fixture
def fake_serve(monkeypatch):
    import serve

    fake = FakeServe()
    monkeypatch.setitem(__import__("sys").modules, "serve.app", fake)
    monkeypatch.setattr(serve, "app", fake, raising=False)
    monkeypatch.setattr(runner, "ensure_ray", lambda cfg: None)
    monkeypatch.setattr(runner, "sample_completion", lambda base_url, cfg: "hello from the student")
    return fake


def _passed_run(cfg, run_id):
    run = _run_dir(cfg, run_id)
    storage.atomic_write_json(storage.join(run, "student", "config.json"), {"routing": "topk"})
    _report(run, passed=True, reason="better")
    storage.atomic_write_json(storage.join(run, "gate", "manifest.json"), {"passed": True})
    return run


def test_deploy_promotes_and_rollback_restores(tmp_path, fake_serve, capsys):
    cfg = _cfg(tmp_path, "pipeline.stages=[gate, deploy]")
    for run_id in ("r1", "r2"):
        run = _passed_run(cfg, run_id)
        out = run_pipeline(cfg, run_id=run_id, live=False)
        assert out.status == "done" and out.base_url == "http://127.0.0.1:8000"
        deploy = storage.read_json(storage.join(run, "deploy", "manifest.json"))
        assert deploy["model_dir"] == storage.join(run, "student")
    r1, r2 = (storage.join(tmp_path, "real", r, "student") for r in ("r1", "r2"))
    # first deploy starts the app, the second swaps the model in place
    assert fake_serve.calls == [("deploy", r1, "real"), ("update", r2, "real")]
    registry = Registry.for_config(cfg)
    assert registry.current()["model_dir"] == r2 and registry.previous()[-1]["model_dir"] == r1

    # a refused run changes nothing: the old model keeps serving
    run3 = _passed_run(cfg, "r3")
    _report(run3, passed=False, reason="worse")
    assert run_pipeline(cfg, run_id="r3", live=False).status == "refused"
    assert len(fake_serve.calls) == 2 and registry.current()["model_dir"] == r2

    from pipelines.cli import main

    assert main(["rollback", "real", "--set", f"workdir={tmp_path}"]) == 0
    assert fake_serve.calls[-1] == ("update", r1, "real") and registry.current()["model_dir"] == r1
    assert main(["rollback", "real", "--set", f"workdir={tmp_path}"]) == 2  # nothing older
    assert "nothing to roll back to" in capsys.readouterr().err


def test_runs_list_and_show(tmp_path, capsys):
    from pipelines.cli import main
    from tests.pipelines.fakes import FakeStages

    cfg = _cfg(tmp_path)
    run_pipeline(cfg, run_id="r1", stages=FakeStages(fail={"eval"}).mapping(), live=False)
    Registry.for_config(cfg).promote("/x", run_id="r1")  # serving.json beside the runs is not a run
    assert main(["runs", "list", "--set", f"workdir={tmp_path}", "--set", "name=real", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["run_id"], r["status"], r["stages_done"], r["served"]) for r in rows] == [("r1", "failed", "3/7", True)]
    assert main(["runs", "show", "r1", "--set", f"workdir={tmp_path}", "--set", "name=real", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"][3]["message"] == "RuntimeError: injected failure in eval"
    assert main(["runs", "show", "r1", "--set", f"workdir={tmp_path}", "--set", "name=real"]) == 0
    assert "injected failure in eval" in capsys.readouterr().err
