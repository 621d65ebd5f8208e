"""The ``raydistill`` command: one console script for every stage.

raydistill generate --config FILE [--set a.b=v ...] [--run ID]
raydistill filter   --config FILE [--set ...] [--run ID]
raydistill data inspect URI [--json]
raydistill student init|info ...   raydistill export ...   raydistill train|eval|serve|run|submit|schedule ...
"""

from __future__ import annotations

import argparse
import json

from pipelines import commands
from pipelines.cli import eval as eval_cli
from pipelines.cli import serve as serve_cli
from pipelines.cli import student as student_cli
from pipelines.cli import train as train_cli
from pipelines.cli.common import add_config_args, connect_ray, load, print_table, run_command


def cmd_generate(args: argparse.Namespace) -> int:
    from cluster.runs import run_dir
    from distill.data.generate import cleaning_summary, run_generate_stage

    cfg = load(args)
    run = run_dir(cfg, args.run, create=True)
    connect_ray(cfg)
    manifest = run_generate_stage(cfg, run, show_progress=not args.quiet)
    print_table(
        "generate",
        [
            ("rows", manifest["rows"]),
            ("new rows", manifest["new_rows"]),
            ("resumed rows", manifest["resumed_rows"]),
            ("completion tokens", manifest["completion_tokens"]),
            ("teacher tokens/s", manifest["teacher_tokens_per_s"]),
            ("skipped", manifest["skipped"] or "none"),
            *([("prompt cleaning", line)] if (line := cleaning_summary(manifest.get("prompt_cleaning"))) else []),
            ("wall seconds", manifest["wall_seconds"]),
        ],
    )
    print(run)
    return 0


def cmd_filter(args: argparse.Namespace) -> int:
    from cluster.runs import run_dir
    from distill.data.filter_stage import run_filter_stage

    cfg = load(args)
    run = run_dir(cfg, args.run)
    manifest = run_filter_stage(cfg, run)
    rows = [("input rows", manifest.get("input_rows")), ("output rows", manifest.get("output_rows"))]
    rows += [(f"dropped: {name}", count) for name, count in (manifest.get("dropped") or {}).items()]
    print_table("filter", rows)
    print(run)
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from distill.data.inspect import inspect_data

    report = inspect_data(args.uri)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    sample = report.get("sample", {})
    print_table(
        f"data: {args.uri}",
        [
            ("rows", report["rows"]),
            ("unique prompt ids", report["unique_prompt_ids"]),
            ("prompt tokens", f"{report['prompt_tokens']}  {report['prompt_len']}"),
            ("completion tokens", f"{report['completion_tokens']}  {report['completion_len']}"),
            ("finish reasons", report["finish_reason"]),
            ("sources", ", ".join(report["sources"])),
            ("teachers", ", ".join(report["teachers"])),
            ("soft labels", report["soft_labels"]),
            ("sample prompt", (sample.get("prompt") or "")[:200]),
            ("sample completion", (sample.get("completion") or "")[:300]),
            ("sample top-5 @0", sample.get("first_position_topk")),
        ],
    )
    return 0 if report["soft_labels"]["ok"] or report["rows"] == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydistill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="teacher writes synthetic data with soft labels")
    add_config_args(gen)
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    flt = sub.add_parser("filter", help="quality filters, dedup and decontamination: data/generate -> data/filtered")
    add_config_args(flt)
    flt.set_defaults(func=cmd_filter)

    data = sub.add_parser("data", help="inspect generated data")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    insp = data_sub.add_parser("inspect", help="counts, token stats, a sample row, soft-label sanity")
    insp.add_argument("uri", help="a run dir, a data dir, or one .parquet file (any fsspec URI)")
    insp.add_argument("--json", action="store_true", help="machine-readable output")
    insp.set_defaults(func=cmd_data_inspect)

    for module in (student_cli, train_cli, serve_cli, eval_cli, commands):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args, interrupted="interrupted; rerun the same command with --run to resume")
