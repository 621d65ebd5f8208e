"""self_instruct prompts: the teacher's writing is cleaned, counted by reason, and asked again until prompts.count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.errors import RaydistillError
from distill.data.prompts import INSTRUCTION_TEMPLATE, MAX_INSTRUCTION_ROUNDS, build_requests
from pipelines.config import load_config

ECHO = (
    "I'm an AI designed to assist and instruct users. What question or task would you like to ask or instruct me about?"
)
WRITE_MARKER = INSTRUCTION_TEMPLATE.split("{topic}")[0]


class FakeWriter:
    """A TeacherRunner: the next scripted text for each seed request; records every call."""

    def __init__(self, texts: list[str]):
        self.texts = list(texts)
        self.calls: list[int] = []
        self.seeds: list[int] = []

    def __call__(self, requests, sampling):
        assert all(r["messages"][-1]["content"].startswith(WRITE_MARKER) for r in requests)
        assert len({r["prompt_id"] for r in requests}) == len(requests)
        self.calls.append(len(requests))
        self.seeds.append(sampling.seed)
        return [
            {
                "prompt_id": r["prompt_id"],
                "completion": self.texts.pop(0) if self.texts else "",
                "finish_reason": "stop",
                "skip_reason": None,
            }
            for r in requests
        ]


def _cfg(tmp_path: Path, count: int):
    return load_config(None, [f"workdir={tmp_path}", "prompts.source=self_instruct", f"prompts.count={count}"])


def test_echoes_and_wrappers_are_cleaned_and_the_teacher_is_asked_again_for_the_count(tmp_path):
    round0 = [
        ECHO,
        'A user might ask: "How do bees make honey?"',
        "I'm an AI designed to assist and instruct users.",
        "Question: What is 15 percent of 80?",
    ]
    round1 = [
        'A user might ask: "How do bees make honey?"',
        "Birds are nice.",
        "Write a short poem about rain.",
        "Explain why ice floats on water.",
        "Name three prime numbers above 50.",
        "Unused.",
    ]
    writer = FakeWriter(round0 + round1)
    cleaning: dict = {}
    rows, dropped = build_requests(_cfg(tmp_path, 4), str(tmp_path / "run"), writer, cleaning=cleaning)
    assert writer.calls == [4, 4]  # round 1 asks twice the 2 missing
    assert writer.seeds == [0, 1]  # a new sampling seed per round, or a small teacher repeats itself
    assert [r["prompt"] for r in rows] == [
        "How do bees make honey?",
        "What is 15 percent of 80?",
        "Write a short poem about rain.",
        "Explain why ice floats on water.",
    ]
    assert cleaning == {
        "requested": 4,
        "asked": 8,
        "kept": 4,
        "rounds": 2,
        "short_by": 0,
        "dropped": {"assistant_echo": 2, "duplicate": 1, "not_a_task": 1},
    }
    assert dropped == {}
    stored = Path(tmp_path, "run/data/prompts/self_instruct.jsonl").read_text().splitlines()
    assert [json.loads(line)["instruction"] for line in stored] == [r["prompt"] for r in rows]
    assert json.loads(Path(tmp_path, "run/data/prompts/self_instruct.stats.json").read_text()) == cleaning


def test_a_rerun_reuses_the_stored_prompts_and_counts_without_asking(tmp_path):
    run = str(tmp_path / "run")
    first_cleaning: dict = {}
    first, _ = build_requests(
        _cfg(tmp_path, 2),
        run,
        FakeWriter([ECHO, "How do tides work?", "Explain rust.", "What causes rainbows?"]),
        cleaning=first_cleaning,
    )

    def no_teacher(requests, sampling):
        raise AssertionError("a rerun must not ask the teacher again")

    again_cleaning: dict = {}
    again, _ = build_requests(_cfg(tmp_path, 2), run, no_teacher, cleaning=again_cleaning)
    assert [r["prompt_id"] for r in again] == [r["prompt_id"] for r in first]
    assert again_cleaning == first_cleaning and first_cleaning["dropped"] == {"assistant_echo": 1, "too_short": 1}


def test_rounds_are_bounded_and_the_shortfall_is_counted(tmp_path):
    writer = FakeWriter(["What is a comet?"] + [ECHO] * 100)
    cleaning: dict = {}
    rows, dropped = build_requests(_cfg(tmp_path, 3), str(tmp_path / "run"), writer, cleaning=cleaning)
    assert len(writer.calls) == MAX_INSTRUCTION_ROUNDS and writer.calls == [3, 4, 4, 4]
    assert [r["prompt"] for r in rows] == ["What is a comet?"]
    assert cleaning["kept"] == 1 and cleaning["short_by"] == 2 and cleaning["dropped"] == {"assistant_echo": 14}
    assert dropped == {"missing_prompts": 2}


def test_nothing_usable_is_an_error_with_the_drop_counts(tmp_path):
    with pytest.raises(RaydistillError, match=r"self_instruct.*no usable prompt.*assistant_echo"):
        build_requests(_cfg(tmp_path, 2), str(tmp_path / "run"), FakeWriter([ECHO] * 100))


def test_summary_line_names_the_counts():
    from distill.data.generate import cleaning_summary

    line = cleaning_summary(
        {
            "requested": 32,
            "asked": 76,
            "kept": 30,
            "rounds": 4,
            "short_by": 2,
            "dropped": {"not_a_task": 9, "assistant_echo": 31, "truncated": 6},
        }
    )
    assert line == (
        "kept 30/32 written prompts in 4 rounds (asked 76); dropped assistant_echo 31, not_a_task 9, "
        "truncated 6; 2 short of prompts.count"
    )
    assert cleaning_summary(None) is None and cleaning_summary({}) is None
