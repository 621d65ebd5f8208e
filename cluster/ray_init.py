"""Start or join Ray.

``connect()`` with no address starts an embedded local Ray sized to this machine (quiet logs,
dashboard off unless asked): the default, which must just work on a 2-core laptop. With an
address (``auto``, ``ray://host:10001`` or ``host:6379``) it joins that cluster and ships the
project as the ``working_dir`` of the ``runtime_env`` so every node can import it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from cluster.errors import RaydistillError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Kept out of the working_dir upload: environments, run outputs and caches.
RUNTIME_ENV_EXCLUDES = [
    ".venv/",
    "runs/",
    ".git/",
    "**/__pycache__/",
    ".pytest_cache/",
    "*.egg-info/",
    "bench/out/",
    "*.safetensors",
    "*.gguf",
]


def build_runtime_env(
    working_dir: str | os.PathLike | None = None,
    pip: list[str] | None = None,
    extras: list[str] | None = None,
    env_vars: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The ``runtime_env`` for remote runs: the project as working_dir plus optional pip packages.

    ``extras`` (e.g. ``["gpu"]``) become ``raydistill[gpu]``-style requirements resolved from the
    working_dir, so cluster nodes get the same optional dependencies as the driver asked for.
    """
    env: dict[str, Any] = {"working_dir": str(working_dir or PROJECT_ROOT), "excludes": list(RUNTIME_ENV_EXCLUDES)}
    packages = list(pip or [])
    if extras:
        packages.extend(_extra_requirements(extras))
    if packages:
        env["pip"] = packages
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def _extra_requirements(extras: list[str]) -> list[str]:
    import tomllib

    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    optional = pyproject["project"]["optional-dependencies"]
    out: list[str] = []
    for extra in extras:
        if extra not in optional:
            raise RaydistillError(f"unknown extra {extra!r}; choose from {sorted(optional)}")
        out.extend(optional[extra])
    return out


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    dashboard: bool = False,
    runtime_env: dict[str, Any] | None = None,
    namespace: str = "raydistill",
    log_level: int = logging.WARNING,
) -> dict[str, Any]:
    """Start a local Ray (``address=None``) or join one; returns the cluster's resources.

    Idempotent: if Ray is already initialised in this process (e.g. inside ``ray job submit``),
    it is reused as is.
    """
    import ray

    quiet_ray_logs()  # also when Ray is up: a library imported since (ray.serve) may have reset its logger
    if ray.is_initialized():
        return ray.cluster_resources()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Ray Train V2 is the default in recent Ray; make it explicit so older 2.x behave the same.
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    common: dict[str, Any] = dict(
        namespace=namespace, logging_level=log_level, ignore_reinit_error=True, log_to_driver=True
    )
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]  # set by `ray job submit` and by users
    if address is None:
        cpus = num_cpus or os.cpu_count() or 1
        # Cap the object store: the default (30% of RAM) starves a laptop's torch workers.
        object_store = min(2 * 1024**3, int(_total_memory() * 0.15))
        ray.init(
            num_cpus=cpus,
            num_gpus=num_gpus if num_gpus is not None else _local_gpus(),
            include_dashboard=dashboard,
            object_store_memory=object_store,
            runtime_env=with_quiet_workers(runtime_env),
            **common,
        )
    else:
        try:
            ray.init(address=address, runtime_env=with_quiet_workers(runtime_env or build_runtime_env()), **common)
        except ConnectionError as exc:
            raise RaydistillError(
                f"cannot reach Ray at ray.address={address!r} ({exc}); start a cluster "
                "(`ray start --head` or `ray up ray_cluster.yaml`) or set ray.address: null "
                "for the embedded local Ray"
            ) from exc
    return ray.cluster_resources()


# Ray library loggers whose INFO lines (and one warning) would interleave with our progress bars on the
# driver's console; their records still reach Ray's log files at WARNING and above.
_NOISY_LOGGERS = {
    # Ray Train re-configures "ray.train" in its controller and workers; there RunConfig's LoggingConfig
    # (distill.training.ray_train) is what keeps its INFO lines off the console.
    "ray.train": logging.WARNING,
    "ray.tune": logging.WARNING,
    # Warns every few seconds when the State API is off (no dashboard: our default) and repeats it
    # on every progress line; it only watches for a dead controller, which Ray Train also handles.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    "ray.serve": logging.WARNING,  # "Started Serve", "Deploying new version", "Adding 1 replica", ...
}


class _DropMessages(logging.Filter):
    """Drops the records whose message contains one of ``fragments``; every other record passes."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


# Single records of a logger that stays on. Ray warns on every local start that token auth is on by
# default ("Set RAY_AUTH_MODE=disabled to opt out"): that is the safe default the README describes; its
# warning that auth is *disabled* (an open cluster) is kept.
_NOISY_RECORDS = {
    "ray._private.authentication.authentication_token_setup": _DropMessages(
        "Token authentication is enabled for this Ray cluster"
    )
}
# Warnings Ray raises against its own code: Ray Train's DatasetManager actor passes Ray Data the
# deprecated ``exclude_resources`` (two lines on the console at the start of every training run).
_NOISY_WARNINGS = [r"`ExecutionOptions\.exclude_resources` is deprecated"]


def quiet_ray_logs() -> None:
    """Raise the level of Ray's chatty library loggers in this process (see ``_NOISY_LOGGERS``), drop
    single records of others (``_NOISY_RECORDS``) and Ray's warnings about its own code (``_NOISY_WARNINGS``).

    The driver calls it from :func:`connect`; Ray workers call it as the runtime_env's
    ``worker_process_setup_hook``, because worker output is streamed to the driver's console.
    """
    for name, level in _NOISY_LOGGERS.items():
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < level:
            logger.setLevel(level)
    for name, record_filter in _NOISY_RECORDS.items():
        logger = logging.getLogger(name)
        if record_filter not in logger.filters:
            logger.addFilter(record_filter)
    for message in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)  # replaces an identical filter: added once
    quiet_hf_progress()


def quiet_hf_progress() -> None:
    """Turn off Hugging Face's per-call progress bars ("Loading weights", "Writing model shards"): one
    per model load or save, in every worker, streamed to the driver's console between our own progress.
    A user who set ``HF_HUB_DISABLE_PROGRESS_BARS`` (to anything) keeps their choice."""
    if "HF_HUB_DISABLE_PROGRESS_BARS" in os.environ:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub / transformers are imported
    if "huggingface_hub" in sys.modules:  # already imported here (not imported for it): switch them off directly
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers.utils.logging" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def with_quiet_workers(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """``runtime_env`` plus :func:`quiet_ray_logs` as its worker setup hook (a user's own hook wins)."""
    env = dict(runtime_env or {})
    env.setdefault("worker_process_setup_hook", "cluster.ray_init.quiet_ray_logs")
    return env


def quiet_ray_data() -> None:
    """Turn off Ray Data's own progress output (bars, or on a non-TTY a block of INFO lines every few
    seconds): our stage runner shows the progress. Call before building a dataset; datasets carry
    the context to the workers that execute them."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    notice = logging.getLogger("ray.data._internal.progress")  # "Progress bars disabled. To enable, ..."
    if _PROGRESS_NOTICE not in notice.filters:
        notice.addFilter(_PROGRESS_NOTICE)


_PROGRESS_NOTICE = _DropMessages("Progress bars disabled")


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch/CUDA simply means no GPUs
        return 0


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3
