"""Serve with API keys onto a separately started Ray head (the session's own cluster).

The deploying driver is a separate process that has the keys in its environment; the cluster's
processes were started before and never saw them. The endpoint must still refuse requests
without a key or with a wrong one (401, OpenAI's ``invalid_api_key``) and answer with one (200).
(Issue 16 point 1 and issue 18 point 3; it replaces tests/serve/test_cluster_auth.py, which checked the same
on a second head of its own, ~40 s more.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from tests.conftest import REPO_ROOT
from tests.pipelines.cluster_harness import free_port, shutdown_serve

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.own_cluster]

FAKE = "tests.serve.fake_engine:FakeAsyncEngine.from_pretrained"


def test_api_keys_reach_the_replicas_on_a_separately_started_head(own_cluster, job_server, tiny_teacher_dir):
    port = free_port()  # Ray Serve's HTTP proxy binds the port it is given; it cannot report one it picked
    driver = f"""
from cluster.ray_init import connect
connect({own_cluster.gcs_address!r}, runtime_env={{"env_vars": {{"PYTHONPATH": {str(REPO_ROOT)!r}}}}})
from serve.app import deploy
from serve.section import ServeSection
section = ServeSection(port={port}, route_prefix="/auth", api_key_env="RD_TEST_SERVE_KEYS", num_cpus=0.25,
                       ingress_num_cpus=0, max_batch_size=2)
print("URL", deploy({tiny_teacher_dir!r}, section, name="auth", engine_factory={FAKE!r}), flush=True)
"""
    # The keys live in this driver's environment only: the head and its workers were started without them.
    assert "RD_TEST_SERVE_KEYS" not in os.environ
    env = {
        **os.environ,
        "RD_TEST_SERVE_KEYS": "k-head-1, k-head-2",
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": str(REPO_ROOT),
    }
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run(
            [sys.executable, "-c", driver], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        url = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("URL "))
        assert url == f"http://127.0.0.1:{port}/auth"
        body = {"model": "auth", "prompt": "hi", "max_tokens": 2, "temperature": 0}
        with httpx.Client(timeout=60) as http:
            no_key = http.post(url + "/v1/completions", json=body)
            assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key", no_key.text
            wrong = http.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer k-head-3"})
            assert wrong.status_code == 401, wrong.text
            ok = http.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer k-head-2"})
            assert ok.status_code == 200, ok.text
            assert ok.json()["model"] == "auth"
    finally:
        shutdown_serve(job_server)
