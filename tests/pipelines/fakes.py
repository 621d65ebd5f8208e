"""Fake pipeline stages for runner tests: cheap, deterministic, with call counters and injectable failures."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cluster import storage
from pipelines.manifest import MANIFEST
from pipelines.section import STAGE_ORDER
from pipelines.stages import Stage, StageContext, StageResult

# The config section each fake stage depends on (all exist in PipelineConfig).
SECTIONS = {
    "generate": ("generate",),
    "filter": ("filter",),
    "train": ("student",),
    "eval": ("eval",),
    "gate": (),
    "export": ("student",),
    "deploy": ("serve",),
}


class FakeStages:
    """``stages`` mapping for ``run_pipeline``; records calls; ``fail`` names stages that raise once per entry."""

    def __init__(self, fail: set[str] | None = None, refuse: bool = False):
        self.calls: list[tuple[str, bool]] = []  # (stage, resume)
        self.fail = set(fail or ())
        self.refuse = refuse

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def _run(self, name: str):
        def run(ctx: StageContext) -> StageResult:
            self.calls.append((name, ctx.resume))
            if name in self.fail:
                self.fail.discard(name)
                raise RuntimeError(f"injected failure in {name}")
            previous = STAGE_ORDER[STAGE_ORDER.index(name) - 1] if name != "generate" else None
            upstream = (
                storage.read_text(storage.join(ctx.run_dir, previous, MANIFEST))
                if previous and storage.exists(storage.join(ctx.run_dir, previous, MANIFEST))
                else ""
            )
            # Deterministic output: same config + same upstream -> same bytes (so downstream may skip).
            body = {
                "stage": name,
                "hash": ctx.cfg.section_hash(*SECTIONS[name]) if SECTIONS[name] else "",
                "upstream": hashlib.sha256(upstream.encode()).hexdigest(),
            }
            storage.atomic_write_json(storage.join(ctx.run_dir, name, MANIFEST), body)
            if name == "gate" and self.refuse:
                return StageResult(status="refused", message="refused: student worse than baseline")
            return StageResult(
                rows=10,
                tokens=100,
                tokens_per_s=50.0,
                message=f"fake {name}",
                metrics={"base_url": "http://fake"} if name == "deploy" else {},
            )

        return run

    def mapping(self) -> dict[str, Stage]:
        out = {}
        for i, name in enumerate(STAGE_ORDER):
            inputs = (lambda prev: lambda cfg, run: [storage.join(run, prev)] if prev else [])(
                STAGE_ORDER[i - 1] if i else None
            )
            out[name] = Stage(
                name,
                SECTIONS[name],
                inputs,
                (lambda n: lambda cfg, run: [storage.join(run, n, MANIFEST)])(name),
                self._run(name),
            )
        return out


def read_manifest(run_dir: str) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(run_dir, MANIFEST)))


WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
    "upsilon phi chi psi omega river mountain cloud forest ocean desert valley meadow"
).split()


def make_generated_run(run_dir: str, rows: int = 8) -> None:
    """A run whose generate stage finished: one shard of distinct valid rows + its manifest."""
    import random

    from distill.data.schema import prompt_id, to_table

    rng = random.Random(0)
    out = []
    for i in range(rows):
        text = " ".join(rng.choice(WORDS) for _ in range(12))
        completion_len = 4
        out.append(
            {
                "prompt_id": prompt_id("file:x", f"q{i}", 0),
                "prompt": f"q{i}",
                "completion": text,
                "input_ids": list(range(3 + completion_len)),
                "prompt_len": 3,
                "completion_len": completion_len,
                "topk_ids": [[1, 2]] * completion_len,
                "topk_logprobs": [[-0.1, -2.0]] * completion_len,
                "teacher": "tiny@0",
                "sampling": "{}",
                "finish_reason": "stop",
                "quality": None,
                "source": "file:x",
            }
        )
    import pyarrow.parquet as pq

    storage.makedirs(storage.join(run_dir, "data", "generate"))
    pq.write_table(to_table(out), storage.join(run_dir, "data", "generate", "part-0001.parquet"))
    storage.atomic_write_json(
        storage.join(run_dir, "data", "generate", MANIFEST),
        {"stage": "generate", "rows": rows, "completion_tokens": rows * 4},
    )
