"""Run the pipeline's stages in order with a manifest, skip what is up to date, resume what failed.

For each stage in ``pipeline.stages`` the runner computes the hash of the config sections the stage
depends on and fingerprints of its inputs (:mod:`pipelines.manifest`). A stage is **skipped** when its
last execution completed with the same hash and fingerprints and all its completion markers (the
``manifest.json`` / ``report.json`` its outputs carry, written last) exist. Otherwise it runs; a
stage whose previous attempt had the same hash and inputs gets ``resume=True`` and continues its own
partial work (generate skips written shards, train restarts from its checkpoint). Outputs of a
rerun stage change the fingerprints of the stages after it, so they rerun in turn.

``from_stage`` forces that stage and every later one to run; ``only`` runs just that stage. A gate
that refuses ends the run as ``refused`` (exit 0): export and deploy are skipped and the old model
keeps serving. Every state change rewrites ``{run}/manifest.json`` atomically.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any

from cluster import storage
from cluster.errors import ConfigError, RaydistillError
from pipelines.config import PipelineConfig
from pipelines.manifest import COMPLETED, RunManifest, fingerprints, utcnow
from pipelines.registry import Registry
from pipelines.stages import STAGES, Stage, StageContext, StageResult

log = logging.getLogger(__name__)
INCOMPLETE = ("pending", "running", "failed", "interrupted", "partial")


@dataclasses.dataclass
class PipelineOutcome:
    run_id: str
    run_dir: str
    status: str  # done | refused | failed | interrupted | partial
    manifest: dict[str, Any]
    summary: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status in ("done", "refused", "partial")

    @property
    def base_url(self) -> str | None:
        return self.summary.get("base_url")


# ------------------------------------------------------------------------------------------ the run
def select_run(
    cfg: PipelineConfig, run_id: str | None = None, *, new: bool = False, need_existing: bool = False
) -> tuple[str, str]:
    """(run_id, run_dir): ``run_id`` if given (created when new); else a fresh run if ``new``; else the
    newest run when ``need_existing`` (--from/--only) or when it is unfinished; else a fresh run."""
    from cluster.runs import list_runs, run_dir

    if run_id:
        uri = run_dir(cfg, run_id, create=True)
        return run_id, uri
    if not new:
        runs = list_runs(cfg)
        if runs:
            newest = runs[-1]
            uri = run_dir(cfg, newest)
            manifest = RunManifest.load(uri)
            if need_existing or manifest is None or manifest.status in INCOMPLETE:
                return newest, uri
        elif need_existing:
            raise RaydistillError(
                f"no runs of {cfg.name!r} yet; --from/--only need an existing run "
                "(start one with `raydistill run FILE`)"
            )
    uri = run_dir(cfg, create=True)
    return uri.rstrip("/").rsplit("/", 1)[-1], uri


def ensure_ray(cfg: PipelineConfig) -> None:
    """Connect to Ray once: inside `ray job submit` keep the job's runtime_env; else ``ray.address``."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # A job driver: passing a runtime_env here would replace the job's (working_dir, pip extras).
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), namespace="raydistill", logging_level=logging.WARNING)
        return
    from cluster.ray_init import build_runtime_env, connect

    runtime_env = build_runtime_env(extras=cfg.ray.extras) if cfg.ray.address else None
    connect(cfg.ray.address, num_cpus=cfg.ray.num_cpus, dashboard=cfg.ray.dashboard, runtime_env=runtime_env)


def wide_console() -> Any:
    """stderr console; logs (not a terminal) get 160 columns so the tables do not squeeze."""
    from rich.console import Console

    console = Console(stderr=True)
    return console if console.is_terminal else Console(stderr=True, width=160)


def _check_not_running(run_dir: str) -> None:
    """Refuse to drive a run that another live process on this machine is driving right now."""
    manifest = RunManifest.load(run_dir)
    if manifest is None or manifest.status != "running":
        return
    last = (manifest.data.get("invocations") or [{}])[-1]
    pid = last.get("pid")
    if last.get("status") != "running" or last.get("host") != socket.gethostname() or not pid or pid == os.getpid():
        return
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return  # that process is gone: the run was interrupted and may be resumed
    raise RaydistillError(
        f"run {run_dir} is being run by process {pid} on this machine; wait for it, stop it, "
        "or start another run with --new"
    )


def _price_per_hour(cfg: PipelineConfig) -> float | None:
    if cfg.pipeline.cost_per_hour is not None:
        return cfg.pipeline.cost_per_hour
    return getattr(cfg.eval, "hardware_cost_per_hour", None)


def _effective_outcome(entry: Mapping[str, Any]) -> str | None:
    if entry.get("status") in ("done", "refused", "skipped"):
        return entry.get("outcome")
    return None


def _overall_status(manifest: RunManifest, selected: list[str]) -> str:
    entries = [manifest.stage(n) for n in selected]
    if any(e["status"] == "failed" for e in entries):
        return "failed"
    if any(_effective_outcome(e) == "refused" for e in entries):
        return "refused"
    if all(_effective_outcome(e) == "done" for e in entries):
        return "done"
    return "partial"


def run_pipeline(
    cfg: PipelineConfig,
    *,
    run_id: str | None = None,
    new: bool = False,
    from_stage: str | None = None,
    only: str | None = None,
    stages: Mapping[str, Stage] | None = None,
    show_progress: bool | None = None,
    live: bool | None = None,
    console: Any = None,
    argv: list[str] | None = None,
) -> PipelineOutcome:
    """Run (or resume) one pipeline run; returns its outcome (stage failures are recorded, not raised).

    ``stages`` replaces the stage registry (tests use fake stages). ``live``: the rich stage table
    (default: when stderr is a terminal and ``pipeline.live``).
    """
    registry_of_stages = dict(stages or STAGES)
    selected = list(cfg.pipeline.stages)
    for flag, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in selected:
            raise ConfigError(f"{flag} {value}: not one of pipeline.stages {selected}")
    if from_stage and only:
        raise ConfigError("--from and --only exclude each other; pick one")
    missing = [n for n in selected if n not in registry_of_stages]
    if missing:
        raise ConfigError(f"pipeline.stages: no stage named {missing}; known: {sorted(registry_of_stages)}")

    run_id, run_dir = select_run(cfg, run_id, new=new, need_existing=bool(from_stage or only))
    _check_not_running(run_dir)
    manifest = RunManifest.open(run_dir, name=cfg.name, run_id=run_id, stages=selected)
    registry = Registry.for_config(cfg)
    console = console or wide_console()
    live = (cfg.pipeline.live and console.is_terminal) if live is None else live
    show_progress = (not live) if show_progress is None else show_progress
    invocation = {
        "argv": argv if argv is not None else sys.argv[1:],
        "from": from_stage,
        "only": only,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": utcnow(),
        "status": "running",
    }
    manifest.data.setdefault("invocations", []).append(invocation)
    manifest.update(status="running", config_hash=cfg.section_hash(), finished_at=None)
    price = _price_per_hour(cfg)
    view = _LiveView(manifest)
    live_ctx = None
    if live:
        from rich.live import Live

        live_ctx = Live(view, console=console, refresh_per_second=2, transient=True)
        live_ctx.start()
    say = (lambda text: None) if live else (lambda text: console.print(text, highlight=False))
    say(f"[bold]pipeline {cfg.name}[/bold] run {run_id}: {run_dir}")

    refused: str | None = None
    failed = False
    ray_ready = False
    try:
        for index, name in enumerate(selected):
            if only and name != only:
                continue
            if from_stage and index < selected.index(from_stage):
                continue
            stage = registry_of_stages[name]
            previous = dict(manifest.stage(name))
            if refused:
                manifest.update_stage(name, status="skipped", outcome=None, message=f"not run: {refused}")
                say(f"  {name}: skipped ({refused})")
                continue
            config_hash = cfg.section_hash(*stage.sections) if stage.sections else cfg.section_hash("name")
            inputs = fingerprints(stage.inputs(cfg, run_dir))
            if stage.extra_inputs:
                inputs.update(stage.extra_inputs(cfg, run_dir, registry))
            markers = stage.markers(cfg, run_dir)
            forced = only == name or from_stage is not None
            same = previous.get("config_hash") == config_hash and previous.get("inputs") == inputs
            if (
                not forced
                and not stage.always_run
                and same
                and previous.get("outcome") in COMPLETED
                and all(storage.exists(m) for m in markers)
            ):
                manifest.update_stage(name, status="skipped", message=f"up to date since {previous.get('ended_at')}")
                say(f"  {name}: up to date, skipped")
                if previous.get("outcome") == "refused":
                    refused = "gate refused"
                continue
            if stage.needs_ray and not ray_ready:
                ensure_ray(cfg)
                ray_ready = True
            ctx = StageContext(
                cfg=cfg,
                run_dir=run_dir,
                run_id=run_id,
                resume=same and not forced,
                show_progress=show_progress,
                previous=previous,
                registry=registry,
            )
            started = time.time()
            manifest.update_stage(
                name,
                status="running",
                sections=list(stage.sections),
                config_hash=config_hash,
                inputs=inputs,
                outputs=[],
                started_at=utcnow(),
                ended_at=None,
                duration_s=None,
                message="resuming" if ctx.resume and previous.get("status") != "pending" else "",
                attempts=int(previous.get("attempts") or 0) + 1,
            )
            say(f"  {name}: running")
            try:
                result = stage.run(ctx)
            except KeyboardInterrupt:
                manifest.update_stage(
                    name,
                    status="failed",
                    outcome=None,
                    ended_at=utcnow(),
                    duration_s=round(time.time() - started, 2),
                    message="interrupted",
                )
                manifest.update(status="interrupted")
                invocation.update(status="interrupted", ended_at=utcnow())
                manifest.save()
                raise
            except Exception as exc:  # noqa: BLE001 - recorded in the manifest, the run stops here
                log.debug("stage %s failed", name, exc_info=True)
                text = str(exc) if isinstance(exc, RaydistillError) else f"{type(exc).__name__}: {exc}"
                manifest.update_stage(
                    name,
                    status="failed",
                    outcome=None,
                    ended_at=utcnow(),
                    duration_s=round(time.time() - started, 2),
                    message=text,
                    error=traceback.format_exc()[-4000:],
                )
                say(f"  [red]{name}: failed[/red]: {text}")
                failed = True
                break
            if not isinstance(result, StageResult):
                raise TypeError(f"stage {name} returned {type(result).__name__}, expected StageResult")
            duration = round(time.time() - started, 2)
            cost = (
                result.cost
                if result.cost is not None
                else (round(duration / 3600 * price, 6) if price is not None else None)
            )
            outputs = sorted({m.rsplit("/", 1)[0] for m in markers} | set(result.artifacts))
            manifest.update_stage(
                name,
                status=result.status,
                outcome=result.status,
                ended_at=utcnow(),
                duration_s=duration,
                rows=result.rows,
                tokens=result.tokens,
                tokens_per_s=result.tokens_per_s,
                cost=cost,
                message=result.message,
                metrics=result.metrics,
                outputs=outputs,
                error=None,
            )
            say(f"  {name}: {result.status} in {duration:.1f}s {result.message}")
            if result.status == "refused":
                refused = "gate refused"
    finally:
        if live_ctx is not None:
            live_ctx.stop()

    status = "failed" if failed else _overall_status(manifest, selected)
    summary = build_summary(manifest.data, selected)
    manifest.data["summary"] = summary
    invocation.update(status=status, ended_at=utcnow())
    fields: dict[str, Any] = {"status": status}
    if status in ("done", "refused"):
        fields["finished_at"] = utcnow()
    manifest.update(**fields)
    summary["status"] = status
    return PipelineOutcome(run_id=run_id, run_dir=run_dir, status=status, manifest=manifest.data, summary=summary)


# ----------------------------------------------------------------------------------- tables/summary
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _duration(entry: Mapping[str, Any]) -> float | None:
    if entry.get("status") == "running" and entry.get("started_at"):
        started = dt.datetime.fromisoformat(entry["started_at"])
        return (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    return entry.get("duration_s")


STATUS_STYLE = {
    "done": "green",
    "skipped": "dim",
    "running": "yellow",
    "failed": "red",
    "refused": "magenta",
    "pending": "dim",
}


def stage_table(data: Mapping[str, Any], title: str | None = None) -> Any:
    from rich.table import Table

    table = Table(title=title or f"run {data.get('run_id')}", title_justify="left")
    for column in ("stage", "status", "time s", "rows", "tokens", "tok/s", "cost", "note"):
        table.add_column(
            column,
            justify="right" if column in ("time s", "rows", "tokens", "tok/s", "cost") else "left",
            no_wrap=column == "note",
            overflow="ellipsis",
            max_width=64 if column == "note" else None,
        )
    for entry in data.get("stages", []):
        status = entry.get("status", "pending")
        style = STATUS_STYLE.get(status, "")
        table.add_row(
            entry["name"],
            f"[{style}]{status}[/{style}]" if style else status,
            _fmt(_duration(entry), 1),
            _fmt(entry.get("rows")),
            _fmt(entry.get("tokens")),
            _fmt(entry.get("tokens_per_s"), 1),
            _fmt(entry.get("cost"), 4),
            str(entry.get("message") or "")[:200],
        )
    return table


class _LiveView:
    """What rich.live re-renders twice a second: the manifest's stage table (durations tick)."""

    def __init__(self, manifest: RunManifest):
        self.manifest = manifest

    def __rich__(self) -> Any:
        return stage_table(self.manifest.data)


def build_summary(data: Mapping[str, Any], selected: list[str] | None = None) -> dict[str, Any]:
    """The numbers of a run: per stage durations/rows/tokens/cost plus teacher/training speed and eval results."""
    entries = {e["name"]: e for e in data.get("stages", [])}
    metrics = {name: e.get("metrics") or {} for name, e in entries.items()}
    costs = [e.get("cost") for e in entries.values() if e.get("cost") is not None]
    gen, train, ev, deploy = (entries.get(n, {}) for n in ("generate", "train", "eval", "deploy"))
    em = metrics.get("eval", {})
    summary = {
        "run_id": data.get("run_id"),
        "run_dir": data.get("run_dir"),
        "status": data.get("status"),
        "stages": [
            {k: e.get(k) for k in ("name", "status", "duration_s", "rows", "tokens", "tokens_per_s", "cost", "message")}
            for e in data.get("stages", [])
            if selected is None or e["name"] in selected
        ],
        "wall_seconds": round(sum(e.get("duration_s") or 0 for e in entries.values()), 2),
        "teacher_tokens_per_s": gen.get("tokens_per_s"),
        "training_tokens_per_s": train.get("tokens_per_s"),
        "cost": round(sum(costs), 6) if costs else None,
        "manifest": storage.join(str(data.get("run_dir")), "manifest.json"),
    }
    for key in (
        "student_bpb_heldout",
        "teacher_bpb_heldout",
        "student_bpb_heldout_in_context",
        "teacher_bpb_heldout_in_context",
        "student_bpb_human",
        "teacher_bpb_human",
        "init_bpb_human",
        "student_decode_tokens_per_s",
        "teacher_decode_tokens_per_s",
        "decode_speedup",
        "student_ttft_s",
        "teacher_ttft_s",
        "student_experts_per_token",
        "init_experts_per_token",
        "student_max_k",
        "student_hard_minus_easy",
        "gate_passed",
        "gate_reason",
        "heldout_sample",
        "report",
    ):
        summary[key] = em.get(key)
    if entries.get("gate", {}).get("metrics"):
        summary["gate_passed"] = metrics["gate"].get("passed", summary["gate_passed"])
        summary["gate_reason"] = metrics["gate"].get("reason", summary["gate_reason"])
    if deploy.get("status") == "done":  # deployed by this invocation (deploy is never skipped as up to date)
        summary["base_url"] = metrics["deploy"].get("base_url")
        summary["served_model"] = metrics["deploy"].get("model_dir")
    return summary


def print_summary(
    outcome_or_summary: Any, console: Any = None, targets_section: Any = None, sample: tuple[str, ...] | None = None
) -> None:
    """The final stage table, a key/value table of the run's headline numbers, and the ratios vs their targets."""
    from rich.markup import escape
    from rich.table import Table

    console = console or wide_console()
    summary = outcome_or_summary.summary if isinstance(outcome_or_summary, PipelineOutcome) else outcome_or_summary
    stages_view = {"run_id": summary.get("run_id"), "stages": summary.get("stages", [])}
    console.print(stage_table(stages_view, title=f"pipeline run {summary.get('run_id')}: {summary.get('status')}"))

    def pair(a: Any, b: Any, digits: int = 3) -> str:
        return f"{_fmt(a, digits)} vs {_fmt(b, digits)}"

    table = Table(show_header=False, title="summary", title_justify="left")
    rows = [
        ("stage time (sum of last executions)", f"{_fmt(summary.get('wall_seconds'), 1)} s"),
        ("teacher tokens/s", _fmt(summary.get("teacher_tokens_per_s"), 1)),
        ("training tokens/s", _fmt(summary.get("training_tokens_per_s"), 1)),
        (
            "bits/byte held-out: student vs teacher",
            pair(summary.get("student_bpb_heldout"), summary.get("teacher_bpb_heldout")),
        ),
        (
            "bits/byte held-out, after its prompt: student vs teacher",
            pair(summary.get("student_bpb_heldout_in_context"), summary.get("teacher_bpb_heldout_in_context")),
        ),
        (
            "bits/byte human text: student vs teacher",
            pair(summary.get("student_bpb_human"), summary.get("teacher_bpb_human")),
        ),
        (
            "decode tokens/s: student vs teacher",
            pair(summary.get("student_decode_tokens_per_s"), summary.get("teacher_decode_tokens_per_s"), 1)
            + (f"  ({summary['decode_speedup']:.2f}x)" if summary.get("decode_speedup") else ""),
        ),
        (
            "gate",
            "-"
            if summary.get("gate_passed") is None
            else f"{'passed' if summary['gate_passed'] else 'refused'}: {summary.get('gate_reason') or ''}",
        ),
        ("cost", _fmt(summary.get("cost"), 4)),
        ("report", _fmt(summary.get("report"))),
        ("serving", _fmt(summary.get("base_url"))),
        ("manifest", _fmt(summary.get("manifest"))),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    targets = target_rows(summary, targets_section)
    if targets:
        check = Table(title="student vs teacher, against the targets (pipeline.targets)", title_justify="left")
        for column in ("measure", "value", "target", ""):
            check.add_column(column)
        for name, value, target, ok in targets:
            check.add_row(name, value, target, "-" if ok is None else ("ok" if ok else "MISSED"))
        console.print(check)
    if sample:  # model text is escaped: "[...]" in it is not rich markup
        console.print(
            f"[bold]sample answer[/bold] (served student, {sample[2] if len(sample) > 2 else 'greedy'}) "
            f"{escape(repr(sample[0]))} ->\n{escape(sample[1])}",
            highlight=False,
        )
    heldout = summary.get("heldout_sample")
    if heldout:
        penalty = heldout.get("repetition_penalty")
        console.print(
            "[bold]held-out prompt[/bold] (never trained on; eval, greedy"
            + (f", repetition_penalty {penalty:g}" if penalty not in (None, 1.0) else "")
            + f") {escape(repr(heldout['prompt']))} ->\n[bold]teacher:[/bold] {escape(heldout['teacher'])}\n"
            f"[bold]student:[/bold] {escape(heldout['student'])}",
            highlight=False,
        )


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def target_rows(summary: Mapping[str, Any], targets: Any) -> list[tuple[str, str, str, bool | None]]:
    """(measure, value, target, met?) for each ratio the run measured; met is None without a target."""
    if targets is None:
        from pipelines.section import TargetsSection

        targets = TargetsSection()
    s = summary
    max_k = s.get("student_max_k")
    experts = s.get("student_experts_per_token")
    measures = [
        (
            "bits/byte human text, student / teacher",
            _ratio(s.get("student_bpb_human"), s.get("teacher_bpb_human")),
            targets.bpb_human_ratio,
            "<=",
        ),
        (
            "bits/byte held-out teacher text, student / teacher",
            _ratio(s.get("student_bpb_heldout"), s.get("teacher_bpb_heldout")),
            targets.bpb_heldout_ratio,
            "<=",
        ),
        (
            "bits/byte held-out teacher text after its prompt, student / teacher",
            _ratio(s.get("student_bpb_heldout_in_context"), s.get("teacher_bpb_heldout_in_context")),
            targets.bpb_heldout_in_context_ratio,
            "<=",
        ),
        (
            "bits/byte human text, init / teacher",
            _ratio(s.get("init_bpb_human"), s.get("teacher_bpb_human")),
            targets.init_bpb_human_ratio,
            "<=",
        ),
        (
            "decode tokens/s, student / teacher",
            _ratio(s.get("student_decode_tokens_per_s"), s.get("teacher_decode_tokens_per_s")),
            targets.decode_speedup,
            ">=",
        ),
        (
            "time to first token, student / teacher",
            _ratio(s.get("student_ttft_s"), s.get("teacher_ttft_s")),
            targets.ttft_ratio,
            "<=",
        ),
        (
            f"experts per token / max_k ({_fmt(experts, 2)} of {_fmt(max_k)})",
            _ratio(experts, max_k),
            targets.experts_fraction,
            "<=",
        ),
        ("difficulty curve: hard - easy (experts)", s.get("student_hard_minus_easy"), targets.hard_minus_easy, ">"),
    ]
    rows = []
    for name, value, target, op in measures:
        if value is None:
            continue
        ok = (
            None
            if target is None
            else (value <= target if op == "<=" else value >= target if op == ">=" else value > target)
        )
        rows.append((name, f"{value:.3f}", "-" if target is None else f"{op} {target:g}", ok))
    return rows


# ------------------------------------------------------------------------------------ after deploy
def sample_settings(cfg: PipelineConfig) -> str:
    """How :func:`sample_completion` samples, for the summary: greedy, plus the serving defaults it gets."""
    extra = {k: v for k, v in cfg.serve.sampling_defaults.items() if k != "temperature"}
    return "greedy" + "".join(f", {k} {v:g}" for k, v in sorted(extra.items()))


def sample_completion(base_url: str, cfg: PipelineConfig, *, timeout: float = 120.0) -> str:
    """One chat completion from the served model (OpenAI API), to show the endpoint works."""
    import httpx

    from serve.app import served_name

    url = base_url.rstrip("/")
    url = f"{url}/chat/completions" if url.endswith("/v1") else f"{url}/v1/chat/completions"
    headers = {}
    keys = os.environ.get(cfg.serve.api_key_env or "", "") if getattr(cfg.serve, "api_key_env", None) else ""
    if keys:
        headers["Authorization"] = f"Bearer {keys.split(',')[0].strip()}"
    body = {
        "model": served_name(cfg.serve, cfg.name),
        "messages": [{"role": "user", "content": cfg.pipeline.sample_prompt}],
        "max_tokens": cfg.pipeline.sample_max_tokens,
        "temperature": 0,
    }
    response = httpx.post(url, json=body, headers=headers, timeout=timeout)
    if response.status_code != 200:
        raise RaydistillError(f"sample completion from {url} failed: HTTP {response.status_code} {response.text[:300]}")
    return response.json()["choices"][0]["message"]["content"]
