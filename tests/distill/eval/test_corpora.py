"""Human-text corpora: user files, the builtin fortunes corpus, empty and missing input."""

from __future__ import annotations

import json

import pytest

from cluster.errors import RaydistillError
from distill.data import texts
from distill.eval import corpora


def test_fortune_files_split_on_percent_lines():
    text = "First saying.\n%\nSecond one,\n  on two lines.\n%\n\n%\nLast"
    assert corpora.split_fortunes(text) == ["First saying.", "Second one,\n  on two lines.", "Last"]


def test_txt_and_jsonl_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("Para one.\n\nPara two.\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    found, notes = corpora.load_corpora([str(tmp_path / "*.*")], None, None)
    assert found == {"a.txt": ["Para one.\n\nPara two.\n"], "b.jsonl": ["one", "two"]} and notes == []


def test_max_bytes_keeps_whole_texts_and_cuts_a_single_long_one(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ["aaaa", "bbbb", "cccc"]))
    assert corpora.read_corpus(str(jsonl), max_bytes=9) == ["aaaa", "bbbb"]
    long = tmp_path / "long.txt"
    long.write_text("é" * 10)  # 20 bytes; a cut inside a character drops it
    assert corpora.read_corpus(str(long), max_bytes=5) == ["éé"]


def test_empty_or_missing_corpus_is_an_error_naming_the_path(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(RaydistillError, match=rf"{empty} is empty.*remove it from eval.corpora"):
        corpora.read_corpus(str(empty))
    with pytest.raises(RaydistillError, match="does not exist"):
        corpora.read_corpus(str(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(RaydistillError, match="line 1 has no string 'text' field"):
        corpora.read_corpus(str(bad))
    with pytest.raises(RaydistillError, match="matches no file"):
        corpora.load_corpora([str(tmp_path / "*.none")], None, None)


def test_missing_builtin_corpus_is_a_note_with_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(texts, "FORTUNES_DIR", str(tmp_path))
    found, notes = corpora.load_corpora([], "fortunes", 1000)
    assert found == {} and "apt-get install fortunes-min" in notes[0]
    with pytest.raises(RaydistillError, match="apt-get install fortunes-min"):
        corpora.builtin_corpus("fortunes")


def test_builtin_fortunes_corpus_is_english_text():
    if not corpora.builtin_available("fortunes"):
        from tests.conftest import missing_dependency

        missing_dependency("Debian fortunes-min is not installed (apt-get install fortunes-min; .ci/run installs it)")
    texts = corpora.builtin_corpus("fortunes", max_bytes=20_000)
    assert len(texts) > 50
    assert 15_000 < sum(len(t.encode()) for t in texts) <= 20_000
    assert sum(t.count(" the ") for t in texts) > 50  # English prose
