"""``raydistill student init|info`` and ``raydistill export``.

raydistill student init --config FILE [--set student.num_experts=8 ...] --out DIR [--seed N] [--force]
raydistill student info MODEL_DIR [--context 2048] [--json]
raydistill export MODEL_DIR --format qwen2_moe --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cluster.errors import ConfigError
from pipelines.cli.common import add_config_args, load


def register(subparsers: Any) -> None:
    """Add ``student`` (init, info) and ``export`` to an argparse subparsers object."""
    student = subparsers.add_parser("student", help="build and inspect the MoE student")
    student_sub = student.add_subparsers(dest="student_command", metavar="{init,info}", required=True)

    init = student_sub.add_parser("init", help="create a student from the config's teacher or at random")
    add_config_args(init, run=False)
    init.add_argument("--out", required=True, metavar="DIR", help="directory to write the HF student into")
    init.add_argument("--seed", type=int, default=0, help="seed for random weights and the router init")
    init.add_argument(
        "--run",
        metavar="DIR",
        default=None,
        help="run directory whose teacher data calibrates the init (student.calibration.data: run)",
    )
    init.add_argument("--force", action="store_true", help="write into a non-empty --out directory")
    init.set_defaults(func=cmd_student_init)

    info = student_sub.add_parser("info", help="parameters, active parameters, FLOPs and KV-cache size")
    info.add_argument("model_dir", metavar="MODEL_DIR")
    info.add_argument("--context", type=int, default=2048, help="context length for FLOPs and KV bytes")
    info.add_argument(
        "--experts-per-token",
        type=float,
        default=None,
        help="measured mean experts per token (top-p); default k, or max_k as an upper bound",
    )
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_student_info)

    export = subparsers.add_parser("export", help="export a student for other runtimes")
    export.add_argument("model_dir", metavar="MODEL_DIR")
    export.add_argument(
        "--format",
        required=True,
        choices=["qwen2_moe"],
        help="qwen2_moe: stock transformers Qwen2MoeForCausalLM (top-k students only)",
    )
    export.add_argument("--out", required=True, metavar="DIR")
    export.set_defaults(func=cmd_export)


def _prepare_out(path: str, force: bool) -> Path:
    out = Path(path)
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} is not empty; choose a new directory or pass --force to write into it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def cmd_student_init(args: argparse.Namespace) -> int:
    from distill.training.student_init import create_student, init_summary

    cfg = load(args)
    out = _prepare_out(args.out, args.force)
    student_config, record = create_student(
        cfg.teacher,
        cfg.student,
        cfg.train,
        out,
        seed=args.seed,
        run_dir=args.run,
        progress=lambda line: print(f"  {line}", end="\r", flush=True),
    )
    print(f"wrote {record['init']} student to {out}" + " " * 40)
    for line in init_summary(record):
        print(f"  {line}")
    _print_rows(_info_rows(student_config, 2048, None))
    return 0


def _read_student_config(model_dir: str):
    from distill.student.config import StudentConfig

    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{model_dir} has no config.json; pass a directory written by `raydistill student init`")
    data = json.loads(path.read_text())
    if data.get("model_type") != "raydistill_moe":
        raise ConfigError(f"{model_dir} holds a {data.get('model_type')!r} model, not a raydistill student")
    return StudentConfig.from_dict(data, ignore_unknown=True)


def _info_rows(config, context: int, experts_per_token: float | None) -> list[tuple[str, str]]:
    from distill.student.accounting import summary

    return summary(config, context_len=context, experts_per_token=experts_per_token)


def _print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def cmd_student_info(args: argparse.Namespace) -> int:
    from distill.student import accounting

    config = _read_student_config(args.model_dir)
    if args.json:
        counts = accounting.count_parameters(config)
        print(
            json.dumps(
                {
                    "total_parameters": counts.total,
                    "active_parameters": accounting.active_parameters(config, args.experts_per_token),
                    "flops_per_token": accounting.flops_per_token(config, args.context, args.experts_per_token),
                    "kv_bytes_per_token_per_layer": accounting.kv_bytes_per_token(config),
                    "kv_cache_bytes": accounting.kv_cache_bytes(config, args.context),
                    "context": args.context,
                    "config": config.model_dump(mode="json"),
                },
                indent=2,
            )
        )
        return 0
    print(f"student {args.model_dir}")
    _print_rows(_info_rows(config, args.context, args.experts_per_token))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from distill.student.export import export_qwen2_moe

    _read_student_config(args.model_dir)  # clear error before loading weights
    out = export_qwen2_moe(args.model_dir, args.out)
    print(f"exported {args.model_dir} as {args.format} to {out}")
    return 0
