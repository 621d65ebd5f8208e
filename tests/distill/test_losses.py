"""distill/losses.py against naive fp64 references."""

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cluster.errors import ConfigError, RaydistillError
from distill.losses import (
    LossWeights,
    TailMode,
    distillation_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    sampled_reverse_kl,
    token_ce,
    topk_buckets,
    with_sampled_token,
)

N, V, K = 7, 50, 6


def _data(seed=0, n=N, v=V, k=K, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=g, dtype=dtype) * 2
    teacher = torch.log_softmax(torch.randn(n, v, generator=g, dtype=dtype) * 2, -1)
    tlp, ids = teacher.topk(k, dim=-1)
    return student, teacher, ids, tlp


def _ref_buckets(student_logits, ids, tlp, t=1.0, tail=True):
    """Naive reference: T=1 probabilities, tail = 1 - sum, then both sides tempered over the buckets."""
    q = torch.softmax(student_logits, -1).gather(1, ids)
    p = tlp.exp()
    if tail:
        p = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)
        q = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
    p, q = p ** (1 / t), q ** (1 / t)
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def _kl(a, b):
    return (a * (a.log() - b.log())).sum(-1)


def test_full_vocab_kl_equals_bucket_kl_when_k_is_v():
    student, teacher, ids, tlp = _data(k=V)
    full = _kl(teacher.exp(), torch.softmax(student, -1))
    got = forward_kl(torch.log_softmax(student, -1), ids, tlp, TailMode.bucket)
    torch.testing.assert_close(got, full, atol=1e-10, rtol=1e-8)
    assert (full > 0.1).all()  # a non-trivial comparison
    b = topk_buckets(student, ids, tlp)
    assert b.p.shape == (N, V + 1) and b.p[:, -1].abs().max() < 1e-12 and b.q[:, -1].abs().max() < 1e-12


@pytest.mark.parametrize("tail", [TailMode.bucket, TailMode.renormalize])
@pytest.mark.parametrize("t", [1.0, 2.0, 0.7])
def test_kl_jsd_match_reference(tail, t):
    student, _, ids, tlp = _data(seed=1)
    p, q = _ref_buckets(student, ids, tlp, t, tail is TailMode.bucket)
    fkl = forward_kl(torch.log_softmax(student, -1), ids, tlp, tail, t)
    torch.testing.assert_close(fkl, t * t * _kl(p, q))
    torch.testing.assert_close(reverse_kl(student, ids, tlp, tail, t), t * t * _kl(q, p))
    beta = 0.3
    m = beta * p + (1 - beta) * q
    torch.testing.assert_close(
        generalized_jsd(student, ids, tlp, tail, t, beta=beta), t * t * (beta * _kl(p, m) + (1 - beta) * _kl(q, m))
    )
    b = topk_buckets(student, ids, tlp, tail, t)
    torch.testing.assert_close(b.p.sum(-1), torch.ones(N, dtype=torch.float64))
    torch.testing.assert_close(b.q.sum(-1), torch.ones(N, dtype=torch.float64))
    if tail is TailMode.renormalize:
        assert (b.p[:, -1] == 0).all() and (b.q[:, -1] == 0).all()
    else:
        assert (b.p[:, -1] > 0.01).all()  # K << V: the tail holds real mass


@pytest.mark.parametrize("tail", [TailMode.bucket, TailMode.renormalize])
@pytest.mark.parametrize("t", [0.5, 2.0, 4.0])
def test_divergences_vanish_when_the_student_is_the_teacher_at_any_temperature(tail, t):
    _, teacher, ids, tlp = _data(seed=8)
    for fn in (forward_kl, reverse_kl, generalized_jsd):
        torch.testing.assert_close(
            fn(teacher, ids, tlp, tail, t), torch.zeros(N, dtype=torch.float64), atol=1e-10, rtol=0
        )
    assert forward_kl(teacher + 1.0, ids, tlp, tail, t).abs().max() < 1e-10  # logits: any offset
    lw = LossWeights(forward_kl=1.0, reverse_kl=1.0, jsd=1.0, temperature=t, tail=tail)  # the chunked loss too
    out = distillation_loss(teacher.float(), torch.eye(V), None, ids, tlp.float(), lw, chunk_size=4)
    assert abs(out.loss.item()) < 1e-5 and abs(out.parts["kl"].item()) < 1e-5
    assert forward_kl(teacher.flip(-1), ids, tlp, tail, t).min() > 0.01  # not trivially 0


def test_jsd_limits_and_symmetry():
    student, teacher, ids, tlp = _data(seed=2)
    args = (torch.log_softmax(student, -1), ids, tlp)
    # TRL: beta=0 is forward KL, beta=1 reverse KL
    torch.testing.assert_close(generalized_jsd(*args, beta=0.0), forward_kl(*args))
    torch.testing.assert_close(generalized_jsd(*args, beta=1.0), reverse_kl(*args))
    # swapping teacher and student with beta -> 1 - beta gives the same value (K = V, both exact)
    s, t, ids_v, tlp_v = _data(seed=3, k=V)
    ls = torch.log_softmax(s, -1)
    swapped = generalized_jsd(t, ids_v, ls.gather(1, ids_v), beta=0.7)  # teacher as "student" and back
    torch.testing.assert_close(generalized_jsd(ls, ids_v, tlp_v, beta=0.3), swapped, atol=1e-9, rtol=1e-7)
    # classic JSD (beta=0.5) is bounded by log 2, and zero for identical distributions
    assert (generalized_jsd(*args, beta=0.5) <= math.log(2) + 1e-12).all()
    same = generalized_jsd(teacher, teacher.topk(K, -1).indices, teacher.topk(K, -1).values, beta=0.5)
    torch.testing.assert_close(same, torch.zeros(N, dtype=torch.float64), atol=1e-12, rtol=0)


def test_padding_in_topk_has_zero_mass():
    student, _, ids, tlp = _data(seed=4)
    ids_pad, tlp_pad = ids.clone(), tlp.clone()
    ids_pad[:, -2:] = -1
    tlp_pad[:, -1] = float("-inf")
    ref = forward_kl(student, ids[:, :-2], tlp[:, :-2])
    got = forward_kl(student, ids_pad, tlp_pad)
    torch.testing.assert_close(got, ref)
    assert torch.isfinite(reverse_kl(student, ids_pad, tlp_pad, TailMode.renormalize)).all()


def test_token_ce_matches_cross_entropy():
    student, _, _, _ = _data(seed=5)
    targets = torch.randint(0, V, (N,))
    torch.testing.assert_close(
        token_ce(torch.log_softmax(student, -1), targets), F.cross_entropy(student, targets, reduction="none")
    )


def _reference_loss(hidden, w, targets, ids, tlp, lw, token_weights):
    logits = hidden.double() @ w.double().t()
    per = lw.ce * F.cross_entropy(logits, targets, reduction="none")
    p, q = _ref_buckets(logits, ids, tlp.double(), lw.temperature, lw.tail is TailMode.bucket)
    t2 = lw.temperature**2
    m = lw.jsd_beta * p + (1 - lw.jsd_beta) * q
    per = per + t2 * (
        lw.forward_kl * _kl(p, q)
        + lw.reverse_kl * _kl(q, p)
        + lw.jsd * (lw.jsd_beta * _kl(p, m) + (1 - lw.jsd_beta) * _kl(q, m))
    )
    return (per * token_weights).sum() / token_weights.sum()


@pytest.mark.parametrize("chunk", [4, 5, 64])
@pytest.mark.parametrize(
    "lw",
    [
        LossWeights(),
        LossWeights(ce=0.5, forward_kl=1.0, reverse_kl=0.3, jsd=0.2, jsd_beta=0.4, temperature=2.0),
        LossWeights(forward_kl=1.0, ce=0.1, tail=TailMode.renormalize),
    ],
)
def test_chunked_loss_and_grads_match_unchunked_reference(chunk, lw):
    g = torch.Generator().manual_seed(6)
    n, h, v, k = 20, 8, 40, 5
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    w = (torch.randn(v, h, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    tlp, ids = torch.log_softmax(torch.randn(n, v, generator=g) * 2, -1).topk(k, dim=-1)
    tw = torch.rand(n, generator=g)
    out = distillation_loss(hidden, w, targets, ids, tlp, lw, chunk_size=chunk, token_weights=tw)
    out.loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _reference_loss(h64, w64, targets, ids, tlp, lw, tw.double())
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=1e-4)
    expected_parts = {k for k in ("ce", "forward_kl", "reverse_kl", "jsd") if getattr(lw, k) > 0} | {"kl"}
    assert set(out.parts) == expected_parts and out.tokens == n
    assert all(not p.requires_grad and p.shape == () for p in out.parts.values())
    # the "kl" monitor is forward KL with tail at T = 1, whatever the training terms are
    p1, q1 = _ref_buckets(h64.detach() @ w64.detach().t(), ids, tlp.double())
    torch.testing.assert_close(out.parts["kl"].double(), (_kl(p1, q1) * tw).sum() / tw.sum(), atol=1e-5, rtol=1e-5)


def test_top1_agreement_and_token_weights():
    v, h = 6, 6
    hidden = torch.eye(h)[:4] * 10  # student argmax of row i is token i (lm_head = identity)
    w = torch.eye(v)
    ids = torch.tensor([[0, 5], [4, 1], [2, 3], [1, 0]])  # teacher top-1 ids: 0, 1 (unsorted), 2, 0
    tlp = torch.log(torch.tensor([[0.6, 0.1], [0.2, 0.5], [0.7, 0.1], [0.1, 0.8]]))
    targets = torch.tensor([0, 1, 2, 3])
    out = distillation_loss(hidden, w, targets, ids, tlp, LossWeights(), chunk_size=3)
    assert out.tokens == 4 and out.top1_agreement.item() == pytest.approx(0.75)
    tw = torch.tensor([1.0, 1.0, 0.0, 1.0])
    weighted = distillation_loss(hidden, w, targets, ids, tlp, LossWeights(), token_weights=tw)
    assert weighted.tokens == 3 and weighted.top1_agreement.item() == pytest.approx(2 / 3)
    per = forward_kl(torch.log_softmax(hidden @ w.t(), -1), ids, tlp)
    assert weighted.loss.item() == pytest.approx(((per * tw).sum() / 3).item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(per.mean().item(), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(forward_kl=-1.0), "forward_kl"),
        (dict(ce=float("nan")), "ce"),
        (dict(forward_kl=0.0), "all loss weights"),
        (dict(jsd_beta=1.5), "jsd_beta"),
        (dict(temperature=0.0), "temperature"),
        (dict(tail="top"), "tail"),
    ],
)
def test_loss_weights_validate_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        LossWeights(**kwargs).validate()
    LossWeights(tail="renormalize").validate()  # strings coerce
    assert LossWeights(ce=1.0, forward_kl=0.0).needs_soft_labels is False


def test_missing_soft_labels_is_an_error():
    with pytest.raises(RaydistillError, match="top-k"):
        distillation_loss(
            torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), None, None, LossWeights()
        )


def test_no_full_logits_kept_for_backward_and_no_projection_in_backward():
    """Each chunk's gradients are taken in the forward pass: once it returns, nothing of logits size is
    kept for backward, and backward runs no matmul (no second projection to the vocabulary)."""
    n, h, v, chunk = 64, 8, 40, 16
    hidden = torch.randn(n, h, requires_grad=True)
    w = torch.randn(v, h, requires_grad=True)
    tlp, ids = torch.log_softmax(torch.randn(n, v), -1).topk(4, dim=-1)
    saved = []  # weak references: a chunk's own graph saves logits-size tensors, then frees them
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(weakref.ref(x)) or x, lambda x: x):
        out = distillation_loss(hidden, w, ids[:, 0], ids, tlp, LossWeights(ce=1.0), chunk_size=chunk)
    gc.collect()
    alive = [ref().numel() for ref in saved if ref() is not None]
    assert saved and max(alive, default=0) < chunk * v

    class CountMatmuls(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                CountMatmuls.calls += 1
            return func(*args, **(kwargs or {}))

    with CountMatmuls():
        out.loss.backward()
    assert CountMatmuls.calls == 0 and hidden.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


def test_projection_stays_fp32_under_bf16_autocast():
    """The "fp32" logits really are: under bf16 autocast the loss and grads equal the fp32 ones."""
    g = torch.Generator().manual_seed(9)
    n, h, v, k = 32, 64, 256, 8
    hidden = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * 0.6  # logits of std ~5, max ~20: a trained LM's scale
    teacher = torch.log_softmax(hidden @ w.t() + torch.randn(n, v, generator=g), -1)
    tlp, ids = teacher.topk(k, dim=-1)
    lw = LossWeights(forward_kl=1.0, ce=0.5)
    targets = ids[:, 0]

    def run(autocast: bool):
        hd, wd = hidden.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = distillation_loss(hd, wd, targets, ids, tlp, lw, chunk_size=8)
        out.loss.backward()
        return out, hd.grad, wd.grad

    ref, ref_h, ref_w = run(False)
    got, got_h, got_w = run(True)
    assert got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.parts["kl"], ref.parts["kl"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-4, atol=1e-6)


def test_teacher_entropy_is_exact_with_the_whole_vocabulary_and_a_lower_bound_from_the_top_k():
    from distill.losses import teacher_entropy

    torch.manual_seed(0)
    logp = F.log_softmax(torch.randn(6, 10) * 2, dim=-1)  # [N, V]
    full = -(logp.exp() * logp).sum(-1)
    ids = torch.arange(10).expand(6, 10)
    torch.testing.assert_close(teacher_entropy(ids, logp), full, rtol=1e-5, atol=1e-5)
    top, top_ids = logp.topk(4, dim=-1)
    partial = teacher_entropy(top_ids, top)
    assert bool((partial <= full + 1e-6).all()) and bool((partial > 0).all())
    more = teacher_entropy(*reversed(logp.topk(8, dim=-1)))
    assert bool((partial <= more + 1e-6).all()) and bool((more <= full + 1e-6).all())  # tighter with more of k
    padded_ids = torch.cat([top_ids, torch.full((6, 2), -1)], dim=1)  # padding entries carry no mass
    padded = torch.cat([top, torch.full((6, 2), float("-inf"))], dim=1)
    torch.testing.assert_close(teacher_entropy(padded_ids, padded), partial)


def test_difficulty_routing_loss_lowers_routing_entropy_of_easy_tokens_and_raises_it_for_hard_ones():
    from distill.losses import difficulty_routing_loss

    torch.manual_seed(0)
    logits = torch.randn(4, 8).requires_grad_()  # 4 tokens, 8 experts
    difficulty = torch.tensor([0.1, 0.5, 2.0, 3.0])  # teacher entropy: two easy tokens, two hard ones
    opt = torch.optim.SGD([logits], lr=0.5)
    start = None
    for _ in range(20):
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)  # [N]
        start = entropy.detach() if start is None else start
        opt.zero_grad()
        difficulty_routing_loss(entropy, difficulty).backward()
        opt.step()
    end = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).detach()
    assert bool((end[:2] < start[:2] - 0.1).all())  # easy tokens: sharper routing (fewer experts reach p)
    assert bool((end[2:] > start[2:] + 0.01).all())  # hard tokens: flatter routing (more experts)
    # zero-mean weights: a batch where every token is equally hard contributes nothing
    flat = difficulty_routing_loss(torch.rand(5, requires_grad=True), torch.full((5,), 1.3))
    assert float(flat.detach()) == 0.0
    with pytest.raises(RaydistillError, match="must both be"):
        difficulty_routing_loss(torch.rand(5), torch.rand(4))


def test_difficulty_routing_loss_raises_routing_entropy_of_hard_tokens():
    from distill.losses import difficulty_routing_loss

    logits = torch.tensor([[3.0, 0, 0, 0]] * 4, requires_grad=True)  # every token confidently routed
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    difficulty_routing_loss(entropy, torch.tensor([0.1, 0.2, 2.0, 3.0])).backward()
    # gradient descent moves along -grad: hard tokens' top logit goes down (flatter routing), easy ones' up
    assert bool((logits.grad[2:, 0] > 0).all()) and bool((logits.grad[:2, 0] < 0).all())


def test_teacher_token_nll_reads_the_stored_log_prob_and_falls_back_to_the_tail():
    from distill.losses import teacher_token_nll

    ids = torch.tensor([[4, 9, -1], [4, 9, 2]])
    logp = torch.log(torch.tensor([[0.5, 0.3, 1.0], [0.6, 0.2, 0.1]]))
    logp[0, 2] = float("-inf")  # padding entry
    nll = teacher_token_nll(torch.tensor([9, 7]), ids, logp)
    # row 0: the target is stored (p = 0.3); row 1: it is not, so the tail bucket (1 - 0.9) stands in
    torch.testing.assert_close(nll, torch.tensor([-math.log(0.3), -math.log(0.1)]), rtol=1e-5, atol=1e-5)


# --- on-policy: the student's own sampled tokens, scored by the teacher ---------------------------


def _on_policy_data(seed, k, v=V, n=N):
    """Student logits, full teacher log-probs, its top-k, and one token per row sampled from the student."""
    student, teacher, ids, tlp = _data(seed=seed, n=n, v=v, k=k)
    g = torch.Generator().manual_seed(seed + 100)
    sampled = torch.multinomial(torch.softmax(student, -1), 1, generator=g)[:, 0]  # [N]
    return student, teacher, ids, tlp, sampled, teacher.gather(1, sampled[:, None])[:, 0]


def _ref_partition(student_logits, teacher_logprobs, ids, sampled):
    """fp64 reference: both full distributions merged into buckets {top-k ids, sampled id, the rest}."""
    p_full, q_full = teacher_logprobs.exp(), torch.softmax(student_logits, -1)
    ps, qs = [], []
    for row in range(p_full.shape[0]):
        keep = sorted(set(ids[row].tolist()) | {int(sampled[row])})
        rest = [t for t in range(p_full.shape[1]) if t not in keep]
        ps.append(torch.cat([p_full[row, keep], p_full[row, rest].sum().reshape(1)]))
        qs.append(torch.cat([q_full[row, keep], q_full[row, rest].sum().reshape(1)]))
    return ps, qs


def _ref_jsd(p, q, beta):
    m = beta * p + (1 - beta) * q
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def test_sampled_token_divergences_are_exact_with_the_whole_vocabulary():
    student, teacher, ids, tlp, sampled, sampled_lp = _on_policy_data(seed=3, k=V)
    aug_ids, aug_lp = with_sampled_token(ids, tlp, sampled, sampled_lp)
    assert aug_ids.shape == (N, V + 1) and (aug_ids[:, -1] == -1).all()  # the sampled token is always in the top-V
    p, q = teacher.exp(), torch.softmax(student, -1)
    lq = torch.log_softmax(student, -1)
    torch.testing.assert_close(reverse_kl(lq, aug_ids, aug_lp), _kl(q, p), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(forward_kl(lq, aug_ids, aug_lp), _kl(p, q), atol=1e-10, rtol=1e-8)
    for beta in (0.1, 0.5, 0.9):
        torch.testing.assert_close(
            generalized_jsd(lq, aug_ids, aug_lp, beta=beta), _ref_jsd(p, q, beta), atol=1e-10, rtol=1e-8
        )
    assert (_kl(q, p) > 0.1).all()


def test_sampled_token_divergences_with_a_small_k_are_the_bucketed_divergence_and_a_lower_bound():
    student, teacher, ids, tlp, sampled, sampled_lp = _on_policy_data(seed=4, k=3)
    aug_ids, aug_lp = with_sampled_token(ids, tlp, sampled, sampled_lp)
    outside = ~(ids == sampled[:, None]).any(-1)
    assert outside.any() and (~outside).any()  # both cases occur in this data
    assert (aug_ids[outside, -1] == sampled[outside]).all() and (aug_ids[~outside, -1] == -1).all()
    lq = torch.log_softmax(student, -1)
    got_r, got_f = reverse_kl(lq, aug_ids, aug_lp), forward_kl(lq, aug_ids, aug_lp)
    got_j = generalized_jsd(lq, aug_ids, aug_lp, beta=0.3)
    ps, qs = _ref_partition(student, teacher, ids, sampled)
    want_r = torch.stack([_kl(q, p) for p, q in zip(ps, qs)])
    want_f = torch.stack([_kl(p, q) for p, q in zip(ps, qs)])
    want_j = torch.stack([_ref_jsd(p, q, 0.3) for p, q in zip(ps, qs)])
    torch.testing.assert_close(got_r, want_r, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(got_f, want_f, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(got_j, want_j, atol=1e-10, rtol=1e-8)
    full_r = _kl(torch.softmax(student, -1), teacher.exp())
    assert (got_r <= full_r + 1e-12).all() and (got_r < full_r).any()
    # the sampled token as its own bucket: without it the sampled token hides in the tail
    assert not torch.allclose(reverse_kl(lq, ids, tlp)[outside], got_r[outside])


def test_sampled_token_divergence_is_exact_when_one_token_is_left_over():
    student, teacher, ids, tlp, _, _ = _on_policy_data(seed=5, k=V - 2)
    sampled = teacher.argmin(-1)  # a token the teacher finds unlikely: outside its top-(V - 2)
    sampled[0] = ids[0, 0]  # and one row where it is inside
    sampled_lp = teacher.gather(1, sampled[:, None])[:, 0]
    aug_ids, aug_lp = with_sampled_token(ids, tlp, sampled, sampled_lp)
    outside = ~(ids == sampled[:, None]).any(-1)
    assert outside.sum() == N - 1
    lq = torch.log_softmax(student, -1)
    full = _kl(torch.softmax(student, -1), teacher.exp())
    torch.testing.assert_close(reverse_kl(lq, aug_ids, aug_lp)[outside], full[outside], atol=1e-10, rtol=1e-8)


def test_sampled_token_in_distillation_loss_and_the_one_sample_estimate():
    student, teacher, ids, tlp, sampled, sampled_lp = _on_policy_data(seed=6, k=4, n=400, v=12)
    aug_ids, aug_lp = with_sampled_token(ids, tlp, sampled, sampled_lp)
    h = 12
    hidden = student.float()  # with an identity head the hidden state is the logits
    out = distillation_loss(
        hidden, torch.eye(h), sampled, aug_ids, aug_lp.float(), LossWeights(forward_kl=0, reverse_kl=1), chunk_size=64
    )
    want = reverse_kl(torch.log_softmax(student, -1), aug_ids, aug_lp).mean()
    torch.testing.assert_close(out.loss.double(), want, atol=1e-5, rtol=1e-5)
    lq = torch.log_softmax(student, -1)
    est = sampled_reverse_kl(lq.gather(1, sampled[:, None])[:, 0], sampled_lp)
    assert est.shape == (400,)
    full = _kl(torch.softmax(student, -1), teacher.exp()).mean()
    assert abs(float(est.mean()) - float(full)) < 0.25 * float(full)  # unbiased: 400 samples land close


def test_with_sampled_token_checks_shapes():
    _, _, ids, tlp, sampled, sampled_lp = _on_policy_data(seed=7, k=3)
    with pytest.raises(RaydistillError, match="sampled_ids"):
        with_sampled_token(ids, tlp, sampled[:-1], sampled_lp[:-1])


def test_log_softmax_gather_equals_log_softmax_then_gather_with_repeated_ids():
    from distill.losses import log_softmax_gather

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(6, 50, generator=g, dtype=torch.float64) * 4).requires_grad_()
    index = torch.randint(0, 50, (6, 5), generator=g)
    index[:, -1] = index[:, 0]  # the sampled token is often one of the teacher's top-k: both columns count
    upstream = torch.randn(6, 5, generator=g, dtype=torch.float64)
    got = log_softmax_gather(logits, index)
    (d_got,) = torch.autograd.grad(got, logits, upstream)
    ref = torch.log_softmax(logits, -1).gather(1, index)
    (d_ref,) = torch.autograd.grad(ref, logits, upstream)
    assert got.shape == (6, 5)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(d_got, d_ref)
