"""Own Ray clusters for the own_cluster tests: one local Ray with the job server per test session.

Starting one costs ~20 s on 2 cores, so the Ray Jobs tests, the end-to-end job and the Serve-auth
test on a separately started head share it (``job_server`` in tests/pipelines/conftest.py). Every
process of the cluster is found by its temp dir and killed at the end; nothing else is touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_processes(marker: str) -> list[int]:
    """Pids of processes whose command line mentions ``marker`` (a temp dir only our Ray uses)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


def kill_leftovers(marker: str) -> None:
    """SIGKILL each process of ours that mentions ``marker``; wait (bounded) until they are gone."""
    for pid in ray_processes(marker):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while ray_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)


@dataclasses.dataclass
class Cluster:
    address: str  # the job server, http://127.0.0.1:PORT
    gcs_address: str  # what a driver passes to ray.init(address=...)
    temp_dir: str


@contextlib.contextmanager
def ray_head(env: dict[str, str], num_cpus: int, *, prefix: str, timeout: float = 120, **popen) -> Iterator[Cluster]:
    """``tests/pipelines/ray_head.py`` in a subprocess with exactly ``env``: its own temp dir and free ports;
    stopped on exit with everything that runs on it (Serve replicas, job drivers)."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths have a length limit
    log_path = os.path.join(temp_dir, "head.log")
    log = open(log_path, "w")  # a file, not a pipe: nobody drains a pipe once the cluster is up
    head = str(REPO_ROOT / "tests" / "pipelines" / "ray_head.py")
    proc = subprocess.Popen(
        [sys.executable, head, str(port), str(free_port()), temp_dir, str(num_cpus)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
        **popen,
    )
    try:
        deadline = time.time() + timeout
        ready = None
        while time.time() < deadline and proc.poll() is None:
            ready = next((line for line in Path(log_path).read_text().splitlines() if line.startswith("READY")), None)
            if ready:
                break
            time.sleep(0.1)
        if not ready:
            pytest.fail("local Ray head did not start:\n" + Path(log_path).read_text()[-4000:])
        yield Cluster(f"http://127.0.0.1:{port}", ready.split()[1], temp_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        kill_leftovers(temp_dir)  # nothing of this cluster may outlive the test
        log.close()
        remove_dir(temp_dir)


def remove_dir(path: str, timeout: float = 10) -> None:
    """``rmtree`` until the folder is gone (bounded): an exiting Ray process may still write a file into it."""
    deadline = time.monotonic() + timeout
    shutil.rmtree(path, ignore_errors=True)
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def job_cluster(num_cpus: int = 2) -> Iterator[Cluster]:
    """A local Ray with the job server, sharing this process's environment (without RAY_ADDRESS)."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    saved = os.environ.get("RAY_AUTH_MODE")
    try:
        with ray_head(env, num_cpus, prefix="rde-", start_new_session=True) as cluster:
            os.environ["RAY_AUTH_MODE"] = "disabled"  # the client side of the same cluster
            yield cluster
    finally:
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def shutdown_serve(job_server: str, timeout: float = 120) -> None:
    """Shut Serve down on the cluster behind ``job_server`` (its apps and HTTP proxy) through the
    dashboard's REST API (no new driver has to join the cluster)."""
    import httpx

    response = httpx.delete(job_server.rstrip("/") + "/api/serve/applications/", timeout=timeout)
    assert response.status_code == 200, response.text[-3000:]
