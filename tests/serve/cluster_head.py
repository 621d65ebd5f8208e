"""A separate local Ray head for tests that need a *running* cluster whose processes do not share the test's
environment (as on a real cluster started with ``ray start --head``).

``start_head(env)`` runs ``tests/pipelines/ray_head.py`` in a subprocess with exactly ``env`` (plus PATH),
its own temp dir and free ports; it yields ``(gcs_address, dashboard_url)`` and stops the head (SIGTERM to
that process only) afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from tests.conftest import REPO_ROOT

# What a clean machine's environment has; nothing of the test process's own settings (API keys...).
CLEAN_ENV_KEYS = ("HOME", "LANG", "LC_ALL", "TMPDIR", "USER")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment (no API keys, no RAY_ADDRESS) with the venv's bin first on PATH."""
    env = {k: os.environ[k] for k in CLEAN_ENV_KEYS if k in os.environ}
    env["PATH"] = f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(extra)
    return env


@contextlib.contextmanager
def start_head(env: dict[str, str], num_cpus: int = 1, timeout: float = 180) -> Iterator[tuple[str, str]]:
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rdh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    log_path = os.path.join(temp_dir, "head.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "tests" / "pipelines" / "ray_head.py"),
            str(port),
            str(free_port()),
            temp_dir,
            str(num_cpus),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
        cwd=temp_dir,
    )
    address: str | None = None
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            text = open(log_path).read()
            if "READY" in text:
                address = re.search(r"ADDRESS=(\S+)", text).group(1)
                break
            time.sleep(0.5)
        if address is None:
            raise RuntimeError("local Ray head did not start:\n" + open(log_path).read()[-4000:])
        yield address, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
