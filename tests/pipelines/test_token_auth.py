"""Issue #16 point 2: `raydistill submit` / `schedule` work against a head with Ray token auth, with the
token in a file only (no RAY_AUTH_MODE in the client's environment), and the cluster configs keep token
auth on."""

from __future__ import annotations

import secrets

import httpx
import pytest
import yaml

from cluster import storage
from tests.conftest import REPO_ROOT
from tests.pipelines.fakes import make_generated_run, read_manifest
from tests.serve.cluster_head import clean_env, start_head

QUICKSTART = str(REPO_ROOT / "pipelines" / "configs" / "quickstart.yaml")


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.own_cluster
def test_submit_and_schedule_status_against_a_token_auth_head(tmp_path, monkeypatch, capsys):
    from pipelines.cli import main
    from pipelines.config import load_config
    from pipelines.scheduler import RayJobSubmitter

    token_file = tmp_path / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    with start_head(clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))) as (_gcs, dashboard):
        assert httpx.get(dashboard + "/api/jobs/", timeout=30).status_code == 401  # token auth is really on
        # The laptop: the head's token copied into a file, nothing else (as in the README).
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
        workdir = str(tmp_path / "runs")
        run = storage.join(workdir, "tok", "r1")
        make_generated_run(run, rows=4)
        sets = [f"workdir={workdir}", "name=tok"]
        rc = main(
            [
                "submit",
                QUICKSTART,
                "--address",
                dashboard,
                "--run",
                "r1",
                "--only",
                "filter",
                *[a for s in sets for a in ("--set", s)],
            ]
        )
        out = capsys.readouterr()
        assert rc == 0, out.out[-3000:] + out.err[-3000:]
        assert "filter: done" in out.out  # the log stream (websocket) is authenticated too
        job_id = out.out.splitlines()[0]
        submitter = RayJobSubmitter(load_config(QUICKSTART, sets), QUICKSTART, sets, address=dashboard)
        assert submitter.status(job_id) == "SUCCEEDED"  # what the scheduler polls
    assert {s["name"]: s for s in read_manifest(run)["stages"]}["filter"]["status"] == "done"


def test_job_server_headers_find_the_token_like_ray_does(tmp_path, monkeypatch):
    from pipelines.scheduler import job_server_headers

    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert job_server_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert job_server_headers() == {"Authorization": "Bearer from-home"}
    other = tmp_path / "tok"
    other.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(other))
    assert job_server_headers() == {"Authorization": "Bearer from-path"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert job_server_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert job_server_headers() == {}


def test_cluster_yaml_keeps_token_auth_on_every_node():
    cfg = yaml.safe_load((REPO_ROOT / "ray_cluster.yaml").read_text())
    text = (REPO_ROOT / "ray_cluster.yaml").read_text()
    assert "RAY_AUTH_MODE=disabled" not in text
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts), starts
    # Every node gets the laptop's token (made by `ray get-auth-token --generate` before `ray up`).
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
