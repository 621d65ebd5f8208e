"""Tiny models for the student tests (CPU, a few seconds each)."""

from __future__ import annotations

import pytest
import torch

from distill.student.config import StudentConfig

# The tiny student every test shape starts from (tests/distill/training/tiny.py and the eval tests override it).
TINY_FIELDS = dict(
    vocab_size=96,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=8,
    num_experts=4,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=0,
    intermediate_size=64,
    num_experts_per_tok=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def tiny_config(**overrides) -> StudentConfig:
    """4 layers (S S S F), window 8, 4 experts of 32, GQA 4:2 heads of 16."""
    return StudentConfig(**{**TINY_FIELDS, "rope_theta": 10000.0, **overrides})


def tiny_student(seed: int = 0, **overrides):
    from distill.student.init import init_random

    return init_random(tiny_config(**overrides), seed=seed)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> str:
    """A random 6-layer Llama (SmolLM2-shaped, tiny) saved as an HF dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger than the 0.02 init so greedy tokens are not near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    out = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread():
    """Tiny matmuls on a shared 2-core machine: one thread for this package's tests only (set at
    import, it would change every later test of the session)."""
    from tests.conftest import torch_threads

    with torch_threads(1):
        yield
