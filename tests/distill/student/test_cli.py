"""``student init|info`` and ``export`` subcommands, accounting, and the vLLM plugin registration."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from cluster.errors import ConfigError
from distill.student import accounting
from pipelines.cli.student import register

from .conftest import tiny_config, tiny_student


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="raydistill")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture()
def teacher_with_tokenizer(tiny_teacher_dir, tmp_path) -> str:
    path = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, path)
    (path / "tokenizer.json").write_text('{"stub": true}')
    return str(path)


def write_config(tmp_path: Path, teacher: str, student: str) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"name: t\nteacher:\n  model: {teacher}\nstudent:\n{student}")
    return str(path)


def test_student_init_from_teacher_info_and_export_round_trip(tmp_path, teacher_with_tokenizer, capsys):
    from transformers import Qwen2MoeForCausalLM

    from distill.student.export import load_student

    config = write_config(
        tmp_path, teacher_with_tokenizer, "  num_experts: 4\n  num_hidden_layers: 3\n  sliding_window: 8\n"
    )
    out = tmp_path / "student"
    with pytest.raises(ConfigError, match="student.calibration.data: 'run' needs a pipeline run; pass --run"):
        run(["student", "init", "--config", config, "--out", str(tmp_path / "nowhere")])
    assert (
        run(
            [
                "student",
                "init",
                "--config",
                config,
                "--set",
                "student.shared_expert_intermediate_size=32",
                "--set",
                "student.calibration.data=none",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "wrote from_teacher student" in printed and "data-free init" in printed
    record = json.loads((out / "student_init.json").read_text())
    assert record["init"] == "from_teacher" and record["teacher_layers"] == [0, 3, 5]
    assert (out / "tokenizer.json").read_text() == '{"stub": true}'
    student = load_student(out)
    cfg = student.student_config
    assert (cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size) == (4, 24, 32)

    assert run(["student", "info", str(out), "--context", "64"]) == 0
    text = capsys.readouterr().out
    total = sum(p.numel() for p in student.parameters())  # tied: counted once
    assert f"{total:,}" in text and "KV cache at 64 tokens" in text and "S S F" in text

    assert run(["student", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_parameters"] == total and info["config"]["num_experts"] == 4

    qdir = tmp_path / "qwen"
    assert run(["export", str(out), "--format", "qwen2_moe", "--out", str(qdir)]) == 0
    assert (qdir / "tokenizer.json").exists()
    qwen = Qwen2MoeForCausalLM.from_pretrained(str(qdir), dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (1, 30))
    with torch.no_grad():
        assert (qwen(ids, use_cache=False).logits - student(ids).logits).abs().max().item() < 1e-4


def test_student_init_random_and_refuses_non_empty_out(tmp_path, tiny_teacher_dir):
    config = write_config(
        tmp_path,
        tiny_teacher_dir,
        "  init: random\n  num_hidden_layers: 2\n  num_experts: 2\n"
        "  moe_intermediate_size: 16\n  routing: topp\n  top_p: 0.7\n",
    )
    out = tmp_path / "random"
    assert run(["student", "init", "--config", config, "--out", str(out), "--seed", "3"]) == 0
    data = json.loads((out / "config.json").read_text())
    assert data["vocab_size"] == 96 and data["routing"] == "topp" and data["num_hidden_layers"] == 2
    with pytest.raises(ConfigError, match="is not empty"):
        run(["student", "init", "--config", config, "--out", str(out)])
    with pytest.raises(ConfigError, match="cannot export a routing: topp student"):
        run(["export", str(out), "--format", "qwen2_moe", "--out", str(tmp_path / "q")])


def test_cli_errors_are_clear(tmp_path, tiny_teacher_dir):
    bad = write_config(tmp_path, tiny_teacher_dir, "  hidden: 64\n")
    with pytest.raises(ConfigError, match="student.hidden: unknown key"):
        run(["student", "init", "--config", bad, "--out", str(tmp_path / "x")])
    with pytest.raises(ConfigError, match="not a raydistill student"):
        run(["student", "info", tiny_teacher_dir])
    with pytest.raises(SystemExit):
        run(["export", tiny_teacher_dir, "--format", "gguf", "--out", str(tmp_path / "y")])


def test_top_level_cli_wires_the_subcommands(tmp_path, tiny_teacher_dir, capsys):
    from pipelines import cli

    model = tiny_student()
    model.save_pretrained(str(tmp_path / "m"))
    assert cli.main(["student", "info", str(tmp_path / "m")]) == 0
    assert "total parameters" in capsys.readouterr().out
    assert cli.main(["student", "info", tiny_teacher_dir]) == 2  # RaydistillError -> exit code 2
    assert "not a raydistill student" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "tie_word_embeddings": True,
            "attention_bias": True,
            "shared_expert_intermediate_size": 8,
            "mlp_only_layers": [2],
        },
    ],
)
def test_accounting_matches_the_model(overrides):
    config = tiny_config(**overrides)
    model = tiny_student(**overrides)
    counts = accounting.count_parameters(config)
    assert counts.total == sum(p.numel() for p in model.parameters())
    moe_layers = 4 - len(config.mlp_only_layers)
    # Active = total minus the unchosen experts (embedding lookup excluded unless untied head needs it).
    unchosen = moe_layers * (config.num_experts - 2) * counts.per_expert
    embedding_lookup = counts.embedding if counts.lm_head else 0
    assert accounting.active_parameters(config) == counts.total - unchosen - embedding_lookup
    assert accounting.active_parameters(config, experts_per_token=config.num_experts) == counts.total - embedding_lookup
    flops = accounting.flops_per_token(config, context_len=100)
    attention = 4 * 4 * 16 * (100 + 3 * 8)  # one full layer sees 100 keys, three sliding layers 8
    assert flops == 2 * (accounting.active_parameters(config) - counts.norms) + attention
    kv = accounting.kv_cache_bytes(config, 100, dtype_bytes=2)
    assert kv["full_attention"] == 1 * 2 * 2 * 16 * 2 * 100 and kv["sliding_attention"] == 3 * 2 * 2 * 16 * 2 * 8


def test_vllm_plugin_registers_a_lazy_model_string(monkeypatch):
    calls = []

    class FakeRegistry:
        @staticmethod
        def get_supported_archs():
            return [name for name, _ in calls]

        @staticmethod
        def register_model(name, target):
            calls.append((name, target))

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(ModelRegistry=FakeRegistry))
    from distill.student.vllm_plugin import register as vllm_register

    vllm_register()
    vllm_register()  # idempotent: vLLM calls plugins in every process
    assert calls == [("RaydistillMoeForCausalLM", "distill.student.vllm_model:RaydistillMoeForCausalLM")]
    assert "distill.student.vllm_model" not in sys.modules  # lazy: the model module needs real vLLM
    pyproject = Path(__file__).resolve().parents[3] / "pyproject.toml"
    text = pyproject.read_text()
    assert '[project.entry-points."vllm.general_plugins"]' in text
    assert 'raydistill_moe = "distill.student.vllm_plugin:register"' in text


def test_student_init_calibrated_on_a_text_file_prints_layers_and_heldout_bpb(tmp_path, builtin_teacher_dir, capsys):
    from tests.conftest import make_tiny_llama

    teacher = make_tiny_llama(tmp_path / "teacher", builtin_teacher_dir, hidden=32, layers=4, seed=3)
    corpus = tmp_path / "calib.jsonl"
    corpus.write_text(
        "\n".join(json.dumps({"text": f"Sentence number {i} says that the cat sat on mat {i % 7}."}) for i in range(60))
    )
    config = write_config(
        tmp_path,
        teacher,
        "  num_experts: 4\n  num_hidden_layers: 2\n  sliding_window: 8\n  routing: topp\n  top_p: 0.6\n  max_k: 3\n",
    )
    out = tmp_path / "student"
    assert (
        run(
            [
                "student",
                "init",
                "--config",
                config,
                "--set",
                f"student.calibration.data=[{corpus}]",
                "--set",
                "student.calibration.heldout_tokens=200",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    record = json.loads((out / "student_init.json").read_text())
    assert len(record["teacher_layers"]) == 2 and len(record["layer_importance"]) == 4
    kept = sorted(record["layer_importance"], key=lambda k: record["layer_importance"][k])[-2:]
    assert sorted(int(k) for k in kept) == record["teacher_layers"]  # the two most important layers
    held = record["heldout"]
    assert held["tokens"] >= 150 and held["bpb_teacher"] > 0 and held["bpb_dense_pruned"] > 0
    assert 1 <= held["experts_per_token"] <= 3
    assert f"teacher layers kept (by measured importance): {record['teacher_layers']}" in printed
    assert f"MoE student {held['bpb_student']:.3f}" in printed
