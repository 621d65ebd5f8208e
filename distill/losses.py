"""Distillation losses on the teacher's stored top-k soft labels. Plain torch: no Ray, no I/O.

The teacher data keeps, for every completion token, the teacher's ``K`` most likely ids and their
temperature-1 log-probs. Divergences are computed over ``K + 1`` *buckets*: the ``K`` stored ids
plus one tail bucket holding all remaining mass (``TailMode.bucket``), or over the ``K`` ids with
both distributions renormalised (``TailMode.renormalize``, the tail bucket then has zero mass).
With ``K == V`` the tail is empty and the bucket KL is the full-vocabulary KL.
A temperature ``T`` tempers both distributions over the buckets (``softmax(log_mass / T)``), so
a student equal to the teacher has zero divergence at any ``T``.

Conventions (all functions): ``p`` is the teacher, ``q`` the student; rows are flattened completion
positions ``[N, ...]``; padding entries of the top-k (id ``-1`` or log-prob ``-inf``/NaN) carry
zero mass. Masked buckets hold ``p = q = 0`` and a finite log value (``LOG_FLOOR``) so that no
``0 * inf`` NaNs reach forward values or gradients.

``distillation_loss`` projects hidden states to the vocabulary ``chunk_size`` rows at a time and
computes each chunk's gradients during the forward pass (the Liger / cut-cross-entropy pattern): at
most one chunk of ``[chunk, V]`` fp32 logits is alive, and backward does not project again.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import NamedTuple

import torch
from pydantic import Field, model_validator

from cluster.errors import RaydistillError
from cluster.section import BuiltInCode, Section
from distill.onednn import project

LOG_FLOOR = -1.0e4  # log-value of masked buckets: exp() is exactly 0 in fp32/fp64, yet finite
_LN2 = math.log(2.0)


class TailMode(str, enum.Enum):
    bucket = "bucket"  # K stored ids + one bucket with the rest of the mass
    renormalize = "renormalize"  # both distributions renormalised over the K ids, no tail


class LossWeights(BuiltInCode, Section):
    """Weights of the summed per-token loss terms: ``train.stages[].loss`` in the pipeline config."""

    ce: float = Field(
        default=0.0, ge=0, allow_inf_nan=False, description="cross-entropy on the teacher's tokens (sequence-level KD)"
    )
    forward_kl: float = Field(
        default=1.0, ge=0, allow_inf_nan=False, description="KL(teacher || student) on the stored top-k + tail"
    )
    reverse_kl: float = Field(default=0.0, ge=0, allow_inf_nan=False, description="KL(student || teacher)")
    jsd: float = Field(default=0.0, ge=0, allow_inf_nan=False, description="generalised Jensen-Shannon divergence")
    jsd_beta: float = Field(default=0.5, ge=0, le=1)
    temperature: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    tail: TailMode = TailMode.bucket

    @model_validator(mode="after")
    def _some_weight(self) -> LossWeights:
        if self.ce + self.forward_kl + self.reverse_kl + self.jsd <= 0:
            raise ValueError("all loss weights are 0; give ce, forward_kl, reverse_kl or jsd a positive weight")
        return self

    def validate(self) -> None:
        """Re-check the values (construction and assignment already do): ConfigError naming the field."""
        LossWeights(**self.model_dump())

    @property
    def needs_soft_labels(self) -> bool:
        return self.forward_kl > 0 or self.reverse_kl > 0 or self.jsd > 0


@dataclasses.dataclass
class LossOutput:
    loss: torch.Tensor  # [] weighted sum of the terms, mean over counted tokens, differentiable
    parts: dict[str, torch.Tensor]  # detached [] means; "kl" = forward KL at T=1 with tail (monitor)
    top1_agreement: torch.Tensor  # [] detached share of counted positions: student argmax == teacher top-1
    tokens: int  # counted positions (token_weights > 0, or all rows)
    loss_sum: torch.Tensor | None = None  # [] sum(w * l) before the division by sum(w), differentiable


class Buckets(NamedTuple):
    """Teacher ``p`` and student ``q`` over ``K + 1`` buckets (tail last), each ``[N, K + 1]``."""

    p: torch.Tensor
    log_p: torch.Tensor
    q: torch.Tensor
    log_q: torch.Tensor


def valid_topk(topk_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` bool: stored top-k entries that carry mass (id >= 0 and a finite log-prob)."""
    return (topk_ids >= 0) & torch.isfinite(teacher_logprobs)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends.

    ``x`` is clamped to ``<= -eps`` of its dtype: top-k masses that round to >= 1 give a tail of
    ~eps (the float noise floor) instead of ``log(0) = -inf``; both branches stay finite.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _buckets(
    student_topk: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    tail: TailMode,
    temperature: float,
) -> Buckets:
    """Buckets from the T=1 student log-probs of the teacher's top-k ids ``[N, K]`` (gathered from the
    ``[N, V]`` log-probs; any value where the id is invalid) and the raw (T=1) teacher top-k, then tempered.

    Both sides are tempered the same way, *in bucket space*: the ``K + 1`` T=1 bucket log-masses
    are divided by ``T`` and re-normalised (the tail bucket is tempered as if it were one token).
    The teacher's tail is only known as one number, so this is the only tempering both sides can
    share; it keeps ``KL(p || p) = 0`` at any ``T``. (Tempering the student over the full vocabulary
    and the teacher per bucket would compare different things: KL = 1.2 at T = 2 for equal models.)
    In ``renormalize`` mode this equals softmax(logits / T) over the K ids for either side.
    """
    tail = TailMode(getattr(tail, "value", tail))
    dtype = student_topk.dtype
    valid = valid_topk(topk_ids, teacher_logprobs)
    s_k = torch.where(valid, student_topk, LOG_FLOOR)  # [N, K]
    t_k = torch.where(valid, teacher_logprobs.to(dtype), LOG_FLOOR)  # [N, K], raw T=1 log-probs
    n = t_k.shape[0]
    if tail is TailMode.bucket:
        # tail mass = 1 - top-k mass, in log space
        t_tail = _log1mexp(torch.logsumexp(t_k, dim=-1, keepdim=True))  # [N, 1]
        s_tail = _log1mexp(torch.logsumexp(s_k, dim=-1, keepdim=True))  # [N, 1]
        mask = torch.cat([valid, valid.new_ones(n, 1)], dim=-1)  # [N, K + 1]
        t_all = torch.cat([t_k, t_tail], dim=-1)
        s_all = torch.cat([s_k, s_tail], dim=-1)
    else:
        mask = torch.cat([valid, valid.new_zeros(n, 1)], dim=-1)
        t_all = torch.cat([t_k, t_k.new_zeros(n, 1)], dim=-1)
        s_all = torch.cat([s_k, s_k.new_zeros(n, 1)], dim=-1)
    if temperature != 1.0:
        t_all, s_all = t_all / temperature, s_all / temperature
    # log_softmax re-normalises: the stored top-k may sum to 1 + rounding, tempered buckets do not sum to 1
    log_p = torch.log_softmax(torch.where(mask, t_all, LOG_FLOOR), dim=-1)
    log_q = torch.log_softmax(torch.where(mask, s_all, LOG_FLOOR), dim=-1)
    log_p = torch.where(mask, log_p, LOG_FLOOR)
    log_q = torch.where(mask, log_q, LOG_FLOOR)
    zero = log_p.new_zeros(())
    return Buckets(torch.where(mask, log_p.exp(), zero), log_p, torch.where(mask, log_q.exp(), zero), log_q)


def _log_softmax32(student_logprobs: torch.Tensor) -> torch.Tensor:
    x = student_logprobs if student_logprobs.dtype in (torch.float32, torch.float64) else student_logprobs.float()
    return torch.log_softmax(x, dim=-1)


def topk_buckets(
    student_logprobs: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    tail: TailMode = TailMode.bucket,
    temperature: float = 1.0,
) -> Buckets:
    """Teacher/student distributions over the ``K + 1`` buckets, tempered in bucket space.

    student_logprobs: ``[N, V]`` T=1 log-probs (or logits: they are log-softmaxed);
    topk_ids ``[N, K]`` long, teacher_logprobs ``[N, K]`` raw T=1 teacher log-probs.
    Returns ``Buckets(p, log_p, q, log_q)``, each ``[N, K + 1]``; the tail bucket is last (zero mass
    in ``renormalize`` mode); masked buckets have zero mass and log value ``LOG_FLOOR``.
    """
    student_topk = _log_softmax32(student_logprobs).gather(1, topk_ids.clamp(min=0).long())  # [N, K]
    return _buckets(student_topk, topk_ids, teacher_logprobs, tail, temperature)


def _kl(log_a: torch.Tensor, a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``KL(a || b)`` per row ``[N]``; masked buckets have ``a = 0`` and finite logs, so add 0."""
    return (a * (log_a - log_b)).sum(dim=-1)


def _forward(b: Buckets, t: float) -> torch.Tensor:
    return _kl(b.log_p, b.p, b.log_q) * (t * t)


def _reverse(b: Buckets, t: float) -> torch.Tensor:
    return _kl(b.log_q, b.q, b.log_p) * (t * t)


def _jsd(b: Buckets, t: float, beta: float) -> torch.Tensor:
    # TRL GKDTrainer.generalized_jsd_loss: beta=0 / beta=1 are special-cased to forward / reverse KL
    # (the mixture formula itself is identically 0 there and would give no gradient).
    if beta == 0.0:
        return _forward(b, t)
    if beta == 1.0:
        return _reverse(b, t)
    log_m = torch.logaddexp(b.log_p + math.log(beta), b.log_q + math.log(1.0 - beta))
    return (beta * _kl(b.log_p, b.p, log_m) + (1.0 - beta) * _kl(b.log_q, b.q, log_m)) * (t * t)


def forward_kl(
    student_logprobs: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    tail: TailMode = TailMode.bucket,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``[N]`` KL(teacher || student) over the buckets, times ``T^2``. Inputs as ``topk_buckets``."""
    return _forward(topk_buckets(student_logprobs, topk_ids, teacher_logprobs, tail, temperature), temperature)


def reverse_kl(
    student_logprobs: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    tail: TailMode = TailMode.bucket,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``[N]`` KL(student || teacher) over the buckets, times ``T^2``."""
    return _reverse(topk_buckets(student_logprobs, topk_ids, teacher_logprobs, tail, temperature), temperature)


def generalized_jsd(
    student_logprobs: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    tail: TailMode = TailMode.bucket,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """``[N]`` TRL/GKD generalised JSD, times ``T^2``.

    ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta * p + (1 - beta) * q``
    (p teacher, q student); as in TRL, ``beta = 0`` is forward KL and ``beta = 1`` reverse KL.
    """
    b = topk_buckets(student_logprobs, topk_ids, teacher_logprobs, tail, temperature)
    return _jsd(b, temperature, beta)


def with_sampled_token(
    topk_ids: torch.Tensor, teacher_logprobs: torch.Tensor, sampled_ids: torch.Tensor, sampled_logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k plus the token the student actually sampled, for on-policy losses.

    topk_ids ``[N, K]`` / teacher_logprobs ``[N, K]``: the teacher's raw (T=1) top-k at each
    position of the student's own completion; sampled_ids ``[N]``: the token the student sampled
    there; sampled_logprobs ``[N]``: the teacher's raw log-prob of that token (``ScoredSequence.
    token_logprobs``). Returns ``([N, K + 1], [N, K + 1])``: column ``K`` holds the sampled token
    when it is not among the valid top-k ids, and padding (id -1, log-prob -inf) when it is.

    Fed to :func:`forward_kl` / :func:`reverse_kl` / :func:`generalized_jsd` (or ``distillation_loss``)
    this compares teacher and student over ``K + 2`` buckets: the top-k ids, the sampled token, and
    the rest of the vocabulary as one tail bucket. With ``K == V`` that is the exact full-vocabulary
    divergence. With ``K < V`` it is the divergence of both distributions merged into those buckets:
    by the data-processing inequality never above the full-vocabulary value, exact when at most one
    token's mass lies outside the buckets; the sampled token is always its own bucket, so a token
    the student likes and the teacher does not (the case reverse KL punishes) is scored at its true
    teacher probability instead of hiding in the tail.
    """
    if (
        topk_ids.dim() != 2
        or topk_ids.shape != teacher_logprobs.shape
        or tuple(sampled_ids.shape) != (topk_ids.shape[0],)
        or sampled_ids.shape != sampled_logprobs.shape
    ):
        raise RaydistillError(
            f"with_sampled_token: topk_ids {tuple(topk_ids.shape)} / teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)} must be [N, K], sampled_ids {tuple(sampled_ids.shape)} / "
            f"sampled_logprobs {tuple(sampled_logprobs.shape)} [N]"
        )
    sampled = sampled_ids.long()
    in_top = (valid_topk(topk_ids, teacher_logprobs) & (topk_ids.long() == sampled[:, None])).any(dim=-1)  # [N]
    extra_id = torch.where(in_top, -1, sampled).to(topk_ids.dtype)  # [N]
    extra_lp = torch.where(in_top, float("-inf"), sampled_logprobs.to(teacher_logprobs.dtype))  # [N]
    return (torch.cat([topk_ids, extra_id[:, None]], dim=1), torch.cat([teacher_logprobs, extra_lp[:, None]], dim=1))


def sampled_reverse_kl(student_token_logprobs: torch.Tensor, teacher_token_logprobs: torch.Tensor) -> torch.Tensor:
    """``[N]`` the one-sample estimate ``log q(y) - log p(y)`` of KL(student || teacher), no gradient.

    Both ``[N]``: the T=1 log-probs of the token ``y`` the student sampled, under the student and
    the teacher. Its mean over tokens sampled from ``q`` at temperature 1 is an unbiased estimate of
    the full-vocabulary reverse KL, whatever ``K`` (the "on-policy KL" of the step's metrics); at
    another sampling temperature it is the same quantity under the tempered sampling distribution.
    """
    return (student_token_logprobs.detach().float() - teacher_token_logprobs.detach().float()).reshape(-1)


def token_ce(student_logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[N]`` negative log-likelihood of ``targets [N]`` under ``student_logprobs [N, V]``."""
    return -student_logprobs.gather(1, targets.long().unsqueeze(1)).squeeze(1)


def teacher_top1(topk_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """``[N]`` the teacher's most likely stored id (the stored top-k need not be sorted); -1 if none."""
    valid = valid_topk(topk_ids, teacher_logprobs)
    best = torch.where(valid, teacher_logprobs.float(), float("-inf")).argmax(dim=-1, keepdim=True)
    ids = topk_ids.gather(1, best).squeeze(1).long()
    return torch.where(valid.any(dim=-1), ids, -1)


def _teacher_masses(
    topk_ids: torch.Tensor, teacher_logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stored top-k as fp32 log-masses: valid [N, K] bool, log-probs [N, K] (-inf where not
    valid), and the log of the tail bucket's mass [N] (1 - top-k mass)."""
    valid = valid_topk(topk_ids, teacher_logprobs)
    logp = torch.where(valid, teacher_logprobs.float(), float("-inf"))
    return valid, logp, _log1mexp(torch.logsumexp(logp, dim=-1))


def teacher_entropy(topk_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """``[N]`` the teacher's next-token entropy (nats) from its stored top-k ``[N, K]``.

    The mass outside the top-k counts as one bucket (``-m log m``), so this is a lower bound of the
    full entropy that keeps the order of easy and hard positions. No gradient (teacher data).
    """
    valid, logp, log_tail = _teacher_masses(topk_ids, teacher_logprobs)
    top = -(logp.exp() * torch.where(valid, logp, 0.0)).sum(dim=-1)  # [N]
    return top - log_tail.exp() * log_tail  # all-invalid rows: tail = 1, entropy 0


def teacher_token_nll(targets: torch.Tensor, topk_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """``[N]`` the teacher's NLL (nats) of ``targets [N]`` from its stored top-k ``[N, K]``, no gradient.

    A target outside the stored top-k gets the NLL of the whole tail bucket, a lower bound of its own
    (for sampled tokens at the usual temperatures the target is nearly always in the top-k).
    """
    valid, logp, log_tail = _teacher_masses(topk_ids, teacher_logprobs)
    hit = valid & (topk_ids == targets.long().unsqueeze(1))  # [N, K]
    in_top = torch.where(hit, logp, float("-inf")).logsumexp(dim=-1)  # [N]; -inf when not stored
    return -torch.where(hit.any(dim=-1), in_top, log_tail)


def difficulty_routing_loss(router_entropy: torch.Tensor, difficulty: torch.Tensor) -> torch.Tensor:
    """Routing entropy weighted by how easy each token is: ``mean(z * router_entropy)``, a scalar.

    router_entropy ``[N]`` (nats, with gradient to the routers; the mean over MoE layers of each
    token's routing entropy); difficulty ``[N]`` (e.g. :func:`teacher_entropy`, no gradient).
    ``z = (mean(d) - d) / std(d)``: positive for tokens easier than the batch's mean, negative for
    harder ones. Minimising it lowers routing entropy where the teacher is confident (fewer experts
    reach top-p) and raises it where the teacher is unsure (more experts), so compute follows
    difficulty. ``z`` has mean 0, so the term does not move the average routing entropy; that is
    ``router_entropy_loss_coef``'s job. 0 (still in the graph) for fewer than 2 tokens or constant d.
    """
    if router_entropy.shape != difficulty.shape or router_entropy.dim() != 1:
        raise RaydistillError(
            f"difficulty_routing_loss: router_entropy {tuple(router_entropy.shape)} and "
            f"difficulty {tuple(difficulty.shape)} must both be [N]"
        )
    d = difficulty.detach().float()
    if d.numel() < 2:
        return router_entropy.sum() * 0.0
    std = d.std()
    if not bool(std > 1e-6):
        return router_entropy.sum() * 0.0
    z = (d.mean() - d) / std  # [N]
    return (z * router_entropy.float()).mean()


# indices of the detached per-chunk sums returned next to the differentiable loss sum
_METRICS = ("ce", "forward_kl", "reverse_kl", "jsd", "kl", "top1")


def _chunk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None,
    topk_ids: torch.Tensor | None,
    teacher_logprobs: torch.Tensor | None,
    token_weights: torch.Tensor,
    w: LossWeights,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk ``[C, H]``: returns (``[]`` weighted loss sum, ``[6]`` detached weighted sums)."""
    # Autocast (bf16 training) would run this matmul in bf16: at logit scales of ~20 its rounding
    # moves the KL by ~10%. The projection and everything after it stay fp32.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _chunk_fp32(hidden, weight, targets, topk_ids, teacher_logprobs, token_weights, w)


def _chunk_fp32(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None,
    topk_ids: torch.Tensor | None,
    teacher_logprobs: torch.Tensor | None,
    token_weights: torch.Tensor,
    w: LossWeights,
) -> tuple[torch.Tensor, torch.Tensor]:
    t = float(w.temperature)
    logits = project(hidden.float(), weight.float())  # [C, V] fp32 (oneDNN on CPU)
    # T=1 log-probs of the ids the loss reads, in one gather (its backward writes the [C, V] gradient
    # once); temperature is applied in bucket space. Columns: the teacher's top-k ids, then the sampled token.
    columns = [] if topk_ids is None else [topk_ids.clamp(min=0).long()]
    if targets is not None:
        columns.append(targets.long().unsqueeze(1))
    picked = log_softmax_gather(logits, torch.cat(columns, dim=1))  # [C, K (+ 1)]
    s_topk = None if topk_ids is None else picked[:, : topk_ids.shape[1]]
    terms: dict[str, torch.Tensor] = {}
    if w.ce > 0:
        terms["ce"] = -picked[:, -1]  # CE on the sampled tokens is always at T = 1
    b = None
    if topk_ids is not None:
        if w.needs_soft_labels:
            b = _buckets(s_topk, topk_ids, teacher_logprobs, w.tail, t)
        if w.forward_kl > 0:
            terms["forward_kl"] = _forward(b, t)
        if w.reverse_kl > 0:
            terms["reverse_kl"] = _reverse(b, t)
        if w.jsd > 0:
            terms["jsd"] = _jsd(b, t, float(w.jsd_beta))
    loss = logits.new_zeros(())
    for name, per_tok in terms.items():
        loss = loss + getattr(w, name) * (per_tok * token_weights).sum()
    with torch.no_grad():
        sums = logits.new_zeros(len(_METRICS))
        for name, per_tok in terms.items():
            sums[_METRICS.index(name)] = (per_tok * token_weights).sum()
        counted = token_weights > 0
        if topk_ids is not None:
            if "forward_kl" in terms and t == 1.0 and w.tail is TailMode.bucket:
                kl = terms["forward_kl"]
            else:
                kl = _forward(_buckets(s_topk, topk_ids, teacher_logprobs, TailMode.bucket, 1.0), 1.0)
            sums[_METRICS.index("kl")] = (kl * token_weights).sum()
            ref = teacher_top1(topk_ids, teacher_logprobs)
        else:
            ref = targets.long()  # no soft labels: agreement with the teacher's sampled token
        sums[_METRICS.index("top1")] = ((logits.argmax(dim=-1) == ref) & counted).sum()
    return loss, sums


class _LogSoftmaxGather(torch.autograd.Function):
    """``log_softmax(logits)`` at ``index``: logits ``[C, V]``, index ``[C, J]`` -> ``[C, J]``.

    The same values and gradient as ``torch.log_softmax(logits, -1).gather(1, index)``; backward writes
    the gradient once, ``scatter(g) - softmax(logits) * sum(g)``, instead of a zero-filled ``[C, V]`` per
    gather, their sum and the log-softmax backward (at [340, 49152] on 2 threads: ~60 ms against ~155).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(logits, dim=-1)  # [C, V]
        ctx.save_for_backward(logprobs, index)
        return logprobs.gather(1, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logprobs, index = ctx.saved_tensors
        d_logits = torch.exp(logprobs).mul_(-grad.sum(dim=-1, keepdim=True))  # [C, V]
        return d_logits.scatter_add_(1, index, grad), None


def log_softmax_gather(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[C, J]`` = ``log_softmax(logits [C, V], -1)`` gathered at ``index [C, J]`` (long), differentiable
    in ``logits`` (see :class:`_LogSoftmaxGather`)."""
    return _LogSoftmaxGather.apply(logits, index)


class _PrecomputedGrad(torch.autograd.Function):
    """``loss`` (a scalar already computed from ``hidden`` and ``weight``) as a differentiable function of
    them, with its gradients given: d_hidden ``[N, H]``, d_weight ``[V, H]`` (either None when not needed).

    Backward scales them by the incoming gradient, which is exact because the loss is a scalar."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, d_hidden, d_weight):
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.save_for_backward(d_hidden, d_weight)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        d_hidden, d_weight = ctx.saved_tensors
        gh = None if d_hidden is None else (d_hidden * grad).to(ctx.hidden_dtype)
        gw = None if d_weight is None else (d_weight * grad).to(ctx.weight_dtype)
        return None, gh, gw, None, None


def distillation_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor | None,
    topk_ids: torch.Tensor | None,
    teacher_logprobs: torch.Tensor | None,
    weights: LossWeights,
    chunk_size: int = 1024,
    token_weights: torch.Tensor | None = None,
) -> LossOutput:
    """Weighted KD loss over flattened completion positions, projecting ``chunk_size`` rows at a time.

    hidden ``[N, H]`` (any float dtype): state at the position before completion token n;
    lm_head_weight ``[V, H]``; targets ``[N]`` the sampled completion tokens (needed when ce > 0);
    topk_ids / teacher_logprobs ``[N, K]`` the teacher's stored top-k (needed for KL/JSD terms);
    token_weights ``[N]`` optional per-token weights (loss = sum(w * l) / sum(w)).
    Each chunk's logits ``[C, V]`` are fp32. With gradients on, each chunk's gradients for ``hidden``
    (and ``lm_head_weight`` when it requires grad) are computed right after its loss, during the
    forward pass, and its logits freed; backward only scales them (:class:`_PrecomputedGrad`). That
    bounds memory like activation checkpointing did, without a second ``[C, H] x [H, V]`` projection
    in backward (15% of a quickstart training step on 2 CPU cores).
    """
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or hidden.shape[1] != lm_head_weight.shape[1]:
        raise RaydistillError(
            f"distillation_loss: hidden {tuple(hidden.shape)} must be [N, H] and "
            f"lm_head_weight {tuple(lm_head_weight.shape)} [V, H] with the same H"
        )
    n = hidden.shape[0]
    if chunk_size < 1:
        raise RaydistillError(f"distillation_loss: chunk_size must be >= 1, got {chunk_size}")
    if weights.ce > 0 and (targets is None or tuple(targets.shape) != (n,)):
        raise RaydistillError(
            f"distillation_loss: loss.ce > 0 needs targets of shape [{n}], got "
            f"{None if targets is None else tuple(targets.shape)}"
        )
    if weights.needs_soft_labels and (topk_ids is None or teacher_logprobs is None):
        raise RaydistillError(
            "distillation_loss: forward_kl/reverse_kl/jsd > 0 need the teacher's top-k "
            "(topk_ids, teacher_logprobs); set them to 0 or use data with soft labels"
        )
    if topk_ids is not None and (
        teacher_logprobs is None
        or topk_ids.shape != teacher_logprobs.shape
        or topk_ids.dim() != 2
        or topk_ids.shape[0] != n
    ):
        raise RaydistillError(
            f"distillation_loss: topk_ids and teacher_logprobs must both be [{n}, K], got "
            f"{tuple(topk_ids.shape)} and "
            f"{None if teacher_logprobs is None else tuple(teacher_logprobs.shape)}"
        )
    if topk_ids is None and targets is None:
        raise RaydistillError("distillation_loss: give targets or the teacher's top-k")
    if token_weights is None:
        token_weights = hidden.new_ones(n, dtype=torch.float32)
    elif tuple(token_weights.shape) != (n,):
        raise RaydistillError(f"distillation_loss: token_weights must be [{n}], got {tuple(token_weights.shape)}")
    token_weights = token_weights.float()

    weight = lm_head_weight.float()  # cast once, outside the chunks
    grad_hidden = torch.is_grad_enabled() and hidden.requires_grad
    grad_weight = torch.is_grad_enabled() and lm_head_weight.requires_grad
    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    sums = hidden.new_zeros(len(_METRICS), dtype=torch.float32)
    d_hidden = [] if grad_hidden else None  # per chunk [C, H] fp32
    d_weight = torch.zeros_like(weight, dtype=torch.float32) if grad_weight else None  # [V, H]
    for start in range(0, n, chunk_size):
        sl = slice(start, start + chunk_size)
        rest = (
            None if targets is None else targets[sl],
            None if topk_ids is None else topk_ids[sl],
            None if teacher_logprobs is None else teacher_logprobs[sl],
            token_weights[sl],
            weights,
        )
        if not (grad_hidden or grad_weight):
            chunk_loss, chunk_sums = _chunk(hidden[sl], weight, *rest)
        else:
            h = hidden[sl].detach().requires_grad_(grad_hidden)
            wt = weight.detach().requires_grad_(grad_weight)
            # autocast off for the backward too: it would run the gradient matmuls in bf16
            with torch.enable_grad(), torch.autocast(device_type=hidden.device.type, enabled=False):
                chunk_loss, chunk_sums = _chunk(h, wt, *rest)
                leaves = [t for t in (h, wt) if t.requires_grad]
                grads = list(torch.autograd.grad(chunk_loss, leaves))  # frees this chunk's graph and logits
            if grad_hidden:
                d_hidden.append(grads.pop(0).float())
            if grad_weight:
                d_weight += grads.pop(0)
            chunk_loss = chunk_loss.detach()
        loss_sum = loss_sum + chunk_loss
        sums = sums + chunk_sums.detach()
    if (grad_hidden or grad_weight) and n:
        loss_sum = _PrecomputedGrad.apply(
            loss_sum, hidden, lm_head_weight, torch.cat(d_hidden) if grad_hidden else None, d_weight
        )

    denom = token_weights.sum()
    tokens = int((token_weights > 0).sum())
    if float(denom) <= 0:
        # nothing counted: a zero that still connects to the graph so backward() works
        zero = hidden.sum().float() * 0.0 + lm_head_weight.sum().float() * 0.0
        parts = {k: zero.detach() for k in _parts_keys(weights, topk_ids is not None)}
        return LossOutput(zero, parts, zero.detach(), 0, zero)
    parts = {k: sums[_METRICS.index(k)] / denom for k in _parts_keys(weights, topk_ids is not None)}
    top1 = sums[_METRICS.index("top1")] / max(tokens, 1)
    return LossOutput(loss_sum / denom, parts, top1, tokens, loss_sum)


def _parts_keys(w: LossWeights, has_topk: bool) -> list[str]:
    keys = [k for k in ("ce", "forward_kl", "reverse_kl", "jsd") if getattr(w, k) > 0]
    return keys + (["kl"] if has_topk else [])
