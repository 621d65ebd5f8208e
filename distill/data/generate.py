"""The generate stage: prompts -> teacher actors (Ray Data) -> Parquet shards with soft labels.

Read prompts, ``map_batches`` into an actor pool of teacher replicas (each with its own
``num_cpus``/``num_gpus``; more replicas is how it scales), and write each finished batch as one
zstd Parquet shard, atomically (temp + rename). Shards are named by a hash of their prompt ids, so
a retried batch overwrites itself instead of duplicating rows, and a rerun of the same run skips
every prompt already written. A teacher actor that dies is restarted by Ray Data and its batch
retried; a batch that raises is retried inside the actor ``generate.max_retries`` times.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from cluster import storage
from cluster.ray_init import quiet_ray_data
from distill.data import prompts as prompt_sources
from distill.data.schema import is_corpus_source, schema, to_table
from distill.data.section import DataConfig
from distill.data.shards import SHARD_SUFFIX, read_dir, read_shards, shard_uris, token_counts, write_parquet
from distill.teacher.base import SamplingParams, backend_class, completion_row, load_backend, row_seed, skipped_row
from distill.teacher.section import TeacherSection

log = logging.getLogger(__name__)

GENERATE_DIR = "data/generate"
JUDGE_TEMPLATE = (
    "Rate the assistant's answer to the user's request on a scale of 1 to 10 for helpfulness, "
    "correctness and clarity (1 = useless or wrong, 10 = excellent).\n\n"
    "Request:\n{prompt}\n\nAnswer:\n{completion}\n\nReply with the number only."
)
REQUEST_COLUMNS = ["prompt_id", "prompt", "messages", "source"]


def sampling_from_config(cfg: DataConfig) -> SamplingParams:
    g = cfg.generate
    return SamplingParams(
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        logprobs=g.logprobs,
        seed=g.seed,
    )


class TeacherWorker:
    """A Ray Data actor hosting one teacher replica: loads weights once, then completes batches."""

    def __init__(self, teacher: dict[str, Any], sampling: dict[str, Any], logprob_dtype: str, max_retries: int):
        import torch

        cfg = TeacherSection.model_validate(teacher)
        # Ray pins OMP threads to the actor's logical CPUs; a CPU teacher should use its share of cores.
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.replicas)
        torch.set_num_threads(threads)
        self.backend = load_backend(cfg)
        self.sampling = SamplingParams.from_json(sampling)
        self.logprob_dtype = logprob_dtype
        self.max_retries = max_retries

    def __call__(self, batch: pa.Table) -> pa.Table:
        requests = batch.select([c for c in REQUEST_COLUMNS if c in batch.column_names]).to_pylist()
        rows: list[dict[str, Any] | None] = [None] * len(requests)
        todo, inputs, seeds = [], [], []
        for index, request in enumerate(requests):
            body = request.get("messages") or request.get("prompt")
            length = len(self.backend.encode_prompt(body))
            if length + 1 > self.backend.context_length:
                rows[index] = skipped_row(
                    request, f"prompt_too_long ({length} tokens > context {self.backend.context_length})"
                )
            else:
                todo.append(index)
                inputs.append(body)
                seeds.append(row_seed(self.sampling.seed, str(request["prompt_id"])))
        if inputs:
            completions = self._generate_with_retries(inputs, None if self.sampling.seed is None else seeds)
            for index, completion in zip(todo, completions):
                rows[index] = completion_row(
                    requests[index], completion, self.backend.name, self.sampling, self.logprob_dtype
                )
        return rows_to_table([r for r in rows if r is not None], self.logprob_dtype)

    def _generate_with_retries(self, inputs: list[Any], seeds: list[int] | None):
        for attempt in range(self.max_retries + 1):
            try:
                return self.backend.generate(inputs, self.sampling, seeds=seeds)
            except Exception:  # noqa: BLE001 - any teacher failure is retried, then surfaced
                if attempt == self.max_retries:
                    raise
                log.warning(
                    "teacher batch failed (attempt %d/%d); retrying", attempt + 1, self.max_retries + 1, exc_info=True
                )
        raise AssertionError("unreachable")


def rows_to_table(rows: list[dict[str, Any]], logprob_dtype: str = "float32") -> pa.Table:
    """Teacher-stage rows (kept or skipped) -> the data schema plus a ``skip_reason`` column."""
    table = to_table(rows, logprob_dtype)
    return table.append_column("skip_reason", pa.array([r.get("skip_reason") for r in rows], pa.string()))


def teacher_stage(cfg: DataConfig, sampling: SamplingParams) -> Callable[[Any], Any]:
    """ds -> ds of teacher rows: the backend's own Ray Data stage, or an actor pool of replicas."""
    cls = backend_class(cfg.teacher.backend)
    if hasattr(cls, "build_dataset_stage"):
        return cls.build_dataset_stage(cfg.teacher, sampling, cfg.generate.logprob_dtype)
    t = cfg.teacher

    # Several batches per replica only where the backend shares one engine batch between calls.
    calls = t.batches_in_flight if getattr(cls, "concurrent_calls", False) else 1

    def apply(ds: Any) -> Any:
        import ray.data

        return ds.map_batches(
            TeacherWorker,
            fn_constructor_kwargs=dict(
                teacher=t.model_dump(mode="json"),
                sampling=sampling.to_json(),
                logprob_dtype=cfg.generate.logprob_dtype,
                max_retries=cfg.generate.max_retries,
            ),
            batch_size=t.batch_size,
            batch_format="pyarrow",
            # True multi-threading: with one call per replica it runs on the actor's main thread, where
            # the weights were loaded (Ray Data's default hands it to a helper thread: ~1.4x slower torch
            # here, serve/engine/async_engine.py); with more, the calls run side by side.
            compute=ray.data.ActorPoolStrategy(
                size=t.replicas, max_concurrent_calls_per_actor=calls, enable_true_multi_threading=True
            ),
            # Ray Data's actor pools default to max_restarts=-1 / max_task_retries=-1: a dead
            # replica is restarted and its in-flight batches are retried (tested).
            num_cpus=t.num_cpus,
            num_gpus=t.num_gpus or None,
        )

    return apply


def run_teacher(cfg: DataConfig, requests: list[dict[str, Any]], sampling: SamplingParams):
    """Yield pyarrow tables of teacher rows for ``requests`` as batches finish (Ray Data, streaming)."""
    import ray

    items = [{c: r.get(c) for c in REQUEST_COLUMNS} for r in requests]
    table = pa.Table.from_pylist(items, schema=_request_schema())
    # One input block per teacher batch: a block is Ray Data's unit of work, so this is what lets
    # replicas share the work and what a crash loses at most (finished batches are already written).
    size = cfg.teacher.batch_size
    quiet_ray_data()
    ds = ray.data.from_arrow([table.slice(i, size) for i in range(0, max(table.num_rows, 1), size)])
    ds = teacher_stage(cfg, sampling)(ds)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _request_schema() -> pa.Schema:
    full = schema()
    return pa.schema([full.field(c) for c in REQUEST_COLUMNS])


def shard_name(prompt_ids: list[str]) -> str:
    digest = hashlib.sha256("\n".join(sorted(prompt_ids)).encode()).hexdigest()[:20]
    return f"part-{digest}{SHARD_SUFFIX}"


def write_shard(out_dir: str, table: pa.Table) -> str:
    """Write one shard; the name depends only on the rows' prompt ids, so a retry overwrites itself."""
    return write_parquet(storage.join(out_dir, shard_name(table.column("prompt_id").to_pylist())), table)


def existing_prompt_ids(data_dir: str) -> set[str]:
    table = read_dir(data_dir, columns=["prompt_id"])
    return set() if table is None else set(table.column("prompt_id").to_pylist())


def parse_judge_score(text: str) -> float | None:
    match = re.search(r"\b(10|[1-9])(?:\s*/\s*10)?\b", text)
    return float(match.group(1)) if match else None


def judge_shards(cfg: DataConfig, data_dir: str, progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Teacher-as-judge: fill ``quality`` (1-10) in every shard that lacks it, rewriting shards atomically."""
    judge_sampling = SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=1)
    counts = {"judged": 0, "unparsable": 0}
    for uri in shard_uris(data_dir):
        table = read_shards([uri])
        if table.column("quality").null_count == 0 or all(map(is_corpus_source, table.column("source").to_pylist())):
            continue  # judged, or human text the teacher scored (no answer to judge)
        rows = table.to_pylist()
        requests = [
            {
                "prompt_id": r["prompt_id"],
                "prompt": None,
                "source": "judge",
                "messages": [
                    {
                        "role": "user",
                        "content": JUDGE_TEMPLATE.format(prompt=r["prompt"] or "", completion=r["completion"]),
                    }
                ],
            }
            for r in rows
        ]
        scores: dict[str, float | None] = {}
        for batch in run_teacher(cfg, requests, judge_sampling):
            for r in batch.to_pylist():
                scores[r["prompt_id"]] = None if r.get("skip_reason") else parse_judge_score(r["completion"] or "")
        quality = [scores.get(r["prompt_id"]) for r in rows]
        counts["judged"] += sum(q is not None for q in quality)
        counts["unparsable"] += sum(q is None for q in quality)
        index = table.schema.get_field_index("quality")
        write_parquet(uri, table.set_column(index, "quality", pa.array(quality, pa.float32())))
        if progress:
            progress(len(rows))
    return counts


def run_generate_stage(cfg: DataConfig, run_dir: str, show_progress: bool = True) -> dict[str, Any]:
    """Generate (or finish generating) this run's data set; returns the manifest written beside it."""
    from tqdm import tqdm

    started = time.time()
    out_dir = storage.join(run_dir, GENERATE_DIR)
    sampling = sampling_from_config(cfg)

    def teacher_for_prompts(requests: list[dict[str, Any]], params: SamplingParams) -> list[dict[str, Any]]:
        return [row for batch in run_teacher(cfg, requests, params) for row in batch.to_pylist()]

    tokenizer = _driver_tokenizer(cfg) if cfg.prompts.source.value == "magpie" else None
    cleaning: dict[str, Any] = {}
    requests, dropped = prompt_sources.build_requests(cfg, run_dir, teacher_for_prompts, tokenizer, cleaning)
    done = existing_prompt_ids(out_dir)
    todo = [r for r in requests if r["prompt_id"] not in done]
    skipped: dict[str, int] = dict(dropped)
    new_rows = new_tokens = 0
    gen_started = time.time()
    if todo:
        bar = tqdm(total=len(todo), desc="teacher", unit="row", disable=not show_progress)
        for batch in run_teacher(cfg, todo, sampling):
            reasons = batch.column("skip_reason").to_pylist()
            for reason in reasons:
                if reason:
                    key = reason.split(" (")[0]
                    skipped[key] = skipped.get(key, 0) + 1
            kept = batch.filter(pa.compute.is_null(batch.column("skip_reason"))).drop_columns(["skip_reason"])
            if kept.num_rows:
                kept = kept.cast(schema(cfg.generate.logprob_dtype))
                write_shard(out_dir, kept)
                new_rows += kept.num_rows
                new_tokens += int(pa.compute.sum(kept.column("completion_len")).as_py() or 0)
            bar.update(batch.num_rows)
            bar.set_postfix(tokens=new_tokens)
        bar.close()
    gen_seconds = time.time() - gen_started
    judge_counts = None
    if cfg.generate.judge:
        judge_counts = judge_shards(cfg, out_dir)
    corpus = _score_corpus(cfg, out_dir, done, show_progress) if cfg.corpus.enabled else None
    table = read_dir(out_dir, columns=["prompt_len", "completion_len"])
    tokens = token_counts(table)
    stats = {
        "rows": 0 if table is None else table.num_rows,
        "prompt_tokens": tokens["prompt"],
        "completion_tokens": tokens["completion"],
    }
    previous = _read_manifest(out_dir)
    manifest = {
        "stage": "generate",
        "run_dir": run_dir,
        **stats,
        "requests": len(requests),
        "resumed_rows": len(requests) - len(todo),
        "new_rows": new_rows,
        "new_completion_tokens": new_tokens,
        "teacher": cfg.teacher.model,
        "teacher_backend": cfg.teacher.backend,
        "teacher_replicas": cfg.teacher.replicas,
        "teacher_tokens_per_s": round(new_tokens / gen_seconds, 2) if new_tokens else None,
        "sampling": sampling.to_json(),
        "config_hash": cfg.section_hash("teacher", "prompts", "generate", "corpus"),
        "skipped": skipped,
        # self_instruct / magpie: what the teacher wrote, what the cleaner dropped (by reason), what was kept
        "prompt_cleaning": cleaning or None,
        "judge": judge_counts,
        # corpus: human text the teacher scored (texts read, dropped for eval overlap, rows, tokens)
        "corpus": corpus,
        "wall_seconds": round(time.time() - started, 2),
        "total_wall_seconds": round(time.time() - started + (previous or {}).get("total_wall_seconds", 0), 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    storage.atomic_write_json(storage.join(out_dir, "manifest.json"), manifest)
    return manifest


def _score_corpus(cfg: DataConfig, out_dir: str, done: set[str], show_progress: bool) -> dict[str, Any]:
    """Label the ``corpus:`` texts with the teacher (resumable: rows already written are skipped)."""
    from tqdm import tqdm

    from distill.data.corpus import corpus_rows, score_corpus

    tokenizer = _driver_tokenizer(cfg)
    requests, stats = corpus_rows(cfg, tokenizer)
    todo = [r for r in requests if r["prompt_id"] not in done]
    bar = tqdm(total=len(todo), desc="corpus", unit="row", disable=not show_progress or not todo)
    tokens = 0

    def progress(rows: int, new_tokens: int) -> None:
        nonlocal tokens
        tokens += new_tokens
        bar.update(rows)
        bar.set_postfix(tokens=tokens)

    scored = score_corpus(cfg, todo, tokenizer, lambda table: write_shard(out_dir, table), progress)
    bar.close()
    seconds = scored["seconds"]
    return {
        **stats,
        "resumed_rows": len(requests) - len(todo),
        **scored,
        "tokens_per_s": round(scored["new_tokens"] / seconds, 2) if seconds else None,
    }


def _read_manifest(data_dir: str) -> dict[str, Any] | None:
    uri = storage.join(data_dir, "manifest.json")
    return storage.read_json(uri) if storage.exists(uri) else None


def _driver_tokenizer(cfg: DataConfig) -> Any:
    from distill.teacher.sources import load_tokenizer

    return load_tokenizer(cfg.teacher.tokenizer or cfg.teacher.model, cfg.teacher.revision)


def cleaning_summary(cleaning: dict[str, Any] | None) -> str | None:
    """One line: ``kept 30/32 written prompts in 2 rounds (asked 40); dropped assistant_echo 6, ...``."""
    if not cleaning or "kept" not in cleaning:
        return None
    dropped = ", ".join(
        f"{reason} {n}" for reason, n in sorted((cleaning.get("dropped") or {}).items(), key=lambda kv: -kv[1])
    )
    line = (
        f"kept {cleaning['kept']}/{cleaning['requested']} written prompts in {cleaning['rounds']} "
        f"round{'s' if cleaning['rounds'] != 1 else ''} (asked {cleaning['asked']}); dropped {dropped or 'none'}"
    )
    if cleaning.get("short_by"):
        line += f"; {cleaning['short_by']} short of prompts.count"
    return line


def manifest_json(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True, default=str)
