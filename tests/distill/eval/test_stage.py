"""The eval stage end to end on a fake run (tiny models): report.json, HTML, gate, bad input, CLI, Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.errors import RaydistillError
from distill.eval.stage import load_model, run_eval_stage
from pipelines.config import load_config
from tests.conftest import missing_dependency


@pytest.fixture(scope="module")
def report(fake_run) -> dict:
    return run_eval_stage(load_config(fake_run["config"]), fake_run["run"], show_progress=False)


def test_report_has_every_number_and_is_written(report, fake_run):
    on_disk = json.loads(Path(report["paths"]["json"]).read_text())
    assert on_disk["gate"] == report["gate"] and on_disk["config_hash"] == report["config_hash"]
    assert set(report["models"]) == {"teacher", "student", "init"}
    assert report["models"]["student"]["path"] == str(Path(fake_run["run"]) / "student")
    assert report["heldout"]["rows"] == len(fake_run["heldout"]) == 6  # only held-out prompt ids
    assert report["corpora"]["heldout"]["texts"] == 6 and "human.txt" in report["corpora"]
    for name in ("teacher", "student", "init"):
        m = report["models"][name]["metrics"]
        assert 0 < m["bpb_heldout"] < 20 and 0 < m["bpb_human"] < 20
        assert m["parameters"] > 0 and m["kv_bytes_per_token"] > 0
    s = report["models"]["student"]
    assert s["metrics"]["kl"] > 0 and 0 <= s["metrics"]["top1_agreement"] <= 1
    assert report["models"]["teacher"]["metrics"]["kl"] == 0.0
    assert 1 <= s["metrics"]["experts_per_token"] <= 3
    assert len(s["routing"]["experts_per_token_by_layer"]) == 2 and s["routing"]["difficulty_curve"]
    assert len(s["load_balance"]["by_layer"]) == 2


def test_report_bits_per_byte_recomputed_from_the_models_and_texts(report, fake_run):
    """Each model's bpb numbers equal a fresh bits_per_byte over the held-out rows' completions and the corpus."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import distill.student.hf  # noqa: F401 - registers the student model type
    from distill.eval import metrics as M
    from distill.eval.corpora import read_corpus

    table = pq.read_table(str(Path(fake_run["run"]) / "data" / "generate" / "part-0.parquet")).to_pylist()
    held = set(fake_run["heldout"])
    heldout_texts = [r["completion"] for r in sorted(table, key=lambda r: r["prompt_id"]) if r["prompt_id"] in held]
    assert len(heldout_texts) == 6
    human = read_corpus(str(Path(fake_run["root"]) / "human.txt"))
    for name in ("teacher", "student", "init"):
        model = AutoModelForCausalLM.from_pretrained(fake_run[name], dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(fake_run[name])
        m = report["models"][name]["metrics"]
        want_held = M.bits_per_byte(model, tokenizer, heldout_texts, window=64)
        want_human = M.bits_per_byte(model, tokenizer, human, window=64)
        assert m["bpb_heldout"] == pytest.approx(want_held["bits_per_byte"], rel=1e-4), name
        assert m["bpb_human"] == pytest.approx(want_human["bits_per_byte"], rel=1e-4), name


def test_heldout_completions_are_also_scored_after_their_prompts(report, fake_run):
    """bpb_heldout_in_context: each held-out row fed whole (prompt + completion), only its completion tokens
    scored, over the completions' bytes; the teacher is scored too. Recomputed here by hand."""
    import math

    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    import distill.student.hf  # noqa: F401 - registers the student model type

    table = pq.read_table(str(Path(fake_run["run"]) / "data" / "generate" / "part-0.parquet")).to_pylist()
    held = [r for r in table if r["prompt_id"] in set(fake_run["heldout"])]
    assert len(held) == 6
    nbytes = sum(len(r["completion"].encode("utf-8")) for r in held)
    for name in ("teacher", "student", "init"):
        model = AutoModelForCausalLM.from_pretrained(fake_run[name], dtype=torch.float32).eval()
        nats, tokens = 0.0, 0
        with torch.no_grad():
            for r in held:
                ids = torch.tensor([list(r["input_ids"])])
                plen, clen = r["prompt_len"], len(r["topk_ids"])
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                # position j predicts token j + 1: the completion's tokens plen .. plen + clen - 1
                nats -= float(logprobs[plen - 1 : plen - 1 + clen].gather(-1, ids[0, plen : plen + clen, None]).sum())
                tokens += clen
        got = report["models"][name]["heldout_in_context"]
        assert got["tokens"] == tokens and got["bytes"] == nbytes, name
        assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-4), name
        assert report["models"][name]["metrics"]["bpb_heldout_in_context"] == got["bits_per_byte"]
        # Not the alone-scored figure: the prompt changes what the model predicts.
        assert got["bits_per_byte"] != pytest.approx(report["models"][name]["metrics"]["bpb_heldout"], rel=1e-3)


def _greedy_by_hand(model, ids: list[int], max_new: int, eos: set[int], penalty: float = 1.0) -> list[int]:
    """Greedy decoding with the full forward at every step (no cache, no generate), CTRL repetition penalty."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(input_ids=torch.tensor([out])).logits[0, -1].float()
            seen = torch.tensor(sorted(set(out)))
            picked = logits[seen]
            logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
            token = int(logits.argmax())
            out.append(token)
            if token in eos:
                break
    return out[len(ids) :]


def test_sample_answers_are_each_models_greedy_answer_to_the_same_heldout_prompts(report, fake_run, tokenizer):
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    import distill.student.hf  # noqa: F401 - registers the student model type

    table = pq.read_table(str(Path(fake_run["run"]) / "data" / "generate" / "part-0.parquet")).to_pylist()
    held = sorted((r for r in table if r["prompt_id"] in set(fake_run["heldout"])), key=lambda r: r["prompt_id"])
    samples = report["samples"]
    assert [s["prompt_id"] for s in samples] == [r["prompt_id"] for r in held[:3]]  # eval.samples: 3 by default
    assert [s["prompt"] for s in samples] == [r["prompt"] for r in held[:3]]
    assert report["sample_settings"] == {"decoding": "greedy", "repetition_penalty": 1.0, "max_new_tokens": 48}
    for name in ("teacher", "student", "init"):
        assert "samples" not in report["models"][name]  # moved to report["samples"], not kept twice
        model = AutoModelForCausalLM.from_pretrained(fake_run[name], dtype=torch.float32).eval()
        eos = {tokenizer.eos_token_id}
        for sample, row in zip(samples, held):
            new = _greedy_by_hand(model, list(row["input_ids"][: row["prompt_len"]]), 48, eos)
            assert sample["answers"][name] == tokenizer.decode(new, skip_special_tokens=True).strip(), name
    assert samples[0]["answers"]["student"] != samples[0]["answers"]["teacher"]


def test_sample_answers_apply_the_repetition_penalty_asked_for(fake_run, tokenizer):
    from distill.eval.samples import greedy_answers

    model, tok, _ = load_model(fake_run["student"], role="student")
    row = {"prompt": "p", "input_ids": tok("the cat sat on the mat")["input_ids"], "prompt_len": 8}
    answers = {
        penalty: greedy_answers(model, tok, [row], max_new_tokens=24, repetition_penalty=penalty)[0]
        for penalty in (1.0, 3.0)
    }
    for penalty, answer in answers.items():
        new = _greedy_by_hand(model, list(row["input_ids"][:8]), 24, {tok.eos_token_id}, penalty)
        assert answer == tok.decode(new, skip_special_tokens=True).strip()
    assert answers[1.0] != answers[3.0]


def test_speed_and_cost(report):
    for name in ("teacher", "student"):
        speed = report["models"][name]["speed"]
        assert set(speed["by_batch"]) == {"1", "2"}
        for b, m in speed["by_batch"].items():
            assert m["total_tokens"] == int(b) * 4 and m["ttft_s"] > 0 and m["decode_tokens_per_s"] > 0
            assert m["cost_per_million_tokens"] == pytest.approx(2.0 / (m["decode_tokens_per_s"] * 3600) * 1e6)
    assert "speed" not in report["models"]["init"]
    assert report["run_cost"] == {
        "generate_seconds": 120.0,
        "train_seconds": 240.0,
        "wall_seconds": 360.0,
        "cost_per_hour": 2.0,
        "cost": pytest.approx(0.2),
    }
    assert report["comparison"]["decode_speedup"] > 0


def test_gate_uses_init_by_default(report):
    gate = report["gate"]
    assert set(gate) == {"passed", "metric", "direction", "margin", "value", "reference", "against", "reason"}
    assert gate["against"] == "init" and gate["metric"] == "bpb_heldout"
    assert gate["value"] == report["models"]["student"]["metrics"]["bpb_heldout"]
    assert gate["reference"] == report["models"]["init"]["metrics"]["bpb_heldout"]
    assert gate["passed"] == (gate["value"] <= gate["reference"])


def test_html_is_self_contained_with_all_plots(report):
    text = Path(report["paths"]["html"]).read_text()
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 4
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing fetched from a network
    for name in ("training_loss", "bits_per_byte", "routing", "speed"):
        assert Path(report["paths"][f"png_{name}"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the sample answers as a table: a row per prompt, a column per model, model text escaped
    section = text.split("<h2>Sample answers</h2>", 1)[1].split("<h2>", 1)[0]
    assert "greedy with repetition penalty 1, at most 48 new tokens" in section
    assert section.count("<tr>") == 1 + len(report["samples"])
    assert "<th>teacher</th><th>student</th><th>init</th>" in section
    for sample in report["samples"]:
        assert html.escape(sample["prompt"]) in section
        assert html.escape(sample["answers"]["student"]) in section


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _screenshot(html: Path, out: Path) -> np.ndarray:
    import matplotlib.image

    subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={out}",
            "--window-size=1200,2600",
            html.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return matplotlib.image.imread(str(out))[..., :3]  # [H, W, 3] floats in [0, 1]


def _colored_share(img: np.ndarray) -> float:
    """Share of pixels with clearly saturated colour (plot bars and lines; text is black/grey)."""
    return float(((img.max(-1) - img.min(-1)) > 0.25).mean())


def test_html_renders_in_headless_chromium_with_plots(report, tmp_path):
    if _chromium() is None:
        missing_dependency("Chromium is missing (apt-get install chromium; .ci/run installs it)")
    html = Path(report["paths"]["html"])
    img = _screenshot(html, tmp_path / "report.png")
    assert img.shape[:2] == (2600, 1200)
    non_white = float((img.min(-1) < 0.9).mean())
    assert non_white > 0.05, f"screenshot is nearly blank ({non_white:.3f} non-white)"
    with_plots = _colored_share(img)
    # Control: the same page without its images shows almost no colour, so the plots are what is seen.
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', html.read_text()))
    without = _colored_share(_screenshot(bare, tmp_path / "bare.png"))
    assert with_plots > 0.02 and with_plots > 10 * without, (with_plots, without)


def test_baseline_with_another_vocabulary_skips_kl_with_a_note(fake_run, tokenizer, tmp_path):
    from tests.distill.eval.conftest import save, tiny_llama

    other = tokenizer.__class__.from_pretrained(fake_run["student"])
    other.add_tokens(["<extra-token>"])
    baseline = save(tiny_llama(other, seed=5), other, tmp_path / "baseline")
    cfg = load_config(
        fake_run["config"],
        ["eval.models=[teacher, student, baseline]", "eval.speed.enabled=false", "eval.gate.metric=bpb_human"],
    )
    rep = run_eval_stage(cfg, fake_run["run"], baseline_dir=baseline, show_progress=False)
    b = rep["models"]["baseline"]
    assert b["vocab_size"] == len(tokenizer) + 1
    assert b["metrics"]["bpb_human"] > 0 and b["metrics"]["kl"] is None and "fidelity" not in b
    assert any("baseline: vocabulary differs" in n and "KL and top-1 agreement skipped" in n for n in rep["notes"])
    assert "init" not in rep["models"]
    assert rep["gate"]["against"] == "baseline" and rep["gate"]["reference"] == b["metrics"]["bpb_human"]


def test_serve_dtype_int8_has_the_eval_score_the_int8_student_it_will_serve(fake_run):
    """The student's bits per byte with the int8 weights of serve.dtype int8, recomputed here from a
    quantized copy, beside its float32 figures; the teacher and init are not quantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import distill.student.hf  # noqa: F401 - registers the student model type
    from distill.eval import metrics as M
    from distill.eval.corpora import read_corpus
    from serve.engine.kernels import quantize_int8_weights

    cfg = load_config(
        fake_run["config"], ["serve.dtype=int8", "eval.models=[teacher, student]", "eval.speed.enabled=false"]
    )
    rep = run_eval_stage(cfg, fake_run["run"], show_progress=False)
    student = rep["models"]["student"]
    int8 = student["served_int8"]
    assert "served_int8" not in rep["models"]["teacher"] and set(int8["bits_per_byte"]) == {"heldout", "human.txt"}
    model = AutoModelForCausalLM.from_pretrained(fake_run["student"], dtype=torch.float32).eval()
    quantize_int8_weights(model)
    tok = AutoTokenizer.from_pretrained(fake_run["student"])
    human = read_corpus(str(Path(fake_run["root"]) / "human.txt"))
    want = M.bits_per_byte(model, tok, human, window=cfg.eval.window, batch_tokens=cfg.eval.batch_tokens)
    assert int8["bits_per_byte"]["human.txt"] == pytest.approx(want["bits_per_byte"], rel=1e-6)
    fp32 = student["bits_per_byte"]["human.txt"]["bits_per_byte"]
    assert int8["bits_per_byte"]["human.txt"] != fp32  # really the quantized weights
    assert int8["change"]["human.txt"] == pytest.approx(int8["bits_per_byte"]["human.txt"] / fp32 - 1)
    assert any(n.startswith("student served as int8 (serve.dtype): bits per byte on human.txt") for n in rep["notes"])


def test_model_dir_without_tokenizer_is_an_error_naming_the_path(fake_run, tmp_path):
    bare = tmp_path / "student-no-tok"
    shutil.copytree(fake_run["student"], bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    with pytest.raises(RaydistillError, match=rf"{bare} has no tokenizer.*save_pretrained"):
        load_model(str(bare), role="student")
    cfg = load_config(fake_run["config"], ["eval.speed.enabled=false"])
    with pytest.raises(RaydistillError, match="has no tokenizer"):
        run_eval_stage(cfg, fake_run["run"], model_dir=str(bare), show_progress=False)


def test_empty_corpus_is_an_error_naming_the_path(fake_run, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = load_config(fake_run["config"], [f"eval.corpora={empty}"])
    with pytest.raises(RaydistillError, match=rf"{empty} is empty"):
        run_eval_stage(cfg, fake_run["run"], show_progress=False)


def test_cli_json(fake_run, capsys):
    from pipelines.cli import main

    code = main(
        [
            "eval",
            "--config",
            fake_run["config"],
            "--run",
            "run1",
            "--set",
            "eval.speed.enabled=false",
            "--set",
            "eval.models=[student, init]",
            "--set",
            "eval.gate.metric=kl",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gate"]["against"] == "init" and out["gate"]["metric"] == "kl"
    assert out["gate"]["passed"] == (out["metrics"]["student"]["kl"] <= out["metrics"]["init"]["kl"])
    assert Path(out["paths"]["html"]).exists()


def test_cli_table_prints_report_paths(fake_run, capsys):
    from pipelines.cli import main

    code = main(
        [
            "eval",
            "--config",
            fake_run["config"],
            "--set",
            "eval.speed.enabled=false",
            "--set",
            "eval.models=[student]",
            "--set",
            "eval.gate.against=teacher",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.strip().splitlines()[-2].endswith("eval/report.html")
    assert "gate FAILED" in captured.err and "no reference model 'teacher'" in captured.err


def test_model_dirs_load_from_fsspec_uris(fake_run):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(fake_run["student"] + "/", "/eval-test/student", recursive=True)
    model, tokenizer, local = load_model("memory://eval-test/student", role="student")
    assert type(model).__name__ == "RaydistillMoeForCausalLM" and len(tokenizer) == 259
    assert Path(local, "model.safetensors").exists()
