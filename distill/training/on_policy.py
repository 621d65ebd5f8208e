"""On-policy distillation pieces: the student samples, the teacher labels, a batch for the loss.

Legend: ``B`` prompts, ``P_i`` prompt length, ``T_i`` sampled completion length, ``L`` padded row
width, ``N = sum(T_i)`` completion positions, ``K`` teacher top-k, ``V`` vocab.

The student samples on the training worker with its own prefill + decode (``CausalLMMixin``), not
through the serving engine: the weights are the ones being trained (no copy to refresh, every
sample comes from the current policy), and ``distill.training`` may not import ``serve``. The
teacher scores the samples in a :class:`distill.teacher.service.LabelService` (Ray actors) and
:func:`packed_batch` turns the result into the same ``PackedBatch`` that offline KD trains on, with
the sampled token added to each position's top-k (:func:`distill.losses.with_sampled_token`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from distill.losses import sampled_reverse_kl, with_sampled_token
from distill.teacher.base import ScoredSequence
from distill.teacher.service import LabelService
from distill.training.data import PackedBatch
from distill.training.section import OnPolicy


@dataclasses.dataclass
class Samples:
    prompts: list[list[int]]  # [B] prompt ids
    completions: list[list[int]]  # [B] sampled ids, T_i each (includes the end token when one was sampled)
    student_logprobs: list[np.ndarray]  # [B] each [T_i] float32: T=1 student log-prob of the sampled token
    seconds: float

    @property
    def tokens(self) -> int:
        return sum(len(c) for c in self.completions)


@torch.no_grad()
def sample(
    student: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_ids: set[int],
    pad_id: int = 0,
    generator: torch.Generator | None = None,
) -> Samples:
    """Sample one completion per prompt from ``student`` (a ``CausalLMMixin``: prefill / decode_step).

    Left-pads the prompts ``[B, P]``, then decodes up to ``max_new_tokens`` steps; a row stops after
    an ``eos_ids`` token. ``temperature`` 0 is greedy. Also returns the student's temperature-1
    log-prob of each sampled token (for the one-sample on-policy KL).
    """
    t0 = time.perf_counter()
    was_training = student.training
    student.eval()
    device = student.lm_head.weight.device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)  # [B, P]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)  # [B, P]
    cache = student.new_cache(len(prompts), max_seq_len=width + max_new_tokens)
    logits, cache = student.prefill(ids, mask, cache=cache)  # [B, V]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids), device=device, dtype=torch.long)
    tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        lp = torch.log_softmax(logits.float(), dim=-1)  # [B, V] T=1
        if temperature <= 0:
            tok = lp.argmax(dim=-1)
        else:
            tok = torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1, generator=generator)[:, 0]
        tokens.append(torch.where(done, -1, tok))
        logprobs.append(lp.gather(1, tok[:, None])[:, 0])
        done = done | torch.isin(tok, eos)
        if bool(done.all()):
            break
        logits = student.decode_step(tok, cache)
    student.train(was_training)
    steps = torch.stack(tokens, dim=1).cpu()  # [B, T], -1 after a row ended
    step_lp = torch.stack(logprobs, dim=1).cpu()  # [B, T]
    completions, student_lp = [], []
    for row in range(len(prompts)):
        n = int((steps[row] >= 0).sum())
        completions.append(steps[row, :n].tolist())
        student_lp.append(step_lp[row, :n].numpy().astype(np.float32))
    return Samples([list(p) for p in prompts], completions, student_lp, time.perf_counter() - t0)


def packed_batch(samples: Samples, labels: Sequence[ScoredSequence], pad_id: int = 0) -> PackedBatch:
    """One right-padded row per sample ``[B, L]`` with its teacher labels as a ``PackedBatch``.

    Targets ``[N]`` are the sampled tokens; ``topk_ids`` / ``topk_logprobs`` ``[N, K + 1]`` the
    teacher's top-k plus the sampled token (see :func:`~distill.losses.with_sampled_token`).
    Samples with an empty completion contribute no positions.
    """
    rows = [p + c for p, c in zip(samples.prompts, samples.completions)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.bool)
    pred, targets, top_ids, top_lp, tok_lp = [], [], [], [], []
    for b, (prompt, completion, scored) in enumerate(zip(samples.prompts, samples.completions, labels)):
        row = prompt + completion
        input_ids[b, : len(row)] = torch.tensor(row)
        attention[b, : len(row)] = True
        if not completion:
            continue
        if scored.topk_ids.shape[0] != len(completion):
            raise ValueError(
                f"labels for sample {b}: {scored.topk_ids.shape[0]} positions, completion {len(completion)}"
            )
        pred.extend(b * width + len(prompt) - 1 + t for t in range(len(completion)))  # position before token t
        targets.extend(completion)
        top_ids.append(scored.topk_ids)
        top_lp.append(scored.topk_logprobs)
        tok_lp.append(scored.token_logprobs)
    targets_t = torch.tensor(targets, dtype=torch.long)  # [N]
    ids, lps = with_sampled_token(
        torch.from_numpy(np.concatenate(top_ids)).long(),
        torch.from_numpy(np.concatenate(top_lp)).float(),
        targets_t,
        torch.from_numpy(np.concatenate(tok_lp)).float(),
    )  # [N, K + 1] each
    return PackedBatch(
        input_ids=input_ids,
        position_ids=torch.arange(width).expand(len(rows), width).clone(),
        attention_mask=attention,
        pred_index=torch.tensor(pred, dtype=torch.long),
        targets=targets_t,
        topk_ids=ids,
        topk_logprobs=lps,
        rows=len(rows),
        prompt_ids=[f"on_policy:{b}" for b in range(len(rows))],
    )


@dataclasses.dataclass
class OnPolicyStats:
    """Per-window sums for the metrics: time split, labelled tokens, the one-sample on-policy KL."""

    sample_s: float = 0.0
    label_s: float = 0.0
    tokens: int = 0  # completion positions sampled and labelled
    kl_sum: float = 0.0  # sum over sampled tokens of log q(y) - log p(y)
    retries: int = 0

    def metrics(self, train_s: float) -> dict[str, float]:
        return {
            "sample_s": round(self.sample_s, 4),
            "label_s": round(self.label_s, 4),
            "train_s": round(train_s, 4),
            "labelled_tokens": self.tokens,
            "labelled_tokens_per_s": self.tokens / self.label_s if self.label_s > 0 else 0.0,
            "kl_sampled": self.kl_sum / self.tokens if self.tokens else 0.0,
            "label_retries": self.retries,
        }


def on_policy_batch(
    student: nn.Module,
    rows: Sequence[dict],
    cfg: OnPolicy,
    labeller: LabelService,
    *,
    eos_ids: set[int],
    pad_id: int,
    stats: OnPolicyStats,
    generator: torch.Generator | None = None,
) -> PackedBatch:
    """Sample completions for the prompts of ``rows`` (``input_ids[:prompt_len]``), label them, pack them."""
    prompts = [[int(t) for t in r["input_ids"][: int(r["prompt_len"])]] for r in rows]
    samples = sample(
        student,
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        eos_ids=eos_ids,
        pad_id=pad_id,
        generator=generator,
    )
    labels = labeller.score(
        [p + c for p, c in zip(samples.prompts, samples.completions)], [len(p) for p in samples.prompts], cfg.k
    )
    stats.sample_s += samples.seconds
    stats.label_s += labels.seconds
    stats.tokens += labels.tokens
    stats.retries += labels.retries
    student_lp = torch.from_numpy(np.concatenate(samples.student_logprobs))
    teacher_lp = torch.from_numpy(np.concatenate([s.token_logprobs for s in labels.scored]))
    stats.kl_sum += float(sampled_reverse_kl(student_lp, teacher_lp).sum())
    return packed_batch(samples, labels.scored, pad_id)
