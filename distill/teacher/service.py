"""The teacher as a labelling service: a pool of Ray actors that score the student's token sequences.

Legend: ``B`` sequences in one call, ``L_i`` length of sequence ``i``, ``T_i = L_i - start_i``
completion positions, ``k`` top-k soft labels per position.

For on-policy distillation the student writes completions and the teacher only scores them: one
teacher-forced forward per sequence, returning per completion position the teacher's raw (T=1)
top-k ids and log-probs plus its log-prob of the token that is actually there (the student's
sample). Each actor holds one backend from the ``teacher:`` section (``engine``, ``hf``, ``vllm``,
``openai`` or ``module:Class``), with that section's ``replicas``, ``num_cpus`` and ``num_gpus``, so
the teacher never lives in a training worker's memory and scales apart from the trainers.

:class:`LabelService` is a plain picklable object (a list of actor handles): build it once on the
driver and pass it to Ray Train workers, which call :meth:`LabelService.score`. Every call cuts its
sequences into batches of ``teacher.batch_size``, keeps at most ``max_in_flight`` batches queued per
actor (back-pressure: callers wait instead of piling work onto a slow teacher) and prefers the
least-loaded actor, so several callers share the replicas. An actor that dies is restarted by Ray
(``max_restarts``, which reloads the model) and the batches it had in flight are submitted again;
results land in a slot per batch, so a retried batch is counted exactly once.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from cluster.errors import RaydistillError
from distill.teacher.base import ScoredSequence, load_backend
from distill.teacher.section import TeacherSection


@dataclasses.dataclass
class Labels:
    """What one :meth:`LabelService.score` call returns."""

    scored: list[ScoredSequence]  # [B], in the order of the input sequences; each row [T_i, k] / [T_i]
    tokens: int  # sum of T_i: completion positions labelled
    seconds: float  # wall time of the call, retries included
    retries: int  # batches submitted again after their actor died

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class LabelActor:
    """One teacher replica (wrapped by ``ray.remote`` in :class:`LabelService`)."""

    def __init__(self, teacher: dict[str, Any], threads: int | None = None):
        if threads:  # Ray gives an actor as many torch threads as it has CPUs; a labelling pass may use more
            import torch

            torch.set_num_threads(threads)
        self.backend = load_backend(TeacherSection(**teacher))

    def score(self, sequences: list[list[int]], starts: list[int], k: int) -> list[ScoredSequence]:
        return self.backend.score(sequences, starts, k)

    def pid(self) -> int:
        return os.getpid()

    def name(self) -> str:
        return self.backend.name


class LabelService:
    """A pool of ``teacher.replicas`` labelling actors. See the module docstring."""

    def __init__(
        self,
        teacher: TeacherSection,
        *,
        max_in_flight: int = 2,
        max_restarts: int = 3,
        max_attempts: int = 3,
        batch_size: int | None = None,
        name: str | None = None,
        threads: int | None = None,
    ):
        import ray

        if max_in_flight < 1 or max_attempts < 1:
            raise RaydistillError(f"LabelService: max_in_flight ({max_in_flight}) and max_attempts must be >= 1")
        options: dict[str, Any] = dict(num_cpus=teacher.num_cpus, max_restarts=max_restarts, max_task_retries=0)
        if teacher.num_gpus:
            options["num_gpus"] = teacher.num_gpus
        actor = ray.remote(LabelActor)
        self.actors = [
            actor.options(**options, **({"name": f"{name}-{i}"} if name else {})).remote(
                teacher.model_dump(mode="json"), threads
            )
            for i in range(teacher.replicas)
        ]
        self.batch_size = batch_size or teacher.batch_size
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        self.name = name

    def teacher_name(self) -> str:
        """The backend's ``model@revision``, as the ``teacher`` column of generated rows has it."""
        import ray

        return ray.get(self.actors[0].name.remote())

    def handle(self) -> dict[str, Any]:
        """JSON-able arguments of :meth:`attach` (a service built with a ``name``), e.g. for a ``TrainJob``."""
        if not self.name:
            raise RaydistillError("LabelService.handle: build the service with a name to attach to it elsewhere")
        return dict(
            name=self.name,
            replicas=len(self.actors),
            batch_size=self.batch_size,
            max_in_flight=self.max_in_flight,
            max_attempts=self.max_attempts,
        )

    @classmethod
    def attach(cls, name: str, replicas: int, batch_size: int, max_in_flight: int, max_attempts: int) -> LabelService:
        """The service whose named actors another process started (a Ray Train worker calls this)."""
        import ray

        service = cls.__new__(cls)
        service.actors = [ray.get_actor(f"{name}-{i}") for i in range(replicas)]
        service.batch_size, service.max_in_flight, service.max_attempts = batch_size, max_in_flight, max_attempts
        service.name = name
        return service

    def ready(self, timeout_s: float = 300.0) -> list[int]:
        """Wait until every replica has loaded its model (restarting ones included); their process ids."""
        import ray
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get([a.pid.remote() for a in self.actors])
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int) -> Labels:
        """Teacher-force each sequence and label positions ``starts[i]..L_i - 1`` (see ``TeacherBackend.score``).

        sequences ``B`` lists of token ids (prompt + the student's completion); starts ``B`` ints
        (the first completion position, >= 1). Returns :class:`Labels` with one ``ScoredSequence``
        per sequence: ``topk_ids [T_i, k]``, ``topk_logprobs [T_i, k]``, ``token_logprobs [T_i]``.
        A batch whose actor died is retried on a restarted or another actor, at most
        ``max_attempts`` times in all; then the error is raised.
        """
        import ray
        from ray.exceptions import ActorDiedError, RayActorError

        if len(sequences) != len(starts):
            raise RaydistillError(f"LabelService.score: {len(sequences)} sequences but {len(starts)} starts")
        t0 = time.perf_counter()
        spans = [(b, min(b + self.batch_size, len(sequences))) for b in range(0, len(sequences), self.batch_size)]
        results: list[list[ScoredSequence] | None] = [None] * len(spans)
        pending = deque((i, 1) for i in range(len(spans)))  # (batch, attempt)
        in_flight: dict[Any, tuple[int, int, int]] = {}  # ref -> (batch, attempt, actor)
        probes: dict[Any, int] = {}  # ref of a pid() call -> actor that failed: back in use once it answers
        dead: set[int] = set()  # out of restarts
        load = [0] * len(self.actors)
        retries = 0
        while pending or in_flight:
            usable = [a for a in range(len(self.actors)) if a not in dead and a not in probes.values()]
            while pending and usable and min(load[a] for a in usable) < self.max_in_flight:
                batch, attempt = pending.popleft()
                actor = min(usable, key=lambda a: (load[a], (a - batch) % len(self.actors)))
                lo, hi = spans[batch]
                seqs = [list(map(int, s)) for s in sequences[lo:hi]]
                ref = self.actors[actor].score.remote(seqs, [int(s) for s in starts[lo:hi]], k)
                in_flight[ref] = (batch, attempt, actor)
                load[actor] += 1
            if len(dead) == len(self.actors):
                raise RaydistillError(f"LabelService: all {len(self.actors)} teacher actors died (out of restarts)")
            done, _ = ray.wait([*in_flight, *probes], num_returns=1)
            if done[0] in probes:
                actor = probes.pop(done[0])
                try:
                    ray.get(done[0])
                except ActorDiedError:
                    dead.add(actor)
                except RayActorError:  # still restarting: ask again shortly
                    time.sleep(0.2)
                    probes[self.actors[actor].pid.remote()] = actor
                continue
            batch, attempt, actor = in_flight.pop(done[0])
            load[actor] -= 1
            try:
                scored = ray.get(done[0])
            except RayActorError:
                if attempt >= self.max_attempts:
                    raise
                retries += 1
                pending.appendleft((batch, attempt + 1))
                if actor not in probes.values():  # keep new work off it until it answers again
                    probes[self.actors[actor].pid.remote()] = actor
                continue
            if results[batch] is None:  # one slot per batch: a batch is counted once
                results[batch] = scored
        flat = [s for part in results for s in part]  # type: ignore[union-attr]
        tokens = sum(len(s.token_logprobs) for s in flat)
        return Labels(flat, tokens, time.perf_counter() - t0, retries)

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
