"""Quality metrics, pure functions over an in-memory model: bits per byte, fidelity, routing per token.

* **Bits per byte**: the model's cross-entropy in bits summed over every token of the texts,
  divided by the texts' UTF-8 bytes. Tokenizers differ, bytes do not, so models with different
  vocabularies compare fairly. Each text is scored as ``[start] + tokens``: the start token (the
  tokenizer's BOS, else EOS) gives the first real token a context, so every byte is predicted by
  some token's probability, the same way for every text.
* **Fidelity**: KL(teacher || student) over the teacher's stored top-k plus one tail bucket (the
  teacher's remaining mass against the student's mass outside the same k ids), and top-1
  agreement (student argmax == teacher's most likely token), on held-out completion positions.
* **Routing per token**: forward hooks on the student's routers give the experts each token used
  in each MoE layer (top-p picks a varying number), lined up with the teacher's entropy at the
  same position for the difficulty curve.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cluster.errors import RaydistillError
from distill.losses import teacher_entropy
from distill.onednn import HEAD_BLOCK_ROWS, head_logits

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- helpers
def _logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] from an HF causal LM, a ``StudentLM`` (returns a tuple) or a plain callable."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


# Model types whose causal-LM forward is exactly ``lm_head(decoder(...).last_hidden_state)``: no logit
# scaling or soft-capping after the head (Gemma 2, Cohere and others have one and take the full forward).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "raydistill_moe"})


def _decoder_and_head(model: Any) -> tuple[Any, torch.nn.Linear] | None:
    """(decoder, LM head) of a plain HF causal LM (``PLAIN_HEAD_MODEL_TYPES``), else None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or type(head) is not torch.nn.Linear:  # a quantized or wrapped head: the full forward
        return None
    return decoder, head


def _row_log_probs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: Sequence[slice]
) -> Iterator[torch.Tensor]:
    """Run ``model`` on ids [B, T] now; the returned iterator gives, for each row r in order, the fp32
    log-softmax [n_r, V] of its next-token distributions at input positions ``positions[r]``.

    A plain HF causal LM (and the student) runs its decoder once and its LM head only at those positions,
    several rows' positions per matmul (``HEAD_BLOCK_ROWS`` or more), on oneDNN for fp32 on CPU
    (:func:`distill.onednn.project`). The student's fortunes score (7,843 tokens, 2 threads): decoder
    8.3 s + head 4.4 s, against 17 s for its full forward, which runs the head at every padded position
    and takes a [B, T, V] log-softmax. Any other model: its full logits."""
    parts = _decoder_and_head(model)
    if parts is None:
        logits = _logits(model, input_ids, attention_mask)  # [B, T, V]
        return (F.log_softmax(logits[r, pos].float(), dim=-1) for r, pos in enumerate(positions))
    decoder, head = parts
    from distill.student.model import StudentModel

    extra = {"compute_aux": False} if isinstance(decoder, StudentModel) else {}
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state  # [B, T, H]
    return _grouped_head(hidden, head, positions)


def _grouped_head(hidden: torch.Tensor, head: torch.nn.Linear, positions: Sequence[slice]) -> Iterator[torch.Tensor]:
    """Rows' positions gathered until a group holds ``HEAD_BLOCK_ROWS``, one head + log-softmax per group,
    each row's part yielded in order (a small matmul per row runs far below the GEMM's speed)."""
    group: list[torch.Tensor] = []
    size = 0
    for r, pos in enumerate(positions):
        group.append(hidden[r, pos])  # [n_r, H]
        size += group[-1].shape[0]
        if size >= HEAD_BLOCK_ROWS or r == len(positions) - 1:
            logits = head_logits(torch.cat(group), head)  # [sum n_r, V]
            yield from F.log_softmax(logits.float(), dim=-1).split([g.shape[0] for g in group])
            group, size = [], 0


def start_token_id(tokenizer: Any) -> int:
    """The token every scored text starts from: BOS if the tokenizer has one, else EOS."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    raise RaydistillError(
        "tokenizer has neither bos_token_id nor eos_token_id; bits per byte needs a start token (pass start_token=ID)"
    )


def windows(num_tokens: int, window: int) -> list[tuple[int, int, int]]:
    """Scoring windows over ``seq = [start] + tokens`` (length ``num_tokens + 1``).

    Returns ``(ctx_start, pred_start, pred_end)``: feed ``seq[ctx_start:pred_end]`` (at most
    ``window`` tokens) and score targets ``seq[pred_start:pred_end]``. Every target 1..num_tokens
    is scored exactly once; after the first window each has at least ``window // 2`` tokens of context.
    """
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    stride = max(1, window // 2)
    out = []
    pred_start = 1
    while pred_start <= num_tokens:
        ctx_start = max(0, pred_start - (window - stride)) if pred_start > 1 else 0
        pred_end = min(num_tokens + 1, ctx_start + window)
        out.append((ctx_start, pred_start, pred_end))
        pred_start = pred_end
    return out


def _batches(items: Sequence[Any], lengths: Sequence[int], batch_tokens: int) -> Iterator[list[int]]:
    """Indices grouped so that (rows x longest row) stays within ``batch_tokens`` (at least one row)."""
    order = sorted(range(len(items)), key=lambda i: -lengths[i])  # long first: less padding per batch
    batch: list[int] = []
    longest = 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if batch and new_longest * (len(batch) + 1) > batch_tokens:
            yield batch
            batch, new_longest = [], lengths[i]
        batch.append(i)
        longest = new_longest
    if batch:
        yield batch


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to ids [B, T] and mask [B, T]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids, mask


def _text_pieces(
    tokenizer: Any, texts: list[str], window: int, start_token: int | None
) -> tuple[list[tuple[list[int], int]], int, int, int]:
    """``(pieces, pad id, bytes, tokens)``: every text as ``[start] + tokens`` cut into scoring windows.

    A piece is ``(window ids, index of the first scored input position)``: input position j predicts
    ``ids[j + 1]``; positions ``first..len-2`` predict this window's targets (each text token once).
    """
    start = start_token_id(tokenizer) if start_token is None else int(start_token)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = start if pad is None else int(pad)
    pieces: list[tuple[list[int], int]] = []
    total_bytes = total_tokens = 0
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        total_bytes += len(text.encode("utf-8"))
        total_tokens += len(ids)
        seq = [start] + ids
        for ctx_start, pred_start, pred_end in windows(len(ids), window):
            # Input position j predicts seq[ctx_start + j + 1]; targets pred_start.. are inputs pred_start-1..
            pieces.append((seq[ctx_start:pred_end], pred_start - 1 - ctx_start))
    return pieces, pad, total_bytes, total_tokens


# ----------------------------------------------------------------------------- bits per byte
@torch.no_grad()
def bits_per_byte(
    model: Any,
    tokenizer: Any,
    texts: Iterable[str],
    *,
    window: int = 256,
    batch_tokens: int = 2048,
    start_token: int | None = None,
) -> dict[str, float]:
    """Cross-entropy of ``texts`` in bits per UTF-8 byte.

    Returns ``{"bits_per_byte", "bytes", "tokens", "nats", "texts"}`` where ``nats`` is the summed
    negative log-likelihood of all ``tokens`` (each text's tokens, no special tokens added, each
    predicted from ``[start] + earlier tokens``) and ``bits_per_byte = nats / ln 2 / bytes``.
    Texts longer than ``window`` tokens are scored in windows that overlap by half (see
    :func:`windows`). Empty texts are ignored; no non-empty text raises RaydistillError.
    """
    texts = [t for t in texts if t]
    if not texts:
        raise RaydistillError("bits_per_byte got no non-empty text; check the corpus files / held-out rows")
    pieces, pad, total_bytes, total_tokens = _text_pieces(tokenizer, texts, window, start_token)
    device = _device_of(model)
    nats = 0.0
    for batch in _batches(pieces, [len(p[0]) for p in pieces], batch_tokens):
        ids, mask = _pad([pieces[i][0] for i in batch], pad)
        ids = ids.to(device)
        spans = [(pieces[i][1], len(pieces[i][0]) - 1) for i in batch]  # input position j predicts ids[r, j + 1]
        log_probs = _row_log_probs(model, ids, mask.to(device), [slice(a, b) for a, b in spans])
        for r, ((first, last), lp) in enumerate(zip(spans, log_probs)):  # lp [last - first, V]
            nats -= float(lp.gather(-1, ids[r, first + 1 : last + 1, None])[:, 0].sum())
    return {
        "bits_per_byte": nats / LN2 / total_bytes,
        "bytes": total_bytes,
        "tokens": total_tokens,
        "nats": nats,
        "texts": len(texts),
    }


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


# ----------------------------------------------------------------------------- fidelity
def forward_kl_topk(
    student_logprobs: torch.Tensor, topk_ids: torch.Tensor, teacher_logprobs: torch.Tensor
) -> torch.Tensor:
    """KL(teacher || student) per position [N] with the tail bucket: the training loss's definition at T=1."""
    from distill.losses import TailMode, forward_kl

    return forward_kl(student_logprobs, topk_ids, teacher_logprobs, tail=TailMode.bucket, temperature=1.0)


@contextlib.contextmanager
def record_routing(model: Any) -> Iterator[list[list[torch.Tensor]]]:
    """Collect experts used per token in every MoE layer of a raydistill student during the block.

    Yields a list with one entry per router (model order); each entry collects, per forward call,
    ``(experts [B*T, K] long, used [B*T, K] bool)``: the slots' expert ids and whether each slot is
    used (top-p keeps a varying prefix; top-k uses all k). Empty list for models without routers.
    """
    from distill.student.router import Router

    routers = [m for m in model.modules() if isinstance(m, Router)] if hasattr(model, "modules") else []
    records: list[list[torch.Tensor]] = [[] for _ in routers]
    handles = []
    for idx, router in enumerate(routers):

        def hook(_module, _inputs, output, idx=idx):
            used = torch.ones_like(output.experts, dtype=torch.bool) if output.mask is None else output.mask
            records[idx].append((output.experts.detach().cpu(), used.detach().cpu()))

        handles.append(router.register_forward_hook(hook))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def _as_2d(value: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray([np.asarray(v) for v in value]) if len(value) else np.zeros((0, 1)), dtype=dtype)


@torch.no_grad()
def score_rows(
    student: Any, rows: Sequence[dict], *, batch_tokens: int = 2048, pad_id: int = 0, routing: bool = True
) -> dict[str, Any]:
    """Per completion position of held-out teacher rows: KL, agreement, teacher entropy, experts used.

    ``rows``: dicts with ``input_ids`` [L], ``prompt_len``, ``topk_ids`` [C][K] and ``topk_logprobs``
    [C][K] (the Parquet schema). Returns numpy arrays over all N positions: ``kl`` [N],
    ``agree`` [N] (0/1), ``entropy`` [N] (teacher, nats), ``experts`` [N, layers] (empty when
    the model has no routers), ``student_nll`` [N] (the model's NLL of the teacher's token, in the
    row's context: prompt and earlier completion tokens), ``expert_load`` [layers][E] (each layer's
    share of expert selections over those positions) and ``bytes`` (UTF-8 bytes of the scored rows'
    ``completion`` texts: ``student_nll.sum() / ln 2 / bytes`` is bits per byte of the completions in
    context, where :func:`bits_per_byte` on the same texts scores them alone).
    """
    rows = [r for r in rows if len(r["topk_ids"]) > 0]
    if not rows:
        raise RaydistillError(
            "fidelity got no held-out row with soft labels; generate more data or raise eval.max_heldout_rows"
        )
    device = _device_of(student)
    seqs = [list(map(int, r["input_ids"])) for r in rows]
    kls, agrees, ents, nlls, experts = [], [], [], [], []
    recorder = record_routing(student) if routing else contextlib.nullcontext([])
    load: list[torch.Tensor] | None = None  # per layer: selections per expert over completion positions
    with recorder as records:
        for batch in _batches(seqs, [len(s) for s in seqs], batch_tokens):
            for rec in records:
                rec.clear()
            ids, mask = _pad([seqs[i] for i in batch], pad_id)
            spans = [
                slice(int(rows[i]["prompt_len"]) - 1, int(rows[i]["prompt_len"]) - 1 + len(rows[i]["topk_ids"]))
                for i in batch
            ]  # input positions predicting each row's completion tokens
            log_probs = _row_log_probs(student, ids.to(device), mask.to(device), spans)
            width = ids.shape[1]
            # per layer: experts [B, T, K] and used [B, T, K] (one forward call per batch -> one record)
            per_layer = [
                (
                    torch.cat([e for e, _ in rec]).reshape(len(batch), width, -1),
                    torch.cat([u for _, u in rec]).reshape(len(batch), width, -1),
                )
                for rec in records
            ]
            if per_layer and load is None:
                num_experts = _num_experts(student)
                load = [torch.zeros(num_experts) for _ in per_layer]
            for r, (i, lp) in enumerate(zip(batch, log_probs)):  # lp [C, V]
                row = rows[i]
                plen, clen = int(row["prompt_len"]), len(row["topk_ids"])
                pos = spans[r]
                tk_ids = _as_2d(row["topk_ids"], torch.long).to(device)  # [C, K]
                tk_lp = _as_2d(row["topk_logprobs"], torch.float).to(device)  # [C, K]
                kls.append(forward_kl_topk(lp, tk_ids, tk_lp).cpu())
                teacher_top1 = tk_ids.gather(-1, tk_lp.argmax(-1, keepdim=True))[:, 0]  # stored order not trusted
                agrees.append((lp.argmax(-1) == teacher_top1).float().cpu())
                ents.append(teacher_entropy(tk_ids, tk_lp).cpu())
                targets = torch.tensor(seqs[i][plen : plen + clen], dtype=torch.long, device=device)
                nlls.append(-lp.gather(-1, targets[:, None])[:, 0].cpu())
                if per_layer:
                    experts.append(torch.stack([u[r, pos].float().sum(-1) for _, u in per_layer], dim=-1))  # [C, L]
                    for layer, (e, u) in enumerate(per_layer):
                        load[layer].scatter_add_(0, e[r, pos].reshape(-1), u[r, pos].float().reshape(-1))
    return {
        "kl": torch.cat(kls).numpy(),
        "agree": torch.cat(agrees).numpy(),
        "entropy": torch.cat(ents).numpy(),
        "student_nll": torch.cat(nlls).numpy(),
        "experts": torch.cat(experts).numpy() if experts else np.zeros((sum(len(k) for k in kls), 0)),
        "expert_load": [(c / c.sum().clamp(min=1.0)).tolist() for c in load] if load else [],
        "bytes": sum(len((r.get("completion") or "").encode("utf-8")) for r in rows),
    }


def _num_experts(model: Any) -> int:
    from distill.student.router import Router

    return next(m for m in model.modules() if isinstance(m, Router)).weight.shape[0]


def has_routers(model: Any) -> bool:
    """True for a raydistill MoE student (it has :class:`~distill.student.router.Router` modules)."""
    from distill.student.router import Router

    return hasattr(model, "modules") and any(isinstance(m, Router) for m in model.modules())


@torch.no_grad()
def route_texts(
    model: Any,
    tokenizer: Any,
    texts: Iterable[str],
    *,
    window: int = 256,
    batch_tokens: int = 2048,
    start_token: int | None = None,
) -> dict[str, Any]:
    """Experts used by every token of ``texts`` (no teacher needed), windowed as in :func:`bits_per_byte`.

    Returns ``experts`` [N, layers] (experts each of the N text tokens used per MoE layer; each
    token counted once, routed with its window's context), ``entropy`` [N] (the model's own
    next-token entropy at that token, nats: the difficulty axis when no teacher labels exist)
    and ``expert_load`` [layers][E] (each layer's share of selections). RaydistillError for a
    model without routers or no non-empty text.
    """
    texts = [t for t in texts if t]
    if not texts:
        raise RaydistillError("route_texts got no non-empty text; check the corpus files")
    if not has_routers(model):
        raise RaydistillError("routing statistics need a raydistill MoE student; this model has no routers")
    pieces, pad, _, _ = _text_pieces(tokenizer, texts, window, start_token)
    device = _device_of(model)
    experts, ents = [], []
    load: list[torch.Tensor] | None = None
    with record_routing(model) as records:
        for batch in _batches(pieces, [len(p[0]) for p in pieces], batch_tokens):
            for rec in records:
                rec.clear()
            ids, mask = _pad([pieces[i][0] for i in batch], pad)
            # each window's new text tokens (targets), each once
            spans = [slice(pieces[i][1] + 1, len(pieces[i][0])) for i in batch]
            log_probs = _row_log_probs(model, ids.to(device), mask.to(device), spans)
            width = ids.shape[1]
            per_layer = [
                (
                    torch.cat([e for e, _ in rec]).reshape(len(batch), width, -1),
                    torch.cat([u for _, u in rec]).reshape(len(batch), width, -1),
                )
                for rec in records
            ]
            if load is None:
                load = [torch.zeros(_num_experts(model)) for _ in per_layer]
            for r, lp in enumerate(log_probs):  # lp [C, V]
                pos = spans[r]
                ents.append(-(lp.exp() * lp).sum(-1).cpu())
                experts.append(torch.stack([u[r, pos].float().sum(-1) for _, u in per_layer], dim=-1))  # [C, L]
                for layer, (e, u) in enumerate(per_layer):
                    load[layer].scatter_add_(0, e[r, pos].reshape(-1), u[r, pos].float().reshape(-1))
    return {
        "experts": torch.cat(experts).numpy(),
        "entropy": torch.cat(ents).numpy(),
        "expert_load": [(c / c.sum().clamp(min=1.0)).tolist() for c in load],
    }


def fidelity(student: Any, rows: Sequence[dict], *, batch_tokens: int = 2048, pad_id: int = 0) -> dict[str, float]:
    """``{"kl", "top1_agreement", "tokens"}``: mean KL(teacher || student) (nats/token) and agreement."""
    scored = score_rows(student, rows, batch_tokens=batch_tokens, pad_id=pad_id, routing=False)
    return {
        "kl": float(scored["kl"].mean()),
        "top1_agreement": float(scored["agree"].mean()),
        "tokens": int(scored["kl"].shape[0]),
    }


# ----------------------------------------------------------------------------- routing summaries
def routing_summary(
    experts: np.ndarray, entropy: np.ndarray, *, max_k: int | None = None, buckets: int = 5
) -> dict[str, Any]:
    """Experts-per-token statistics from :func:`score_rows` arrays.

    experts [N, layers] (experts used per token per MoE layer), entropy [N] (teacher nats).
    Returns per-layer mean and histogram (counts of tokens using 0..max_k experts), and the
    difficulty curve: positions bucketed into entropy quantiles, with each bucket's mean entropy
    and mean experts per token (averaged over layers), plus their Spearman-free summary
    ``hard_minus_easy`` (last bucket minus first; > 0 = harder tokens get more experts).
    """
    if experts.size == 0:
        return {}
    n, layers = experts.shape
    top = int(max_k if max_k is not None else experts.max())
    hist = [[int((experts[:, layer] == k).sum()) for k in range(top + 1)] for layer in range(layers)]
    mean_tok = experts.mean(axis=1)  # [N]
    edges = np.quantile(entropy, np.linspace(0, 1, buckets + 1)) if n else np.zeros(buckets + 1)
    which = np.clip(np.searchsorted(edges[1:-1], entropy, side="right"), 0, buckets - 1)
    curve = []
    for b in range(buckets):
        sel = which == b
        if sel.any():
            curve.append(
                {
                    "bucket": b,
                    "entropy_lo": float(edges[b]),
                    "entropy_hi": float(edges[b + 1]),
                    "mean_entropy": float(entropy[sel].mean()),
                    "mean_experts": float(mean_tok[sel].mean()),
                    "tokens": int(sel.sum()),
                }
            )
    return {
        "tokens": int(n),
        "max_k": top,
        "experts_per_token_mean": float(experts.mean()),
        "experts_per_token_by_layer": [float(v) for v in experts.mean(axis=0)],
        "histogram": {"experts": list(range(top + 1)), "counts_by_layer": hist},
        "difficulty_curve": curve,
        "hard_minus_easy": (curve[-1]["mean_experts"] - curve[0]["mean_experts"]) if len(curve) > 1 else 0.0,
    }


def load_balance(expert_load: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Per-layer balance of expert shares (each row sums to 1): max/mean ratio and normalised entropy (1 = even)."""
    out = []
    for shares in expert_load:
        s = np.asarray(shares, dtype=float)
        s = s / s.sum() if s.sum() > 0 else s
        e = len(s)
        ent = float(-(s[s > 0] * np.log(s[s > 0])).sum() / math.log(e)) if e > 1 else 1.0
        out.append(
            {
                "max_over_mean": float(s.max() * e) if e else 0.0,
                "normalized_entropy": ent,
                "share": [round(float(v), 6) for v in s],
            }
        )
    return {
        "by_layer": out,
        "max_over_mean": max((o["max_over_mean"] for o in out), default=0.0),
        "normalized_entropy_mean": float(np.mean([o["normalized_entropy"] for o in out])) if out else 0.0,
    }
