"""Tiny engines for the engine tests (random models with the builtin tokenizer; a few seconds each)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer(builtin_teacher_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_teacher_dir)


@pytest.fixture(scope="session")
def tiny_llama(tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_moe_student(tokenizer):
    """A random MoE student with sliding layers (window 8) and the builtin vocabulary."""
    from distill.student.config import StudentConfig
    from distill.student.init import init_random

    config = StudentConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=8,
        num_experts=4,
        moe_intermediate_size=16,
        intermediate_size=64,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
    )
    return init_random(config, seed=3)


@pytest.fixture
def make_engine(tiny_teacher_dir):
    from serve.engine.engine import LLMEngine

    def make(**kwargs):
        kwargs.setdefault("max_batch_size", 4)
        kwargs.setdefault("prefill_chunk", 8)
        return LLMEngine.from_pretrained(tiny_teacher_dir, **kwargs)

    return make


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokens_of(outputs) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def text_of(outputs) -> str:
    return "".join(o.text for o in outputs)


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread():
    """Tiny matmuls on a shared 2-core machine: one thread for this package's tests only (set at
    import, it would change every later test of the session)."""
    from tests.conftest import torch_threads

    with torch_threads(1):
        yield
