"""A tiny run for training tests: Parquet data written by the tiny random teacher, and its config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines.config import load_config

TINY_STUDENT = [
    "student.init=random",
    "student.num_hidden_layers=2",
    "student.num_experts=4",
    "student.moe_intermediate_size=16",
    "student.num_experts_per_tok=2",
    "student.sliding_window=8",
]
TINY_TRAIN = [
    "train.seq_len=64",
    "train.micro_batch_size=2",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "train.warmup_steps=1",
    "train.lr=3e-3",
    "train.heldout_fraction=0.2",
    "train.heldout_max_rows=8",
]


def tiny_cfg(workdir: Path, teacher: str, *extra: str):
    return load_config(
        None, [f"workdir={workdir}", f"teacher.model={teacher}", "name=tiny", *TINY_STUDENT, *TINY_TRAIN, *extra]
    )


@pytest.fixture(scope="session")
def sharp_teacher_dir(tmp_path_factory, builtin_teacher_dir) -> str:
    """The tiny random LLaMA with its (tied) embeddings scaled up: peaked next-token distributions,
    so KL and top-1 agreement have something to learn (the plain tiny teacher is near uniform)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_llama

    path = make_tiny_llama(tmp_path_factory.mktemp("sharp_teacher"), builtin_teacher_dir, seed=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(40.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_data_template(tmp_path_factory, sharp_teacher_dir) -> Path:
    """``data/generate`` of a run: 48 prompts, 12 sampled tokens each, top-16 soft labels; sources a/b."""
    from distill.data.schema import prompt_id, to_table
    from distill.data.shards import write_parquet
    from distill.teacher.base import SamplingParams, completion_row
    from distill.teacher.hf import HFTeacher

    root = tmp_path_factory.mktemp("tiny_run")
    out = root / "data" / "generate"
    out.mkdir(parents=True)
    teacher = HFTeacher(sharp_teacher_dir, batch_size=16)
    sampling = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=0, logprobs=16, seed=0)
    prompts = [f"Tell me fact number {i} about {'cats' if i % 2 else 'rivers'}." for i in range(48)]
    completions = teacher.generate(prompts, sampling)
    rows = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        source = "a" if i % 2 == 0 else "b"
        request = {"prompt_id": prompt_id(source, prompt, 0), "prompt": prompt, "source": source}
        row = completion_row(request, completion, "tiny", sampling)
        row["quality"] = float(1 + i % 10)
        row.pop("skip_reason", None)
        rows.append(row)
    for shard in range(3):
        write_parquet(str(out / f"shard-{shard}.parquet"), to_table(rows[shard::3]))
    return root


@pytest.fixture
def tiny_run(tmp_path, tiny_data_template, sharp_teacher_dir):
    """(cfg, run_dir) with the template's data copied into a fresh run."""
    cfg = tiny_cfg(tmp_path / "runs", sharp_teacher_dir)
    run = tmp_path / "runs" / "tiny" / "r1"
    shutil.copytree(tiny_data_template / "data", run / "data")
    return cfg, str(run)
