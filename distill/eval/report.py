"""Plots (matplotlib Agg, PNG) and the self-contained HTML report (images embedded as base64).

The HTML has no script, stylesheet or image from outside: it opens from disk with no network.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

MODEL_ORDER = ("teacher", "student", "init", "baseline")
COLORS = {"teacher": "#1f77b4", "student": "#d62728", "init": "#7f7f7f", "baseline": "#2ca02c"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _models(report: dict) -> list[str]:
    return [m for m in MODEL_ORDER if m in report.get("models", {})]


def _finish(fig, ax, xlabel: str, ylabel: str, title: str) -> bytes:
    """Labels, grid and legend of a one-axis line plot, as PNG bytes."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def loss_lines(metrics: list[dict]) -> list[dict[str, Any]]:
    """The training-loss plot's lines: per stage (``stage_name`` or ``stage``) its loss, labelled offline or
    on-policy, and for on-policy stages the one-sample reverse KL on the student's own samples
    (``on_policy.kl_sampled``, same colour, dotted); held-out KL points last. Each line
    ``{"label", "steps", "values", "kind"}`` with kind ``loss`` / ``on_policy_kl`` / ``heldout``."""
    steps = [m for m in metrics if "loss" in m and "step" in m and m.get("event") is None]
    stages: dict[str, list[dict]] = {}
    for m in steps:
        stages.setdefault(str(m.get("stage_name") or m.get("stage") or "train"), []).append(m)
    lines: list[dict[str, Any]] = []
    for name, rows in stages.items():
        kind = "on-policy" if any("on_policy" in r for r in rows) else "offline"
        lines.append(
            {
                "label": f"loss: {name} ({kind})",
                "steps": [r["step"] for r in rows],
                "values": [r["loss"] for r in rows],
                "kind": "loss",
            }
        )
        sampled = [r for r in rows if r.get("on_policy", {}).get("labelled_tokens")]
        if sampled:
            lines.append(
                {
                    "label": f"on-policy KL: {name}",
                    "steps": [r["step"] for r in sampled],
                    "values": [r["on_policy"]["kl_sampled"] for r in sampled],
                    "kind": "on_policy_kl",
                }
            )
    held = [m for m in metrics if m.get("event") == "heldout" and m.get("kl") is not None]
    if held:
        lines.append(
            {
                "label": "held-out KL",
                "steps": [m["step"] for m in held],
                "values": [m["kl"] for m in held],
                "kind": "heldout",
            }
        )
    return lines


def plot_training_loss(metrics: list[dict]) -> bytes | None:
    """Loss vs step, one line per training stage (see :func:`loss_lines`)."""
    lines = loss_lines(metrics)
    if not any(line["kind"] == "loss" for line in lines):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    color = None
    for line in lines:
        if line["kind"] == "loss":
            (drawn,) = ax.plot(
                line["steps"],
                line["values"],
                marker="." if len(line["steps"]) < 50 else None,  # a single logged step still shows
                label=line["label"],
                linewidth=1.6,
            )
            color = drawn.get_color()
        elif line["kind"] == "on_policy_kl":
            ax.plot(line["steps"], line["values"], ":", color=color, label=line["label"])
        else:
            ax.plot(line["steps"], line["values"], "o--", color="black", label=line["label"])
    return _finish(fig, ax, "step", "loss", "Training loss by stage")


def plot_budget(metrics: list[dict]) -> bytes | None:
    """Student/teacher NLL ratio on held-out teacher text vs training tokens (``train.heldout_every`` points).

    Both NLLs are over the same held-out tokens, so their ratio is the bits-per-byte ratio there.
    None with fewer than two scored points.
    """
    held = [
        m
        for m in metrics
        if m.get("event") == "heldout"
        and m.get("teacher_ce")
        and m.get("ce") is not None
        and m.get("train_tokens") is not None
    ]
    if len(held) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(
        [m["train_tokens"] for m in held],
        [m["ce"] / m["teacher_ce"] for m in held],
        "o-",
        label="student / teacher, held-out teacher text",
    )
    ax.axhline(1.0, color="gray", linestyle=":", label="teacher")
    ax.set_xscale("log")
    return _finish(
        fig,
        ax,
        "training tokens (completion targets)",
        "bits/byte ratio",
        "Student vs teacher as the training budget grows",
    )


def plot_bits_per_byte(report: dict) -> bytes | None:
    models = _models(report)
    corpora = sorted({c for m in models for c in report["models"][m].get("bits_per_byte", {})})
    if not models or not corpora:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(models)
    for i, name in enumerate(models):
        values = [report["models"][name].get("bits_per_byte", {}).get(c, {}).get("bits_per_byte", 0.0) for c in corpora]
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(corpora))]
        bars = ax.bar(xs, values, width, label=name, color=COLORS.get(name))
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(corpora)), corpora)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("Compression: bits per byte by model and corpus")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def plot_routing(report: dict) -> bytes | None:
    """Experts-per-token histogram (pooled over layers) and the difficulty curve, per MoE model."""
    routed = [m for m in _models(report) if report["models"][m].get("routing")]
    if not routed:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(routed)
    for i, name in enumerate(routed):
        r = report["models"][name]["routing"]
        ks = r["histogram"]["experts"]
        pooled = [sum(layer[k] for layer in r["histogram"]["counts_by_layer"]) for k in range(len(ks))]
        total = max(sum(pooled), 1)
        ax1.bar(
            [k + (i - (len(routed) - 1) / 2) * width for k in ks],
            [p / total for p in pooled],
            width,
            label=f"{name} (mean {r['experts_per_token_mean']:.2f})",
            color=COLORS.get(name),
        )
        curve = r.get("difficulty_curve", [])
        ax2.plot(
            [c["mean_entropy"] for c in curve],
            [c["mean_experts"] for c in curve],
            "o-",
            label=name,
            color=COLORS.get(name),
        )
    ax1.set_xlabel("experts used by a token (per MoE layer)")
    ax1.set_ylabel("share of token-layers")
    ax1.set_title("Experts per token")
    ax1.legend(fontsize=8)
    sources = {report["models"][m]["routing"].get("entropy_of", "teacher") for m in routed}
    ax2.set_xlabel(f"{' / '.join(sorted(sources))} entropy (nats), quantile buckets")
    ax2.set_ylabel("mean experts per token")
    ax2.set_title("Difficulty vs experts used")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    return _png(fig)


def plot_speed(report: dict) -> bytes | None:
    timed = [m for m in _models(report) if report["models"][m].get("speed")]
    if not timed:
        return None
    batches = sorted({int(b) for m in timed for b in report["models"][m]["speed"]["by_batch"]})
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(timed)
    for i, name in enumerate(timed):
        by = report["models"][name]["speed"]["by_batch"]
        xs = [j + (i - (len(timed) - 1) / 2) * width for j in range(len(batches))]
        ttft = [by.get(str(b), {}).get("ttft_s", 0.0) * 1000 for b in batches]
        tps = [by.get(str(b), {}).get("decode_tokens_per_s", 0.0) for b in batches]
        ax1.bar_label(ax1.bar(xs, ttft, width, label=name, color=COLORS.get(name)), fmt="%.0f", fontsize=7)
        ax2.bar_label(ax2.bar(xs, tps, width, label=name, color=COLORS.get(name)), fmt="%.0f", fontsize=7)
    engines = sorted({report["models"][m]["speed"].get("engine", "?") for m in timed})
    for ax, title, ylabel in (
        (ax1, f"Time to first token ({', '.join(engines)})", "ms (lower is better)"),
        (ax2, f"Decode throughput ({', '.join(engines)})", "tokens/s (higher is better)"),
    ):
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def make_plots(report: dict, training_metrics: list[dict]) -> dict[str, bytes]:
    """``{file stem: PNG bytes}`` for every plot there is data for."""
    plots = {
        "training_loss": plot_training_loss(training_metrics),
        "budget": plot_budget(training_metrics),
        "bits_per_byte": plot_bits_per_byte(report),
        "routing": plot_routing(report),
        "speed": plot_speed(report),
    }
    return {k: v for k, v in plots.items() if v}


# ----------------------------------------------------------------------------- HTML
def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


SUMMARY_ROWS = [
    ("bpb_heldout", "bits/byte, held-out teacher text"),
    ("bpb_heldout_in_context", "bits/byte, held-out teacher text after its prompt"),
    ("bpb_human", "bits/byte, human text"),
    ("kl", "KL(teacher‖model), nats/token"),
    ("top1_agreement", "top-1 agreement"),
    ("ttft_s", "TTFT batch 1 (s)"),
    ("decode_tokens_per_s", "decode tokens/s (largest batch)"),
    ("cost_per_million_tokens", "cost / 1M output tokens"),
    ("experts_per_token", "experts / token"),
    ("active_parameters", "active parameters / token"),
    ("parameters", "parameters"),
    ("kv_bytes_per_token", "KV-cache bytes / token"),
]

CAPTIONS = {
    "training_loss": "Training loss by stage (held-out KL as points).",
    "budget": "Student/teacher bits-per-byte ratio on held-out teacher text as training tokens grow "
    "(train.heldout_every).",
    "bits_per_byte": "Bits per byte by model and corpus: lower means the model predicts (compresses) the text better.",
    "routing": "Left: experts each token used per MoE layer. Right: entropy bucket (the teacher's on held-out rows, "
    "else the model's own on human text) vs experts used (rising = harder tokens get more experts).",
    "speed": "Time to first token and decode tokens/s on the same engine and machine.",
}


def _samples_html(report: dict, models: list[str]) -> str:
    """The sample answers as a table: one row per held-out prompt, one column per model."""
    samples = report.get("samples") or []
    if not samples:
        return ""
    settings = report.get("sample_settings") or {}
    columns = [m for m in models if any(m in s["answers"] for s in samples)]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in columns)
    body = "".join(
        f'<tr><th class="text">{html.escape(s["prompt"])}</th>'
        + "".join(f'<td class="text">{html.escape(s["answers"].get(m, "-"))}</td>' for m in columns)
        + "</tr>"
        for s in samples
    )
    return (
        "<h2>Sample answers</h2><p>Held-out prompts (never trained on), each model greedy"
        f" with repetition penalty {settings.get('repetition_penalty', 1.0):g}, at most"
        f" {_fmt(settings.get('max_new_tokens'))} new tokens.</p>"
        f"<table><tr><th>prompt</th>{head}</tr>{body}</table>"
    )


def render_html(report: dict, plots: dict[str, bytes]) -> str:
    models = _models(report)
    gate = report.get("gate", {})
    ok = gate.get("passed")
    verdict = "not applied" if ok is None else ("PASSED" if ok else "FAILED")
    subject = (
        (f"Model <code>{html.escape(str(report['models'].get('student', {}).get('path')))}</code> (standalone, no run)")
        if report.get("mode") == "standalone"
        else f"Run <code>{html.escape(str(report.get('run_dir', '')))}</code>"
    )
    rows = []
    for key, label in SUMMARY_ROWS:
        cells = "".join(f"<td>{_fmt(report['models'][m].get('metrics', {}).get(key))}</td>" for m in models)
        rows.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    corpora_rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{_fmt(c.get('texts'))}</td><td>{_fmt(c.get('bytes'))}</td></tr>"
        for n, c in report.get("corpora", {}).items()
    )
    figures = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(CAPTIONS.get(name, name))}</figcaption></figure>"
        for name, png in plots.items()
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.get("notes", []))
    paths = "".join(
        f"<tr><th>{html.escape(m)}</th><td><code>{html.escape(str(report['models'][m].get('path')))}</code></td></tr>"
        for m in models
    )
    samples = _samples_html(report, models)
    run_cost = report.get("run_cost") or {}
    cost_line = ""
    if run_cost.get("cost") is not None:
        cost_line = (
            f"<p>Run cost: {_fmt(run_cost['cost'])} for {_fmt(run_cost['wall_seconds'])} s "
            f"(generate {_fmt(run_cost.get('generate_seconds'))} s + train "
            f"{_fmt(run_cost.get('train_seconds'))} s) at {_fmt(run_cost.get('cost_per_hour'))}/hour.</p>"
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>raydistill eval: {html.escape(str(report.get("run_dir") or report["models"].get("student", {}).get("path")))}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th {{ background: #f4f4f4; text-align: left; }}
.text {{ text-align: left; vertical-align: top; white-space: pre-wrap; max-width: 320px; }}
.gate {{ padding: 10px 14px; border-radius: 6px; font-weight: bold; margin: 12px 0; }}
.pass {{ background: #e3f6e3; border: 1px solid #3a3; }} .skip {{ background: #f4f4f4; border: 1px solid #999; }} .fail {{ background: #fbe3e3; border: 1px solid #c33; }}
figure {{ margin: 12px 0 24px; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
figcaption {{ font-size: 0.9em; color: #555; }}
</style></head><body>
<h1>raydistill evaluation</h1>
<p>{subject} · config hash <code>{html.escape(str(report.get("config_hash", "")))}</code>
· {html.escape(str(report.get("created", "")))}</p>
<div class="gate {"skip" if ok is None else "pass" if ok else "fail"}">Gate {verdict}: {html.escape(str(gate.get("reason", "")))}</div>
<h2>Summary</h2>
<table><tr><th></th>{head}</tr>{"".join(rows)}</table>
{cost_line}
{samples}
<h2>Plots</h2>
{figures}
<h2>Corpora</h2>
<table><tr><th>corpus</th><th>texts</th><th>bytes</th></tr>{corpora_rows}</table>
<h2>Models</h2>
<table>{paths}</table>
<h2>Notes</h2>
<ul>{notes or "<li>none</li>"}</ul>
<details><summary>report.json</summary><pre>{html.escape(json.dumps(report, indent=1, default=str)[:200000])}</pre></details>
</body></html>
"""
