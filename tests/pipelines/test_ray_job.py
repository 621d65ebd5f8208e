"""`raydistill submit` / `python -m pipelines.run` through Ray's JobSubmissionClient on a local cluster
(the session's shared own cluster: ``job_server`` in tests/pipelines/conftest.py)."""

from __future__ import annotations

import time

import pytest

from cluster import storage
from tests.conftest import REPO_ROOT
from tests.pipelines.fakes import make_generated_run, read_manifest

QUICKSTART = str(REPO_ROOT / "pipelines" / "configs" / "quickstart.yaml")


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.own_cluster
def test_submit_only_filter_job(job_server, tmp_path, capsys):
    from pipelines.cli import main

    workdir = str(tmp_path / "runs")
    run = storage.join(workdir, "jobtest", "r1")
    make_generated_run(run, rows=6)
    sets = ["--set", f"workdir={workdir}", "--set", "name=jobtest"]
    rc = main(["submit", QUICKSTART, "--address", job_server, "--run", "r1", "--only", "filter", *sets])
    out = capsys.readouterr()
    assert rc == 0, out.out[-3000:] + out.err[-3000:]
    job_id = out.out.splitlines()[0]
    assert job_id.startswith("raydistill-jobtest-r1-")
    assert "filter: done" in out.out  # the job's log lines were followed
    manifest = read_manifest(run)
    entry = {s["name"]: s for s in manifest["stages"]}["filter"]
    assert entry["status"] == "done" and entry["rows"] == 6
    assert entry["outputs"] == [storage.join(run, "data", "filtered")]
    assert manifest["invocations"][-1]["argv"][:1] == ["pipelines/configs/quickstart.yaml"]

    # a failing job (bad stage input) ends FAILED and the CLI says so
    rc = main(["submit", QUICKSTART, "--address", job_server, "--run", "r1", "--only", "eval", "--no-follow", *sets])
    assert rc == 0
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(job_server)
    job_id = capsys.readouterr().out.splitlines()[0]
    deadline = time.time() + 120
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED} and time.time() < deadline:
        time.sleep(1)
    assert client.get_job_status(job_id) == JobStatus.FAILED
    assert {s["name"]: s for s in read_manifest(run)["stages"]}["eval"]["status"] == "failed"


class _StartedClock:
    """Real time, but starting at a chosen instant (two seconds before a cron tick)."""

    def __init__(self, start):
        self.start, self.t0 = start, time.monotonic()

    def now(self):
        import datetime as dt

        return self.start + dt.timedelta(seconds=time.monotonic() - self.t0)

    def sleep(self, seconds):
        time.sleep(min(seconds, 1.0))


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.own_cluster
def test_scheduler_submits_ray_jobs(job_server, tmp_path):
    import datetime as dt

    from pipelines.config import load_config
    from pipelines.scheduler import RayJobSubmitter, Scheduler, run_id_for

    workdir = str(tmp_path / "runs")
    tick = dt.datetime(2026, 1, 5, 11, 0, tzinfo=dt.timezone.utc)
    run = storage.join(workdir, "sched", run_id_for(tick))
    make_generated_run(run, rows=5)
    overrides = [
        f"workdir={workdir}",
        "name=sched",
        "schedule.cron=0 * * * *",
        "schedule.poll_s=1",
        "pipeline.stages=[filter]",
    ]
    cfg = load_config(QUICKSTART, overrides)
    sched = Scheduler(
        cfg,
        RayJobSubmitter(cfg, QUICKSTART, overrides, address=job_server),
        clock=_StartedClock(tick - dt.timedelta(seconds=2)),
    )
    entry = sched.run(once=True, max_iterations=300)
    assert entry["outcome"] == "succeeded", sched.state
    assert entry["run_id"] == "20260105-110000-cron" and entry["job_id"].startswith("raydistill-sched-")
    assert read_manifest(run)["stages"][0]["status"] == "done"
    assert storage.read_json(sched.uri)["active"] is None


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.own_cluster
def test_job_driver_keeps_the_jobs_runtime_env(job_server):
    """Inside a job, ensure_ray joins the cluster without replacing the job's runtime_env (pip, env vars)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from cluster.ray_init import build_runtime_env

    code = (
        "import os, ray; from pipelines.config import load_config; from pipelines.runner import ensure_ray; "
        "ensure_ray(load_config(None)); f = ray.remote(num_cpus=0)(lambda: os.environ.get('RD_MARK')); "
        "print('MARK=' + str(ray.get(f.remote())))"
    )
    client = JobSubmissionClient(job_server)
    job_id = client.submit_job(
        entrypoint=f'python -c "{code}"', runtime_env=build_runtime_env(env_vars={"RD_MARK": "from-job"})
    )
    deadline = time.time() + 180
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED} and time.time() < deadline:
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
    assert "MARK=from-job" in logs


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.own_cluster
def test_the_job_supervisor_resolves_auto_to_the_test_head_beside_other_rays(own_cluster):
    """Other Rays on the machine (here: processes that look like raylets of 7 other clusters, as Ray's
    discovery sees them) must not capture the test head's job drivers: the head writes its address into
    its temp dir, where its job supervisor resolves "auto"; the driver gets the head's GCS address."""
    import subprocess
    import sys

    from ray._private.services import find_gcs_addresses, get_ray_address_from_environment
    from ray._private.utils import read_ray_address
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert read_ray_address(own_cluster.temp_dir) == own_cluster.gcs_address
    others = [f"192.0.2.{i}:46633" for i in range(2, 9)]  # TEST-NET-1: nothing answers there
    decoys = [
        subprocess.Popen(
            ["raylet-decoy", "-c", "import time; time.sleep(600)", f"--gcs-address={a}"], executable=sys.executable
        )
        for a in others
    ]
    try:
        find_gcs_addresses.cache_clear()
        deadline = time.monotonic() + 30
        while not set(others) <= set(find_gcs_addresses()):
            assert time.monotonic() < deadline, "the decoy raylets are not seen by Ray's discovery"
            time.sleep(0.1)
            find_gcs_addresses.cache_clear()
        assert get_ray_address_from_environment("auto", own_cluster.temp_dir) == own_cluster.gcs_address

        client = JobSubmissionClient(own_cluster.address)
        job_id = client.submit_job(entrypoint="python -c \"import os; print('ADDR=' + os.environ['RAY_ADDRESS'])\"")
        deadline = time.monotonic() + 120
        while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED}:
            assert time.monotonic() < deadline, "the job did not end"
            time.sleep(0.5)
        logs = client.get_job_logs(job_id)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
        assert f"ADDR={own_cluster.gcs_address}" in logs, logs[-3000:]
    finally:
        for d in decoys:
            d.kill()
            d.wait(timeout=10)
        find_gcs_addresses.cache_clear()
