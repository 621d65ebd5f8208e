"""The teacher labelling service: Ray actors score sequences like the backend does in-process,
and a killed actor is restarted with its batch retried and counted once."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from distill.teacher.hf import HFTeacher
from distill.teacher.section import TeacherSection

SLOW_SECONDS = 0.4


class SlowHF(HFTeacher):
    """The hf teacher, slowed down so that a test can kill it while a batch is in flight."""

    def score(self, sequences, starts, k):
        Path(tempfile.gettempdir(), f"slowhf-{os.getpid()}").touch()  # a batch is in flight here
        time.sleep(SLOW_SECONDS)
        return super().score(sequences, starts, k)


def _sequences(tokenizer_dir: str):
    reference = HFTeacher(tokenizer_dir, dtype="float32", batch_size=4)
    texts = ["The quick brown fox jumps", "Hello there, how are you today", "a b c d e f", "Once upon a time"] * 2
    seqs = [reference.encode_prompt(t) for t in texts]
    starts = [max(1, len(s) // 2) for s in seqs]
    return reference, seqs, starts


def _section(model: str, backend: str) -> TeacherSection:
    return TeacherSection(
        model=model, backend=backend, replicas=2, num_cpus=0.5, threads=1, batch_size=2, dtype="float32"
    )


def _assert_same(got, want):
    assert len(got) == len(want)
    for have, ref in zip(got, want):
        assert have.topk_ids.shape == ref.topk_ids.shape and have.token_logprobs.shape == ref.token_logprobs.shape
        np.testing.assert_array_equal(have.topk_ids, ref.topk_ids)
        np.testing.assert_allclose(have.topk_logprobs, ref.topk_logprobs, atol=1e-4)
        np.testing.assert_allclose(have.token_logprobs, ref.token_logprobs, atol=1e-4)


@pytest.mark.parametrize("backend", ["hf", "engine"])
def test_service_scores_like_the_backend_in_process(ray_session, tiny_teacher_dir, backend):
    from distill.teacher.service import LabelService

    reference, seqs, starts = _sequences(tiny_teacher_dir)
    want = reference.score(seqs, starts, 5)
    service = LabelService(_section(tiny_teacher_dir, backend), max_in_flight=1)
    try:
        assert len(set(service.ready())) == 2
        labels = service.score(seqs, starts, 5)
        _assert_same(labels.scored, want)
        assert labels.tokens == sum(len(s) - st for s, st in zip(seqs, starts)) and labels.retries == 0
        # the actual token's log-prob is the teacher's full-vocab log-prob of seq[start + t]
        first = labels.scored[0]
        assert np.all(first.token_logprobs <= first.topk_logprobs[:, 0] + 1e-5)
    finally:
        service.shutdown()


def test_killed_actor_is_restarted_and_its_batch_counted_once(ray_session, tiny_teacher_dir):
    from distill.teacher.service import LabelService

    reference, seqs, starts = _sequences(tiny_teacher_dir)
    want = reference.score(seqs, starts, 3)
    service = LabelService(_section(tiny_teacher_dir, f"{__name__}:SlowHF"), max_in_flight=1)
    try:
        pids = service.ready()
        for pid in pids:
            Path(tempfile.gettempdir(), f"slowhf-{pid}").unlink(missing_ok=True)
        result = {}
        caller = threading.Thread(target=lambda: result.update(labels=service.score(seqs, starts, 3)))
        caller.start()
        marker = Path(tempfile.gettempdir(), f"slowhf-{pids[0]}")
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:  # kill while its batch is in flight
            time.sleep(0.01)
        marker.unlink(missing_ok=True)
        os.kill(pids[0], signal.SIGKILL)
        caller.join(timeout=120)
        assert not caller.is_alive()
        labels = result["labels"]
        assert labels.retries >= 1
        _assert_same(labels.scored, want)  # every sequence once, in order, none lost or repeated
        after = service.ready()
        assert after[0] != pids[0] and after[1] == pids[1]  # restarted in place
    finally:
        service.shutdown()
