"""Bits per byte, KL / agreement and routing statistics against hand and reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cluster.errors import RaydistillError
from distill.eval import metrics as M


class WordTokenizer:
    """Whitespace words -> ids (several bytes per token), BOS 1."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, words: list[str]):
        self.ids = {w: i + 3 for i, w in enumerate(words)}

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [self.ids[w] for w in text.split(" ")]}


class Bigram(torch.nn.Module):
    """logits[t] = table[input_ids[t]]: the next token depends on the current one only."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=gen) * 2.0)

    def forward(self, input_ids, attention_mask=None):
        return self.table[input_ids]  # [B, T, V]


class Uniform(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        return torch.zeros(*input_ids.shape, self.vocab)


WORDS = ["the", "cat", "sat", "on", "mat", "héllo", "wörld"]


def test_bits_per_byte_matches_hand_computation_on_a_bigram_model():
    tok = WordTokenizer(WORDS)
    model = Bigram(len(WORDS) + 3)
    text = "the cat sat on the mat"
    ids = [1] + tok(text)["input_ids"]
    logp = F.log_softmax(model.table.detach(), dim=-1)
    nats = -sum(float(logp[ids[i], ids[i + 1]]) for i in range(len(ids) - 1))
    expected = nats / math.log(2) / len(text.encode("utf-8"))

    got = M.bits_per_byte(model, tok, [text])
    assert got["tokens"] == 6 and got["bytes"] == 22
    assert got["nats"] == pytest.approx(nats, rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(expected, rel=1e-5)


def test_long_texts_score_every_token_once_across_windows():
    tok = WordTokenizer(WORDS)
    model = Bigram(len(WORDS) + 3, seed=3)
    text = " ".join(WORDS[i % len(WORDS)] for i in range(53))
    whole = M.bits_per_byte(model, tok, [text, "cat"], window=1024)
    windowed = M.bits_per_byte(model, tok, [text, "cat"], window=8, batch_tokens=16)
    # A bigram model sees only the previous token, so windows must not change any token's NLL.
    assert windowed["tokens"] == whole["tokens"] == 54
    assert windowed["nats"] == pytest.approx(whole["nats"], rel=1e-5)


def test_windows_cover_each_target_once_with_context():
    for n, w in [(1, 4), (10, 4), (37, 8), (100, 16), (7, 2)]:
        spans = M.windows(n, w)
        targets = [t for _, a, b in spans for t in range(a, b)]
        assert targets == list(range(1, n + 1))
        assert all(b - c <= w for c, _, b in spans)
        assert all(a - c >= w // 2 for c, a, _ in spans[1:])  # later windows keep half a window of context


def test_uniform_model_gives_log2_vocab_bits_per_token():
    tok = WordTokenizer(WORDS)
    vocab = 50
    texts = ["héllo wörld the cat", "mat"]
    got = M.bits_per_byte(Uniform(vocab), tok, texts)
    tokens, nbytes = 5, sum(len(t.encode("utf-8")) for t in texts)
    assert nbytes == 24 and got["tokens"] == tokens
    assert got["bits_per_byte"] == pytest.approx(math.log2(vocab) * tokens / nbytes, rel=1e-6)


def test_empty_texts_are_an_error_naming_the_fix():
    with pytest.raises(RaydistillError, match="no non-empty text"):
        M.bits_per_byte(Uniform(10), WordTokenizer(WORDS), ["", ""])


def _rows(vocab: int, k: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for length, plen in [(12, 4), (9, 3), (15, 7)]:
        ids = rng.integers(3, vocab, length).tolist()
        clen = length - plen
        topk_ids = [rng.choice(vocab, k, replace=False).tolist() for _ in range(clen)]
        probs = [np.sort(rng.dirichlet(np.ones(k + 3))[:k])[::-1] for _ in range(clen)]
        rows.append(
            {
                "input_ids": ids,
                "prompt_len": plen,
                "topk_ids": topk_ids,
                "topk_logprobs": [np.log(p).tolist() for p in probs],
            }
        )
    return rows


def _reference(model: Bigram, rows: list[dict]) -> tuple[float, float]:
    """Dense loops: KL over the k ids plus the tail bucket, agreement with the teacher's argmax."""
    logq_all = F.log_softmax(model.table.detach().double(), dim=-1).numpy()
    kls, agree = [], []
    for row in rows:
        for i, (ids, lps) in enumerate(zip(row["topk_ids"], row["topk_logprobs"])):
            q = np.exp(logq_all[row["input_ids"][row["prompt_len"] - 1 + i]])
            p = np.exp(np.asarray(lps, dtype=float))
            kl = sum(p[j] * (math.log(p[j]) - math.log(q[ids[j]])) for j in range(len(ids)))
            p_tail, q_tail = 1 - p.sum(), 1 - q[ids].sum()
            kls.append(kl + p_tail * (math.log(p_tail) - math.log(q_tail)))
            agree.append(float(np.argmax(q) == ids[int(np.argmax(p))]))
    return float(np.mean(kls)), float(np.mean(agree))


def test_fidelity_equals_reference_kl_and_agreement():
    vocab = 20
    model = Bigram(vocab, seed=1)
    rows = _rows(vocab, k=4)
    # Make some positions agree: the teacher's top-1 is the bigram's argmax.
    best = model.table.detach().argmax(-1)
    for row in rows[:2]:
        for i in range(0, len(row["topk_ids"]), 2):
            row["topk_ids"][i][0] = int(best[row["input_ids"][row["prompt_len"] - 1 + i]])
            row["topk_ids"][i][1:] = [t for t in range(vocab) if t != row["topk_ids"][i][0]][:3]
    kl, agree = _reference(model, rows)
    got = M.fidelity(model, rows, batch_tokens=16)
    assert got["tokens"] == 8 + 6 + 8
    assert got["kl"] == pytest.approx(kl, rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(agree)
    assert 0 < agree < 1


def _reference_forward_kl(student_logprobs, topk_ids, teacher_logprobs):
    """KL(teacher || student) over the k ids plus one tail bucket, per row, written out directly."""
    p_log = teacher_logprobs.float()
    q_log = student_logprobs.float().gather(-1, topk_ids.long())
    p = p_log.exp()
    p_tail = (1.0 - p.sum(-1)).clamp(min=0.0)
    q_tail = (1.0 - q_log.exp().sum(-1)).clamp(min=1e-12)
    tail = torch.where(
        p_tail > 0, p_tail * (torch.log(p_tail.clamp(min=1e-12)) - torch.log(q_tail)), torch.zeros_like(p_tail)
    )
    return (p * (p_log - q_log)).sum(-1) + tail


def test_project_kl_and_local_reference_agree():
    vocab, k = 30, 5
    gen = torch.Generator().manual_seed(0)
    student = F.log_softmax(torch.randn(7, vocab, generator=gen), -1)
    teacher_p = torch.distributions.Dirichlet(torch.ones(vocab)).sample((7,))
    top = teacher_p.log().topk(k, dim=-1)
    ours = _reference_forward_kl(student, top.indices, top.values)
    assert torch.allclose(M.forward_kl_topk(student, top.indices, top.values).float(), ours, atol=1e-5)
    assert (ours >= 0).all()


def test_teacher_entropy_includes_the_tail_bucket():
    lp = torch.log(torch.tensor([[0.5, 0.25], [0.9, 0.1]]))
    expected = [
        -(0.5 * math.log(0.5) + 0.25 * math.log(0.25) + 0.25 * math.log(0.25)),
        -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)),
    ]
    ids = torch.tensor([[3, 7], [1, 2]])
    assert M.teacher_entropy(ids, lp).tolist() == pytest.approx(expected, rel=1e-5)


def test_routing_records_experts_per_token_and_difficulty_curve():
    from distill.student.init import init_random
    from tests.distill.eval.conftest import student_config

    torch.manual_seed(0)
    model = init_random(student_config(40, initializer_range=0.5), seed=0)  # large router weights: varied k
    rows = _rows(40, k=4, seed=2)
    scored = M.score_rows(model, rows, batch_tokens=20)
    n = sum(len(r["topk_ids"]) for r in rows)
    assert scored["experts"].shape == (n, 2)  # two MoE layers
    assert scored["experts"].min() >= 1 and scored["experts"].max() <= 3  # min_k / max_k clamp
    assert len(np.unique(scored["experts"])) > 1  # top-p uses a varying number of experts

    # The hook's counts equal the router's own selection on the same tokens (layer 0, first row alone).
    row = rows[0]
    with M.record_routing(model) as records:
        model(input_ids=torch.tensor([row["input_ids"]]))
    used = records[0][0][1].float().sum(-1)  # [T]
    c = len(row["topk_ids"])
    single = M.score_rows(model, [row])["experts"][:, 0]
    assert single.tolist() == used[row["prompt_len"] - 1 : row["prompt_len"] - 1 + c].tolist()

    summary = M.routing_summary(scored["experts"], scored["entropy"], max_k=3, buckets=4)
    assert sum(sum(c) for c in summary["histogram"]["counts_by_layer"]) == n * 2
    assert summary["experts_per_token_mean"] == pytest.approx(float(scored["experts"].mean()))
    curve = summary["difficulty_curve"]
    assert sum(b["tokens"] for b in curve) == n
    assert [b["mean_entropy"] for b in curve] == sorted(b["mean_entropy"] for b in curve)
    load = M.load_balance(scored["expert_load"])
    assert len(load["by_layer"]) == 2
    assert all(sum(layer["share"]) == pytest.approx(1.0, abs=1e-4) for layer in load["by_layer"])
    assert load["max_over_mean"] >= 1.0


def test_topk_student_uses_exactly_k_experts():
    from distill.student.init import init_random
    from tests.distill.eval.conftest import student_config

    model = init_random(
        student_config(40, routing="topk", num_experts_per_tok=2, top_p=None, min_k=None, max_k=None), seed=0
    )
    scored = M.score_rows(model, _rows(40, k=3))
    assert (scored["experts"] == 2).all()


def test_load_balance_of_even_and_collapsed_routing():
    even = M.load_balance([[0.25] * 4])
    collapsed = M.load_balance([[1.0, 0.0, 0.0, 0.0]])
    assert even["max_over_mean"] == pytest.approx(1.0) and even["normalized_entropy_mean"] == pytest.approx(1.0)
    assert collapsed["max_over_mean"] == pytest.approx(4.0) and collapsed["normalized_entropy_mean"] == 0.0


def test_route_texts_counts_every_text_token_once_without_a_teacher():
    from distill.student.init import init_random
    from tests.distill.eval.conftest import student_config

    model = init_random(student_config(40, initializer_range=0.5), seed=0)
    tok = WordTokenizer(WORDS)
    texts = [" ".join(WORDS * 3), "the cat sat"]  # 21 tokens (several windows of 8) + 3 tokens
    routed = M.route_texts(model, tok, texts, window=8, batch_tokens=16)
    assert routed["experts"].shape == (24, 2) and routed["entropy"].shape == (24,)
    assert routed["experts"].min() >= 1 and routed["experts"].max() <= 3
    # One window covering a whole text: the hook's experts and the model's own entropy at tokens 1..n of [BOS]+ids.
    ids = [1] + tok("the cat sat")["input_ids"]
    with M.record_routing(model) as records:
        logits = M._logits(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
    used = records[0][0][1].float().sum(-1)  # layer 0, [T]
    lp = torch.log_softmax(logits.float(), -1)
    assert routed["experts"][-3:, 0].tolist() == used[1:].tolist()
    assert routed["entropy"][-3:].tolist() == pytest.approx((-(lp.exp() * lp).sum(-1))[1:].tolist(), abs=1e-5)
    assert all(sum(layer) == pytest.approx(1.0, abs=1e-5) for layer in routed["expert_load"])

    topk = init_random(
        student_config(40, routing="topk", num_experts_per_tok=2, top_p=None, min_k=None, max_k=None), seed=0
    )
    assert (M.route_texts(topk, tok, texts, window=8)["experts"] == 2).all()
    with pytest.raises(RaydistillError, match="no routers"):
        M.route_texts(Bigram(40), tok, texts)


@pytest.mark.parametrize("block_rows", [5, 128])
@pytest.mark.parametrize("kind", ["llama", "student"])
def test_scoring_with_the_head_at_scored_positions_only_equals_the_full_forward(kind, block_rows, monkeypatch):
    """A plain HF causal LM (and the student's HF class, which the eval loads) runs its decoder once and
    its LM head only at the positions scored, several rows per matmul (groups of at least ``block_rows``
    positions; 5 splits a batch into many groups): bits per byte, the held-out rows' KL / agreement / NLL /
    routing and the routing over text equal those from the model's full logits."""
    monkeypatch.setattr(M, "HEAD_BLOCK_ROWS", block_rows)
    from distill.student.hf import RaydistillMoeConfig, RaydistillMoeForCausalLM
    from tests.distill.eval.conftest import byte_tokenizer, student_config, tiny_llama

    tok = byte_tokenizer()
    if kind == "llama":
        model = tiny_llama(tok)
    else:
        torch.manual_seed(0)
        config = student_config(len(tok), initializer_range=0.5).model_dump()
        model = RaydistillMoeForCausalLM(RaydistillMoeConfig(**config)).eval()
    assert M._decoder_and_head(model) is not None  # the fast path is the one under test
    texts = ["the cat sat on the mat, " * 5, "héllo wörld", "a"]  # several windows of 32, a 1-token text
    rows = _rows(len(tok), k=4, seed=5)

    def measure():
        bpb = M.bits_per_byte(model, tok, texts, window=32, batch_tokens=64)
        scored = M.score_rows(model, rows, batch_tokens=20, routing=kind == "student")
        routed = M.route_texts(model, tok, texts, window=32, batch_tokens=64) if kind == "student" else None
        return bpb, scored, routed

    fast = measure()
    monkeypatch.setattr(M, "_decoder_and_head", lambda model: None)  # the model's own forward, full logits
    full = measure()
    assert fast[0]["tokens"] == full[0]["tokens"] > 100
    assert fast[0]["nats"] == pytest.approx(full[0]["nats"], rel=1e-5)
    for key in ("kl", "student_nll", "entropy"):
        np.testing.assert_allclose(fast[1][key], full[1][key], rtol=1e-4, atol=1e-5)
    assert (fast[1]["agree"] == full[1]["agree"]).mean() >= 0.95  # argmax may flip only on a near-tie
    np.testing.assert_array_equal(fast[1]["experts"], full[1]["experts"])
    if kind == "student":
        assert fast[1]["experts"].shape[1] == 2
        np.testing.assert_array_equal(fast[2]["experts"], full[2]["experts"])
        np.testing.assert_allclose(fast[2]["entropy"], full[2]["entropy"], rtol=1e-4, atol=1e-5)


def test_a_model_with_logit_soft_capping_after_the_head_is_scored_with_its_full_forward(monkeypatch):
    """Gemma 2 caps its logits after the LM head: its bits per byte come from its own forward."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from tests.distill.eval.conftest import byte_tokenizer

    tok = byte_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=0.5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # logits large enough for the cap to matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    assert M._decoder_and_head(model) is None
    text = "the cat sat on the mat"
    ids = torch.tensor([[1] + tok(text)["input_ids"]])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # capped logits
    nats = -float(logp.gather(-1, ids[0, 1:, None]).sum())
    assert M.bits_per_byte(model, tok, [text])["nats"] == pytest.approx(nats, rel=1e-5)
    # the decoder + head without the cap would score it differently: the check above can tell them apart
    monkeypatch.setattr(M, "_decoder_and_head", lambda m: (m.model, m.lm_head))
    assert M.bits_per_byte(model, tok, [text])["nats"] != pytest.approx(nats, rel=0.05)
