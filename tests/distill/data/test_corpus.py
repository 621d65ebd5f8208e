"""Human text the teacher labels (``corpus:``): teacher-forced soft labels, eval overlap dropped, never held out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from cluster.errors import ConfigError, RaydistillError
from distill.data import texts
from distill.data.corpus import builtin_files, corpus_rows, pack_rows
from distill.data.filters import apply_filters
from distill.data.generate import GENERATE_DIR, run_generate_stage
from distill.data.schema import to_table
from distill.data.section import FilterSection
from distill.data.shards import read_dir
from distill.data.split import row_is_heldout
from pipelines.config import load_config

EVAL_SENTENCE = "the quick brown fox jumps over the lazy dog while seven wise owls watch from the old oak tree"


def write_fortunes(directory: Path, name: str, entries: list[str]) -> None:
    (directory / name).write_text("\n%\n".join(entries) + "\n%\n")


@pytest.fixture
def fortunes_dir(tmp_path, monkeypatch) -> Path:
    """A fortunes dir as Debian lays it out: the eval's files, topic files, ASCII art, foreign sayings."""
    d = tmp_path / "fortunes"
    d.mkdir()
    write_fortunes(d, "fortunes", ["A saying the eval reads.", EVAL_SENTENCE.capitalize() + "."])
    write_fortunes(d, "literature", ["Call me Ishmael, said the eval's literature file."])
    write_fortunes(
        d,
        "science",
        [f"Science fact number {i}: water boils at a hundred degrees at sea level." for i in range(12)]
        + ["As they say, " + EVAL_SENTENCE + ", and nobody minds."],  # shares 13+ words with the eval
    )
    write_fortunes(d, "wisdom", [f"Wisdom {i}: a stitch in time saves nine." for i in range(4)])
    write_fortunes(d, "ascii-art", ["  /\\_/\\\n ( o.o )\n  > ^ <"])
    write_fortunes(d, "translate-me", ["Wer nicht wagt, der nicht gewinnt."])
    (d / "science.dat").write_bytes(b"\x00\x01")  # strfile's index beside each file
    monkeypatch.setattr(texts, "FORTUNES_DIR", str(d))
    return d


def corpus_cfg(tmp_path: Path, teacher: str, *extra: str):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(2)))
    return load_config(
        None,
        [
            f"workdir={tmp_path / 'runs'}",
            f"teacher.model={teacher}",
            f"prompts.path={prompts}",
            "prompts.count=null",
            "generate.max_new_tokens=4",
            "generate.temperature=0",
            "generate.logprobs=5",
            "teacher.batch_size=4",
            *extra,
        ],
    )


class CharTokenizer:
    """One token per character (id = code point): packing arithmetic is easy to check by hand."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


def test_pack_rows_fills_rows_up_to_the_limit_cuts_long_texts_and_stops_at_the_budget():
    texts_in = [("a", "x" * 5), ("a", "y" * 5), ("a", "z" * 23), ("b", "w" * 3)]
    rows = pack_rows(texts_in, CharTokenizer(), row_tokens=12, budget=None, seed=0)
    assert all(2 <= len(ids) <= 12 for _, ids in rows)
    assert {name for name, _ in rows} == {"a", "b"}
    for name, ids in rows:  # a row holds one source's texts only
        assert set(ids) <= ({ord("w")} if name == "b" else {ord(c) for c in "xyz\n"})
    # Every character of every text is in some row (the 23-character text in pieces of <= 12).
    packed = "".join(chr(i) for _, ids in rows for i in ids)
    assert sum(packed.count(c) for c in "xyzw") == 5 + 5 + 23 + 3
    # A budget stops packing once that many tokens (positions after the first) are taken.
    few = pack_rows(texts_in * 10, CharTokenizer(), row_tokens=12, budget=30, seed=0)
    taken = sum(len(ids) - 1 for _, ids in few)
    assert 30 <= taken < 30 + 2 * 12
    assert pack_rows(texts_in, CharTokenizer(), 12, None, seed=0) == rows  # the seed fixes the order


def test_builtin_files_leave_out_the_eval_files_art_foreign_text_and_excluded(fortunes_dir, tmp_path, monkeypatch):
    cfg = load_config(None, ["corpus.builtin=fortunes"])
    assert builtin_files(cfg.corpus) == ["science", "wisdom"]
    cfg = load_config(None, ["corpus.builtin=fortunes", "corpus.exclude=wisdom"])
    assert builtin_files(cfg.corpus) == ["science"]
    cfg = load_config(None, ["corpus.builtin=fortunes", "corpus.exclude=[wisdon]"])
    with pytest.raises(ConfigError, match=r"corpus.exclude: \['wisdon'\] are not fortune files.*'wisdom'"):
        builtin_files(cfg.corpus)
    monkeypatch.setattr(texts, "FORTUNES_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(RaydistillError, match="apt-get install fortunes"):
        builtin_files(load_config(None, ["corpus.builtin=fortunes"]).corpus)


def test_corpus_texts_overlapping_the_eval_are_dropped_and_counted(fortunes_dir, tmp_path, tiny_teacher_dir):
    from transformers import AutoTokenizer

    notes = tmp_path / "notes.txt"
    notes.write_text("First paragraph of my notes.\n\nSecond paragraph, about " + EVAL_SENTENCE + ".\n")
    cfg = corpus_cfg(
        tmp_path, tiny_teacher_dir, "corpus.builtin=fortunes", f"corpus.path={notes}", "corpus.tokens=null"
    )
    rows, stats = corpus_rows(cfg, AutoTokenizer.from_pretrained(tiny_teacher_dir))
    # science 13 + wisdom 4 fortunes + 2 paragraphs; the science entry and the paragraph quoting the eval go.
    assert stats["texts"] == 19 and stats["dropped_eval_overlap"] == 2
    assert stats["rows"] == len(rows) and {r["source"] for r in rows} == {"corpus:fortunes", "corpus:notes.txt"}
    assert len({r["prompt_id"] for r in rows}) == len(rows)


def test_generate_stage_scores_the_corpus_with_the_teacher_and_resumes(
    ray_session, fortunes_dir, tmp_path, tiny_teacher_dir
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = corpus_cfg(
        tmp_path, tiny_teacher_dir, "corpus.builtin=fortunes", "corpus.row_tokens=40", "corpus.tokens=null"
    )
    run = str(tmp_path / "run")
    manifest = run_generate_stage(cfg, run, show_progress=False)
    corpus = manifest["corpus"]
    assert corpus["texts"] == 17 and corpus["dropped_eval_overlap"] == 1 and corpus["new_rows"] == corpus["rows"] > 1
    table = read_dir(f"{run}/{GENERATE_DIR}")
    rows = [r for r in table.to_pylist() if r["source"] == "corpus:fortunes"]
    generated = [r for r in table.to_pylist() if r["source"] != "corpus:fortunes"]
    assert len(rows) == corpus["rows"] and len(generated) == 2 and manifest["rows"] == len(rows) + 2
    assert corpus["tokens"] == corpus["new_tokens"] == sum(r["completion_len"] for r in rows)
    text = " ".join(r["prompt"] + r["completion"] for r in rows)
    assert "Science fact number 3" in text and "Wisdom 2" in text
    assert "quick brown fox" not in text and "Ishmael" not in text and "( o.o )" not in text and "wagt" not in text
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    for row in rows:
        ids = row["input_ids"]
        assert row["prompt_len"] == 1 and row["completion_len"] == len(ids) - 1 and len(ids) <= 40
        assert tokenizer.decode(ids[:1]) + tokenizer.decode(ids[1:]) == row["prompt"] + row["completion"]
        top_ids, top_lp = np.asarray(row["topk_ids"]), np.asarray(row["topk_logprobs"])
        assert top_ids.shape == top_lp.shape == (len(ids) - 1, 5)
        with torch.no_grad():  # the teacher's raw distribution over tokens 1..L-1, teacher-forced
            reference = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
        np.testing.assert_allclose(top_lp, reference.gather(-1, torch.from_numpy(top_ids).long()).numpy(), atol=1e-3)
        np.testing.assert_allclose(top_lp[:, 0], reference.max(-1).values.numpy(), atol=1e-3)
        assert row["teacher"] == generated[0]["teacher"] and row["finish_reason"] == "stop"
        # Human text is always a training row: the held-out split is the teacher's own text.
        assert not row_is_heldout(row, fraction=0.999)
    assert sum(row_is_heldout(r, fraction=0.999) for r in generated) == 2
    # A rerun of the same run scores nothing again.
    again = run_generate_stage(cfg, run, show_progress=False)
    assert again["corpus"]["new_rows"] == 0 and again["corpus"]["resumed_rows"] == corpus["rows"]
    assert read_dir(f"{run}/{GENERATE_DIR}").num_rows == len(rows) + 2


def test_min_quality_keeps_corpus_rows_which_have_no_judge_score():
    rows = [
        {
            "prompt_id": "a",
            "prompt": "q",
            "completion": "a good answer here",
            "completion_len": 4,
            "quality": 8.0,
            "source": "file:p.jsonl",
            "finish_reason": "stop",
        },
        {
            "prompt_id": "b",
            "prompt": "q2",
            "completion": "a poor answer there",
            "completion_len": 4,
            "quality": 2.0,
            "source": "file:p.jsonl",
            "finish_reason": "stop",
        },
        {
            "prompt_id": "c",
            "prompt": "Hu",
            "completion": "man text nobody judged",
            "completion_len": 4,
            "quality": None,
            "source": "corpus:fortunes",
            "finish_reason": "stop",
        },
        {
            "prompt_id": "d",
            "prompt": "q3",
            "completion": "an answer never judged",
            "completion_len": 4,
            "quality": None,
            "source": "file:p.jsonl",
            "finish_reason": "stop",
        },
    ]
    kept, dropped = apply_filters(to_table(rows), FilterSection(min_quality=5, dedup="none"))
    assert kept.column("prompt_id").to_pylist() == ["a", "c"] and dropped["quality"] == 2
    only_corpus = to_table([rows[2]])
    kept, _ = apply_filters(only_corpus, FilterSection(min_quality=5, dedup="none"))
    assert kept.num_rows == 1
    with pytest.raises(RaydistillError, match="no generated row has a judge score"):
        apply_filters(to_table([rows[2], rows[3]]), FilterSection(min_quality=5, dedup="none"))
    assert isinstance(kept, pa.Table)
