"""A test-only teacher backend that fails on purpose, steered by ``flaky.json`` in its model dir.

``{"mode": "raise" | "exit" | "hang", "fail_on_call": N, "times": M, "state": "/path/counter", "delay_s": S}``:
the N-th ``generate`` call across all processes (counted in the state file) raises, kills the actor
process outright, or never returns (until its process is killed), M times in total.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from distill.teacher.hf import HFTeacher


class FlakyTeacher(HFTeacher):
    @classmethod
    def from_config(cls, teacher_cfg):
        teacher = super().from_config(teacher_cfg)
        teacher.control = json.loads((Path(teacher_cfg.model) / "flaky.json").read_text())
        return teacher

    def _bump(self) -> tuple[int, int]:
        """(call number, failures so far), counted across processes in the state file."""
        path = Path(self.control["state"])
        with open(path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            state = json.loads(handle.read() or '{"calls": 0, "failures": 0}')
            state["calls"] += 1
            call, failures = state["calls"], state["failures"]
            fail = call >= self.control["fail_on_call"] and failures < self.control.get("times", 1)
            if fail:
                state["failures"] += 1
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(state))
            handle.flush()
            os.fsync(handle.fileno())
        return call, fail

    def generate(self, prompts, sampling, seeds=None):
        call, fail = self._bump()
        if fail:
            # A real crash comes after some progress: give the driver time to write earlier shards.
            time.sleep(self.control.get("delay_s", 0))
            if self.control["mode"] == "hang":
                time.sleep(3600)  # a stuck batch: the test kills the driver while this call is open
            if self.control["mode"] == "exit":
                os._exit(1)  # the actor dies mid-batch, as on a node loss or OOM kill
            raise RuntimeError(f"planned teacher failure on call {call}")
        return super().generate(prompts, sampling, seeds)
