"""``raydistill`` subcommands of the pipelines package.

raydistill run FILE [--from S] [--only S] [--set k=v] [--run ID] [--new] [--keep-serving]
raydistill submit FILE --address http://HEAD:8265 [--no-follow] [--set ...] [--run ID] [--from/--only S]
raydistill runs list [--config FILE] | runs show ID [--config FILE] [--json]
raydistill schedule FILE [--once] [--list] [--emit-k8s DIR] [--address URL]
raydistill rollback NAME [--config FILE] [--registry-only] [--keep-serving]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from cluster.errors import RaydistillError


def _console():
    from pipelines.runner import wide_console

    return wide_console()


# -------------------------------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.run import execute

    return execute(args, keep_serving=args.keep_serving, argv=sys.argv[1:])


# ----------------------------------------------------------------------------------------- submit
def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.scheduler import RayJobSubmitter

    cfg = load_config(args.config, args.overrides)
    submitter = RayJobSubmitter(cfg, args.config, args.overrides, address=args.address)
    extra: list[str] = []
    if args.from_stage:
        extra += ["--from", args.from_stage]
    if args.only:
        extra += ["--only", args.only]
    if args.new:
        extra.append("--new")
    job_id = submitter.submit(run_id=args.run_id, extra_args=extra + ["--no-live"])
    print(job_id, flush=True)
    console = _console()
    console.print(
        f"submitted {job_id} to {submitter.address}; logs: `ray job logs -f {job_id} --address {submitter.address}`"
    )
    if args.no_follow:
        return 0
    return follow_job(submitter.client, job_id)


def follow_job(client: Any, job_id: str) -> int:
    """Stream a job's logs to stdout until it ends; 0 if it succeeded."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (stop it with `ray job stop {job_id}`)", file=sys.stderr)
        return 130
    status = client.get_job_status(job_id)
    for _ in range(100):  # the log stream can close a moment before the status is final
        if str(getattr(status, "value", status)) in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.2)
        status = client.get_job_status(job_id)
    status = str(getattr(status, "value", status))
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


# ------------------------------------------------------------------------------------------- runs
def _load_cfg(args: argparse.Namespace, extra: list[str] | None = None):
    from pipelines.config import load_config

    return load_config(args.config, list(args.overrides) + list(extra or []))


def cmd_runs_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from cluster import storage
    from cluster.runs import list_runs, runs_root
    from pipelines.manifest import RunManifest
    from pipelines.registry import Registry

    cfg = _load_cfg(args)
    current = (Registry.for_config(cfg).current() or {}).get("run_id")
    table = Table(title=f"runs of {cfg.name} under {runs_root(cfg)}", title_justify="left")
    for column in ("run", "status", "created", "stages done", "gate", "served", "duration s"):
        table.add_column(column)
    rows = []
    for run_id in list_runs(cfg):
        manifest = RunManifest.load(storage.join(runs_root(cfg), run_id))
        data = manifest.data if manifest else {}
        stages = data.get("stages", [])
        done = sum(1 for s in stages if s.get("outcome") in ("done", "refused"))
        gate = next((s for s in stages if s["name"] == "gate"), {})
        gate_text = {"done": "passed", "refused": "refused"}.get(gate.get("outcome"), "-")
        rows.append(
            {
                "run_id": run_id,
                "status": data.get("status", "(no manifest)"),
                "created": data.get("created_at"),
                "stages_done": f"{done}/{len(stages)}",
                "gate": gate_text,
                "served": run_id == current,
                "duration_s": round(sum(s.get("duration_s") or 0 for s in stages), 1),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        table.add_row(
            r["run_id"],
            r["status"],
            str(r["created"] or "-"),
            r["stages_done"],
            r["gate"],
            "*" if r["served"] else "",
            str(r["duration_s"]),
        )
    _console().print(table)
    return 0


def cmd_runs_show(args: argparse.Namespace) -> int:
    from cluster.runs import run_dir
    from pipelines.manifest import RunManifest
    from pipelines.runner import build_summary, print_summary

    cfg = _load_cfg(args)
    uri = run_dir(cfg, args.run_id)
    manifest = RunManifest.load(uri)
    if manifest is None:
        raise RaydistillError(f"{uri} has no manifest.json (not a pipeline run; made by `raydistill generate`?)")
    if args.json:
        print(json.dumps(manifest.data, indent=2, default=str))
        return 0
    summary = build_summary(manifest.data)
    summary["status"] = manifest.status
    print_summary(summary, _console())
    for entry in manifest.data["stages"]:
        if entry.get("status") == "failed" and entry.get("error"):
            _console().print(f"[red]{entry['name']} failed:[/red]\n{entry['error']}")
    return 0


# --------------------------------------------------------------------------------------- schedule
def cmd_schedule(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.scheduler import RayJobSubmitter, Scheduler

    cfg = load_config(args.config, args.overrides)
    console = _console()
    if args.emit_k8s:
        from pipelines import k8s

        for path in k8s.emit(cfg, args.config, args.emit_k8s, overrides=args.overrides):
            print(path)
        return 0
    submitter = RayJobSubmitter(cfg, args.config, args.overrides, address=args.address)
    sched = Scheduler(cfg, submitter)
    if args.list:
        from rich.table import Table

        console.print(
            f"schedule {cfg.schedule.cron!r} ({cfg.schedule.timezone}), concurrency "
            f"{cfg.schedule.concurrency}; state: {sched.uri}"
        )
        console.print("next runs: " + ", ".join(t.isoformat() for t in sched.upcoming(5)))
        if sched.state.get("active"):
            console.print(f"running now: {sched.state['active']}")
        table = Table(title="history", title_justify="left")
        for column in ("tick", "run", "job", "outcome", "note"):
            table.add_column(column)
        for e in sched.state["history"][-20:]:
            table.add_row(
                str(e.get("tick") or e.get("first") or "-"),
                str(e.get("run_id") or "-"),
                str(e.get("job_id") or "-"),
                e.get("outcome", "-"),
                str(e.get("reason") or (f"{e['count']} missed" if e.get("count") else "")),
            )
        console.print(table)
        return 0

    def notify(entry: dict) -> None:
        console.print(f"{time.strftime('%H:%M:%S')} {json.dumps(entry, sort_keys=True)}", highlight=False)

    console.print(
        f"scheduling {cfg.name}: cron {cfg.schedule.cron!r} ({cfg.schedule.timezone}) -> Ray jobs at "
        f"{submitter.address}; next {sched.next_tick().isoformat()}; Ctrl-C to stop"
    )
    try:
        entry = sched.run(once=args.once, notify=notify)
    except KeyboardInterrupt:
        console.print(f"scheduler stopped; state kept in {sched.uri}")
        return 130
    if args.once and entry is not None:
        return 0 if entry.get("outcome") == "succeeded" else 1
    return 0


# --------------------------------------------------------------------------------------- rollback
def cmd_rollback(args: argparse.Namespace) -> int:
    from pipelines.registry import Registry
    from pipelines.runner import ensure_ray, sample_completion
    from pipelines.stages import serve_model, served_model_dir

    cfg = _load_cfg(args, [f"name={args.name}"])
    registry = Registry.for_config(cfg)
    console = _console()
    base_url = None
    with registry.lock:  # serialised with deploys and other rollbacks of this pipeline
        served = None
        if not args.registry_only:
            ensure_ray(cfg)
            served = served_model_dir(cfg)
        registry.recover(served)
        previous = registry.previous()
        if not previous:
            registry.rollback()  # raises with the reason
        target = previous[-1]
        with registry.change("rollback", target["model_dir"], run_id=target.get("run_id"), served=served):
            if not args.registry_only:
                base_url = serve_model(cfg, target["model_dir"])
            entry = registry.rollback()
            if base_url:
                registry.set_base_url(base_url)
    console.print(
        f"{args.name}: rolled back to {entry['model_dir']} (run {entry.get('run_id')})"
        + (f", serving at {base_url}/v1" if base_url else "; registry only, redeploy with the next run")
    )
    if base_url:
        try:
            console.print(f"sample: {sample_completion(base_url, cfg)}", highlight=False)
        except Exception as exc:  # noqa: BLE001
            console.print(f"[yellow]sample completion failed:[/yellow] {exc}")
        if args.keep_serving:
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    return 0


# --------------------------------------------------------------------------------------- register
def register(subparsers: Any) -> None:
    from pipelines.cli.common import add_config_args, add_set_arg
    from pipelines.run import add_run_args
    from pipelines.section import STAGE_ORDER

    run = subparsers.add_parser("run", help="run the pipeline (generate -> ... -> deploy) with manifest and resume")
    add_run_args(run)
    run.add_argument("--keep-serving", action="store_true", help="after deploy, keep serving until Ctrl-C")
    run.set_defaults(func=cmd_run)

    sub = subparsers.add_parser("submit", help="submit the pipeline as a Ray job (JobSubmissionClient)")
    sub.add_argument("config", metavar="FILE")
    sub.add_argument(
        "--address",
        help="Ray job server, e.g. http://HEAD:8265 (default: schedule.address, RAY_ADDRESS or http://127.0.0.1:8265)",
    )
    sub.add_argument("--no-follow", action="store_true", help="print the job id and return")
    add_set_arg(sub)
    sub.add_argument("--run", dest="run_id", metavar="ID")
    sub.add_argument("--from", dest="from_stage", choices=STAGE_ORDER, metavar="STAGE")
    sub.add_argument("--only", choices=STAGE_ORDER, metavar="STAGE")
    sub.add_argument("--new", action="store_true")
    sub.set_defaults(func=cmd_submit)

    runs = subparsers.add_parser("runs", help="list pipeline runs or show one run's manifest")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True, metavar="SUBCOMMAND")
    lst = runs_sub.add_parser("list", help="runs of the config's name, oldest first")
    add_config_args(lst, run=False)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_runs_list)
    show = runs_sub.add_parser("show", help="stage table and summary of one run")
    show.add_argument("run_id", metavar="ID")
    add_config_args(show, run=False)
    show.add_argument("--json", action="store_true", help="the whole manifest")
    show.set_defaults(func=cmd_runs_show)

    sch = subparsers.add_parser("schedule", help="run the pipeline as Ray jobs on schedule.cron")
    sch.add_argument("config", metavar="FILE")
    add_set_arg(sch)
    sch.add_argument("--address", help="Ray job server (default: schedule.address)")
    mode = sch.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="run the next due tick, wait for it, exit")
    mode.add_argument("--list", action="store_true", help="upcoming times and history")
    mode.add_argument("--emit-k8s", metavar="DIR", help="write KubeRay RayJob + CronJob manifests instead")
    sch.set_defaults(func=cmd_schedule)

    rb = subparsers.add_parser("rollback", help="serve the previously promoted model of pipeline NAME again")
    rb.add_argument("name", metavar="NAME", help="the pipeline's name (runs under {workdir}/NAME)")
    add_config_args(rb, run=False)
    rb.add_argument("--registry-only", action="store_true", help="only update serving.json, do not redeploy")
    rb.add_argument("--keep-serving", action="store_true", help="keep serving until Ctrl-C")
    rb.set_defaults(func=cmd_rollback)
