"""KubeRay RayJob + CronJob emission, and the serving registry's promote/rollback."""

from __future__ import annotations

import pytest
import yaml

from cluster.errors import ConfigError, RaydistillError
from pipelines import k8s
from pipelines.config import load_config
from pipelines.registry import Registry
from tests.conftest import REPO_ROOT

QUICKSTART = str(REPO_ROOT / "pipelines" / "configs" / "quickstart.yaml")


def _load_all(path):
    with open(path) as handle:
        return list(yaml.safe_load_all(handle))


def test_emit_k8s_writes_rayjob_cronjob_rbac(tmp_path):
    cfg = load_config(
        QUICKSTART,
        [
            "schedule.cron=30 2 * * 1-5",
            "schedule.timezone=Europe/Berlin",
            "schedule.k8s.worker_gpus=1",
            "schedule.k8s.namespace=ml",
        ],
    )
    paths = k8s.emit(cfg, QUICKSTART, str(tmp_path), overrides=["prompts.count=8"])
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == ["cronjob.yaml", "rayjob.yaml", "rbac.yaml"]
    (job,) = _load_all(tmp_path / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["generateName"] == "quickstart-" and job["metadata"]["namespace"] == "ml"
    assert job["spec"]["entrypoint"] == (
        "python -m pipelines.run pipelines/configs/quickstart.yaml --set prompts.count=8"
    )
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == "/app"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert job["spec"]["shutdownAfterJobFinishes"] is True

    (cron,) = _load_all(tmp_path / "cronjob.yaml")
    assert cron["apiVersion"] == "batch/v1" and cron["kind"] == "CronJob"
    assert cron["spec"]["schedule"] == "30 2 * * 1-5" and cron["spec"]["timeZone"] == "Europe/Berlin"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and "startingDeadlineSeconds" not in cron["spec"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "raydistill-scheduler" and pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    script = container["args"][0]
    assert "kubectl create -f -" in script and "still running" in script
    embedded = yaml.safe_load(container["env"][0]["value"])
    assert embedded == job  # the CronJob creates exactly the emitted RayJob

    kinds = [d["kind"] for d in _load_all(tmp_path / "rbac.yaml")]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding"]


def test_emit_k8s_existing_cluster_replace_no_catchup(tmp_path):
    cfg = load_config(
        QUICKSTART,
        [
            "schedule.cron=0 * * * *",
            "schedule.concurrency=replace",
            "schedule.catchup=false",
            "schedule.misfire_grace_s=600",
            "schedule.k8s.cluster_name=distill",
        ],
    )
    k8s.emit(cfg, QUICKSTART, str(tmp_path))
    (job,) = _load_all(tmp_path / "rayjob.yaml")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "distill"} and "rayClusterSpec" not in job["spec"]
    (cron,) = _load_all(tmp_path / "cronjob.yaml")
    assert cron["spec"]["concurrencyPolicy"] == "Replace" and cron["spec"]["startingDeadlineSeconds"] == 600
    assert (
        "kubectl delete rayjob" in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    )


def test_emit_k8s_errors(tmp_path):
    cfg = load_config(QUICKSTART)
    with pytest.raises(ConfigError, match="schedule.cron: not set"):
        k8s.emit(cfg, QUICKSTART, str(tmp_path))
    outside = tmp_path / "p.yaml"
    outside.write_text("name: x\nschedule: {cron: '0 3 * * *'}\n")
    with pytest.raises(ConfigError, match="outside the project"):
        k8s.emit(load_config(str(outside)), str(outside), str(tmp_path))


def test_registry_promote_and_rollback(tmp_path):
    reg = Registry(str(tmp_path / "demo"), "demo")
    assert reg.current() is None and reg.baseline_for("r1") is None
    with pytest.raises(RaydistillError, match="nothing to roll back to"):
        reg.rollback()
    reg.promote("/runs/r1/student", run_id="r1", base_url="http://x")
    reg.promote("/runs/r2/student", run_id="r2")
    reg.promote("/runs/r3/student", run_id="r3")
    assert reg.current()["model_dir"] == "/runs/r3/student"
    assert [e["model_dir"] for e in reg.previous()] == ["/runs/r1/student", "/runs/r2/student"]
    # the baseline of run r3 (a rerun after its own promotion) is the model before it
    assert reg.baseline_for("r3")["run_id"] == "r2" and reg.baseline_for("r4")["run_id"] == "r3"
    # promoting the current model again changes nothing in the history
    reg.promote("/runs/r3/student", run_id="r3", base_url="http://y")
    assert len(reg.previous()) == 2 and reg.current()["base_url"] == "http://y"
    assert reg.rollback()["model_dir"] == "/runs/r2/student"
    assert reg.rollback()["model_dir"] == "/runs/r1/student"
    assert reg.current()["model_dir"] == "/runs/r1/student" and reg.previous() == []
    events = reg.load()["events"]
    assert [e["action"] for e in events] == ["promote"] * 3 + ["rollback"] * 2
    assert events[-1]["from_model_dir"] == "/runs/r2/student"
    # the file is what other processes see
    assert Registry(str(tmp_path / "demo"), "demo").current()["run_id"] == "r1"


def test_cluster_config_loads_and_emits(tmp_path):
    path = str(REPO_ROOT / "pipelines" / "configs" / "cluster.yaml")
    cfg = load_config(path)
    assert cfg.teacher.backend == "vllm" and cfg.prompts.source.value == "served_prompts"
    assert cfg.schedule.cron == "0 2 * * *" and cfg.pipeline.deploy_model == "qwen2_moe"
    k8s.emit(cfg, path, str(tmp_path))
    (job,) = _load_all(tmp_path / "rayjob.yaml")
    assert job["spec"]["entrypoint"] == "python -m pipelines.run pipelines/configs/cluster.yaml"
    assert any(p.startswith("vllm") for p in yaml.safe_load(job["spec"]["runtimeEnvYAML"])["pip"])
