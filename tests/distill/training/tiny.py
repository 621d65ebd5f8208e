"""Tiny students and hand-made packed batches for step-level training tests (no data files, no Ray)."""

from __future__ import annotations

import numpy as np
import torch

from distill.student.config import StudentConfig
from distill.training.data import PackedBatch, collate
from tests.distill.student.conftest import TINY_FIELDS

VOCAB, K = 64, 4


def tiny_model(seed: int = 0, **overrides):
    """2 layers (both MoE), 4 experts of 16, vocab 64; fp32, train mode."""
    from distill.student.init import init_random

    smaller = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    smaller.update(moe_intermediate_size=16, intermediate_size=32, max_position_embeddings=256)
    return init_random(StudentConfig(**{**TINY_FIELDS, **smaller, **overrides}), seed=seed).train()


def row(seed: int, prompt_len: int, completion_len: int) -> dict:
    """A random row with top-K soft labels (sorted teacher log-probs of a random distribution)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, prompt_len + completion_len)
    logits = rng.normal(size=(completion_len, VOCAB)) * 3
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = np.argsort(-logprobs, axis=-1)[:, :K]
    return {
        "prompt_id": f"p{seed}",
        "input_ids": ids,
        "prompt_len": prompt_len,
        "topk_ids": top.astype(np.int64),
        "topk_logprobs": np.take_along_axis(logprobs, top, -1).astype(np.float32),
    }


def batch(sequences: list[list[dict]], seq_len: int = 32) -> PackedBatch:
    return collate(sequences, seq_len)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
