"""The builtin teacher's one-off GGUF conversion: a complete cache dir, and a quiet console."""

from __future__ import annotations

import sys

import pytest

from distill.teacher.sources import CACHE_COMPLETE, GGUF_PROGRESS, builtin_gguf, convert_gguf


def test_the_conversion_writes_a_complete_dir_without_transformers_progress_bar(tmp_path, capsys):
    out = convert_gguf(builtin_gguf(), tmp_path / "smollm2")
    assert (out / CACHE_COMPLETE).exists() and (out / "config.json").exists()
    assert list(out.glob("*.safetensors"))
    err = capsys.readouterr().err
    assert GGUF_PROGRESS not in err


def test_other_output_of_the_conversion_is_passed_on_even_when_it_fails(tmp_path, capsys, monkeypatch):
    import transformers

    def noisy(*args, **kwargs):
        print(f"{GGUF_PROGRESS}:  50%|#####     | 136/272\r", end="", file=sys.stderr)
        print("UserWarning: something the user should see", file=sys.stderr)
        raise OSError("unreadable GGUF")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", noisy)
    with pytest.raises(OSError, match="unreadable GGUF"):
        convert_gguf(builtin_gguf(), tmp_path / "smollm2")
    err = capsys.readouterr().err
    assert "UserWarning: something the user should see" in err
    assert GGUF_PROGRESS not in err
    assert not (tmp_path / "smollm2").exists()
