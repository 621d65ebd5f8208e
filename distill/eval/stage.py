"""The eval stage: score teacher, student, student-at-init and an optional baseline; gate; write the report.

:func:`run_standalone_eval` scores one model dir (optionally beside a teacher) without a run.

Writes ``{run}/eval/report.json`` (every number, config hash, model paths), ``{run}/eval/*.png``
and ``{run}/eval/report.html`` (self-contained). Models are loaded one at a time, fp32 on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Protocol

import numpy as np

from cluster import storage
from cluster.errors import RaydistillError
from cluster.section import RunConfig
from distill.eval import corpora as corpora_mod
from distill.eval import metrics as M
from distill.eval import report as report_mod
from distill.eval import samples as samples_mod
from distill.eval import speed as speed_mod
from distill.eval.gate import evaluate_gate
from distill.eval.section import EvalSection
from distill.teacher.section import TeacherSection
from distill.training.section import TrainSection


class EvalConfig(RunConfig, Protocol):
    """The sections the eval stage reads (``train`` for the held-out split)."""

    teacher: TeacherSection
    train: TrainSection
    eval: EvalSection
    serve: ServedWeights


class ServedWeights(Protocol):
    dtype: str  # serve.dtype: int8 has the eval also score the student with the int8 weights it will serve
    sampling_defaults: dict[str, Any]  # serve.sampling_defaults: the sample answers use its repetition_penalty


log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
HELDOUT = "heldout"


# ----------------------------------------------------------------------------- loading
def load_model(path_or_alias: str, *, role: str) -> tuple[Any, Any, str]:
    """``(model, tokenizer, local dir)``; RaydistillError when the dir, its weights or its tokenizer are missing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import distill.student.hf  # noqa: F401 - registers raydistill_moe with Auto*

    if role in ("teacher", "baseline") and not storage.exists(path_or_alias):
        from distill.teacher.sources import resolve_model

        local = resolve_model(path_or_alias)
    else:
        if not storage.exists(path_or_alias):
            raise RaydistillError(
                f"{role} model {path_or_alias} does not exist; train the run first or pass --model DIR"
            )
        local = storage.local_copy(path_or_alias)
    if not os.path.exists(os.path.join(local, "config.json")):
        raise RaydistillError(
            f"{role} model {path_or_alias} is not an HF model dir (no config.json); pass the "
            "directory written by training/export"
        )
    if not any(os.path.exists(os.path.join(local, f)) for f in TOKENIZER_FILES):
        raise RaydistillError(
            f"{role} model dir {path_or_alias} has no tokenizer ({' / '.join(TOKENIZER_FILES)}); "
            f"save one there with tokenizer.save_pretrained('{path_or_alias}') (e.g. the teacher's)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(local)
    except Exception as exc:  # noqa: BLE001 - reported with the path
        raise RaydistillError(
            f"cannot load the tokenizer of {role} model {path_or_alias} ({exc}); "
            "re-save it with tokenizer.save_pretrained"
        ) from exc
    model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).eval()
    return model, tokenizer, local


def same_vocabulary(a: Any, b: Any) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def heldout_rows(cfg: EvalConfig, run_dir: str) -> tuple[list[dict], dict[str, Any]]:
    """Held-out teacher rows (the training split, by prompt), at most ``eval.max_heldout_rows``, by prompt_id."""
    from distill.data.shards import read_dir
    from distill.data.split import SPLIT_COLUMNS, row_is_heldout

    filtered = storage.join(run_dir, "data", "filtered")
    source = (
        filtered
        if storage.exists(storage.join(filtered, "manifest.json"))
        else storage.join(run_dir, "data", "generate")
    )
    fraction = float(getattr(cfg.train, "heldout_fraction", 0.1))
    seed = int(getattr(cfg.train, "seed", 0))
    info = {"source": source, "fraction": fraction, "seed": seed, "rows": 0}
    table = read_dir(source, ["completion", "input_ids", "prompt_len", "topk_ids", "topk_logprobs", *SPLIT_COLUMNS])
    if table is None:
        return [], info
    rows = [r for r in table.to_pylist() if row_is_heldout(r, fraction, seed)]
    rows.sort(key=lambda r: r["prompt_id"])
    info["available"] = len(rows)
    rows = rows[: cfg.eval.max_heldout_rows]
    info["rows"] = len(rows)
    return rows, info


def _read_jsonl(uri: str) -> list[dict]:
    if not storage.exists(uri):
        return []
    out = []
    for line in storage.read_text(uri).splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line while training still writes
    return out


def _read_manifest(uri: str) -> dict | None:
    return storage.read_json(uri) if storage.exists(uri) else None


def run_cost(run_dir: str, cost_per_hour: float | None) -> dict[str, Any]:
    """Hardware cost of the run: teacher generation + training wall seconds at ``cost_per_hour``."""
    gen = _read_manifest(storage.join(run_dir, "data", "generate", "manifest.json")) or {}
    train = _read_manifest(storage.join(run_dir, "train", "manifest.json")) or {}
    g, t = float(gen.get("wall_seconds") or 0.0), float(train.get("wall_seconds") or 0.0)
    cost = None if cost_per_hour is None else (g + t) / 3600.0 * cost_per_hour
    return {
        "generate_seconds": g,
        "train_seconds": t,
        "wall_seconds": g + t,
        "cost_per_hour": cost_per_hour,
        "cost": cost,
    }


# ----------------------------------------------------------------------------- one model
def _combine_bpb(results: list[dict]) -> float | None:
    nats = sum(r["nats"] for r in results)
    nbytes = sum(r["bytes"] for r in results)
    return nats / math.log(2) / nbytes if nbytes else None


def evaluate_model(
    name: str,
    model: Any,
    tokenizer: Any,
    *,
    cfg: EvalConfig,
    texts: dict[str, list[str]],
    rows: list[dict],
    fidelity_ok: bool,
    notes: list[str],
    say,
) -> dict[str, Any]:
    ecfg = cfg.eval
    out: dict[str, Any] = {"vocab_size": len(tokenizer), "bits_per_byte": {}}
    for corpus, corpus_texts in texts.items():
        say(f"{name}: bits per byte on {corpus}")
        out["bits_per_byte"][corpus] = M.bits_per_byte(
            model, tokenizer, corpus_texts, window=ecfg.window, batch_tokens=ecfg.batch_tokens
        )
    experts_by_layer = None
    if rows and fidelity_ok:
        say(f"{name}: held-out rows in context" + ("" if name == "teacher" else ", fidelity and routing"))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else M.start_token_id(tokenizer)
        scored = M.score_rows(model, rows, batch_tokens=ecfg.batch_tokens, pad_id=int(pad), routing=name != "teacher")
        # The completions as the model meets them when serving: after their prompts. bits_per_byte above
        # scores the same texts alone, which takes the prompt's help from both models (the teacher, which
        # uses it more, loses more: README, the quality recipe).
        nats = float(scored["student_nll"].sum())
        out["heldout_in_context"] = {
            "bits_per_byte": nats / math.log(2) / scored["bytes"] if scored["bytes"] else None,
            "tokens": int(scored["student_nll"].shape[0]),
            "bytes": int(scored["bytes"]),
            "nats": nats,
        }
        if ecfg.samples:
            picked = samples_mod.sample_rows(rows, ecfg.samples)
            if picked:
                say(f"{name}: {len(picked)} sample answers")
                out["samples"] = samples_mod.greedy_answers(
                    model,
                    tokenizer,
                    picked,
                    max_new_tokens=ecfg.sample_max_tokens,
                    repetition_penalty=sample_penalty(cfg),
                )
        if name != "teacher":
            out["fidelity"] = {
                "kl": float(scored["kl"].mean()),
                "top1_agreement": float(scored["agree"].mean()),
                "tokens": int(scored["kl"].shape[0]),
                "teacher_token_nll": float(scored["student_nll"].mean()),
            }
            if scored["experts"].size:
                max_k = getattr(getattr(model.config, "to_student_config", lambda: None)(), "max_k", None)
                out["routing"] = M.routing_summary(scored["experts"], scored["entropy"], max_k=max_k)
                out["load_balance"] = M.load_balance(scored["expert_load"])
                out["routing"]["entropy_of"] = "teacher"
                experts_by_layer = out["routing"]["experts_per_token_by_layer"]
    human = [t for corpus, corpus_texts in texts.items() if corpus != HELDOUT for t in corpus_texts]
    if "routing" not in out and human and M.has_routers(model):
        # No held-out teacher rows to route over (standalone eval, or vocabulary differs): the human text,
        # with the model's own next-token entropy as the difficulty axis.
        say(f"{name}: routing on the human corpora")
        routed = M.route_texts(model, tokenizer, human, window=ecfg.window, batch_tokens=ecfg.batch_tokens)
        if routed["experts"].size:
            max_k = getattr(getattr(model.config, "to_student_config", lambda: None)(), "max_k", None)
            out["routing"] = M.routing_summary(routed["experts"], routed["entropy"], max_k=max_k)
            out["routing"]["entropy_of"] = "model"
            out["load_balance"] = M.load_balance(routed["expert_load"])
            experts_by_layer = out["routing"]["experts_per_token_by_layer"]
    out["footprint"] = speed_mod.model_footprint(model, experts_by_layer)
    out["metrics"] = summary_metrics(out, ecfg.hardware_cost_per_hour)
    return out


def sample_penalty(cfg: EvalConfig) -> float:
    """The repetition penalty the endpoint applies when a request leaves it out (``serve.sampling_defaults``)."""
    return float(cfg.serve.sampling_defaults.get("repetition_penalty", 1.0))


def summary_metrics(result: dict, cost_per_hour: float | None) -> dict[str, Any]:
    """The flat numbers a gate or a table reads (keys of ``GATE_METRICS`` plus sizes)."""
    bpb = result.get("bits_per_byte", {})
    human = [v for k, v in bpb.items() if k != HELDOUT]
    metrics: dict[str, Any] = {
        "bpb_heldout": bpb[HELDOUT]["bits_per_byte"] if HELDOUT in bpb else None,
        "bpb_heldout_in_context": result.get("heldout_in_context", {}).get("bits_per_byte"),
        "bpb_human": _combine_bpb(human) if human else None,
        "kl": result.get("fidelity", {}).get("kl"),
        "top1_agreement": result.get("fidelity", {}).get("top1_agreement"),
        "experts_per_token": result.get("routing", {}).get("experts_per_token_mean"),
    }
    speed = result.get("speed")
    if speed:
        by = speed["by_batch"]
        smallest, largest = min(by, key=int), max(by, key=int)
        metrics["ttft_s"] = by[smallest]["ttft_s"]
        metrics["decode_tokens_per_s"] = by[largest]["decode_tokens_per_s"]
        metrics["cost_per_million_tokens"] = speed_mod.cost_per_million_tokens(
            by[largest]["decode_tokens_per_s"], cost_per_hour
        )
        for m in by.values():
            m["cost_per_million_tokens"] = speed_mod.cost_per_million_tokens(m["decode_tokens_per_s"], cost_per_hour)
    else:
        metrics.update({"ttft_s": None, "decode_tokens_per_s": None, "cost_per_million_tokens": None})
    fp = result.get("footprint", {})
    for key in ("parameters", "active_parameters", "kv_bytes_per_token"):
        metrics[key] = fp.get(key)
    return metrics


# ----------------------------------------------------------------------------- the stage
def run_eval_stage(
    cfg: EvalConfig,
    run_dir: str,
    *,
    model_dir: str | None = None,
    baseline_dir: str | None = None,
    show_progress: bool = True,
) -> dict:
    """Evaluate the run's models, apply the gate, write ``{run}/eval/report.{json,html}`` and plots.

    ``model_dir`` defaults to ``{run}/student``; ``baseline_dir`` to ``eval.gate.baseline``.
    Returns the report dict (``report["gate"]``, ``report["paths"]``).
    """
    import torch

    ecfg = cfg.eval
    started = time.time()
    if ecfg.threads:
        torch.set_num_threads(ecfg.threads)

    say = _sayer(show_progress)
    notes: list[str] = []
    eval_dir = storage.join(run_dir, "eval")
    student_path = model_dir or storage.join(run_dir, "student")
    if not storage.exists(student_path):
        raise RaydistillError(f"student model {student_path} does not exist; run training first or pass --model DIR")
    baseline_path = baseline_dir or ecfg.gate.baseline
    init_path = storage.join(run_dir, "train", "init")
    paths: dict[str, str | None] = {"teacher": cfg.teacher.model, "student": student_path}
    if "init" in ecfg.models:
        if storage.exists(storage.join(init_path, "config.json")):
            paths["init"] = init_path
        else:
            notes.append(f"student at initialisation skipped: {init_path} is absent (training writes it)")
    if baseline_path and "baseline" in ecfg.models:
        paths["baseline"] = baseline_path
    order = [
        m for m in ("teacher", "student", "init", "baseline") if m in paths and (m in ecfg.models or m == "student")
    ]

    rows, held_info = heldout_rows(cfg, run_dir)
    if not rows:
        notes.append(
            f"no held-out teacher rows under {held_info['source']} (train.heldout_fraction="
            f"{held_info['fraction']}); held-out bits per byte and fidelity skipped"
        )
    human, corpus_notes = corpora_mod.load_corpora(
        ecfg.corpora, ecfg.builtin_corpus, ecfg.max_corpus_bytes, resolve=cfg.resolve_path
    )
    notes.extend(corpus_notes)
    texts: dict[str, list[str]] = {}
    if rows:
        texts[HELDOUT] = [r["completion"] for r in rows if r.get("completion")]
        if not texts[HELDOUT]:
            del texts[HELDOUT]
    texts.update(human)
    if not texts:
        raise RaydistillError(
            "nothing to evaluate on: no held-out teacher rows and no human corpus; set "
            "eval.corpora or install the builtin corpus (apt-get install fortunes-min)"
        )

    results = _evaluate_models(cfg, order, paths, rows, texts, notes, say)
    if "teacher" in results and rows:
        # The teacher against itself: KL 0 and agreement 1 by definition (the reference for gates on them).
        results["teacher"]["metrics"].update({"kl": 0.0, "top1_agreement": 1.0})

    report: dict[str, Any] = {
        "run_dir": run_dir,
        "config_hash": cfg.section_hash(),
        "eval_config": ecfg.model_dump(mode="json"),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "models": results,
        "corpora": {
            name: {"texts": len(t), "bytes": sum(len(x.encode("utf-8")) for x in t)} for name, t in texts.items()
        },
        "heldout": held_info,
        "run_cost": run_cost(run_dir, ecfg.hardware_cost_per_hour),
        "training": _read_manifest(storage.join(run_dir, "train", "manifest.json")),
        "notes": notes,
    }
    answers = {name: result.pop("samples") for name, result in results.items() if "samples" in result}
    if answers:
        report["samples"] = samples_mod.side_by_side(samples_mod.sample_rows(rows, ecfg.samples), answers)
        report["sample_settings"] = {
            "decoding": "greedy",
            "repetition_penalty": sample_penalty(cfg),
            "max_new_tokens": ecfg.sample_max_tokens,
        }
    report["gate"] = evaluate_gate(ecfg.gate, {k: v["metrics"] for k, v in results.items()})
    comparison = _comparison(results)
    if comparison:
        report["comparison"] = comparison
    report["wall_seconds"] = round(time.time() - started, 2)

    _write_report(report, eval_dir, _read_jsonl(storage.join(run_dir, "train", "metrics.jsonl")), say)
    return report


def default_out_dir(model: str) -> str:
    """``./eval-<last path part of the model dir or alias>`` (absolute)."""
    name = model.rstrip("/").rsplit("/", 1)[-1] or "model"
    return os.path.abspath(f"eval-{name}")


def _model_or_alias(value: str, flag: str) -> str:
    """A model dir that exists (used as given), or a builtin alias / Hugging Face id resolved to a local dir."""
    if storage.exists(value):
        return value
    from distill.teacher.sources import BUILTIN_ALIASES, resolve_model

    hf_id = value.count("/") == 1 and "://" not in value and not value.startswith((".", "/", "~"))
    if value in BUILTIN_ALIASES or hf_id:
        try:
            return resolve_model(value)
        except RaydistillError as exc:
            raise RaydistillError(f"{flag} {value}: {exc}") from exc
    raise RaydistillError(
        f"{flag} {value} does not exist; pass a student dir written by training/export, an HF "
        f"causal LM dir, a Hugging Face id (org/name) or a builtin alias "
        f"({', '.join(BUILTIN_ALIASES)})"
    )


def run_standalone_eval(
    cfg: EvalConfig, model: str, *, teacher: str | None = None, out_dir: str | None = None, show_progress: bool = True
) -> dict:
    """Evaluate one model with no pipeline run: bits per byte on the human corpora, speed, routing (MoE).

    ``model``: a student dir, any HF causal LM dir, a Hugging Face id or a builtin alias; it is
    reported as ``student``. ``teacher`` (optional) is scored the same way beside it. Teacher-text
    metrics (held-out bits per byte, KL, top-1 agreement) need a run's soft labels and are absent;
    no gate is applied (``report["gate"]["passed"] is None``). Writes ``report.{json,html}`` and
    plots under ``out_dir`` (default :func:`default_out_dir`).
    """
    import torch

    ecfg = cfg.eval
    started = time.time()
    if ecfg.threads:
        torch.set_num_threads(ecfg.threads)
    say = _sayer(show_progress)
    paths: dict[str, Any] = {}
    if teacher:
        paths["teacher"] = _model_or_alias(teacher, "--teacher")
    paths["student"] = _model_or_alias(model, "--model")
    out_dir = out_dir or default_out_dir(model)
    notes = [
        "standalone evaluation (no pipeline run): held-out teacher-text bits per byte, KL and top-1 agreement "
        "need a run's soft labels; pass --run ID for them"
    ]
    human, corpus_notes = corpora_mod.load_corpora(
        ecfg.corpora, ecfg.builtin_corpus, ecfg.max_corpus_bytes, resolve=cfg.resolve_path
    )
    notes.extend(corpus_notes)
    if not human:
        raise RaydistillError(
            "nothing to evaluate on: no human corpus; pass --corpus FILE (.txt or .jsonl), set "
            "eval.corpora, or install the builtin corpus (apt-get install fortunes-min)"
        )
    results = _evaluate_models(cfg, list(paths), paths, [], human, notes, say)
    report: dict[str, Any] = {
        "mode": "standalone",
        "run_dir": None,
        "config_hash": cfg.section_hash(),
        "eval_config": ecfg.model_dump(mode="json"),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "models": results,
        "corpora": {
            name: {"texts": len(t), "bytes": sum(len(x.encode("utf-8")) for x in t)} for name, t in human.items()
        },
        "heldout": None,
        "run_cost": None,
        "training": None,
        "notes": notes,
        "gate": {
            "passed": None,
            "metric": ecfg.gate.metric,
            "reason": "standalone evaluation has no run to gate; `raydistill eval --run ID` applies eval.gate",
        },
    }
    comparison = _comparison(results)
    if comparison:
        report["comparison"] = comparison
    report["wall_seconds"] = round(time.time() - started, 2)
    _write_report(report, out_dir, [], say)
    return report


def _sayer(show_progress: bool):
    def say(message: str) -> None:
        log.info(message)
        if show_progress:
            from rich.console import Console

            Console(stderr=True).print(f"[dim]eval[/dim] {message}")

    return say


def _evaluate_models(
    cfg: EvalConfig,
    order: list[str],
    paths: dict[str, Any],
    rows: list[dict],
    texts: dict[str, list[str]],
    notes: list[str],
    say,
) -> dict[str, dict]:
    """Load and score each model in ``order``, one at a time; then time the teacher and the student in turn."""
    ecfg = cfg.eval
    teacher_tok = None
    results: dict[str, dict] = {}
    timed: dict[str, tuple[Any, Any]] = {}  # name -> (model, tokenizer), kept loaded for the speed rounds
    for name in order:
        say(f"loading {name}: {paths[name]}")
        model, tokenizer, local = load_model(paths[name], role=name)
        if name == "teacher":
            teacher_tok = tokenizer
        fidelity_ok = True
        if name != "teacher" and teacher_tok is not None and not same_vocabulary(tokenizer, teacher_tok):
            fidelity_ok = False
            notes.append(
                f"{name}: vocabulary differs from the teacher's ({len(tokenizer)} vs {len(teacher_tok)} "
                "tokens); bits per byte compared, KL and top-1 agreement skipped"
            )
        elif name != "teacher" and teacher_tok is None and rows:
            # Teacher not evaluated (eval.models): the stored soft labels must at least index this vocabulary.
            fidelity_ok = len(tokenizer) > max(max(max(k) for k in r["topk_ids"]) for r in rows if r["topk_ids"])
        if ecfg.speed.enabled and name in ("teacher", "student"):
            timed[name] = (model, tokenizer)
        results[name] = evaluate_model(
            name, model, tokenizer, cfg=cfg, texts=texts, rows=rows, fidelity_ok=bool(fidelity_ok), notes=notes, say=say
        )
        if name == "student" and cfg.serve.dtype == "int8":
            results[name]["served_int8"] = int8_cost(model, tokenizer, texts, results[name], ecfg, notes, say)
        results[name]["path"] = paths[name]
        results[name]["local_path"] = local
        del model
    if timed:
        s = ecfg.speed
        say(f"speed: {' and '.join(timed)} in turn at batch {s.batch_sizes}, {s.rounds} round(s)")
        speeds = speed_mod.measure_speeds(
            timed,
            batch_sizes=s.batch_sizes,
            prompt_tokens=s.prompt_tokens,
            new_tokens=s.new_tokens,
            warmup=s.warmup,
            repeats=s.repeats,
            rounds=s.rounds,
        )
        for name, speed in speeds.items():
            results[name]["speed"] = speed
            results[name]["metrics"] = summary_metrics(results[name], ecfg.hardware_cost_per_hour)
    return results


def int8_cost(
    model: Any, tokenizer: Any, texts: dict[str, list[str]], result: dict, ecfg: EvalSection, notes: list[str], say
) -> dict[str, Any]:
    """Bits per byte of ``model`` with the int8 weights ``serve.dtype: int8`` serves (a quantized copy), on
    the same texts as its float32 figures in ``result``: ``{"bits_per_byte": {corpus: bpb},
    "change": {corpus: int8 / fp32 - 1}}``; one line per corpus in ``notes``."""
    import copy

    from serve.engine.kernels import quantize_int8_weights

    say("student: bits per byte with the int8 weights it is served with (serve.dtype: int8)")
    quantized = copy.deepcopy(model)
    quantize_int8_weights(quantized)
    out: dict[str, Any] = {"bits_per_byte": {}, "change": {}}
    for corpus, corpus_texts in texts.items():
        bpb = M.bits_per_byte(quantized, tokenizer, corpus_texts, window=ecfg.window, batch_tokens=ecfg.batch_tokens)
        fp32 = result["bits_per_byte"][corpus]["bits_per_byte"]
        out["bits_per_byte"][corpus] = bpb["bits_per_byte"]
        out["change"][corpus] = bpb["bits_per_byte"] / fp32 - 1
        notes.append(
            f"student served as int8 (serve.dtype): bits per byte on {corpus} {bpb['bits_per_byte']:.4f} "
            f"vs {fp32:.4f} in float32 ({100 * out['change'][corpus]:+.2f}%)"
        )
    return out


def _comparison(results: dict[str, dict]) -> dict[str, Any] | None:
    """Student / teacher ratios: decode speed-up, active parameters, KV bytes (None without both)."""
    if "teacher" not in results or "student" not in results:
        return None
    t, s = results["teacher"]["metrics"], results["student"]["metrics"]

    def ratio(key: str) -> float | None:
        return s[key] / t[key] if s.get(key) and t.get(key) else None

    return {
        "decode_speedup": ratio("decode_tokens_per_s"),
        "active_parameter_ratio": ratio("active_parameters"),
        "kv_bytes_ratio": ratio("kv_bytes_per_token"),
    }


def _write_report(report: dict, eval_dir: str, training_metrics: list[dict], say) -> None:
    """Plots, ``report.html`` and ``report.json`` under ``eval_dir`` (each written atomically)."""
    plots = report_mod.make_plots(report, training_metrics)
    json_uri, html_uri = storage.join(eval_dir, "report.json"), storage.join(eval_dir, "report.html")
    report["paths"] = {
        "json": json_uri,
        "html": html_uri,
        **{f"png_{k}": storage.join(eval_dir, f"{k}.png") for k in plots},
    }
    for name, png in plots.items():
        storage.atomic_write_bytes(storage.join(eval_dir, f"{name}.png"), png)
    storage.atomic_write_text(html_uri, report_mod.render_html(report, plots))
    storage.atomic_write_json(json_uri, _jsonable(report))
    say(f"report: {html_uri}")


def _jsonable(obj: Any) -> Any:
    """numpy scalars and NaN -> plain JSON values."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    return obj
