"""The pipeline entrypoint: ``python -m pipelines.run FILE [--from S] [--only S] [--set k=v ...] [--run ID]``.

This is what ``ray job submit --working-dir . -- python -m pipelines.run pipelines/configs/quickstart.yaml``
runs on a cluster (inside a job it joins the job's Ray and keeps its runtime_env), and what
``raydistill run FILE`` runs locally. Exit status: 0 when the run completed (also when the gate
refused the student), 1 when a stage failed, 2 for a bad config or input, 130 when interrupted.
The run directory is the last line on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from pipelines.cli.common import add_set_arg, run_command
from pipelines.section import STAGE_ORDER


def add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="FILE", help="pipeline YAML (local path or fsspec URI)")
    parser.add_argument(
        "--from",
        dest="from_stage",
        choices=STAGE_ORDER,
        metavar="STAGE",
        help="rerun this stage and every later one (on the newest run unless --run)",
    )
    parser.add_argument("--only", choices=STAGE_ORDER, metavar="STAGE", help="run just this stage")
    add_set_arg(parser)
    parser.add_argument(
        "--run",
        dest="run_id",
        metavar="ID",
        help="run id to create or continue (default: resume the newest unfinished run, else a new one)",
    )
    parser.add_argument("--new", action="store_true", help="always start a new run")
    parser.add_argument("--no-live", action="store_true", help="plain log lines instead of the live stage table")
    parser.add_argument("--no-sample", action="store_true", help="no sample chat completion after deploy")


def execute(args: argparse.Namespace, *, keep_serving: bool = False, argv: list[str] | None = None) -> int:
    from pipelines.config import load_config
    from pipelines.runner import print_summary, run_pipeline, sample_completion, sample_settings, wide_console

    console = wide_console()
    cfg = load_config(args.config, args.overrides)
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and "://" not in cfg.workdir and not os.path.isabs(cfg.workdir):
        console.print(
            f"[yellow]workdir {cfg.workdir!r} is relative: in this Ray job it is {os.path.abspath(cfg.workdir)}, "
            "inside the job's temporary working_dir copy; pass --set workdir=/shared/path or a bucket "
            "URI to keep the runs[/yellow]"
        )
    outcome = run_pipeline(
        cfg,
        run_id=args.run_id,
        new=args.new,
        from_stage=args.from_stage,
        only=args.only,
        live=False if args.no_live else None,
        console=console,
        argv=argv,
    )
    sample = None
    if outcome.base_url and not args.no_sample:
        try:
            sample = (cfg.pipeline.sample_prompt, sample_completion(outcome.base_url, cfg), sample_settings(cfg))
        except Exception as exc:  # noqa: BLE001 - the run itself succeeded; say why the sample did not
            console.print(f"[yellow]sample completion failed:[/yellow] {exc}")
    print_summary(outcome, console, cfg.pipeline.targets, sample=sample)
    print(outcome.run_dir, flush=True)
    if keep_serving and outcome.base_url:
        console.print(
            f"serving {outcome.summary.get('served_model')} at {outcome.base_url}/v1 (OpenAI API); Ctrl-C to stop"
        )
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            console.print("stopped serving")
    return 0 if outcome.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_args(parser)
    parser.add_argument("--keep-serving", action="store_true", help="after deploy, block until Ctrl-C")
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    return run_command(
        lambda a: execute(a, keep_serving=a.keep_serving, argv=argv),
        args,
        interrupted="interrupted; rerun the same command to resume at the interrupted stage",
    )


if __name__ == "__main__":
    sys.exit(main())
