"""Issue #16 point 1: API keys hold on a running cluster whose workers never saw the driver's environment."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.serve.cluster_head import clean_env, free_port, start_head

FAKE = "tests.serve.fake_engine:FakeAsyncEngine.from_pretrained"

DRIVER = r"""
import json, os, sys
import httpx
from cluster.ray_init import connect
connect(os.environ["RD_HEAD"], runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
from serve.app import deploy, shutdown
from serve.section import ServeSection
section = ServeSection(port=int(os.environ["RD_PORT"]), route_prefix="/auth", api_key_env="RD_TEST_KEYS",
                       num_cpus=0.25, ingress_num_cpus=0)
url = deploy(os.environ["RD_MODEL"], section, name="auth", engine_factory=os.environ["RD_FAKE"])
body = {"model": "auth", "prompt": "hi", "max_tokens": 2}
out = {}
try:
    with httpx.Client(timeout=60) as http:
        r = http.post(url + "/v1/completions", json=body)
        out["no_key"] = [r.status_code, r.json()]
        r = http.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        out["wrong_key"] = r.status_code
        r = http.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer s3cret-key"})
        out["key"] = r.status_code
finally:
    shutdown("auth")
print("RESULT=" + json.dumps(out), flush=True)
"""


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.own_cluster
def test_keys_set_only_in_the_driver_protect_a_running_cluster(tiny_teacher_dir):
    # The head (and so every worker it starts) has no RD_TEST_KEYS; only the deploying driver does.
    with start_head(clean_env(RAY_AUTH_MODE="disabled"), num_cpus=1) as (address, _dashboard):
        env = clean_env(
            RAY_AUTH_MODE="disabled",
            RD_HEAD=address,
            RD_PORT=str(free_port()),
            RD_MODEL=tiny_teacher_dir,
            RD_FAKE=FAKE,
            RD_TEST_KEYS="s3cret-key",
        )
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER], env=env, cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=400
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT=")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(lines[0][len("RESULT=") :])
    status, body = result["no_key"]
    assert status == 401 and body["error"]["code"] == "invalid_api_key", result
    assert result["wrong_key"] == 401
    assert result["key"] == 200
