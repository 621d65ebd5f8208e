"""The generate stage end to end on a local Ray: soft labels, fault tolerance, resume, bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from cluster.errors import ConfigError, RaydistillError
from distill.data.generate import GENERATE_DIR, REQUEST_COLUMNS, TeacherWorker, run_generate_stage, sampling_from_config
from distill.data.inspect import inspect_data
from distill.data.prompts import expand_samples, read_prompt_files
from distill.data.shards import read_dir as read_shards
from distill.teacher.base import row_seed
from distill.teacher.hf import HFTeacher
from pipelines.config import load_config

FLAKY = "tests.distill.data.flaky_teacher:FlakyTeacher"
SCRIPTED = "tests.distill.data.scripted_teacher:ScriptedTeacher"


def write_prompts(path: Path, n: int, column: str = "prompt") -> str:
    with open(path, "w") as handle:
        for i in range(n):
            handle.write(json.dumps({column: f"Question number {i}: what is {i} plus {i}?"}) + "\n")
    return str(path)


def make_cfg(tmp_path: Path, teacher: str, prompts: str, *extra: str):
    return load_config(
        None,
        [
            f"workdir={tmp_path / 'runs'}",
            f"teacher.model={teacher}",
            f"prompts.path={prompts}",
            "prompts.source=file",
            "prompts.count=null",
            "generate.max_new_tokens=6",
            "generate.temperature=0",
            "teacher.batch_size=4",
            *extra,
        ],
    )


def all_prompt_ids(run_dir: str) -> list[str]:
    return read_shards(f"{run_dir}/{GENERATE_DIR}", columns=["prompt_id"]).column("prompt_id").to_pylist()


def test_greedy_tokens_are_top1_and_logprobs_match_a_forward_pass(ray_session, tmp_path, builtin_teacher_model):
    prompts = write_prompts(tmp_path / "p.jsonl", 5)
    cfg = make_cfg(tmp_path, "smollm2-135m-instruct", prompts, "generate.max_new_tokens=12", "generate.logprobs=20")
    run = str(tmp_path / "run")
    manifest = run_generate_stage(cfg, run, show_progress=False)
    assert manifest["rows"] == 5 and manifest["skipped"] == {}
    table = read_shards(f"{run}/{GENERATE_DIR}")
    model = builtin_teacher_model
    for row in table.to_pylist():
        ids = row["input_ids"]
        completion = ids[row["prompt_len"] :]
        topk_ids = np.asarray(row["topk_ids"])
        topk_lp = np.asarray(row["topk_logprobs"])
        assert topk_ids.shape == (row["completion_len"], 20) == (len(completion), 20)
        assert (topk_ids[:, 0] == np.asarray(completion)).all(), "greedy token must be the stored top-1"
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        reference = torch.log_softmax(logits[row["prompt_len"] - 1 : len(ids) - 1].float(), dim=-1)
        expected = reference.gather(-1, torch.from_numpy(topk_ids).long()).numpy()
        np.testing.assert_allclose(topk_lp, expected, atol=1e-3)
        assert (np.diff(topk_lp, axis=1) <= 1e-6).all() and (topk_lp <= 0).all()
        assert row["teacher"].startswith("smollm2-135m-instruct@")
        assert json.loads(row["sampling"])["temperature"] == 0


def test_engine_teacher_keeps_two_batches_in_flight_and_answers_as_in_process(ray_session, tmp_path, tiny_teacher_dir):
    from serve.engine.teacher import EngineTeacher

    prompts = write_prompts(tmp_path / "p.jsonl", 5)
    cfg = make_cfg(
        tmp_path,
        tiny_teacher_dir,
        prompts,
        "teacher.backend=engine",
        "teacher.batch_size=2",
        "generate.logprobs=4",
        "teacher.dtype=float32",  # as the in-process teacher below (auto is bfloat16 on a CPU with AMX)
    )
    assert cfg.teacher.batches_in_flight == 2  # the default: 3 batches of 2, two at a time on one replica
    run = str(tmp_path / "run")
    manifest = run_generate_stage(cfg, run, show_progress=False)
    rows = read_shards(f"{run}/{GENERATE_DIR}").to_pylist()
    assert manifest["rows"] == 5 and sorted(r["prompt"] for r in rows) == sorted(
        json.loads(line)["prompt"] for line in Path(prompts).read_text().splitlines()
    )
    teacher = EngineTeacher(tiny_teacher_dir, batch_size=2)
    want = teacher.generate([r.get("messages") or r["prompt"] for r in rows], sampling_from_config(cfg))
    teacher.close()
    for row, completion in zip(rows, want):
        assert row["input_ids"] == completion.prompt_ids + completion.completion_ids
        np.testing.assert_allclose(np.asarray(row["topk_logprobs"]), completion.topk_logprobs, atol=1e-4)


def test_soft_labels_are_the_raw_distribution_whatever_the_temperature(ray_session, tmp_path, tiny_teacher_dir):
    """Sampling at a low temperature must not sharpen the stored log-probs."""
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    rows = {}
    for temp in ("0", "0.3"):
        cfg = make_cfg(tmp_path, tiny_teacher_dir, prompts, f"generate.temperature={temp}", "generate.seed=1")
        run = str(tmp_path / f"run-{temp}")
        run_generate_stage(cfg, run, show_progress=False)
        rows[temp] = {r["prompt_id"]: r for r in read_shards(f"{run}/{GENERATE_DIR}").to_pylist()}
    for pid, greedy in rows["0"].items():
        sampled = rows["0.3"][pid]
        # Position 0 has the same context in both runs, so its raw distribution must be identical.
        np.testing.assert_allclose(greedy["topk_logprobs"][0], sampled["topk_logprobs"][0], atol=1e-5)


def test_killed_actor_is_restarted_and_every_prompt_lands_once(ray_session, tmp_path, tiny_teacher_copy):
    Path(tiny_teacher_copy, "flaky.json").write_text(
        json.dumps({"mode": "exit", "fail_on_call": 2, "times": 1, "state": str(tmp_path / "state.json")})
    )
    prompts = write_prompts(tmp_path / "p.jsonl", 12)
    cfg = make_cfg(tmp_path, tiny_teacher_copy, prompts, f"teacher.backend={FLAKY}")
    run = str(tmp_path / "run")
    manifest = run_generate_stage(cfg, run, show_progress=False)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["failures"] == 1, "the actor must really have died once"
    ids = all_prompt_ids(run)
    assert manifest["rows"] == 12 and len(ids) == 12 and len(set(ids)) == 12


def test_failed_batch_is_retried_inside_the_actor(ray_session, tmp_path, tiny_teacher_copy):
    Path(tiny_teacher_copy, "flaky.json").write_text(
        json.dumps({"mode": "raise", "fail_on_call": 1, "times": 1, "state": str(tmp_path / "state.json")})
    )
    prompts = write_prompts(tmp_path / "p.jsonl", 8)
    cfg = make_cfg(tmp_path, tiny_teacher_copy, prompts, f"teacher.backend={FLAKY}", "generate.max_retries=1")
    run = str(tmp_path / "run")
    manifest = run_generate_stage(cfg, run, show_progress=False)
    assert json.loads((tmp_path / "state.json").read_text())["failures"] == 1
    assert manifest["rows"] == 8 and sorted(Counter(all_prompt_ids(run)).values()) == [1] * 8


def test_rerun_after_a_partial_run_skips_finished_prompts(ray_session, tmp_path, tiny_teacher_copy):
    control = Path(tiny_teacher_copy, "flaky.json")
    control.write_text(
        json.dumps(
            {"mode": "raise", "fail_on_call": 3, "times": 100, "delay_s": 4, "state": str(tmp_path / "state.json")}
        )
    )
    prompts = write_prompts(tmp_path / "p.jsonl", 16)
    cfg = make_cfg(
        tmp_path,
        tiny_teacher_copy,
        prompts,
        f"teacher.backend={FLAKY}",
        "generate.max_retries=0",
        "teacher.batch_size=2",
    )
    run = str(tmp_path / "run")
    with pytest.raises(Exception, match="planned teacher failure"):
        run_generate_stage(cfg, run, show_progress=False)
    written = all_prompt_ids(run)
    assert 0 < len(written) < 16, "the partial run should have written some shards"
    control.write_text(json.dumps({"mode": "raise", "fail_on_call": 10**9, "state": str(tmp_path / "state2.json")}))
    manifest = run_generate_stage(cfg, run, show_progress=False)
    assert manifest["resumed_rows"] == len(written)
    assert manifest["new_rows"] == 16 - len(written)
    ids = all_prompt_ids(run)
    assert len(ids) == 16 and len(set(ids)) == 16 and set(written) <= set(ids)
    # A third run has nothing to do and writes nothing twice.
    again = run_generate_stage(cfg, run, show_progress=False)
    assert again["new_rows"] == 0 and again["resumed_rows"] == 16 and len(all_prompt_ids(run)) == 16
    assert not list(Path(run, GENERATE_DIR).glob(".tmp-*"))


def test_samples_per_prompt_get_distinct_stable_ids(ray_session, tmp_path, tiny_teacher_dir):
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    cfg = make_cfg(tmp_path, tiny_teacher_dir, prompts, "prompts.samples_per_prompt=2", "generate.temperature=1.0")
    first = str(tmp_path / "a")
    run_generate_stage(cfg, first, show_progress=False)
    ids = all_prompt_ids(first)
    assert len(ids) == 6 and len(set(ids)) == 6
    second = str(tmp_path / "b")
    run_generate_stage(cfg, second, show_progress=False)
    assert set(all_prompt_ids(second)) == set(ids), "prompt ids depend only on source, prompt and sample index"


def test_prompt_longer_than_context_is_skipped_and_counted(ray_session, tmp_path, tiny_teacher_dir):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "word " * 400}) + "\n")
    cfg = make_cfg(tmp_path, tiny_teacher_dir, str(path), "teacher.max_model_len=64")
    run = str(tmp_path / "run")
    manifest = run_generate_stage(cfg, run, show_progress=False)
    assert manifest["rows"] == 1
    assert manifest["skipped"] == {"prompt_too_long": 1}


def test_bad_prompt_files_fail_with_the_file_and_field(tmp_path, tiny_teacher_dir):
    run = str(tmp_path / "run")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(RaydistillError, match=r"wrong\.jsonl: no 'prompt', 'messages' or 'raw' column.*question"):
        run_generate_stage(make_cfg(tmp_path, tiny_teacher_dir, str(wrong)), run, show_progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(RaydistillError, match=r"empty\.jsonl is empty"):
        run_generate_stage(make_cfg(tmp_path, tiny_teacher_dir, str(empty)), run, show_progress=False)
    with pytest.raises(RaydistillError, match=r"prompts\.path: .*missing\.jsonl does not exist"):
        run_generate_stage(
            make_cfg(tmp_path, tiny_teacher_dir, str(tmp_path / "missing.jsonl")), run, show_progress=False
        )
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(RaydistillError, match=r"broken\.jsonl:2: not valid JSON"):
        run_generate_stage(make_cfg(tmp_path, tiny_teacher_dir, str(broken)), run, show_progress=False)
    assert not Path(run, GENERATE_DIR).exists() or not list(Path(run, GENERATE_DIR).glob("*.parquet"))


def test_unknown_teacher_is_a_clear_error(tmp_path, monkeypatch):
    from distill.teacher.sources import resolve_model

    with pytest.raises(ConfigError, match="unknown model 'not-a-model'"):
        resolve_model("not-a-model")
    with pytest.raises(ConfigError, match="has no config.json"):
        resolve_model(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="cannot fetch Hugging Face model 'nobody/no-such-model'"):
        resolve_model("nobody/no-such-model")
    with pytest.raises(ConfigError, match=r"teacher\.backend"):
        load_config(None, ["teacher.backend=tensorrt"])


def test_messages_csv_and_parquet_sources(ray_session, tmp_path, tiny_teacher_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "chat.jsonl").write_text(
        json.dumps(
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]}
        )
        + "\n"
    )
    (tmp_path / "plain.csv").write_text("prompt,other\nName a color.,x\n,empty row\n")
    pq.write_table(pa.table({"prompt": ["Name a tree.", "Name a tree."]}), tmp_path / "more.parquet")
    (tmp_path / "raw.jsonl").write_text(json.dumps({"raw": "Once upon a time, a fox"}) + "\n")
    cfg = make_cfg(tmp_path, tiny_teacher_dir, str(tmp_path / "*.*"))
    run = str(tmp_path / "run")
    manifest = run_generate_stage(cfg, run, show_progress=False)
    table = read_shards(f"{run}/{GENERATE_DIR}")
    by_source = {r["source"]: r for r in table.to_pylist()}
    assert set(by_source) == {"file:chat.jsonl", "file:plain.csv", "file:more.parquet", "file:raw.jsonl"}
    assert by_source["file:chat.jsonl"]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert by_source["file:plain.csv"]["prompt"] == "Name a color."
    # A raw prefix is continued as it is: its tokens, no chat template, no special tokens.
    from transformers import AutoTokenizer

    raw = by_source["file:raw.jsonl"]
    assert raw["messages"] is None and raw["prompt"] == "Once upon a time, a fox"
    expected = AutoTokenizer.from_pretrained(tiny_teacher_dir)(raw["prompt"], add_special_tokens=False)["input_ids"]
    assert raw["input_ids"][: raw["prompt_len"]] == expected
    chat = by_source["file:plain.csv"]
    assert chat["prompt_len"] > len(AutoTokenizer.from_pretrained(tiny_teacher_dir)(chat["prompt"])["input_ids"])
    assert manifest["skipped"] == {"duplicate_prompt": 1}


def test_a_csv_with_prompt_and_raw_columns_keeps_both_kinds_of_row(tmp_path):
    """A CSV reader gives "" for a blank cell (JSONL has no key): a row with only a raw prefix is a raw
    request, one with only a prompt a chat request, and a row with neither is skipped."""
    from distill.data.prompts import read_prompt_files

    (tmp_path / "mixed.csv").write_text("prompt,raw\nName a bird.,\n,Long ago a heron\n,\n")
    requests = read_prompt_files(make_cfg(tmp_path, "unused", str(tmp_path / "mixed.csv")))
    assert [(r["prompt"], r["messages"] is None) for r in requests] == [
        ("Name a bird.", False),
        ("Long ago a heron", True),
    ]


def test_self_instruct_prompts_are_cleaned_counted_in_the_manifest_and_reused(ray_session, tmp_path, tiny_teacher_copy):
    topics = tmp_path / "topics.txt"
    topics.write_text("# comment\nbirds\nrivers\n")
    Path(tiny_teacher_copy, "scripted.json").write_text(
        json.dumps(
            {
                "state": str(tmp_path / "written"),
                "instructions": [
                    # round 0: 4 seeds
                    "I'm an AI designed to assist and instruct users. What question or task would you like to ask or "
                    "instruct me about?",
                    'A user might ask: "How do birds find their way south?"',
                    "Question: Why do rivers bend?",
                    "I'm ready to help. What's your question?",
                    # round 1: twice the 2 missing
                    'A user might ask: "How do birds find their way south?"',
                    "Birds are warm-blooded vertebrates with feathers.",
                    "Explain how a river delta forms.",
                    "Write a haiku about a heron.",
                ],
            }
        )
    )
    cfg = load_config(
        None,
        [
            f"workdir={tmp_path}",
            f"teacher.model={tiny_teacher_copy}",
            f"teacher.backend={SCRIPTED}",
            "prompts.source=self_instruct",
            "prompts.count=4",
            f"prompts.topics_path={topics}",
            "generate.max_new_tokens=4",
        ],
    )
    run = str(tmp_path / "run")
    first = run_generate_stage(cfg, run, show_progress=False)
    assert first["prompt_cleaning"] == {
        "requested": 4,
        "asked": 8,
        "kept": 4,
        "rounds": 2,
        "short_by": 0,
        "dropped": {"assistant_echo": 2, "duplicate": 1, "not_a_task": 1},
    }
    on_disk = json.loads(Path(run, GENERATE_DIR, "manifest.json").read_text())
    assert on_disk["prompt_cleaning"] == first["prompt_cleaning"]
    assert first["rows"] == 4 and first["skipped"] == {}
    prompts = read_shards(f"{run}/{GENERATE_DIR}", columns=["prompt"]).column("prompt").to_pylist()
    assert sorted(prompts) == sorted(
        [
            "How do birds find their way south?",
            "Why do rivers bend?",
            "Explain how a river delta forms.",
            "Write a haiku about a heron.",
        ]
    )
    assert len(Path(run, "data/prompts/self_instruct.jsonl").read_text().splitlines()) == 4
    again = run_generate_stage(cfg, run, show_progress=False)
    assert again["new_rows"] == 0 and again["resumed_rows"] == 4
    assert again["prompt_cleaning"] == first["prompt_cleaning"]
    assert (tmp_path / "written").read_text() == "8", "a rerun reuses the stored prompts without asking again"
    sources = set(read_shards(f"{run}/{GENERATE_DIR}", columns=["source"]).column("source").to_pylist())
    assert sources == {"self_instruct"}


def test_magpie_prefix_is_the_chat_template_up_to_the_user_turn(builtin_teacher_dir):
    from transformers import AutoTokenizer

    from distill.data.prompts import magpie_prefix

    tok = AutoTokenizer.from_pretrained(builtin_teacher_dir)
    prefix = magpie_prefix(tok)
    assert prefix.endswith("<|im_start|>user\n") and "<|im_start|>system" in prefix


def test_judge_scores_land_in_quality(ray_session, tmp_path, tiny_teacher_copy):
    """The judge's verdicts (scripted per prompt) land in each row's quality; an unparsable verdict is null."""
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    Path(tiny_teacher_copy, "scripted.json").write_text(
        json.dumps(
            {
                "state": str(tmp_path / "written"),
                "judge": {
                    "Question number 0:": "Score: 7/10",
                    "Question number 1:": "3",
                    "Question number 2:": "I cannot rate this",
                },
            }
        )
    )
    cfg = make_cfg(tmp_path, tiny_teacher_copy, prompts, f"teacher.backend={SCRIPTED}", "generate.judge=true")
    run = str(tmp_path / "run")
    manifest = run_generate_stage(cfg, run, show_progress=False)
    table = read_shards(f"{run}/{GENERATE_DIR}", columns=["prompt", "quality"]).to_pylist()
    quality = {r["prompt"].split(":")[0]: r["quality"] for r in table}
    assert quality == {"Question number 0": 7.0, "Question number 1": 3.0, "Question number 2": None}
    assert manifest["judge"] == {"judged": 2, "unparsable": 1}


def test_judge_score_parser():
    from distill.data.generate import parse_judge_score

    assert parse_judge_score("8") == 8.0
    assert parse_judge_score("Score: 10/10") == 10.0
    assert parse_judge_score("I'd say 7 out of 10") == 7.0
    assert parse_judge_score("no idea") is None


def test_cli_generate_then_inspect(ray_session, tmp_path, tiny_teacher_dir, capsys):
    from pipelines.cli import main

    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"name: clitest\nworkdir: {tmp_path / 'runs'}\nteacher: {{model: {tiny_teacher_dir}}}\n"
        f"prompts: {{source: file, path: {prompts}}}\n"
    )
    assert main(["generate", "--config", str(config), "--set", "generate.max_new_tokens=3", "--quiet"]) == 0
    run = capsys.readouterr().out.strip().splitlines()[-1]
    assert run.startswith(str(tmp_path / "runs" / "clitest")) and Path(run, GENERATE_DIR, "manifest.json").exists()
    assert main(["data", "inspect", run, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 3 and report["completion_tokens"] == 9 and report["soft_labels"]["ok"]
    assert 0 < report["soft_labels"]["mean_topk_mass"] <= 1
    # --run continues the same run instead of starting a new one.
    run_id = Path(run).name
    assert (
        main(["generate", "--config", str(config), "--set", "generate.max_new_tokens=3", "--run", run_id, "--quiet"])
        == 0
    )
    assert capsys.readouterr().out.strip().splitlines()[-1] == run
    assert inspect_data(run)["rows"] == 3
    assert main(["generate", "--config", str(config), "--set", "teacher.bakend=hf"]) == 2
    assert "teacher.bakend: unknown key" in capsys.readouterr().err


def completions_by_id(run_dir: str) -> dict[str, list[int]]:
    table = read_shards(f"{run_dir}/{GENERATE_DIR}", columns=["prompt_id", "input_ids", "prompt_len"]).to_pylist()
    return {r["prompt_id"]: r["input_ids"][r["prompt_len"] :] for r in table}


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_a_resumed_second_sample_of_each_prompt_is_a_new_draw(ray_session, tmp_path, tiny_teacher_dir, backend):
    """Samples added later (samples_per_prompt 1 -> 2 on the same run) land at the same batch positions as
    the first ones: with a seed per batch position they repeated them word for word."""
    prompts = write_prompts(tmp_path / "p.jsonl", 4)
    run = str(tmp_path / "run")
    sampled = ("generate.temperature=1.0", f"teacher.backend={backend}")
    run_generate_stage(make_cfg(tmp_path, tiny_teacher_dir, prompts, *sampled), run, show_progress=False)
    first = completions_by_id(run)
    more = make_cfg(tmp_path, tiny_teacher_dir, prompts, *sampled, "prompts.samples_per_prompt=2")
    assert run_generate_stage(more, run, show_progress=False)["new_rows"] == 4
    both = completions_by_id(run)
    later = [c for pid, c in both.items() if pid not in first]
    assert len(later) == 4
    assert not set(map(tuple, later)) & set(map(tuple, first.values())), "a second sample repeated a first one"


class RecordingTeacher(HFTeacher):
    """The tiny HF teacher, recording the seeds each ``generate`` call is given (in-process use only)."""

    calls: list[list[int] | None] = []

    def generate(self, prompts, sampling, seeds=None):
        RecordingTeacher.calls.append(None if seeds is None else list(seeds))
        return super().generate(prompts, sampling, seeds)


def test_each_row_is_seeded_from_generate_seed_and_its_prompt_id_whatever_its_batch(tmp_path, tiny_teacher_dir):
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    cfg = make_cfg(
        tmp_path,
        tiny_teacher_dir,
        prompts,
        f"teacher.backend={__name__}:RecordingTeacher",
        "prompts.samples_per_prompt=2",
        "generate.temperature=1.0",
        "generate.seed=7",
    )
    requests, _ = expand_samples(read_prompt_files(cfg), 2, None)
    table = pa.Table.from_pylist([{c: r.get(c) for c in REQUEST_COLUMNS} for r in requests])
    worker = TeacherWorker(cfg.teacher.model_dump(mode="json"), sampling_from_config(cfg).to_json(), "float32", 0)
    ids = table.column("prompt_id").to_pylist()
    seen = {}
    for size in (4, 3):
        RecordingTeacher.calls.clear()
        for start in range(0, table.num_rows, size):
            worker(table.slice(start, size))
        seen[size] = [s for call in RecordingTeacher.calls for s in call]
    assert seen[4] == seen[3] == [row_seed(7, pid) for pid in ids]
    assert len(set(seen[4])) == 6, "each sample of a prompt draws its own stream"
    assert row_seed(None, ids[0]) is None and row_seed(8, ids[0]) != row_seed(7, ids[0])
