"""``raydistill eval --model DIR`` with no pipeline run: human corpora, speed, routing; no teacher-text metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.eval import corpora as corpora_mod
from pipelines.cli import main

FAST = [
    "--set",
    "eval.max_corpus_bytes=1500",
    "--set",
    "eval.speed.batch_sizes=[1, 2]",
    "--set",
    "eval.speed.prompt_tokens=8",
    "--set",
    "eval.speed.new_tokens=4",
]


@pytest.fixture()
def no_runs(tmp_path, monkeypatch) -> Path:
    """CWD with no ``./runs`` and no config: the defaults (name quickstart) have no run at all."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _human(root: Path) -> str:
    path = root / "human.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 6 + "\n\nA second paragraph, with café.\n")
    return str(path)


def test_model_without_a_run_reports_human_bpb_speed_and_routing(fake_run, no_runs, capsys):
    out_dir = no_runs / "out"
    code = main(
        ["eval", "--model", fake_run["student"], "--corpus", _human(no_runs), "--out", str(out_dir), *FAST, "--json"]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out_dir / "report.json").read_text())
    assert printed["paths"]["json"] == str(out_dir / "report.json") and (out_dir / "report.html").exists()
    assert report["mode"] == "standalone" and report["run_dir"] is None
    assert set(report["models"]) == {"student"}
    assert "human.txt" in report["corpora"] and "heldout" not in report["corpora"]
    if corpora_mod.builtin_available("fortunes"):  # the builtin corpus is on by default
        assert report["corpora"]["fortunes"]["bytes"] <= 1500
    s = report["models"]["student"]
    m = s["metrics"]
    assert 0 < m["bpb_human"] < 20
    assert m["bpb_heldout"] is None and m["kl"] is None and m["top1_agreement"] is None
    # Routing of the tiny top-p student (min_k 1, max_k 3, 2 MoE layers) over every human-text token.
    tokens = sum(c["tokens"] for c in s["bits_per_byte"].values())
    assert s["routing"]["tokens"] == tokens and s["routing"]["entropy_of"] == "model"
    assert 1 <= m["experts_per_token"] <= 3 and len(s["routing"]["experts_per_token_by_layer"]) == 2
    assert sum(sum(layer) for layer in s["routing"]["histogram"]["counts_by_layer"]) == 2 * tokens
    assert len(s["load_balance"]["by_layer"]) == 2
    assert set(s["speed"]["by_batch"]) == {"1", "2"} and m["decode_tokens_per_s"] > 0
    assert report["gate"]["passed"] is None and "standalone" in report["gate"]["reason"]
    assert any("held-out" in n and "--run" in n for n in report["notes"])


def test_model_with_teacher_compares_without_fidelity(fake_run, no_runs, capsys):
    out_dir = no_runs / "cmp"
    code = main(
        [
            "eval",
            "--model",
            fake_run["student"],
            "--teacher",
            fake_run["teacher"],
            "--corpus",
            _human(no_runs),
            "--out",
            str(out_dir),
            *FAST,
            "--set",
            "eval.builtin_corpus=null",
            "--json",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["metrics"]) == {"teacher", "student"}
    for name in ("teacher", "student"):
        assert printed["metrics"][name]["bpb_human"] > 0 and printed["metrics"][name]["kl"] is None
    assert printed["comparison"]["decode_speedup"] > 0 and printed["comparison"]["active_parameter_ratio"] > 0
    report = json.loads((out_dir / "report.json").read_text())
    assert report["models"]["teacher"]["path"] == fake_run["teacher"]
    assert "routing" not in report["models"]["teacher"]  # dense model: no routers


def test_default_out_dir_and_printed_summary(fake_run, no_runs, capsys):
    code = main(
        [
            "eval",
            "--model",
            fake_run["student"],
            "--corpus",
            _human(no_runs),
            *FAST,
            "--set",
            "eval.speed.enabled=false",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    expected = no_runs / "eval-student"
    assert captured.out.strip().splitlines()[-2:] == [str(expected / "report.html"), str(expected / "report.json")]
    assert (expected / "report.json").exists() and (expected / "report.html").exists()
    assert "bits/byte human" in captured.err and "gate skipped" in captured.err
    assert "no runs of" not in captured.err


def test_dense_hf_model_dir_has_no_routing(fake_run, no_runs, capsys):
    code = main(
        [
            "eval",
            "--model",
            fake_run["teacher"],
            "--corpus",
            _human(no_runs),
            "--out",
            str(no_runs / "o"),
            *FAST,
            "--set",
            "eval.speed.enabled=false",
            "--json",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["metrics"]["student"]["bpb_human"] > 0 and printed["metrics"]["student"]["experts_per_token"] is None


def test_missing_model_dir_is_an_error_naming_the_flag(no_runs, capsys):
    missing = no_runs / "nope"
    assert main(["eval", "--model", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--model {missing}" in err and "does not exist" in err


def test_nothing_to_evaluate_on_is_an_error_with_the_fix(fake_run, no_runs, capsys):
    assert main(["eval", "--model", fake_run["student"], "--set", "eval.builtin_corpus=null"]) == 2
    err = capsys.readouterr().err
    assert "no human corpus" in err and "--corpus FILE" in err
