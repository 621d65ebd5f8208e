"""The train stage on the driver: check the data, build the initial student, run the workers, publish.

    {run}/train/init/            the student at initialisation (HF dir + tokenizer)
    {run}/train/metrics.jsonl    one line per logged step, plus held-out results at stage ends
    {run}/train/ray/             Ray Train's run: checkpoint_NNNNNNN folders (or local/ without Ray)
    {run}/train/manifest.json    written last
    {run}/student/               the final student (HF dir + tokenizer + stages.json)
    {run}/student-qwen2moe/      the stock Qwen2-MoE export (top-k routing only)

Everything a bad config or bad data can get wrong is checked here, before any worker starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from cluster import storage
from cluster.errors import ConfigError, RaydistillError
from cluster.section import RayConfigHolder, RunConfig
from distill.student.section import StudentSection
from distill.teacher.section import TeacherSection
from distill.training.data import data_dir_for, scan
from distill.training.loop import LocalRuntime, TrainJob, train_loop
from distill.training.section import TrainSection


class TrainConfig(RunConfig, RayConfigHolder, Protocol):
    """The sections the train stage reads."""

    teacher: TeacherSection
    student: StudentSection
    train: TrainSection


TRAIN_DIR = "train"
STUDENT_DIR = "student"
EXPORT_DIR = "student-qwen2moe"
RAY_RUN_NAME = "ray"


def ensure_init_student(cfg: TrainConfig, train_dir: Path, seed: int) -> Path:
    """``{run}/train/init``: built once from the config's student section (from the teacher or random).

    A from-teacher init is calibrated on the run's teacher data (training rows) by default.
    """
    from distill.training.student_init import create_student, init_summary

    init_dir = train_dir / "init"
    if (init_dir / "config.json").exists():
        return init_dir
    train_dir.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=".tmp-init-", dir=train_dir))
    print(
        "student init: building from the teacher" if cfg.student.init == "from_teacher" else "student init: random",
        flush=True,
    )
    _, record = create_student(
        cfg.teacher,
        cfg.student,
        cfg.train,
        staged,
        seed=seed,
        run_dir=str(train_dir.parent),
        progress=lambda line: print(f"student init: {line}", flush=True),
    )
    for line in init_summary(record):
        print(f"student init: {line}", flush=True)
    storage.publish_dir(staged, init_dir)
    return init_dir


def _vocab_and_pad(init_dir: Path) -> tuple[int, int]:
    config = json.loads((init_dir / "config.json").read_text())
    pad = config.get("pad_token_id")
    if pad is None:
        eos = config.get("eos_token_id")
        pad = eos[0] if isinstance(eos, list) else eos
    return int(config["vocab_size"]), int(pad or 0)


def _eos_ids(init_dir: Path) -> list[int]:
    """The student's end tokens for on-policy sampling: the same rule as the teacher backends'
    (tokenizer EOS, ``config.json``, ``generation_config.json``)."""
    from distill.teacher.sources import eos_token_ids

    tokenizer = None
    if (init_dir / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(init_dir))
    return eos_token_ids(tokenizer, str(init_dir), json.loads((init_dir / "config.json").read_text()))


@contextlib.contextmanager
def _labelling_service(cfg: TrainConfig, section: TrainSection):
    """The teacher labelling service for on-policy stages (None without them); its actors end with the stage."""
    if not any(s.on_policy for s in section.stages):
        yield None
        return
    from cluster.ray_init import connect
    from distill.teacher.service import LabelService

    connect(cfg.ray.address, num_cpus=cfg.ray.num_cpus, dashboard=cfg.ray.dashboard)
    service = LabelService(cfg.teacher, name=f"raydistill-labeller-{uuid.uuid4().hex[:8]}")
    try:
        service.ready()
        yield service
    finally:
        service.shutdown()


def _section(cfg: TrainConfig, workers: int | None, gpus_per_worker: float | None) -> TrainSection:
    update: dict[str, Any] = {}
    if workers is not None:
        update["workers"] = workers
    if gpus_per_worker is not None:
        update["gpus_per_worker"] = gpus_per_worker
    return TrainSection.model_validate({**cfg.train.model_dump(), **update})


class _Progress:
    """A driver-side progress bar fed by the workers' metrics.jsonl (works for local and Ray runs)."""

    def __init__(self, metrics: Path, total_steps: int | None, enabled: bool):
        self.metrics, self.total, self.enabled = metrics, total_steps, enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._offset = 0  # bytes of metrics.jsonl already read

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.total, desc="train", unit="step", dynamic_ncols=True)
        while not self._stop.wait(1.0):
            self._update(bar)
        self._update(bar)
        bar.close()

    def _update(self, bar) -> None:
        try:
            with open(self.metrics, "rb") as handle:
                if handle.seek(0, os.SEEK_END) < self._offset:
                    self._offset = 0  # cut back by a resume
                handle.seek(self._offset)
                chunk = handle.read()
        except OSError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next tick
        self._offset += len(complete)
        lines = complete.decode().splitlines()
        steps = [m for m in (json.loads(line) for line in lines if line.strip()) if "loss" in m]
        if steps and steps[-1]["step"] != bar.n:  # redraw only on progress (logs stay readable)
            last = steps[-1]
            bar.n = last["step"]
            bar.set_postfix(
                stage=last["stage_name"],
                loss=f"{last['loss']:.3f}",
                kl=f"{last['kl']:.3f}",
                tok_s=f"{last['tokens_per_s']:.0f}",
                refresh=False,
            )
            bar.refresh()

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def run_train_stage(
    cfg: TrainConfig,
    run_dir: str,
    *,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    resume: bool = True,
    restart: bool = False,
    use_ray: bool = True,
    show_progress: bool = True,
    callbacks: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Distil the run's data into the student; returns (and writes) ``{run}/train/manifest.json``.

    ``resume``: continue from the last checkpoint if there is one (else a run with checkpoints is an
    error, so nothing is overwritten by accident). ``restart``: discard earlier training state.
    ``use_ray=False`` runs the same loop in this process (one worker). ``callbacks``: step callbacks
    (``TrainJob.callbacks``), e.g. to trace the rows each worker trains on or to inject a failure.
    """
    section = _section(cfg, workers, gpus_per_worker)
    run = Path(storage.local_path(storage.absolute(run_dir)))
    train_dir = run / TRAIN_DIR
    manifest_path = train_dir / "manifest.json"
    config_hash = cfg.section_hash("student", "train")
    if restart:
        for path in (
            train_dir / RAY_RUN_NAME,
            train_dir / "local",
            manifest_path,
            train_dir / "metrics.jsonl",
            train_dir / "init",
            run / STUDENT_DIR,
            run / EXPORT_DIR,
        ):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    has_state = any((train_dir / d).exists() for d in (RAY_RUN_NAME, "local"))
    if has_state and not resume:
        raise ConfigError(
            f"{train_dir} already has training state; pass --resume to continue it or --restart "
            "to discard it and train from the initial student"
        )
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text())
        if (
            previous.get("status") == "done"
            and previous.get("config_hash") == config_hash
            and (run / STUDENT_DIR / "config.json").exists()
        ):
            return previous  # nothing changed since the last completed training

    data_dir = data_dir_for(str(run))
    init_dir = ensure_init_student(cfg, train_dir, section.seed)
    vocab_size, pad_id = _vocab_and_pad(init_dir)
    summary = scan(data_dir, section, vocab_size)  # bad data and bad stages fail here, before any worker
    with _labelling_service(cfg, section) as labeller:
        job = TrainJob(
            section=section.model_dump(mode="json"),
            init_dir=str(init_dir),
            metrics_uri=str(train_dir / "metrics.jsonl"),
            data_files=summary.files,
            checkpoint_dir=str(train_dir / "local"),
            pad_id=pad_id,
            callbacks=list(callbacks or []),
            labeller=labeller.handle() if labeller is not None else None,
            eos_ids=_eos_ids(init_dir) if labeller is not None else [],  # only on-policy sampling stops on EOS
        )
        total_steps = sum(s.steps for s in section.stages) if all(s.steps for s in section.stages) else None
        started = time.time()
        with _Progress(train_dir / "metrics.jsonl", total_steps, show_progress):
            if use_ray:
                from cluster.ray_init import connect
                from distill.training.ray_train import fit, latest_checkpoint_path

                connect(cfg.ray.address, num_cpus=cfg.ray.num_cpus, dashboard=cfg.ray.dashboard)
                import ray.train

                try:
                    result = fit(job, section, summary.files, str(train_dir), RAY_RUN_NAME)
                except ray.train.TrainingFailedError as exc:
                    raise RaydistillError(
                        f"training failed after {section.max_failures} restarts (train.max_failures); "
                        f"fix the cause and rerun with --resume to continue from the last "
                        f"checkpoint: {exc}"
                    ) from exc
                if result.error is not None:
                    raise RaydistillError(f"training failed after {section.max_failures} restarts: {result.error}")
                checkpoint = result.checkpoint.path if result.checkpoint else latest_checkpoint_path(str(train_dir))
            else:
                if section.workers != 1:
                    raise ConfigError("train.workers > 1 needs Ray; drop --no-ray or set --workers 1")
                train_loop(job, LocalRuntime(job, section))
                from distill.training.checkpoint import LocalCheckpoints

                checkpoint = str(LocalCheckpoints(train_dir / "local").latest())
    state = json.loads((Path(checkpoint) / "state.json").read_text())
    if state["stage"] < len(section.stages):
        raise RaydistillError(
            f"training stopped in stage {state['stage']} of {len(section.stages)}; rerun with --resume"
        )
    student_dir, export_dir = publish_student(cfg, init_dir, Path(checkpoint), run, state, section)
    metrics_tail = _last_metrics(train_dir / "metrics.jsonl")
    manifest = {
        "status": "done",
        "config_hash": config_hash,
        "data_dir": data_dir,
        "rows": summary.rows,
        "train_rows": summary.train_rows,
        "heldout_rows": summary.heldout_rows,
        "steps": state["step"],
        "tokens": state["tokens"],
        "wall_seconds": round(time.time() - started, 2),
        "train_seconds": round(state.get("wall_seconds", 0.0), 2),
        "tokens_per_s": metrics_tail.get("tokens_per_s"),
        "workers": section.workers,
        "stages": state["history"],
        "student_dir": str(student_dir),
        "export_dir": str(export_dir) if export_dir else None,
        "init_dir": str(init_dir),
        "checkpoint": str(checkpoint),
        "metrics": str(train_dir / "metrics.jsonl"),
    }
    storage.atomic_write_json(str(manifest_path), manifest)
    return manifest


def _last_metrics(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [m for m in lines if "tokens_per_s" in m]
    if not steps:
        return {}
    rates = [m["tokens_per_s"] for m in steps[1:]] or [steps[-1]["tokens_per_s"]]  # the first window includes start-up
    return {"tokens_per_s": round(sum(rates) / len(rates), 1)}


def publish_student(
    cfg: TrainConfig, init_dir: Path, checkpoint: Path, run: Path, state: dict[str, Any], section: TrainSection
) -> tuple[Path, Path | None]:
    """Write the final weights as an HF student dir (and the Qwen2-MoE export for top-k routing)."""
    from safetensors.torch import load_file

    from distill.student.config import RoutingMode
    from distill.student.export import TOKENIZER_FILES, export_qwen2_moe, load_student

    model = load_student(init_dir)
    model.load_state_dict(load_file(str(checkpoint / "model.safetensors")), strict=False)
    final_routing = (state["history"][-1].get("routing") or {}) if state["history"] else {}
    for key, value in final_routing.items():
        setattr(model.config, key, value)
    staged = Path(tempfile.mkdtemp(prefix=".tmp-student-", dir=run))
    model.save_pretrained(str(staged))
    for name in TOKENIZER_FILES:
        if (init_dir / name).exists() and not (staged / name).exists():
            shutil.copy2(init_dir / name, staged / name)
    if (init_dir / "student_init.json").exists():
        shutil.copy2(init_dir / "student_init.json", staged / "student_init.json")
    (staged / "stages.json").write_text(
        json.dumps(
            {
                "stages": state["history"],
                "steps": state["step"],
                "tokens": state["tokens"],
                "config": section.model_dump(mode="json"),
                "teacher": cfg.teacher.model,
            },
            indent=2,
        )
        + "\n"
    )
    student_dir = run / STUDENT_DIR
    storage.publish_dir(staged, student_dir)
    export_dir = None
    if section.export_qwen2_moe and model.student_config.routing is RoutingMode.topk:
        staged = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=run))
        export_qwen2_moe(str(student_dir), staged)
        export_dir = run / EXPORT_DIR
        storage.publish_dir(staged, export_dir)
    return student_dir, export_dir
