"""The Ray-specific lines of training: datasets on the driver, a runtime for the workers, the trainer.

Each (stage, mixture component) is one Ray dataset (``s{stage}c{component}``) and the held-out
rows are ``heldout``. Datasets are not split by Ray: every worker keeps the rows whose
``prompt_id`` hashes to its rank (:func:`distill.training.data.rank_of`), so the split is disjoint
and identical after a restart, which is what makes the checkpointed data position exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from cluster.ray_init import quiet_ray_data
from distill.training.checkpoint import COMPLETE_FILE
from distill.training.data import component_mask, heldout_mask, rank_of, read_table, rows_from_table
from distill.training.loop import Runtime, TrainJob, train_loop
from distill.training.section import TrainSection


def _select(table: pa.Table, fraction: float, seed: int, heldout: bool, component: Any = None) -> pa.Table:
    held = heldout_mask(table, fraction, seed)
    mask = held if heldout else ~held
    if component is not None:
        mask &= component_mask(table, component)
    return table.filter(pa.array(mask))


def build_datasets(files: list[str], section: TrainSection) -> dict[str, Any]:
    """Ray datasets per stage component (training rows only) and the held-out rows.

    The shards are read once here, on the driver, with pyarrow (as the no-Ray path reads them, and as
    :func:`~distill.training.data.scan` has just read their light columns), split by the same masks, and
    each split enters the object store as Arrow blocks (``from_arrow``): no read or map tasks to
    schedule, where a ``read_parquet`` plus one ``map_batches`` per split took 12 s of the quickstart's
    train stage on 2 cores (the first call in a session, before Ray Data's task workers were warm)."""
    import ray.data

    quiet_ray_data()
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # same order every epoch/restart
    table = read_table(files)

    def split(heldout: bool, component: Any = None) -> Any:
        return ray.data.from_arrow(
            _select(table, section.heldout_fraction, section.seed, heldout=heldout, component=component)
        )

    datasets = {"heldout": split(heldout=True)}
    for s, stage in enumerate(section.stages):
        for c, component in enumerate(stage.mixture):
            datasets[f"s{s}c{c}"] = split(heldout=False, component=component)
    return datasets


class RayShardSource:
    """A worker's rows of one dataset: local shuffle seeded by (seed, epoch), rows of other ranks dropped."""

    def __init__(self, iterator: Any, seed: int, rank: int, world_size: int, buffer: int):
        self.iterator, self.seed, self.rank, self.world_size, self.buffer = iterator, seed, rank, world_size, buffer

    def rows(self, epoch: int) -> Iterator[dict[str, Any]]:
        for batch in self.iterator.iter_batches(
            batch_size=64,
            batch_format="pyarrow",
            local_shuffle_buffer_size=self.buffer,
            local_shuffle_seed=self.seed * 100_003 + epoch,
        ):
            mine = [rank_of(p, self.world_size) == self.rank for p in batch["prompt_id"].to_pylist()]
            yield from rows_from_table(batch.filter(pa.array(mine, type=pa.bool_())))


class RayRuntime(Runtime):
    """Ray Train's worker runtime: dataset shards, ``ray.train.report`` and its checkpoints.

    Ray registers a reported checkpoint only when its controller polls the worker (every
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s): a worker that dies between uploading a checkpoint and
    that poll leaves the checkpoint in storage but unknown to Ray, and a restart would fall back to an
    older one. So rank 0 marks each upload complete (``checkpoint.COMPLETE_FILE``) and a restart takes
    the newer of Ray's checkpoint and the newest marked one in ``checkpoints`` (the run's storage).
    """

    def __init__(self, section: TrainSection, checkpoints: str | None = None):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.section = section
        self.checkpoints = checkpoints

    def sources(self, stage_index, stage, seed):
        import ray.train

        return [
            RayShardSource(
                ray.train.get_dataset_shard(f"s{stage_index}c{i}"),
                seed + i,
                self.rank,
                self.world_size,
                self.section.shuffle_buffer,
            )
            for i in range(len(stage.mixture))
        ]

    def heldout(self, seed):
        import ray.train

        return RayShardSource(ray.train.get_dataset_shard("heldout"), seed, self.rank, self.world_size, 1)

    @contextlib.contextmanager
    def latest_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        newest = latest_checkpoint_path(self.checkpoints, name="") if self.checkpoints else None
        if newest is not None and (checkpoint is None or checkpoint_step(newest) > checkpoint_step(checkpoint.path)):
            checkpoint = ray.train.Checkpoint(newest)
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield Path(path)

    def report(self, metrics, checkpoint_dir, step):
        import ray.train

        from cluster import storage

        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        name = f"checkpoint_{step:07d}"
        ray.train.report(flat, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)
        if checkpoint_dir is not None:  # rank 0: the upload has returned
            if self.checkpoints:
                storage.atomic_write_json(storage.join(self.checkpoints, name, COMPLETE_FILE), {"step": step})
            shutil.rmtree(checkpoint_dir, ignore_errors=True)


def worker_main(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: the plain loop with the Ray runtime."""
    # Ray Train sets the worker's root logger to INFO and its own per-report lines ("Reporting
    # training result ...", "Checkpoint successfully created ...") use loggers outside `ray.train`,
    # so RunConfig's log level does not reach them; the driver shows our progress bar instead.
    logging.getLogger().setLevel(logging.WARNING)
    quiet_ray_data()  # the worker iterates the datasets: no "Progress bars disabled" / per-dataset INFO lines
    job = TrainJob.from_dict(config)
    train_loop(job, RayRuntime(TrainSection.model_validate(job.section), job.ray_checkpoints))


def fit(job: TrainJob, section: TrainSection, files: list[str], storage_path: str, name: str = "ray"):
    """Run the loop on ``section.workers`` Ray Train workers; returns the ``ray.train.Result``.

    Rerunning with the same ``storage_path``/``name`` restores the run's checkpoint manager, so the
    workers start from the latest checkpoint (Ray Train V2 run restoration).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster import storage

    job = dataclasses.replace(job, ray_checkpoints=storage.join(storage_path, name))

    resources: dict[str, float] = {"CPU": section.cpus_per_worker}
    if section.gpus_per_worker:
        resources["GPU"] = section.gpus_per_worker
    trainer = TorchTrainer(
        worker_main,
        train_loop_config=job.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=section.workers, use_gpu=section.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=section.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=section.keep_checkpoints),
            # Ray Train's own INFO lines ("Requesting resources", "Checkpoint successfully created") stay in
            # its log files, off the console where our progress bar runs.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=build_datasets(files, section),
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    return trainer.fit()


def checkpoint_step(path: str) -> int:
    """The step in a ``checkpoint_{step:07d}`` folder's name."""
    return int(str(path).rstrip("/").rsplit("/", 1)[-1].split("_", 1)[1])


def latest_checkpoint_path(storage_path: str, name: str = "ray") -> str | None:
    """The newest whole ``checkpoint_*`` folder (marked ``COMPLETE_FILE`` by rank 0) under ``storage_path/name``."""
    from cluster import storage

    root = storage.join(storage_path, name)
    found = sorted(
        u.rstrip("/")
        for u in storage.listdir(root)
        if u.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_0")
        and storage.exists(storage.join(u, COMPLETE_FILE))
    )
    return found[-1] if found else None
