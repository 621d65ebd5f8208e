"""Issue #16 points 2 and 10 on Kubernetes: emitted manifests keep Ray token auth on with secrets only as
secretKeyRef, and the CronJob's overlap check counts every unfinished RayJob (run against a fake kubectl)."""

from __future__ import annotations

import stat
import subprocess

import pytest
import yaml

from cluster.errors import ConfigError
from pipelines import k8s
from pipelines.config import load_config
from tests.conftest import REPO_ROOT

QUICKSTART = str(REPO_ROOT / "pipelines" / "configs" / "quickstart.yaml")


def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _containers(job):
    return [n for n in _walk(job) if "image" in n and "name" in n]


@pytest.mark.parametrize("cluster_name", [None, "distill"])
def test_rayjob_keeps_token_auth_and_secrets_are_references(tmp_path, cluster_name):
    sets = [
        "schedule.cron=0 3 * * *",
        "schedule.k8s.secret_env={AWS_SECRET_ACCESS_KEY: aws/secret, RAYDISTILL_API_KEYS: serve-keys/keys}",
    ]
    if cluster_name:
        sets.append(f"schedule.k8s.cluster_name={cluster_name}")
    cfg = load_config(QUICKSTART, sets)
    job = k8s.rayjob(cfg, QUICKSTART)
    containers = _containers(job)
    assert {c["name"] for c in containers} >= {"ray-job-submitter"}
    if not cluster_name:
        assert {c["name"] for c in containers} == {"ray-head", "ray-worker", "ray-job-submitter"}
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "raydistill-ray-auth",
            "key": "auth_token",
        }
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "aws", "key": "secret"}
        assert env["RAYDISTILL_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "serve-keys", "key": "keys"}
        assert all("value" not in e for e in c["env"] if e["name"] != "RAY_AUTH_MODE")
    text = yaml.safe_dump(job)
    assert "disabled" not in text


def test_secret_looking_env_vars_are_never_written_inline(tmp_path):
    cfg = load_config(QUICKSTART, ["schedule.cron=0 3 * * *", "schedule.env_vars={HF_TOKEN: hf_abc, MODE: x}"])
    with pytest.raises(ConfigError, match=r"\['HF_TOKEN'\].*schedule.k8s.secret_env"):
        k8s.emit(cfg, QUICKSTART, str(tmp_path))
    with pytest.raises(ConfigError, match="secret-name/key"):
        load_config(QUICKSTART, ["schedule.k8s.secret_env={X: no-key}"])


def _run_script(tmp_path, cfg, listing: str) -> tuple[str, list[str]]:
    """Run the CronJob's script with a fake kubectl printing ``listing`` for `get`; returns (stdout, calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    fake = bin_dir / "kubectl"
    fake.write_text(f"""#!/bin/sh
echo "$@" >> {calls}
case "$1" in get) printf '%b' "$FAKE_LISTING" ;; esac
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    if calls.exists():
        calls.unlink()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RAYJOB_MANIFEST": "kind: RayJob", "FAKE_LISTING": listing}
    proc = subprocess.run(
        ["/bin/sh", "-c", k8s._create_script(cfg)], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.parametrize("status", ["", "Initializing", "Waiting", "Running", "Retrying", "Suspending"])
def test_forbid_counts_every_unfinished_rayjob(tmp_path, status):
    cfg = load_config(QUICKSTART, ["schedule.cron=0 3 * * *"])
    out, calls = _run_script(tmp_path, cfg, f"old-1=Complete\\nold-2=Failed\\nnow-1={status}\\n")
    assert "skipping this tick: RayJob(s) now-1 still running" in out
    assert not any(c.startswith("create") for c in calls), calls


def test_forbid_creates_when_every_rayjob_has_ended(tmp_path):
    cfg = load_config(QUICKSTART, ["schedule.cron=0 3 * * *"])
    for listing in ("", "a=Complete\\nb=Failed\\nc=ValidationFailed\\n"):
        out, calls = _run_script(tmp_path, cfg, listing)
        assert "skipping" not in out and calls[-1] == "create -f -", calls


def test_replace_deletes_every_unfinished_rayjob(tmp_path):
    cfg = load_config(QUICKSTART, ["schedule.cron=0 3 * * *", "schedule.concurrency=replace"])
    _, calls = _run_script(tmp_path, cfg, "a=Complete\\nb=Initializing\\nc=Running\\n")
    assert "delete rayjob -n default b c" in calls and calls[-1] == "create -f -", calls
