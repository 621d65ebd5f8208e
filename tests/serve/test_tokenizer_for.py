"""The ingress replica's tokenizer of a student dir loads without transformers' model-type warning
(it printed on the console of every deploy: "You are using a model of type `raydistill_moe` to
instantiate a model of type ``")."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from distill.student.hf import RaydistillMoeConfig

ROOT = Path(__file__).resolve().parents[2]


def test_a_student_dirs_tokenizer_loads_in_a_fresh_process_without_a_model_type_warning(tmp_path, tiny_teacher_dir):
    student = tmp_path / "student"
    student.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_teacher_dir) / name, student / name)
    RaydistillMoeConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2).to_json_file(student / "config.json")

    code = f"from serve.app import _tokenizer_for; print(len(_tokenizer_for({str(student)!r})))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip().splitlines()[-1]) > 0
    assert "model of type" not in done.stderr, done.stderr
