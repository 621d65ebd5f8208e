"""Step callbacks the training tests hand to ``run_train_stage(callbacks=...)`` (``TrainJob.callbacks``).

Ray Train workers build them from their ``module:Class`` name, so they live in an importable module.
"""

from __future__ import annotations

import os
from pathlib import Path


class TraceRows:
    """Each rank appends ``"{step} {prompt_id}"`` lines for the rows it trains on to ``rows-rank{R}.txt``."""

    def __init__(self, trace_dir: str):
        self.trace_dir = Path(trace_dir)

    def before_step(self, rank: int, step: int, batches) -> None:
        with open(self.trace_dir / f"rows-rank{rank}.txt", "a") as trace:
            trace.write("".join(f"{step} {p}\n" for b in batches for p in b.prompt_ids))


class FailOnce:
    """The first worker to reach ``step`` fails, once per run (``marker`` records it): it raises, or with
    ``mode="exit"`` its process dies (no exception, no cleanup: an OOM kill or a lost node)."""

    def __init__(self, step: int, marker: str, mode: str = "raise"):
        self.step, self.marker, self.mode = step, marker, mode

    def before_step(self, rank: int, step: int, batches) -> None:
        if step != self.step or os.path.exists(self.marker):
            return
        Path(self.marker).write_text(f"rank {rank} failed at step {step}\n")
        if self.mode == "exit":
            os._exit(17)
        raise RuntimeError(f"injected failure at step {step}")


def trace_rows(trace_dir: str | Path) -> list[dict]:
    return [{"target": f"{__name__}:TraceRows", "kwargs": {"trace_dir": str(trace_dir)}}]


def fail_once(run: str | Path, step: int, mode: str = "raise", name: str = ".injected-failure") -> list[dict]:
    """Fail at ``step`` once; the marker is ``{run}/train/{name}`` (give each of several failures its own)."""
    marker = Path(run) / "train" / name
    return [{"target": f"{__name__}:FailOnce", "kwargs": {"step": step, "marker": str(marker), "mode": mode}}]


class KillLabeller:
    """Rank 0, before ``step``: SIGKILL the first teacher labelling actor, once per run (``marker``)."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def before_step(self, rank: int, step: int, batches) -> None:
        import signal

        import ray

        if rank != 0 or step != self.step or os.path.exists(self.marker):
            return
        name = next(
            n["name"]
            for n in ray.util.list_named_actors(all_namespaces=True)
            if n["name"].startswith("raydistill-labeller-") and n["name"].endswith("-0")
        )
        pid = ray.get(ray.get_actor(name).pid.remote())
        os.kill(pid, signal.SIGKILL)
        Path(self.marker).write_text(f"killed {name} pid {pid} before step {step}\n")


def kill_labeller(run: str | Path, step: int) -> list[dict]:
    marker = str(Path(run) / "killed-labeller")
    return [{"target": f"{__name__}:KillLabeller", "kwargs": {"step": step, "marker": marker}}]


class FakeClock:
    """A stand-in for ``time`` in ``distill.training.loop`` whose ``perf_counter`` moves only when told to."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


CLOCK = FakeClock()


class AdvanceClock:
    """Each step takes ``seconds`` on :data:`CLOCK` (the local loop only: it shares this process)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def before_step(self, rank: int, step: int, batches) -> None:
        CLOCK.now += self.seconds
