"""The pipeline's stages: what each consumes, what proves it finished, and the adapter that runs it.

A :class:`Stage` names the config sections it depends on (their hash decides reruns), its input
URIs (fingerprinted), its completion markers (files written last by the stage: a rerun trusts a
stage's outputs only when all markers exist) and a ``run(ctx) -> StageResult`` adapter. The real
stage code (data, training, eval, serving) is imported inside each adapter, so a missing or broken
module fails only that stage.

:data:`STAGES` maps stage names to specs; tests pass their own mapping to the runner.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster import storage
from cluster.errors import RaydistillError
from pipelines.config import PipelineConfig
from pipelines.manifest import MANIFEST, utcnow


@dataclasses.dataclass
class StageContext:
    cfg: PipelineConfig
    run_dir: str
    run_id: str
    # True when the previous attempt of this stage ran with the same config hash and inputs, so the
    # stage may continue its own partial work (training resumes checkpoints); False = start it over.
    resume: bool
    show_progress: bool
    previous: dict[str, Any]
    registry: Any  # pipelines.registry.Registry


@dataclasses.dataclass
class StageResult:
    status: str = "done"  # done | refused
    message: str = ""
    rows: int | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    cost: float | None = None  # the stage's own cost (e.g. API spend); else duration x pipeline price
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    artifacts: list[str] = dataclasses.field(default_factory=list)  # outputs besides the marker folders


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]
    inputs: Callable[[Any, str], list[str]]
    markers: Callable[[Any, str], list[str]]
    run: Callable[[StageContext], StageResult]
    needs_ray: bool = False
    always_run: bool = False  # never skipped as up to date (deploy: the app may be gone)
    # Extra {key: fingerprint} inputs that are not files (e.g. the served baseline model).
    extra_inputs: Callable[[Any, str, Any], dict[str, str]] | None = None


def _run_path(run_dir: str, *parts: str) -> str:
    return storage.join(run_dir, *parts)


# ----------------------------------------------------------------------------------------- generate
def _generate_inputs(cfg: PipelineConfig, run_dir: str) -> list[str]:
    pc = cfg.prompts
    source = pc.source.value
    if source == "file" and pc.path:
        out: list[str] = []
        for pattern in [pc.path] if isinstance(pc.path, str) else list(pc.path):
            resolved = cfg.resolve_path(pattern)
            out.extend(storage.expand(resolved))
        return out
    if source == "self_instruct" and pc.topics_path:
        return [cfg.resolve_path(pc.topics_path)]
    # served_prompts: the prompts a run takes from the log are frozen under data/prompts/ on first
    # use, so the growing log itself is not an input of a rerun of the same run.
    return []


def _generate_and_corpus_inputs(cfg: PipelineConfig, run_dir: str) -> list[str]:
    out = _generate_inputs(cfg, run_dir)
    for pattern in cfg.corpus.path:  # the builtin corpus is a Debian package's files, not a run input
        out.extend(storage.expand(cfg.resolve_path(pattern)))
    return out


def _run_generate(ctx: StageContext) -> StageResult:
    from distill.data.generate import cleaning_summary, run_generate_stage

    m = run_generate_stage(ctx.cfg, ctx.run_dir, show_progress=ctx.show_progress)
    message = f"{m.get('new_rows', 0)} new rows, {m.get('resumed_rows', 0)} resumed"
    if m.get("skipped"):
        message += f"; skipped {m['skipped']}"
    if cleaning_summary(m.get("prompt_cleaning")):
        message += f"; prompts: {cleaning_summary(m.get('prompt_cleaning'))}"
    if m.get("corpus"):
        c = m["corpus"]
        message += f"; corpus: {c['rows']} rows, {c['tokens']:,} tokens scored"
    return StageResult(
        rows=m.get("rows"),
        tokens=m.get("completion_tokens"),
        tokens_per_s=m.get("teacher_tokens_per_s"),
        message=message,
        metrics={
            "teacher_tokens_per_s": m.get("teacher_tokens_per_s"),
            "new_rows": m.get("new_rows"),
            "prompt_tokens": m.get("prompt_tokens"),
        },
    )


# ------------------------------------------------------------------------------------------- filter
def _filter_inputs(cfg: PipelineConfig, run_dir: str) -> list[str]:
    return [_run_path(run_dir, "data", "generate")] + [cfg.resolve_path(u) for u in cfg.filter.decontaminate]


def _run_filter(ctx: StageContext) -> StageResult:
    from distill.data.filter_stage import run_filter_stage

    m = run_filter_stage(ctx.cfg, ctx.run_dir)
    tokens = m.get("tokens") or {}
    return StageResult(
        rows=m.get("output_rows"),
        tokens=tokens.get("completion"),
        message=f"kept {m.get('output_rows')}/{m.get('input_rows')}"
        + "".join(f", {k} -{v}" for k, v in (m.get("dropped") or {}).items() if v),
        metrics={"input_rows": m.get("input_rows"), "dropped": m.get("dropped")},
    )


# -------------------------------------------------------------------------------------------- train
def _run_train(ctx: StageContext) -> StageResult:
    from distill.training.stage import run_train_stage

    # Changed config/data or --from/--only (ctx.resume False): discard the old training state.
    m = run_train_stage(ctx.cfg, ctx.run_dir, resume=True, restart=not ctx.resume, show_progress=ctx.show_progress)
    if m.get("status") not in (None, "done"):
        raise RaydistillError(f"training ended with status {m.get('status')!r}; see {ctx.run_dir}/train")
    return StageResult(
        tokens=m.get("tokens"),
        tokens_per_s=m.get("tokens_per_s"),
        rows=m.get("train_rows") or m.get("rows"),
        message=f"{m.get('steps')} steps",
        artifacts=[_run_path(ctx.run_dir, "student")],
        metrics={
            "steps": m.get("steps"),
            "training_tokens_per_s": m.get("tokens_per_s"),
            "wall_seconds": m.get("wall_seconds"),
        },
    )


# --------------------------------------------------------------------------------------------- eval
def _baseline_input(cfg: PipelineConfig, run_dir: str, registry: Any) -> dict[str, str]:
    entry = registry.baseline_for(run_dir.rstrip("/").rsplit("/", 1)[-1]) if registry else None
    if not entry:
        return {"baseline": "none"}
    return {"baseline": f"{entry['model_dir']}@{entry.get('promoted_at')}"}


def _baseline_dir(ctx: StageContext) -> str | None:
    entry = ctx.registry.baseline_for(ctx.run_id) if ctx.registry else None
    if entry and storage.exists(storage.join(entry["model_dir"], "config.json")):
        return entry["model_dir"]
    return None


def eval_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers the run summary shows, from an eval report (missing ones are None)."""
    models = report.get("models") or {}

    def metric(model: str, key: str) -> Any:
        return ((models.get(model) or {}).get("metrics") or {}).get(key)

    gate = report.get("gate") or {}
    return {
        "student_bpb_heldout": metric("student", "bpb_heldout"),
        "teacher_bpb_heldout": metric("teacher", "bpb_heldout"),
        "student_bpb_heldout_in_context": metric("student", "bpb_heldout_in_context"),
        "teacher_bpb_heldout_in_context": metric("teacher", "bpb_heldout_in_context"),
        "student_bpb_human": metric("student", "bpb_human"),
        "teacher_bpb_human": metric("teacher", "bpb_human"),
        "student_decode_tokens_per_s": metric("student", "decode_tokens_per_s"),
        "teacher_decode_tokens_per_s": metric("teacher", "decode_tokens_per_s"),
        "decode_speedup": (report.get("comparison") or {}).get("decode_speedup"),
        "student_kl": metric("student", "kl"),
        "student_top1_agreement": metric("student", "top1_agreement"),
        "init_bpb_human": metric("init", "bpb_human"),
        "init_bpb_heldout": metric("init", "bpb_heldout"),
        "student_ttft_s": metric("student", "ttft_s"),
        "teacher_ttft_s": metric("teacher", "ttft_s"),
        "student_experts_per_token": metric("student", "experts_per_token"),
        "init_experts_per_token": metric("init", "experts_per_token"),
        "student_max_k": ((models.get("student") or {}).get("routing") or {}).get("max_k"),
        "student_hard_minus_easy": ((models.get("student") or {}).get("routing") or {}).get("hard_minus_easy"),
        "gate_passed": gate.get("passed"),
        "gate_reason": gate.get("reason"),
        "heldout_sample": _first_sample(report),
        "report": (report.get("paths") or {}).get("html") or (report.get("paths") or {}).get("json"),
    }


def _first_sample(report: dict[str, Any]) -> dict[str, Any] | None:
    """The first held-out prompt with the teacher's and the student's greedy answers, for the run summary."""
    samples = report.get("samples") or []
    if not samples or not {"teacher", "student"} <= set(samples[0]["answers"]):
        return None
    answers = samples[0]["answers"]
    return {
        "prompt": samples[0]["prompt"],
        "teacher": answers["teacher"],
        "student": answers["student"],
        "repetition_penalty": (report.get("sample_settings") or {}).get("repetition_penalty"),
    }


def _run_eval(ctx: StageContext) -> StageResult:
    from distill.eval.stage import run_eval_stage

    baseline = _baseline_dir(ctx)
    report = run_eval_stage(
        ctx.cfg, ctx.run_dir, model_dir=None, baseline_dir=baseline, show_progress=ctx.show_progress
    )
    metrics = {**eval_metrics(report), "baseline": baseline}
    gate = report.get("gate") or {}
    message = f"gate {'passed' if gate.get('passed') else 'failed'}; report {metrics['report'] or '-'}"
    return StageResult(message=message, metrics=metrics, artifacts=[metrics["report"]] if metrics["report"] else [])


# --------------------------------------------------------------------------------------------- gate
def _run_gate(ctx: StageContext) -> StageResult:
    uri = _run_path(ctx.run_dir, "eval", "report.json")
    if not storage.exists(uri):
        raise RaydistillError(f"gate: {uri} does not exist; run the eval stage first (--from eval)")
    report = storage.read_json(uri)
    gate = report.get("gate")
    if not isinstance(gate, dict) or "passed" not in gate:
        raise RaydistillError(f"gate: {uri} has no gate verdict (report['gate']['passed']); rerun eval")
    passed = bool(gate["passed"])
    reason = gate.get("reason") or ("better than the reference" if passed else "not better than the reference")
    current = ctx.registry.current() if ctx.registry else None
    record = {
        "stage": "gate",
        "passed": passed,
        "reason": reason,
        "gate": gate,
        "report": uri,
        "served_before": (current or {}).get("model_dir"),
        "decided_at": utcnow(),
    }
    storage.atomic_write_json(_run_path(ctx.run_dir, "gate", MANIFEST), record)
    if passed:
        return StageResult(message=f"passed: {reason}", metrics={"passed": True, "reason": reason})
    kept = f"; {current['model_dir']} keeps serving" if current else "; nothing is promoted"
    return StageResult(
        status="refused", message=f"refused: {reason}{kept}", metrics={"passed": False, "reason": reason}
    )


# ------------------------------------------------------------------------------------------- export
def _student_routing(student_dir: str) -> str | None:
    uri = storage.join(student_dir, "config.json")
    if not storage.exists(uri):
        raise RaydistillError(f"export: {uri} does not exist; run the train stage first")
    return storage.read_json(uri).get("routing", "topk")


def _run_export(ctx: StageContext) -> StageResult:
    student = _run_path(ctx.run_dir, "student")
    out = _run_path(ctx.run_dir, "student-qwen2moe")
    routing = _student_routing(student)
    record: dict[str, Any] = {
        "stage": "export",
        "format": "qwen2_moe",
        "student_dir": student,
        "routing": routing,
        "created_at": utcnow(),
    }
    train_manifest_uri = _run_path(ctx.run_dir, "train", MANIFEST)
    train_manifest = storage.read_json(train_manifest_uri) if storage.exists(train_manifest_uri) else {}
    if routing != "topk":
        record.update(
            exported=False,
            dir=None,
            reason=f"routing {routing}: stock Qwen2-MoE routes a fixed k; "
            "the native student is served (vLLM plugin / transformers)",
        )
        message = "not exported (top-p routing)"
    elif train_manifest.get("export_dir") and storage.exists(storage.join(out, "config.json")):
        record.update(exported=True, dir=out, reason="written by the train stage")
        message = "already exported by train"
    else:
        from distill.student.export import export_qwen2_moe

        local_out = Path(storage.local_path(out))
        staged = Path(tempfile.mkdtemp(prefix=storage.TMP_PREFIX + "export-", dir=local_out.parent))
        try:
            export_qwen2_moe(storage.local_path(student), staged)
            storage.publish_dir(staged, local_out)  # the folder appears complete or not at all
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)
        record.update(exported=True, dir=out, reason="exported")
        message = f"exported to {out}"
    storage.atomic_write_json(_run_path(ctx.run_dir, "export", MANIFEST), record)
    return StageResult(
        message=message,
        artifacts=[out] if record["exported"] else [],
        metrics={"exported": record["exported"], "export_dir": record["dir"]},
    )


# ------------------------------------------------------------------------------------------- deploy
def deploy_model_dir(cfg: PipelineConfig, run_dir: str) -> str:
    if cfg.pipeline.deploy_model == "qwen2_moe":
        out = _run_path(run_dir, "student-qwen2moe")
        if not storage.exists(storage.join(out, "config.json")):
            raise RaydistillError(
                f"pipeline.deploy_model=qwen2_moe but {out} does not exist (top-p student, or the "
                "export stage did not run); set pipeline.deploy_model: student"
            )
        return out
    return _run_path(run_dir, "student")


def serve_model(cfg: PipelineConfig, model_dir: str) -> str:
    """Serve ``model_dir`` as app ``cfg.name``: deploy when nothing is served, else a zero-downtime update."""
    from serve import app as serve_app

    name = cfg.name
    if serve_app.status(name) is None:
        return serve_app.deploy(model_dir, cfg.serve, name=name)
    serve_app.update_model(model_dir, cfg.serve, name=name)
    return serve_app.base_url(cfg.serve)


def served_model_dir(cfg: PipelineConfig) -> str | None:
    """The model dir app ``cfg.name`` serves now (None: not running)."""
    from serve import app as serve_app

    return serve_app.served_model_dir(cfg.name)


def _run_deploy(ctx: StageContext) -> StageResult:
    model_dir = deploy_model_dir(ctx.cfg, ctx.run_dir)
    metrics: dict[str, Any] = {}
    eval_uri = _run_path(ctx.run_dir, "eval", "report.json")
    report_path = None
    if storage.exists(eval_uri):
        metrics = eval_metrics(storage.read_json(eval_uri))
        report_path = metrics.get("report")
    # Serialised with other promotes/rollbacks of this pipeline; the intent is recorded before serving changes.
    with ctx.registry.change("promote", model_dir, run_id=ctx.run_id, served=served_model_dir(ctx.cfg)):
        base_url = serve_model(ctx.cfg, model_dir)
        entry = ctx.registry.promote(
            model_dir,
            run_id=ctx.run_id,
            base_url=base_url,
            report=report_path,
            metrics={k: v for k, v in metrics.items() if k.startswith("student_")},
        )
    storage.atomic_write_json(
        _run_path(ctx.run_dir, "deploy", MANIFEST),
        {
            "stage": "deploy",
            "model_dir": model_dir,
            "base_url": base_url,
            "app": ctx.cfg.name,
            "registry": ctx.registry.uri,
            "promoted_at": entry.get("promoted_at"),
            "deployed_at": utcnow(),
        },
    )
    return StageResult(
        message=f"serving {model_dir} at {base_url}", metrics={"base_url": base_url, "model_dir": model_dir}
    )


def _marker(*parts: str) -> Callable[[Any, str], list[str]]:
    return lambda cfg, run_dir: [_run_path(run_dir, *parts)]


STAGES: dict[str, Stage] = {
    "generate": Stage(
        "generate",
        ("teacher", "prompts", "generate", "corpus"),
        _generate_and_corpus_inputs,
        _marker("data", "generate", MANIFEST),
        _run_generate,
        needs_ray=True,
    ),
    "filter": Stage("filter", ("filter",), _filter_inputs, _marker("data", "filtered", MANIFEST), _run_filter),
    "train": Stage(
        "train",
        ("teacher", "student", "train"),
        lambda cfg, run: [_run_path(run, "data", "filtered")],
        _marker("train", MANIFEST),
        _run_train,
        needs_ray=True,
    ),
    "eval": Stage(
        "eval",
        ("teacher", "eval"),
        lambda cfg, run: [_run_path(run, "train")],
        _marker("eval", "report.json"),
        _run_eval,
        extra_inputs=_baseline_input,
    ),
    "gate": Stage(
        "gate",
        (),
        lambda cfg, run: [_run_path(run, "eval", "report.json")],
        _marker("gate", MANIFEST),
        _run_gate,
        extra_inputs=_baseline_input,
    ),
    "export": Stage(
        "export", ("student",), lambda cfg, run: [_run_path(run, "train")], _marker("export", MANIFEST), _run_export
    ),
    "deploy": Stage(
        "deploy",
        ("serve", "pipeline"),
        lambda cfg, run: [_run_path(run, "gate", MANIFEST)],
        _marker("deploy", MANIFEST),
        _run_deploy,
        needs_ray=True,
        always_run=True,
    ),
}
