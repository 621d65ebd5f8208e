"""Run directories: ``{workdir}/{name}/{run_id}/``. Run ids sort by creation time."""

from __future__ import annotations

import secrets
import time

from cluster import storage
from cluster.errors import RaydistillError
from cluster.section import RunConfig

NOT_RUNS = frozenset({"serving.json", "serving.json.lock", "schedule"})


def runs_root(cfg: RunConfig) -> str:
    return storage.join(storage.absolute(cfg.workdir), cfg.name)


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def list_runs(cfg: RunConfig) -> list[str]:
    """Run ids of this config's name, oldest first."""
    root = runs_root(cfg)
    names = (uri.rstrip("/").rsplit("/", 1)[-1] for uri in storage.listdir(root))
    # serving.json (the serving registry) and schedule/ (scheduler state) live beside the runs.
    return [n for n in names if not n.startswith(".") and n not in NOT_RUNS]


def run_dir(cfg: RunConfig, run_id: str | None = None, *, create: bool = False) -> str:
    """The run to work on: ``run_id`` if given, a new run if ``create``, else the newest run."""
    root = runs_root(cfg)
    if run_id:
        uri = storage.join(root, run_id)
        if not create and not storage.exists(uri):
            raise RaydistillError(f"--run {run_id}: no such run under {root} (known: {list_runs(cfg)[-5:]})")
        storage.makedirs(uri)
        return uri
    if create:
        uri = storage.join(root, new_run_id())
        storage.makedirs(uri)
        return uri
    runs = list_runs(cfg)
    if not runs:
        raise RaydistillError(
            f"no runs of {cfg.name!r} under {root}; start one with `raydistill generate --config FILE`"
        )
    return storage.join(root, runs[-1])
