"""Argument helpers every ``raydistill`` subcommand shares: ``--config``/``--set``/``--run``, loading the
config, connecting to Ray, printing a summary table."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cluster.errors import RaydistillError

if TYPE_CHECKING:  # the config imports every section (torch, transformers): not needed for --help
    from pipelines.config import PipelineConfig


def add_set_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set prompts.count=8 (repeatable)",
    )


def add_config_args(parser: argparse.ArgumentParser, run: bool = True) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", help="pipeline YAML (defaults apply when omitted)")
    add_set_arg(parser)
    if run:
        parser.add_argument("--run", metavar="ID", help="work on this run id (default: the newest run)")


def load(args: argparse.Namespace) -> PipelineConfig:
    from pipelines.config import load_config

    return load_config(args.config, args.overrides)


def connect_ray(cfg: PipelineConfig) -> None:
    from cluster.ray_init import connect

    connect(cfg.ray.address, num_cpus=cfg.ray.num_cpus, dashboard=cfg.ray.dashboard)


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, str(value))
    Console(stderr=True).print(table)


def run_command(func: Callable[[argparse.Namespace], Any], args: argparse.Namespace, *, interrupted: str) -> int:
    """Run a subcommand: logging at WARNING (DEBUG with ``--verbose``), our errors as one line and exit code 2."""
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(func(args) or 0)
    except RaydistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
