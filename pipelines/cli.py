"""The ``raydistill`` command: one console script for every stage.

    raydistill generate --config FILE [--set a.b=v ...] [--run ID]
    raydistill filter   --config FILE [--set ...] [--run ID]
    raydistill data inspect URI [--json]
    raydistill student init|info ...   raydistill export ...   (student issue)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

from cluster.errors import RaydistillError


def add_config_args(parser: argparse.ArgumentParser, run: bool = True) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", help="pipeline YAML (defaults apply when omitted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set prompts.count=8 (repeatable)")
    if run:
        parser.add_argument("--run", metavar="ID", help="work on this run id (default: the newest run)")


def load(args: argparse.Namespace):
    from cluster.config import load_config

    return load_config(args.config, args.overrides)


def connect_ray(cfg) -> None:
    from cluster.ray_init import connect

    connect(cfg.ray.address, num_cpus=cfg.ray.num_cpus, dashboard=cfg.ray.dashboard)


def _print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, str(value))
    Console(stderr=True).print(table)


def cmd_generate(args: argparse.Namespace) -> int:
    from cluster.runs import run_dir
    from distill.data.generate import cleaning_summary, run_generate_stage

    cfg = load(args)
    run = run_dir(cfg, args.run, create=True)
    connect_ray(cfg)
    manifest = run_generate_stage(cfg, run, show_progress=not args.quiet)
    _print_table("generate", [("rows", manifest["rows"]), ("new rows", manifest["new_rows"]),
                              ("resumed rows", manifest["resumed_rows"]),
                              ("completion tokens", manifest["completion_tokens"]),
                              ("teacher tokens/s", manifest["teacher_tokens_per_s"]),
                              ("skipped", manifest["skipped"] or "none"),
                              *([("prompt cleaning", line)] if (line := cleaning_summary(
                                  manifest.get("prompt_cleaning"))) else []),
                              ("wall seconds", manifest["wall_seconds"])])
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
    _print_table("filter", rows)
    print(run)
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from distill.data.inspect import inspect_data

    report = inspect_data(args.uri)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    sample = report.get("sample", {})
    _print_table(f"data: {args.uri}", [
        ("rows", report["rows"]), ("unique prompt ids", report["unique_prompt_ids"]),
        ("prompt tokens", f"{report['prompt_tokens']}  {report['prompt_len']}"),
        ("completion tokens", f"{report['completion_tokens']}  {report['completion_len']}"),
        ("finish reasons", report["finish_reason"]), ("sources", ", ".join(report["sources"])),
        ("teachers", ", ".join(report["teachers"])), ("soft labels", report["soft_labels"]),
        ("sample prompt", (sample.get("prompt") or "")[:200]),
        ("sample completion", (sample.get("completion") or "")[:300]),
        ("sample top-5 @0", sample.get("first_position_topk"))])
    return 0 if report["soft_labels"]["ok"] or report["rows"] == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydistill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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

    for register in _plugin_registrars():
        register(sub)
    return parser


def _plugin_registrars() -> list[Callable[[Any], None]]:
    """Subcommands owned by other packages (student, train, serve, eval, pipelines)."""
    import importlib

    out = []
    for module_name in ("distill.student.cli", "distill.training.cli", "serve.cli", "distill.eval.cli",
                        "pipelines.commands"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that package is not part of this checkout yet
            raise
        out.append(module.register)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except RaydistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command with --run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
