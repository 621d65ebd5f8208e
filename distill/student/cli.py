"""``raydistill student init|info`` and ``raydistill export``; :func:`register` adds them to the top-level CLI.

    raydistill student init --config FILE [--set student.num_experts=8 ...] --out DIR [--seed N] [--force]
    raydistill student info MODEL_DIR [--context 2048] [--json]
    raydistill export MODEL_DIR --format qwen2_moe --out DIR
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
from pathlib import Path
from typing import Any

from cluster.errors import ConfigError

INIT_RECORD = "student_init.json"


def register(subparsers: Any) -> None:
    """Add ``student`` (init, info) and ``export`` to an argparse subparsers object."""
    student = subparsers.add_parser("student", help="build and inspect the MoE student")
    student_sub = student.add_subparsers(dest="student_command", metavar="{init,info}", required=True)

    init = student_sub.add_parser("init", help="create a student from the config's teacher or at random")
    init.add_argument("--config", "-c", metavar="FILE", help="pipeline YAML (defaults apply when omitted)")
    init.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set student.num_experts=8 (repeatable)")
    init.add_argument("--out", required=True, metavar="DIR", help="directory to write the HF student into")
    init.add_argument("--seed", type=int, default=0, help="seed for random weights and the router init")
    init.add_argument("--run", metavar="DIR", default=None,
                      help="run directory whose teacher data calibrates the init (student.calibration.data: run)")
    init.add_argument("--force", action="store_true", help="write into a non-empty --out directory")
    init.set_defaults(func=cmd_student_init)

    info = student_sub.add_parser("info", help="parameters, active parameters, FLOPs and KV-cache size")
    info.add_argument("model_dir", metavar="MODEL_DIR")
    info.add_argument("--context", type=int, default=2048, help="context length for FLOPs and KV bytes")
    info.add_argument("--experts-per-token", type=float, default=None,
                      help="measured mean experts per token (top-p); default k, or max_k as an upper bound")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_student_info)

    export = subparsers.add_parser("export", help="export a student for other runtimes")
    export.add_argument("model_dir", metavar="MODEL_DIR")
    export.add_argument("--format", required=True, choices=["qwen2_moe"],
                        help="qwen2_moe: stock transformers Qwen2MoeForCausalLM (top-k students only)")
    export.add_argument("--out", required=True, metavar="DIR")
    export.set_defaults(func=cmd_export)


def _resolve_teacher(name: str, revision: str | None) -> str:
    sources = importlib.import_module("distill.teacher.sources")
    return sources.resolve_model(name, revision=revision)


def _prepare_out(path: str, force: bool) -> Path:
    out = Path(path)
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} is not empty; choose a new directory or pass --force to write into it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def create_student(cfg: Any, out: str | Path, seed: int = 0, run_dir: str | None = None,
                   progress: Any = None) -> tuple[Any, dict[str, Any]]:
    """Build the config's student (from the teacher or at random) and save it with the teacher's tokenizer to ``out``.

    A from-teacher student is calibrated on ``student.calibration.data`` (``run`` = ``run_dir``'s
    teacher data, training rows only) unless that is ``none``. Returns (student config, init record);
    the record holds the chosen layers and, when calibrated, bits/byte of the teacher, the dense
    pruned teacher and the student on held-out calibration text. ``out`` must be a local directory.
    """
    from distill.student.export import TOKENIZER_FILES
    from distill.student.init import CalibrationOptions, build_from_teacher, init_random, load_teacher

    section = cfg.student
    teacher_dir = Path(_resolve_teacher(cfg.teacher.model, cfg.teacher.revision))
    # The teacher fixes the vocabulary and tokenizer even for a random student: it is distilled
    # from the teacher's token distributions.
    teacher_config = json.loads((teacher_dir / "config.json").read_text())
    student_config = section.to_student_config(teacher_config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"init": section.init, "teacher": cfg.teacher.model, "teacher_dir": str(teacher_dir),
                              "seed": seed}
    if section.init == "from_teacher":
        calib = section.calibration
        teacher = load_teacher(str(teacher_dir))
        fit, heldout, tokenizer = _calibration_text(cfg, teacher_dir, run_dir, seed)
        result = build_from_teacher(teacher, student_config, section.teacher_layers, calibration=fit or None,
                                    options=CalibrationOptions(
                                        tokens=calib.tokens, importance_tokens=calib.importance_tokens,
                                        seq_len=calib.seq_len, rounds=calib.rounds, sharpness=calib.sharpness,
                                        difficulty=calib.difficulty,
                                        active_fraction=calib.active_fraction),
                                    seed=seed, progress=progress)
        model = result.model
        record.update(teacher_layers=result.layers, calibration_tokens=result.calibration_tokens,
                      layer_importance={str(k): round(v, 5) for k, v in sorted(result.layer_importance.items())})
        if heldout:
            record["heldout"] = _heldout_report(teacher, result, heldout, tokenizer, calib.seq_len)
    else:
        model = init_random(student_config, seed=seed)
    model.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        if name != "generation_config.json" and (teacher_dir / name).exists():
            shutil.copy2(teacher_dir / name, out / name)
    (out / INIT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return student_config, record


def _calibration_text(cfg: Any, teacher_dir: Path, run_dir: str | None, seed: int
                      ) -> tuple[list[list[int]], list[list[int]], Any]:
    """(fit sequences, held-out sequences, tokenizer); both empty for ``calibration.data: none``."""
    from transformers import AutoTokenizer

    from distill.data.calibration import calibration_sequences, check_sources
    from distill.data.split import row_is_heldout

    calib = cfg.student.calibration
    if not calib.sources():
        return [], [], None
    check_sources(calib.sources(), run_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    train = cfg.train
    sequences = calibration_sequences(
        calib.sources(), run_dir=run_dir, tokenizer=tokenizer, seed=seed,
        keep=lambda row: not row_is_heldout(row, train.heldout_fraction, train.seed))
    heldout, count = [], 0
    while sequences and count < calib.heldout_tokens and len(sequences) > 1:
        heldout.append(sequences.pop())
        count += len(heldout[-1])
    return sequences, heldout, tokenizer


def _heldout_report(teacher: Any, result: Any, heldout: list[list[int]], tokenizer: Any, seq_len: int
                    ) -> dict[str, Any]:
    """Bits/byte of the teacher, the dense pruned teacher and the student on held-out calibration text."""
    import torch

    from distill.student import calibrate
    from distill.student.init import prune_teacher

    chunks = calibrate.batches(heldout, seq_len, sum(map(len, heldout)))
    decode = tokenizer.decode
    experts = []
    with torch.no_grad():
        for ids in chunks:
            stats = result.model(input_ids=ids).routing_stats or []
            experts += [float(s.experts_per_token) for s in stats]
    return {"tokens": sum(int(c.numel()) for c in chunks),
            "bpb_teacher": calibrate.bits_per_byte(teacher, chunks, decode),
            "bpb_dense_pruned": calibrate.bits_per_byte(prune_teacher(teacher, result.layers), chunks, decode),
            "bpb_student": calibrate.bits_per_byte(result.model, chunks, decode),
            "experts_per_token": sum(experts) / len(experts) if experts else None}


def cmd_student_init(args: argparse.Namespace) -> int:
    from cluster.config import load_config

    cfg = load_config(args.config, args.overrides)
    out = _prepare_out(args.out, args.force)
    student_config, record = create_student(cfg, out, seed=args.seed, run_dir=args.run,
                                            progress=lambda line: print(f"  {line}", end="\r", flush=True))
    print(f"wrote {record['init']} student to {out}" + " " * 40)
    for line in init_summary(record):
        print(f"  {line}")
    _print_rows(_info_rows(student_config, 2048, None))
    return 0


def init_summary(record: dict[str, Any]) -> list[str]:
    """Human lines for an init record: the layers kept and the held-out bits/byte."""
    lines = []
    if "teacher_layers" in record:
        how = "by measured importance" if record.get("layer_importance") else "as given / evenly spaced"
        lines.append(f"teacher layers kept ({how}): {record['teacher_layers']}")
    held = record.get("heldout")
    if held:
        k = held.get("experts_per_token")
        lines.append(f"held-out calibration text ({held['tokens']} tokens), bits/byte: teacher "
                     f"{held['bpb_teacher']:.3f}, dense pruned {held['bpb_dense_pruned']:.3f}, MoE student "
                     f"{held['bpb_student']:.3f}" + (f" ({k:.2f} experts/token)" if k is not None else ""))
    elif record.get("init") == "from_teacher":
        lines.append("data-free init (student.calibration.data: none)")
    return lines


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
        print(json.dumps({
            "total_parameters": counts.total,
            "active_parameters": accounting.active_parameters(config, args.experts_per_token),
            "flops_per_token": accounting.flops_per_token(config, args.context, args.experts_per_token),
            "kv_bytes_per_token_per_layer": accounting.kv_bytes_per_token(config),
            "kv_cache_bytes": accounting.kv_cache_bytes(config, args.context),
            "context": args.context,
            "config": config.model_dump(mode="json"),
        }, indent=2))
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
