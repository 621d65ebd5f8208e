"""``raydistill train``: distil the run's teacher data into the student (Ray Train)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    from pipelines.cli.common import add_config_args

    train = subparsers.add_parser("train", help="distil the teacher data into the MoE student with Ray Train")
    add_config_args(train)
    train.add_argument(
        "--workers", type=int, default=None, metavar="N", help="Ray Train workers (default train.workers)"
    )
    train.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        metavar="G",
        help="GPUs per worker (default train.gpus_per_worker)",
    )
    mode = train.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    mode.add_argument("--restart", action="store_true", help="discard earlier training state of the run")
    train.add_argument("--no-ray", action="store_true", help="run the loop in this process (one worker, no Ray)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from cluster.runs import run_dir
    from distill.training.stage import run_train_stage
    from pipelines.cli.common import load, print_table

    cfg = load(args)
    run = run_dir(cfg, args.run)
    manifest = run_train_stage(
        cfg,
        run,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        resume=args.resume,
        restart=args.restart,
        use_ray=not args.no_ray,
        show_progress=not args.quiet,
    )
    rows = [
        ("steps", manifest["steps"]),
        ("completion tokens", manifest["tokens"]),
        ("tokens/s", manifest["tokens_per_s"]),
        ("workers", manifest["workers"]),
        ("wall seconds", manifest["wall_seconds"]),
    ]
    for stage in manifest["stages"]:
        held = stage.get("heldout") or {}
        rows.append(
            (
                f"stage {stage['name']}",
                f"{stage['steps']} steps, held-out KL {held.get('kl', float('nan')):.4f}, "
                f"top-1 {held.get('top1', float('nan')):.3f}",
            )
        )
    rows += [("student", manifest["student_dir"]), ("qwen2-moe export", manifest["export_dir"] or "-")]
    print_table("train", rows)
    print(manifest["student_dir"])
    return 0
