"""The student's initialisation step of the pipeline: build it from the config's teacher (calibrated on
teacher data) or at random, and save it with the teacher's tokenizer (``raydistill student init``, and the
train stage when the run has no student yet)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from distill.student.section import StudentSection
from distill.teacher.section import TeacherSection
from distill.teacher.sources import load_tokenizer, resolve_model
from distill.training.section import TrainSection

INIT_RECORD = "student_init.json"


def create_student(
    teacher_section: TeacherSection,
    section: StudentSection,
    train: TrainSection,
    out: str | Path,
    seed: int = 0,
    run_dir: str | None = None,
    progress: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """Build the config's student (from the teacher or at random) and save it with the teacher's tokenizer to ``out``.

    A from-teacher student is calibrated on ``student.calibration.data`` (``run`` = ``run_dir``'s
    teacher data, training rows only) unless that is ``none``. Returns (student config, init record);
    the record holds the chosen layers and, when calibrated, bits/byte of the teacher, the dense
    pruned teacher and the student on held-out calibration text. ``out`` must be a local directory.
    """
    from distill.student.export import TOKENIZER_FILES
    from distill.student.init import build_from_teacher, init_random, load_teacher

    teacher_dir = Path(resolve_model(teacher_section.model, revision=teacher_section.revision))
    # The teacher fixes the vocabulary and tokenizer even for a random student: it is distilled
    # from the teacher's token distributions.
    teacher_config = json.loads((teacher_dir / "config.json").read_text())
    student_config = section.to_student_config(teacher_config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "init": section.init,
        "teacher": teacher_section.model,
        "teacher_dir": str(teacher_dir),
        "seed": seed,
    }
    if section.init == "from_teacher":
        calib = section.calibration
        teacher = load_teacher(str(teacher_dir))
        fit, heldout, tokenizer = _calibration_text(calib, train, teacher_dir, run_dir, seed)
        result = build_from_teacher(
            teacher,
            student_config,
            section.teacher_layers,
            calibration=fit or None,
            options=calib.options(),
            seed=seed,
            progress=progress,
        )
        model = result.model
        record.update(
            teacher_layers=result.layers,
            calibration_tokens=result.calibration_tokens,
            layer_importance={str(k): round(v, 5) for k, v in sorted(result.layer_importance.items())},
        )
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


def _calibration_text(
    calib: Any, train: TrainSection, teacher_dir: Path, run_dir: str | None, seed: int
) -> tuple[list[list[int]], list[list[int]], Any]:
    """(fit sequences, held-out sequences, tokenizer); both empty for ``calibration.data: none``."""
    from distill.data.calibration import calibration_sequences, check_sources
    from distill.data.split import row_is_heldout

    if not calib.sources():
        return [], [], None
    check_sources(calib.sources(), run_dir)
    tokenizer = load_tokenizer(str(teacher_dir))
    sequences = calibration_sequences(
        calib.sources(),
        run_dir=run_dir,
        tokenizer=tokenizer,
        seed=seed,
        keep=lambda row: not row_is_heldout(row, train.heldout_fraction, train.seed),
    )
    heldout, count = [], 0
    while sequences and count < calib.heldout_tokens and len(sequences) > 1:
        heldout.append(sequences.pop())
        count += len(heldout[-1])
    return sequences, heldout, tokenizer


def _heldout_report(
    teacher: Any, result: Any, heldout: list[list[int]], tokenizer: Any, seq_len: int
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
    return {
        "tokens": sum(int(c.numel()) for c in chunks),
        "bpb_teacher": calibrate.bits_per_byte(teacher, chunks, decode),
        "bpb_dense_pruned": calibrate.bits_per_byte(prune_teacher(teacher, result.layers), chunks, decode),
        "bpb_student": calibrate.bits_per_byte(result.model, chunks, decode),
        "experts_per_token": sum(experts) / len(experts) if experts else None,
    }


def init_summary(record: dict[str, Any]) -> list[str]:
    """Human lines for an init record: the layers kept and the held-out bits/byte."""
    lines = []
    if "teacher_layers" in record:
        how = "by measured importance" if record.get("layer_importance") else "as given / evenly spaced"
        lines.append(f"teacher layers kept ({how}): {record['teacher_layers']}")
    held = record.get("heldout")
    if held:
        k = held.get("experts_per_token")
        lines.append(
            f"held-out calibration text ({held['tokens']} tokens), bits/byte: teacher "
            f"{held['bpb_teacher']:.3f}, dense pruned {held['bpb_dense_pruned']:.3f}, MoE student "
            f"{held['bpb_student']:.3f}" + (f" ({k:.2f} experts/token)" if k is not None else "")
        )
    elif record.get("init") == "from_teacher":
        lines.append("data-free init (student.calibration.data: none)")
    return lines
