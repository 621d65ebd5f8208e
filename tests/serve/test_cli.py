"""``raydistill serve``: flags -> serve section, and the --no-ray server end to end (subprocess)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from cluster.errors import ConfigError
from pipelines.cli import build_parser
from pipelines.cli.serve import section_from_args
from serve.section import ServeSection

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _args(*argv):
    return build_parser().parse_args(["serve", *argv])


def test_flags_override_the_config_section():
    args = _args(
        "runs/q/123/",
        "--port",
        "8123",
        "--min-replicas",
        "2",
        "--prompt-log",
        "memory://plog",
        "--api-key-file",
        "keys.txt",
        "--no-ray",
    )
    s = section_from_args(ServeSection(), args)
    assert (s.port, s.min_replicas, s.max_replicas) == (8123, 2, 2)  # max follows min when only min is given
    assert s.prompt_log_uri == "memory://plog" and s.api_key_file == "keys.txt" and args.no_ray
    assert s.model_name == "123"  # default model id: MODEL_DIR's name
    assert section_from_args(ServeSection(model_name="m"), _args("x")).model_name == "m"
    with pytest.raises(ConfigError, match="max_replicas"):
        section_from_args(ServeSection(), _args("x", "--min-replicas", "3", "--max-replicas", "2"))


def test_section_validation_messages():
    with pytest.raises(ValueError, match="route_prefix"):
        ServeSection(route_prefix="v1")
    with pytest.raises(ValueError, match="extra"):
        ServeSection(replicas=2)
    assert ServeSection(min_replicas=0).min_replicas == 0  # scale to zero is allowed


@pytest.mark.slow
def test_no_ray_server_end_to_end(tiny_teacher_dir):
    import openai

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    env.pop("RAYDISTILL_API_KEYS", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "serve",
            tiny_teacher_dir,
            "--no-ray",
            "--port",
            str(port),
            "--model-name",
            "tiny",
            "--set",
            "serve.max_model_len=256",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
            assert proc.poll() is None, proc.stdout.read()
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, extra_body={"ignore_eos": True}
        )
        assert r.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "OpenAI base URL" in out and "OPEN" in out  # the open-server warning is printed at start
    assert "request chatcmpl-" in out  # one log line per request with its id
