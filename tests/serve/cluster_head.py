"""A separate local Ray head for tests that need a *running* cluster whose processes do not share the test's
environment (as on a real cluster started with ``ray start --head``).

``start_head(env)`` runs ``tests/pipelines/ray_head.py`` in a subprocess with exactly ``env`` (plus PATH),
its own temp dir and free ports; it yields ``(gcs_address, dashboard_url)`` and stops the head (SIGTERM to
that process only) afterwards.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

from tests.conftest import REPO_ROOT
from tests.pipelines.cluster_harness import ray_head

# What a clean machine's environment has; nothing of the test process's own settings (API keys...).
CLEAN_ENV_KEYS = ("HOME", "LANG", "LC_ALL", "TMPDIR", "USER")


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
    """Yields ``(gcs_address, dashboard_url)`` of a head started with exactly ``env``."""
    with ray_head(env, num_cpus, prefix="rdh-", timeout=timeout, cwd=tempfile.gettempdir()) as cluster:
        yield cluster.gcs_address, cluster.address
