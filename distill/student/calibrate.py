"""Calibrated initialisation: measure the teacher on calibration text, then cut it into a student.

Plain PyTorch, no I/O: callers pass token-id sequences (the run's teacher data, a corpus, ...).
Legend in ``config.py``; here also ``N`` calibration tokens, ``J`` a teacher FFN's neurons, ``L``
teacher layers. Three measurements, each feeding one decision of :func:`~distill.student.init.init_from_teacher`:

1. **Which layers** (:func:`layer_importance`, Minitron / ShortGPT): drop each layer alone and
   measure how far the output distribution moves (KL, default) or how much the calibration loss
   rises; keep the layers whose removal hurts most. With
   ``rounds > 1`` the least important layers are removed a part at a time and the rest re-scored
   (the iterative variant: layer importance changes once neighbours are gone).
2. **Which neurons form an expert** (:func:`cluster_neurons`, MoEfication / LLaMA-MoE): a neuron's
   *contribution* to token n is ``|act[n, j]| * |down[:, j]|``; neurons that are among a token's
   top contributors for the same tokens are grouped by balanced k-means over those activity
   patterns, so a token's work concentrates in few experts. The shared expert takes the neurons
   active for the most tokens.
3. **How to route** (:func:`fit_router`, :func:`fit_expert_scales`): the router is fitted so its
   softmax matches each token's share of the FFN output produced by each expert (the norm of the
   expert's output), i.e. it ranks experts by the contribution they actually make for that token;
   ``sharpness`` > 1 raises the shares to a power first, so top-p keeps fewer experts when one
   dominates and more when the work is spread. Then each expert's down-projection gets the scale
   that makes the *routed* block (real selection rule, renormalised weights) best reproduce the
   dense FFN in least squares, instead of the data-free ``E / k`` blow-up; and
   (:func:`fit_down_projections`) the down projections are refitted by ridge regression under that
   routing, so the experts a token picks also carry part of what the skipped ones would have added.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.onednn import HEAD_BLOCK_ROWS, head_logits
from distill.student.router import select_topk, select_topp


# ----------------------------------------------------------------------------- scoring
def batches(sequences: Sequence[Sequence[int]], seq_len: int, max_tokens: int, rows: int = 4) -> list[torch.Tensor]:
    """Token-id sequences -> packed windows, ``rows`` per tensor [rows, seq_len], at most ``max_tokens`` in all.

    The sequences are concatenated (each keeps its own BOS/prompt tokens, which separate them)
    and cut into full windows, as pretraining does: no padding, and matmuls large enough to run
    near the machine's peak. A stream shorter than one window gives one shorter window.
    """
    stream = [t for seq in sequences for t in seq][:max_tokens]
    if len(stream) < 2:
        return []
    if len(stream) < seq_len:
        return [torch.tensor([stream], dtype=torch.long)]
    windows = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    return [torch.tensor(windows[i : i + rows], dtype=torch.long) for i in range(0, len(windows), rows)]


@torch.no_grad()
def total_nll(model: nn.Module, chunks: Sequence[torch.Tensor]) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) over the chunks [B, T], and the tokens scored."""
    nll, count = 0.0, 0
    for ids in chunks:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [B, T-1, V]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return nll, count


def mean_nll(model: nn.Module, chunks: Sequence[torch.Tensor]) -> float:
    """Mean next-token negative log-likelihood (nats/token) of ``model`` over the chunks."""
    nll, count = total_nll(model, chunks)
    return nll / max(count, 1)


def bits_per_byte(model: nn.Module, chunks: Sequence[torch.Tensor], decode: Callable[[list[int]], str]) -> float:
    """Bits per UTF-8 byte of the scored tokens (each window's first token is context, not scored)."""
    nll, _ = total_nll(model, chunks)
    nbytes = sum(len(decode(row[1:].tolist()).encode()) for ids in chunks for row in ids)
    return nll / math.log(2) / max(nbytes, 1)


# ----------------------------------------------------------------------------- 1. layers
@dataclasses.dataclass
class LayerChoice:
    layers: list[int]  # teacher layer indices kept, ascending
    importance: dict[int, float]  # layer -> damage (nats/token) when dropped, as last scored
    base_nll: float  # the full teacher's calibration loss (criterion nll; 0 for kl)


def _log_probs(
    model: nn.Module, hidden: torch.Tensor, block_rows: int, normed: bool = False
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, log-softmax [n, V] fp32) of the final norm (unless ``normed``) + head over hidden [B, T, H],
    flattened to [B * T] rows ``block_rows`` at a time: a block stays in cache between the head, the
    log-softmax and its use, where one [B * T, V] pass would stream several hundred MB each time."""
    x = (hidden if normed else model.model.norm(hidden)).reshape(-1, hidden.shape[-1])  # [N, H]
    for start in range(0, x.shape[0], block_rows):
        rows = slice(start, start + block_rows)
        yield rows, F.log_softmax(head_logits(x[rows], model.lm_head).float(), dim=-1)


@torch.no_grad()
def drop_one(
    model: nn.Module, chunks: Sequence[torch.Tensor], criterion: str = "kl", block_rows: int = HEAD_BLOCK_ROWS
) -> tuple[float, list[float]]:
    """Damage of removing each layer of a Llama-family ``model`` alone, in nats/token.

    ``criterion``: ``"kl"`` = KL(model || model without layer i) over the full next-token
    distribution at every position (returns 0 and the KLs); ``"nll"`` = the next-token loss on the
    text itself (returns the model's mean NLL and each removal's). KL reads the whole distribution,
    not one sampled token: on teacher-written calibration text it picked 16 of SmolLM2's 30 layers
    that score 2.42 bits/byte on human text against 2.74 for the NLL choice (iterated, issue 12).

    One full forward per chunk records every decoder layer's input (and the keyword arguments the
    model passes it: masks, rotary embeddings); removing layer i then re-runs only layers i+1..L-1
    from layer i's input, the final norm and the head, about half the cost of L full forwards. The
    head (on oneDNN) and the loss run ``block_rows`` positions at a time, each position's KL summed in
    float64: SmolLM2's 30 removals on 512 tokens took 31.8-32.7 s instead of 35.7-40.1 s (2 threads,
    2026-11-29), and the sums are closer to a float64 reference than one fp32 sum over [N, V] was.
    """
    if criterion not in ("kl", "nll"):
        raise ValueError(f"criterion={criterion!r}; allowed: kl, nll")
    layers = model.model.layers
    total, dropped, count = 0.0, [0.0] * len(layers), 0
    for ids in chunks:
        inputs: list[tuple[torch.Tensor, dict]] = []  # each layer's input, then the final norm's
        hooks = [
            module.register_forward_pre_hook(
                lambda m, args, kwargs, inputs=inputs: inputs.append((args[0], kwargs)), with_kwargs=True
            )
            for module in [*layers, model.model.norm]
        ]
        try:
            model.model(input_ids=ids, use_cache=False)  # the body only: the head runs below, in blocks
        finally:
            for h in hooks:
                h.remove()
        top = inputs[-1][0]  # [B, T, H] the last layer's output
        # next-token targets per flattened position; a row's last position has none
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).reshape(-1)  # [B * T]
        ref = probs = None
        if criterion == "kl":
            ref = torch.cat([lp for _, lp in _log_probs(model, top, block_rows)])  # [B * T, V] log p
            probs = ref.exp()

        def damage(hidden: torch.Tensor, ref: Any = ref, probs: Any = probs, targets: torch.Tensor = targets) -> float:
            value = torch.zeros((), dtype=torch.float64)
            for rows, logq in _log_probs(model, hidden, block_rows):
                if criterion == "nll":
                    value += F.nll_loss(logq, targets[rows], reduction="sum", ignore_index=-100).double()
                else:  # sum over positions of sum_v p (log p - log q): one [1, V] x [V, 1] product per position
                    diff = (ref[rows] - logq).unsqueeze(2)  # [n, V, 1]
                    value += torch.bmm(probs[rows].unsqueeze(1), diff).double().sum()
            return value.item()

        total += damage(top) if criterion == "nll" else 0.0
        count += ids[:, 1:].numel() if criterion == "nll" else ids.numel()
        for i in range(len(layers)):
            h = inputs[i][0]
            for j in range(i + 1, len(layers)):
                out = layers[j](h, **inputs[j][1])
                h = out[0] if isinstance(out, tuple) else out
            dropped[i] += damage(h)
    count = max(count, 1)
    return total / count, [d / count for d in dropped]


def layer_importance(
    teacher: nn.Module,
    chunks: Sequence[torch.Tensor],
    keep: int,
    rounds: int = 1,
    criterion: str = "kl",
    prune: Callable[[nn.Module, Sequence[int]], nn.Module] | None = None,
    progress: Callable[[str], None] | None = None,
) -> LayerChoice:
    """Choose ``keep`` of the teacher's layers by drop-one damage (see module docstring).

    ``prune(teacher, layers)`` builds the teacher restricted to ``layers`` (default:
    :func:`distill.student.init.prune_teacher`); each round scores the current model with
    :func:`drop_one` with ``criterion`` (``kl`` or ``nll``).
    """
    if prune is None:
        from distill.student.init import prune_teacher as prune
    total = teacher.config.num_hidden_layers
    if not 1 <= keep <= total:
        raise ValueError(f"keep={keep} must be in [1, {total}]")
    current = list(range(total))
    to_drop = total - keep
    importance: dict[int, float] = {}
    rounds = max(1, min(rounds, to_drop)) if to_drop else 1
    base = None
    for r in range(rounds):
        model = teacher if len(current) == total else prune(teacher, current)
        ref, nlls = drop_one(model, chunks, criterion)
        base = ref if base is None else base
        for i, value in zip(current, nlls):
            importance[i] = value - ref
        if progress:
            progress(f"layer importance: round {r + 1}/{rounds} scored {len(current)} layers")
        if not to_drop:
            break
        # Drop an equal share of what remains to be dropped in each round.
        n = math.ceil(to_drop / (rounds - r))
        dropped = sorted(current, key=lambda i: importance[i])[:n]
        current = [i for i in current if i not in dropped]
        to_drop -= n
    return LayerChoice(layers=current, importance=importance, base_nll=base)


# ----------------------------------------------------------------------------- 2. experts
@torch.no_grad()
def next_token_entropy(model: nn.Module, chunks: Sequence[torch.Tensor]) -> torch.Tensor:
    """[N] the model's next-token entropy (nats) at every calibration position, in ``capture_ffn`` order."""
    out = []
    for ids in chunks:
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state  # [rows, T, H], final-normed
        for _, logp in _log_probs(model, hidden, HEAD_BLOCK_ROWS, normed=True):  # [n, V]
            out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out)


@dataclasses.dataclass
class FFNSample:
    """One kept layer's FFN on the calibration tokens. ``act`` is computed on access, not stored, so
    only the [N, H] inputs of all layers are held at once (a big teacher's [N, J] activations of every
    layer would not fit)."""

    x: torch.Tensor  # [N, H] the FFN input (after post_attention_layernorm) = the router's input
    gate: torch.Tensor  # [J, H]
    up: torch.Tensor  # [J, H]

    @property
    def act(self) -> torch.Tensor:
        """[N, J] silu(gate x) * up x."""
        return F.silu(F.linear(self.x, self.gate)) * F.linear(self.x, self.up)


@torch.no_grad()
def capture_ffn(model: nn.Module, chunks: Sequence[torch.Tensor], max_tokens: int | None = None) -> list[FFNSample]:
    """Run a Llama-family ``model`` over the chunks and record every layer's FFN input."""
    layers = model.model.layers
    xs: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = []
    for i, layer in enumerate(layers):

        def hook(_module, args, _i=i):
            xs[_i].append(args[0].reshape(-1, args[0].shape[-1]).float())

        handles.append(layer.mlp.register_forward_pre_hook(hook))
    try:
        for ids in chunks:
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [
        FFNSample(
            x=torch.cat(pieces)[:max_tokens],
            gate=layer.mlp.gate_proj.weight.detach().float(),
            up=layer.mlp.up_proj.weight.detach().float(),
        )
        for layer, pieces in zip(layers, xs)
    ]


class _Stop(Exception):
    pass


class SequentialFFN:
    """Layer-by-layer FFN samples on the student's own hidden states (GPTQ / SparseGPT-style calibration).

    :func:`capture_ffn` records every layer's FFN input on the *dense* pruned teacher, so layer i's
    router and down projections are fitted to inputs the student (whose layers before i are already
    approximations) never sees. Here the calibration tokens are carried through ``model`` (the
    pruned teacher) one decoder layer at a time: :meth:`sample` gives layer i's FFN input on the
    current hidden states, and :meth:`advance` moves them through layer i with the FFN the student
    actually got (the built MoE block), so layer i+1 is fitted on what the student computes.
    One pass of the pruned model in all; the decoder layers are called with the keyword arguments
    (mask, rotary embeddings) the model itself passes them, captured on layer 0.
    """

    def __init__(self, model: nn.Module, chunks: Sequence[torch.Tensor], correct: bool = False):
        self.layers = model.model.layers
        self.states: list[tuple[torch.Tensor, dict]] = [self._layer_inputs(model, ids) for ids in chunks]
        # correct: also carry the dense model's states; `target` = what layer i's FFN must add to the student's
        # residual stream to land on the dense model's after layer i (upstream errors included)
        self.dense: list[torch.Tensor] | None = [h for h, _ in self.states] if correct else None
        self.target: torch.Tensor | None = None
        self._mid: list[torch.Tensor] = []  # [rows, T, H] residual stream after layer i's attention, per chunk
        self._x: list[torch.Tensor] = []  # [rows, T, H] layer i's FFN input, per chunk

    @staticmethod
    @torch.no_grad()
    def _layer_inputs(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        captured: dict[str, Any] = {}

        def pre(_module, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _Stop

        handle = model.model.layers[0].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured["h"], captured["kwargs"]

    @torch.no_grad()
    def sample(self, i: int) -> FFNSample:
        """Layer i's FFN sample on the current hidden states (call once per layer, in order, then advance)."""
        layer = self.layers[i]
        self._mid, self._x = [], []

        def grab_mid(_module, args):
            self._mid.append(args[0])
            raise _Stop

        handle = layer.post_attention_layernorm.register_forward_pre_hook(grab_mid)
        try:
            for h, kwargs in self.states:
                try:
                    layer(h, **kwargs)
                except _Stop:
                    pass
        finally:
            handle.remove()
        self._x = [layer.post_attention_layernorm(mid) for mid in self._mid]
        if self.dense is not None:
            self.dense = [self._out(layer(h, **kwargs)) for h, (_, kwargs) in zip(self.dense, self.states)]
            self.target = torch.cat([(d - m).reshape(-1, d.shape[-1]) for d, m in zip(self.dense, self._mid)]).float()
        return FFNSample(
            x=torch.cat([x.reshape(-1, x.shape[-1]) for x in self._x]).float(),
            gate=layer.mlp.gate_proj.weight.detach().float(),
            up=layer.mlp.up_proj.weight.detach().float(),
        )

    @staticmethod
    def _out(out: Any) -> torch.Tensor:
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def advance(self, ffn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Move the hidden states through the layer last sampled, with ``ffn`` ([rows, T, H] -> same) as its FFN."""
        self.states = [(mid + ffn(x), kwargs) for mid, x, (_, kwargs) in zip(self._mid, self._x, self.states)]
        self._mid, self._x = [], []


def neuron_contributions(act: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """|act[n, j]| * |down[:, j]|: how much neuron j moves token n's output. act [N, J], down [H, J] -> [N, J]."""
    return act.abs() * down.detach().float().norm(dim=0)[None, :]


def _balanced_assign(similarity: torch.Tensor, capacity: int) -> torch.Tensor:
    """Greedy capacity-constrained assignment: best (item, cluster) pairs first. [J, E] -> [J] cluster ids.

    The same result as walking all J*E pairs in descending order (taking a pair when its item is free
    and its cluster has room), computed in at most E+1 vectorised rounds: each free item's best open
    cluster, items sorted by that similarity, and every item taken up to the first one whose cluster
    has just filled (its best open cluster, and so its place in the order, must be recomputed).
    """
    items, clusters = similarity.shape
    assign = torch.full((items,), -1, dtype=torch.long)
    room = torch.full((clusters,), capacity, dtype=torch.long)
    free = torch.arange(items)
    while free.numel() and bool((room > 0).any()):
        sim = similarity[free].masked_fill(room[None, :] == 0, float("-inf"))  # [F, E]
        best, choice = sim.max(dim=1)  # [F]
        order = torch.argsort(best, descending=True, stable=True)
        choice = choice[order]  # [F] in walking order
        seen = (
            F.one_hot(choice, clusters).cumsum(0).gather(1, choice[:, None]).squeeze(1)
        )  # [F] 1-based rank in its cluster
        over = (seen > room[choice]).nonzero()
        take = int(over[0]) if over.numel() else choice.numel()
        picked = free[order[:take]]
        assign[picked] = choice[:take]
        room -= torch.bincount(choice[:take], minlength=clusters)
        keep = torch.ones(free.numel(), dtype=torch.bool)
        keep[order[:take]] = False
        free = free[keep]
    return assign


def cluster_neurons(
    contrib: torch.Tensor,
    num_experts: int,
    expert_size: int,
    shared_size: int,
    active_fraction: float = 0.25,
    iters: int = 15,
    seed: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Partition J neurons into a shared expert (S) and E balanced experts (m each), S + E*m <= J.

    contrib [N, J] (see :func:`neuron_contributions`). When S + E*m < J the neurons with the lowest
    mean contribution are pruned first (Minitron's width pruning by activation importance); the
    down-projection refit later compensates for them. A neuron is *active* for a token when it is
    among the token's top ``active_fraction`` contributors. Shared = the S neurons active for the
    most tokens; the rest are grouped by balanced spherical k-means over their activity patterns
    (co-active neurons land together). Returns (shared [S], experts E x [m]), indices ascending,
    into the original J.
    """
    kept_count = shared_size + num_experts * expert_size
    if kept_count > contrib.shape[1]:
        raise ValueError(f"{shared_size} + {num_experts} x {expert_size} > {contrib.shape[1]} neurons")
    if kept_count < contrib.shape[1]:
        kept = torch.sort(torch.topk(contrib.mean(0), kept_count).indices).values  # [S + E*m]
        shared, experts = cluster_neurons(
            contrib[:, kept], num_experts, expert_size, shared_size, active_fraction, iters, seed
        )
        return kept[shared], [kept[e] for e in experts]
    tokens, total = contrib.shape
    k = max(1, int(active_fraction * total))
    threshold = contrib.topk(k, dim=1).values[:, -1:]  # [N, 1]
    active = (contrib >= threshold).float()  # [N, J]
    frequency = active.mean(0)  # [J]
    shared = (
        torch.sort(torch.topk(frequency, shared_size).indices).values
        if shared_size
        else torch.empty(0, dtype=torch.long)
    )
    is_shared = torch.zeros(total, dtype=torch.bool)
    is_shared[shared] = True
    rest = torch.nonzero(~is_shared).flatten()  # [E*m]
    # Activity pattern of each neuron over tokens, weighted by contribution, unit length.
    feats = F.normalize((active * contrib)[:, rest].t(), dim=1)  # [E*m, N]
    generator = torch.Generator().manual_seed(seed)
    centroids = feats[torch.randperm(feats.shape[0], generator=generator)[:num_experts]]  # [E, N]
    assign = torch.zeros(feats.shape[0], dtype=torch.long)
    for _ in range(iters):
        new = _balanced_assign(feats @ centroids.t(), expert_size)
        if torch.equal(new, assign):
            break
        assign = new
        members = F.one_hot(assign, num_experts).to(feats.dtype)  # [E*m, E]
        centroids = F.normalize(members.t() @ feats, dim=1)  # [E, N]: the direction of each cluster's mean
    experts = [torch.sort(rest[assign == e]).values for e in range(num_experts)]
    return shared, experts


# ----------------------------------------------------------------------------- 3. router and scales
def expert_outputs(act: torch.Tensor, down: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each expert's (unscaled) output per token: act [N, J], down [H, J] -> [N, E, H]."""
    down = down.detach().float()
    return torch.stack([act[:, idx] @ down[:, idx].t() for idx in experts], dim=1)


def difficulty_sharpness(sharpness: float, difficulty: torch.Tensor | None, scale: float) -> torch.Tensor | float:
    """Per-token router-target sharpness [N]: ``sharpness * exp(-scale * z)``, z = standardised difficulty.

    difficulty [N] (the teacher's next-token entropy at each calibration token). Tokens harder than
    average (z > 0) get a flatter target, so top-p keeps more experts for them; easier ones a sharper
    target (fewer experts). ``scale`` 0 or no difficulty: the plain ``sharpness``.
    """
    if difficulty is None or scale == 0 or difficulty.numel() < 2:
        return sharpness
    d = difficulty.detach().float()
    z = ((d - d.mean()) / d.std().clamp(min=1e-6)).clamp(-3.0, 3.0)  # [N]
    return sharpness * torch.exp(-scale * z)


def fit_router(
    x: torch.Tensor,
    outputs: torch.Tensor,
    sharpness: float | torch.Tensor = 1.0,
    steps: int = 200,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> torch.Tensor:
    """Router weights [E, H] whose softmax(x W^T) matches each token's expert shares.

    x [N, H] the router's input; outputs [N, E, H] the experts' outputs. Target for token n:
    ``share_e = |out_ne|^s_n / sum_f |out_nf|^s_n`` with ``s_n`` the sharpness (one number, or [N]
    per token from :func:`difficulty_sharpness`). Fitted by L-BFGS on the soft-label cross-entropy
    (a convex problem) with a small L2 penalty.
    """
    norms = outputs.detach().norm(dim=-1).clamp(min=1e-12)  # [N, E]
    power = sharpness.reshape(-1, 1).float() if isinstance(sharpness, torch.Tensor) else sharpness  # [N, 1] or float
    target = F.softmax(power * norms.log(), dim=1)  # [N, E] = norms**s / sum(norms**s), stable for big s
    x = x.detach().float()
    scale = x.norm(dim=1).mean().clamp(min=1e-6)  # condition the problem; folded back below
    xs = x / scale
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(target.shape[1], x.shape[1], generator=generator) * 1e-3).requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logp = F.log_softmax(xs @ weight.t(), dim=1)
        loss = -(target * logp).sum(1).mean() + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach() / scale


def route(
    logits: torch.Tensor, routing: str, k: int, top_p: float, min_k: int, max_k: int, norm_topk_prob: bool = True
) -> torch.Tensor:
    """The student's selection rule as dense weights [N, E] (0 for experts not chosen)."""
    probs = F.softmax(logits.float(), dim=-1)
    if routing == "topk":
        weights, experts = select_topk(probs, k, norm_topk_prob)
    else:
        weights, experts, _ = select_topp(probs, top_p, min_k, max_k)
    return torch.zeros_like(probs).scatter_(1, experts, weights)


def fit_expert_scales(
    weights: torch.Tensor, outputs: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3
) -> torch.Tensor:
    """Per-expert scales s [E] minimising sum_n |sum_e w_ne s_e out_ne - target_n|^2 (ridge towards 1).

    weights [N, E] routed weights (0 = not chosen); outputs [N, E, H]; target [N, H] (dense FFN
    output minus whatever the routed experts need not produce, e.g. the shared expert's).
    """
    a = (weights[:, :, None] * outputs).transpose(0, 1).reshape(outputs.shape[1], -1)  # [E, N*H]
    gram = a @ a.t()  # [E, E]
    rhs = a @ target.reshape(-1)  # [E]
    reg = ridge * gram.diagonal().mean().clamp(min=1e-12)
    eye = torch.eye(gram.shape[0])
    # Ridge towards s = 1 (the plain sum), not 0: experts a token rarely picks stay sane.
    return torch.linalg.solve(gram + reg * eye, rhs + reg * torch.ones_like(rhs))


def fit_down_projections(
    act: torch.Tensor,
    weights: torch.Tensor,
    shared: torch.Tensor,
    experts: Sequence[torch.Tensor],
    initial: torch.Tensor,
    target: torch.Tensor,
    ridge: float = 1e-2,
) -> torch.Tensor:
    """Down projections [H, S + E*m] (shared neurons first, then each expert's) refitted by ridge regression.

    The routed block's output is linear in its down projections: token n's output is
    ``down_shared @ act[n, shared] + sum_e w_ne * down_e @ act[n, experts[e]]``. So given the
    routing (weights [N, E], 0 = expert not chosen) the least-squares fit to the dense FFN output
    ``target`` [N, H] is one linear solve: the chosen experts (and the shared expert) learn to carry
    part of what the experts a token skipped would have produced. act [N, J]; ``initial`` [H, S + E*m]
    (e.g. the scale-fitted projections) is where the ridge pulls (``ridge`` x the mean feature energy),
    so rarely chosen experts stay close to it.
    """
    columns = [act[:, shared]] + [act[:, idx] * weights[:, e : e + 1] for e, idx in enumerate(experts)]
    z = torch.cat(columns, dim=1).float()  # [N, S + E*m] features
    # Products in fp32 (fp64 made this the slowest step of the init), the solve in fp64.
    gram = (z.t() @ z).double()  # [F, F]
    reg = ridge * gram.diagonal().mean().clamp(min=1e-12)
    rhs = (z.t() @ target.float()).double() + reg * initial.double().t()  # [F, H]
    solved = torch.linalg.solve(gram + reg * torch.eye(gram.shape[0], dtype=gram.dtype), rhs)  # [F, H]
    return solved.t().to(act.dtype)
