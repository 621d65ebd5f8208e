"""``raydistill eval --config FILE [--set ...] [--run ID] [--model DIR] [--baseline DIR] [--json]``.

``--model DIR`` without ``--run`` evaluates that model alone (no pipeline run needed): bits per
byte on the human corpora (``--corpus FILE``, the builtin fortunes), speed, routing of a MoE
student, optionally beside ``--teacher``; the report goes to ``--out`` (default ``./eval-<name>``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

MODEL_COLUMNS = ("teacher", "student", "init", "baseline")
ROWS = [
    ("bpb_heldout", "bits/byte held-out"),
    ("bpb_heldout_in_context", "bits/byte held-out, in context"),
    ("bpb_human", "bits/byte human"),
    ("kl", "KL(teacher||model)"),
    ("top1_agreement", "top-1 agreement"),
    ("ttft_s", "TTFT b=1 (s)"),
    ("decode_tokens_per_s", "decode tok/s (max batch)"),
    ("cost_per_million_tokens", "cost / 1M tokens"),
    ("experts_per_token", "experts / token"),
    ("active_parameters", "active params / token"),
    ("kv_bytes_per_token", "KV bytes / token"),
]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    models = [m for m in MODEL_COLUMNS if m in report["models"]]
    table = Table(title="eval")
    table.add_column("metric")
    for m in models:
        table.add_column(m, justify="right")
    for key, label in ROWS:
        table.add_row(label, *(_cell(report["models"][m]["metrics"].get(key)) for m in models))
    console.print(table)
    for note in report.get("notes", []):
        console.print(f"[yellow]note[/yellow] {note}")
    gate = report["gate"]
    if gate.get("passed") is None:
        console.print(f"[dim]gate skipped[/dim]: {gate['reason']}")
        return
    console.print(
        f"[{'green' if gate['passed'] else 'red'}]gate {'PASSED' if gate['passed'] else 'FAILED'}[/]: {gate['reason']}"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    import os

    from cluster.errors import RaydistillError
    from cluster.runs import run_dir
    from distill.eval.stage import run_eval_stage, run_standalone_eval
    from pipelines.cli.common import load

    cfg = load(args)
    if args.corpus:
        cfg.eval.corpora = list(cfg.eval.corpora) + [c if "://" in c else os.path.abspath(c) for c in args.corpus]
    if args.model and not args.run:
        report = run_standalone_eval(
            cfg, args.model, teacher=args.teacher, out_dir=args.out, show_progress=not args.json
        )
    else:
        for flag, value in (("--teacher", args.teacher), ("--out", args.out)):
            if value:
                raise RaydistillError(
                    f"{flag} applies to `raydistill eval --model DIR` without --run; a run is "
                    f"evaluated against its config's teacher.model and writes {{run}}/eval "
                    f"(drop {flag}, or drop --run to evaluate --model alone)"
                )
        run = run_dir(cfg, args.run)
        report = run_eval_stage(cfg, run, model_dir=args.model, baseline_dir=args.baseline, show_progress=not args.json)
    if args.json:
        print(
            json.dumps(
                {
                    "gate": report["gate"],
                    "paths": report["paths"],
                    "metrics": {k: v["metrics"] for k, v in report["models"].items()},
                    "comparison": report.get("comparison"),
                    "notes": report["notes"],
                },
                indent=2,
                default=str,
            )
        )
        return 0
    print_report(report)
    print(report["paths"]["html"])
    print(report["paths"]["json"])
    return 0


def register(subparsers: Any) -> None:
    from pipelines.cli.common import add_config_args

    parser = subparsers.add_parser(
        "eval", help="bits per byte, fidelity, routing, speed, cost, gate -> eval/report.html"
    )
    add_config_args(parser)
    parser.add_argument(
        "--model",
        metavar="DIR",
        help="model to evaluate: a student dir, an HF causal LM dir or alias (default: {run}/student); "
        "without --run it is evaluated alone on human text, speed and routing",
    )
    parser.add_argument("--teacher", metavar="DIR", help="with --model and no --run: a teacher to compare beside it")
    parser.add_argument(
        "--corpus",
        metavar="FILE",
        action="append",
        default=[],
        help="human-written text to score (.txt or .jsonl, repeatable; adds to eval.corpora)",
    )
    parser.add_argument("--out", metavar="DIR", help="with --model and no --run: report dir (default ./eval-<name>)")
    parser.add_argument(
        "--baseline", metavar="DIR", help="the model served now, for the gate (default: eval.gate.baseline)"
    )
    parser.add_argument("--json", action="store_true", help="print gate, metrics and paths as JSON")
    parser.set_defaults(func=cmd_eval)
