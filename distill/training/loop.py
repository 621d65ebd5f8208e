"""The distillation train loop: plain PyTorch, the same function with or without Ray Train.

:func:`train_loop` takes a :class:`Runtime` that says who this process is (rank, world size,
device), where its rows come from, how to wrap the model (DDP/FSDP) and where checkpoints and
metrics go. :class:`LocalRuntime` runs it in-process (tests, ``--workers 0``); the Ray Train
runtime in :mod:`distill.training.ray_train` is a handful of lines around ``ray.train``.

Per optimizer step: ``grad_accum`` packed micro-batches, loss = weighted KD/CE terms on completion
positions (averaged over the step's target tokens on all micro-batches and ranks) + the MoE aux
losses, gradient clipping, AdamW with warmup + cosine per stage. DDP or FSDP2 wrap the model
(:func:`wrap_model`) before the optimizer is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import math
import os
import pkgutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cluster import storage
from cluster.errors import ConfigError
from distill.losses import LossWeights, difficulty_routing_loss, distillation_loss, teacher_entropy, teacher_token_nll
from distill.training import checkpoint as ckpt
from distill.training.data import (
    MixtureStream,
    PackedBatch,
    RowSource,
    TableSource,
    collate,
    component_mask,
    heldout_mask,
    next_batch,
    read_table,
)
from distill.training.on_policy import OnPolicyStats, on_policy_batch
from distill.training.section import Precision, Schedule, Strategy, TrainSection, TrainStage


@dataclasses.dataclass
class TrainJob:
    """Everything a worker needs, JSON-able (it travels as ``train_loop_config``)."""

    section: dict[str, Any]
    init_dir: str  # the student at initialisation (HF dir)
    metrics_uri: str  # JSONL, written by rank 0
    data_files: list[str] = dataclasses.field(default_factory=list)  # no-Ray path reads these
    checkpoint_dir: str | None = None  # no-Ray path keeps checkpoints here
    ray_checkpoints: str | None = None  # Ray path: the storage folder Ray Train writes ``checkpoint_*`` into
    pad_id: int = 0
    # Step callbacks, each {"target": "module:Class", "kwargs": {...}}: built once on every worker, their
    # ``before_step(rank, step, batches)`` runs before each optimizer step (row tracing, fault injection, ...).
    callbacks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # On-policy stages: ``LabelService.handle()`` of the teacher labelling service, and the student's end tokens.
    labeller: dict[str, Any] | None = None
    eos_ids: list[int] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainJob:
        return cls(**data)


# ----------------------------------------------------------------------------- runtimes
class Runtime:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def sources(self, stage_index: int, stage: TrainStage, seed: int) -> list[RowSource]:
        raise NotImplementedError

    def heldout(self, seed: int) -> RowSource | None:
        raise NotImplementedError

    def wrap(self, module: DistillModule, section: TrainSection) -> nn.Module:
        return wrap_model(module, section.strategy, self.device)

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        raise NotImplementedError


class LocalRuntime(Runtime):
    """One process, rows from the Parquet shards, checkpoints in a local folder."""

    def __init__(self, job: TrainJob, section: TrainSection):
        self.table = read_table(job.data_files)
        held = heldout_mask(self.table, section.heldout_fraction, section.seed)
        import pyarrow as pa

        self.train_table = self.table.filter(pa.array(~held))
        self.heldout_table = self.table.filter(pa.array(held))
        self.checkpoints = ckpt.LocalCheckpoints(job.checkpoint_dir, keep=section.keep_checkpoints)
        if section.gpus_per_worker and torch.cuda.is_available():
            self.device = torch.device("cuda")

    def sources(self, stage_index, stage, seed):
        import pyarrow as pa

        return [
            TableSource(self.train_table.filter(pa.array(component_mask(self.train_table, c))), seed + i)
            for i, c in enumerate(stage.mixture)
        ]

    def heldout(self, seed):
        return TableSource(self.heldout_table, seed) if self.heldout_table.num_rows else None

    @contextlib.contextmanager
    def latest_checkpoint(self):
        yield self.checkpoints.latest()

    def report(self, metrics, checkpoint_dir, step):
        if checkpoint_dir is not None:
            self.checkpoints.commit(checkpoint_dir, step)


# ----------------------------------------------------------------------------- model wrapper
class DistillModule(nn.Module):
    """Student + loss in one ``forward`` so DDP/FSDP see every parameter used inside their forward."""

    def __init__(self, student: nn.Module, chunk_size: int):
        super().__init__()
        self.student = student
        self.chunk_size = chunk_size

    def forward(
        self,
        input_ids,
        attention_mask,
        position_ids,
        pred_index,
        targets,
        topk_ids,
        topk_logprobs,
        weights: LossWeights,
        difficulty_coef: float = 0.0,
    ):
        """Returns (:class:`LossOutput` of the KD terms, the decoder output with the MoE aux loss).

        ``difficulty_coef > 0`` adds :func:`~distill.losses.difficulty_routing_loss` (routing entropy
        against the teacher's entropy at each target position) to the aux loss, as ``aux_losses["difficulty"]``.
        """
        out = self.student.model(input_ids, attention_mask, position_ids=position_ids, compute_aux=True)
        hidden = out.last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])[pred_index]  # [N, H]
        losses = distillation_loss(
            flat, self.student.lm_head.weight, targets, topk_ids, topk_logprobs, weights, chunk_size=self.chunk_size
        )
        if difficulty_coef > 0 and out.router_entropy is not None:
            if topk_ids is None:
                raise ConfigError(
                    "routing.router_difficulty_loss_coef needs the teacher's top-k log-probs in the "
                    "training data; set it to 0 for data without soft labels"
                )
            term = difficulty_routing_loss(
                out.router_entropy.reshape(-1)[pred_index], teacher_entropy(topk_ids, topk_logprobs)
            )
            out.aux_loss = out.aux_loss + difficulty_coef * term
            out.aux_losses = {**out.aux_losses, "difficulty": term}
        return losses, out


@dataclasses.dataclass
class StepResult:
    """One optimizer step's forward/backward, detached. ``sums`` are this rank's token-weighted sums."""

    tokens: int  # this rank's target tokens
    global_tokens: float  # all ranks' target tokens
    global_positions: float  # all ranks' non-padding positions
    sums: torch.Tensor  # [3 + P]: KD loss, KL, top-1 hits, then each of ``parts`` (all times tokens)
    parts: list[str]
    aux: torch.Tensor  # [1 + A]: weighted aux loss, then each of ``aux_names``, summed over micro-batches
    aux_names: list[str]
    micro_batches: int
    out: Any  # the last micro-batch's decoder output (routing stats)


def train_step(
    module: nn.Module,
    batches: list[PackedBatch],
    weights: LossWeights,
    world: int,
    device: torch.device,
    autocast: Any = contextlib.nullcontext,
    difficulty_coef: float = 0.0,
) -> StepResult:
    """Forward and backward over one step's micro-batches; gradients of the step's per-token mean loss.

    Each micro-batch contributes its KD loss *sum* over target tokens divided by the target tokens of
    the whole step on all ranks (all-reduced), times ``world`` because DDP/FSDP average gradients over
    ranks. So every target token weighs the same however tokens fall on micro-batches and ranks (a
    per-micro-batch mean would give tokens in short micro-batches more weight). The MoE aux losses
    are per-micro-batch means and are averaged over micro-batches (and ranks, by the gradient mean).
    """
    tokens = sum(b.tokens for b in batches)
    positions = sum(int(b.attention_mask.sum()) for b in batches)
    global_tokens, global_positions = _all_reduce([float(tokens), float(positions)], device)
    scale = world / max(global_tokens, 1.0)
    sums = aux = None
    parts: list[str] = []
    aux_names: list[str] = []
    out = None
    for micro, batch in enumerate(batches):
        last = micro == len(batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(module, "no_sync") else module.no_sync()
        if hasattr(module, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last micro-batch only
            module.set_requires_gradient_sync(last)
        with sync:
            with autocast():
                losses, out = module(
                    batch.input_ids,
                    batch.attention_mask,
                    batch.position_ids,
                    batch.pred_index,
                    batch.targets,
                    batch.topk_ids,
                    batch.topk_logprobs,
                    weights=weights,
                    difficulty_coef=difficulty_coef,
                )
            loss = losses.loss_sum * scale
            if out.aux_loss is not None:
                loss = loss + out.aux_loss / len(batches)
            loss.backward()
        with torch.no_grad():
            n, zero = float(losses.tokens), losses.loss_sum.new_zeros((), dtype=torch.float32)
            parts = sorted(losses.parts)
            micro_sums = torch.stack(
                [losses.loss_sum.detach().float(), losses.parts.get("kl", zero) * n, losses.top1_agreement.float() * n]
                + [losses.parts[k].float() * n for k in parts]
            )
            sums = micro_sums if sums is None else sums + micro_sums
            aux_names = sorted(out.aux_losses)
            micro_aux = torch.stack(
                [(out.aux_loss if out.aux_loss is not None else loss.new_zeros(())).detach().float()]
                + [out.aux_losses[k].detach().float() for k in aux_names]
            )
            aux = micro_aux if aux is None else aux + micro_aux
    return StepResult(tokens, global_tokens, global_positions, sums, parts, aux, aux_names, len(batches), out)


def step_metrics(result: StepResult, world: int, device: torch.device) -> dict[str, Any]:
    """The step's loss / KL / top-1 / parts as token-weighted means over micro-batches and ranks (collective)."""
    values = _all_reduce(result.sums.tolist() + result.aux.tolist() + [float(result.micro_batches)], device)
    n = max(result.global_tokens, 1.0)
    sums, aux, micro = values[: len(result.sums)], values[len(result.sums) : -1], values[-1]
    aux_mean = [a / max(micro, 1.0) for a in aux]
    return {
        "loss": sums[0] / n + aux_mean[0],
        "kl": sums[1] / n,
        "top1": sums[2] / n,
        "parts": {k: v / n for k, v in zip(result.parts, sums[3:])},
        "aux": dict(zip(result.aux_names, aux_mean[1:])),
    }


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wrap_model(module: DistillModule, strategy: Strategy, device: torch.device) -> nn.Module:
    """DDP or FSDP around the :class:`DistillModule` when this process is one of several ranks.

    FSDP is FSDP2 (``fully_shard``): each decoder layer is one unit, the root holds the embeddings,
    final norm and LM head; parameters become DTensor shards *in place* (build the optimizer after
    this). Works on CPU (gloo) and GPU (NCCL).
    """
    if not _distributed():
        return module
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if strategy is Strategy.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in module.student.model.layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def freeze_parameters(model: nn.Module, patterns: list[str]) -> list[str]:
    """``requires_grad = False`` for the parameters whose names match one of ``patterns`` (``train.freeze``,
    fnmatch; a tied weight matches under either name); the names frozen. Before wrapping: DDP and FSDP
    then leave them out of their reductions, autograd computes no gradient for them, and
    :func:`build_optimizer` keeps no state for them. The quickstart freezes its 28M-parameter embedding:
    its 120 steps took 204 s instead of 293 s on 2 cores."""
    named = list(model.named_parameters(remove_duplicate=False))
    frozen = []
    for pattern in patterns:
        matched = [(name, p) for name, p in named if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ConfigError(
                f"train.freeze: {pattern!r} matches no parameter of the student (names look like "
                f"{named[0][0]!r}, {named[-1][0]!r}); fix the pattern or remove it"
            )
        for name, p in matched:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def _fusable(p: torch.Tensor) -> bool:
    """Fused AdamW for plain tensors on CPU / CUDA, and for FSDP's DTensor shards on CUDA only."""
    if p.device.type not in FUSED_ADAMW_DEVICES:
        return False
    return p.device.type == "cuda" or not _is_dtensor(p)


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed: no DTensors either
        return False
    return isinstance(p, DTensor)


def build_optimizer(module: nn.Module, section: TrainSection) -> torch.optim.Optimizer:
    """AdamW over the (wrapped) module's trainable parameters: weight decay on matrices except the embeddings.

    Built after :func:`wrap_model`, so under FSDP it holds the sharded parameters it will step. Fused
    (one kernel over all parameters) on CPU and CUDA: the quickstart student's step on 2 threads takes
    66 ms instead of 206 ms with the default per-parameter loop (torch 2.13). The fused kernel does not
    bump the parameters' version counters, so :func:`clip_and_step` does. FSDP's sharded parameters
    (DTensors) on CPU keep the default loop: one CI run of the 2-rank FSDP test on CPU aborted with
    ``free(): invalid pointer`` once the fused kernel stepped DTensor shards (not reproduced in 15 runs
    here), and the default loop is what that test had passed with in every earlier run.
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    fused = all(_fusable(p) for p in decay + no_decay)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": section.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=section.lr,
        betas=section.betas,
        fused=fused or None,
    )


def clip_and_step(
    module: nn.Module, optimizer: torch.optim.Optimizer, frozen: list[nn.Parameter], grad_clip: float | None
) -> float | None:
    """Drop the frozen parameters' gradients, clip the rest (DDP or FSDP2 DTensors), step; returns the norm."""
    for p in frozen:
        p.grad = None  # left out of the clip and the optimizer step (AdamW skips parameters without a grad)
    grad_norm = None
    if grad_clip:
        params = [p for p in module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)  # FSDP2: the norm over all shards (a DTensor)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    optimizer.step()
    if any(group.get("fused") for group in optimizer.param_groups):
        # The fused kernel writes the parameters without bumping their version counters, which is how
        # the student's cached weight stacks (fused q/k/v, the MoE dense path) see that they changed.
        torch.autograd.graph.increment_version(
            [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        )
    return grad_norm


def _all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def _gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _routers(model: nn.Module):
    from distill.student.router import Router

    return [m for m in model.modules() if isinstance(m, Router)]


def apply_routing(model: nn.Module, stage: TrainStage, progress: float) -> dict[str, Any]:
    """Set the stage's routing on the routers and the config (progress in [0, 1] moves a top_p schedule)."""
    r = stage.routing
    config = model.model.config
    applied: dict[str, Any] = {}
    if r.top_p is not None:
        start, end = r.top_p if isinstance(r.top_p, list) else [r.top_p, r.top_p]
        top_p = float(start + (end - start) * min(max(progress, 0.0), 1.0))
        config.top_p = top_p
        for router in _routers(model):
            router.top_p = top_p
        applied["top_p"] = round(top_p, 6)
    if r.num_experts_per_tok is not None:
        config.num_experts_per_tok = r.num_experts_per_tok
        for router in _routers(model):
            router.k = r.num_experts_per_tok
        applied["num_experts_per_tok"] = r.num_experts_per_tok
    for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_entropy_loss_coef"):
        value = getattr(r, name)
        if value is not None:
            setattr(config, name, float(value))
            applied[name] = value
    if r.router_difficulty_loss_coef is not None:  # a training term (needs teacher labels), not a model setting
        applied["router_difficulty_loss_coef"] = r.router_difficulty_loss_coef
    return applied


def frozen_parameters(model: nn.Module, stage: TrainStage) -> list[nn.Parameter]:
    """Parameters the stage does not train (the routers with ``freeze_router``).

    They keep ``requires_grad`` (DDP/FSDP fixed the set of parameters they reduce when wrapping; toggling
    it later breaks the next step's reduction): their gradients are dropped before clipping and the
    optimizer step instead (:func:`clip_and_step`), so AdamW neither moves them nor decays them.
    """
    return [router.weight for router in _routers(model)] if stage.routing.freeze_router else []


def lr_at(
    section: TrainSection, stage: TrainStage, step_in_stage: int, progress: float, decay_from: float = 0.0
) -> float:
    """The LR of the stage's step ``step_in_stage`` (0-based): linear warmup, then the decay schedule.

    Warmup steps ``0 .. W-1`` ramp up to ``peak * W / (W + 1)``; step ``W`` is at the peak and the
    decay runs over the rest of the stage. ``progress`` in [0, 1] is the stage's progress before
    this step; for token-length stages ``decay_from`` is the progress when warmup ended.
    """
    peak = stage.lr or section.lr
    floor = peak * (stage.min_lr_ratio if stage.min_lr_ratio is not None else section.min_lr_ratio)
    warmup = stage.warmup_steps if stage.warmup_steps is not None else section.warmup_steps
    if warmup and step_in_stage < warmup:
        return peak * (step_in_stage + 1) / (warmup + 1)
    if stage.steps is not None:
        p = (step_in_stage - warmup) / max(stage.steps - warmup, 1)
    else:
        p = (progress - decay_from) / max(1.0 - decay_from, 1e-12)
    p = min(max(p, 0.0), 1.0)
    if stage.schedule is Schedule.constant:
        return peak
    if stage.schedule is Schedule.linear:
        return peak + (floor - peak) * p
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * p))


class MetricsLog:
    """``metrics.jsonl``: cut back to the resumed step once, atomically (a resume never duplicates lines), then
    one appended line per record (object stores cannot append: there the file is rewritten whole)."""

    def __init__(self, uri: str, resume_step: int | None):
        self.uri = uri
        self.lines: list[str] = []
        if resume_step is not None and storage.exists(uri):
            for line in storage.read_text(uri).splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash mid-append
                if record.get("step", 0) <= resume_step:
                    self.lines.append(line)
        storage.atomic_write_text(uri, "".join(line + "\n" for line in self.lines))

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=float)
        self.lines.append(line)
        if storage.is_local(self.uri):
            with open(storage.local_path(self.uri, "metrics.jsonl is appended"), "a") as handle:
                handle.write(line + "\n")
        else:
            storage.atomic_write_text(self.uri, "".join(x + "\n" for x in self.lines))


def _autocast(device: torch.device, section: TrainSection):
    use_bf16 = section.precision is Precision.bf16 or (section.precision is Precision.auto and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _load_student(init_dir: str):
    import distill.student.hf  # noqa: F401 - registers the model type
    from distill.student.export import load_student

    return load_student(storage.local_copy(init_dir)).train()


def _stage_length_done(stage: TrainStage, state: dict[str, Any]) -> tuple[bool, float]:
    """(stage over, progress in [0, 1]) by the stage's length: steps, completion tokens or minutes."""
    if stage.steps is not None:
        return state["stage_step"] >= stage.steps, state["stage_step"] / stage.steps
    if stage.minutes is not None:
        progress = state.get("stage_seconds", 0.0) / (60.0 * stage.minutes)
        return progress >= 1.0, min(progress, 1.0)
    return state["stage_tokens"] >= stage.tokens, state["stage_tokens"] / stage.tokens


# ----------------------------------------------------------------------------- the loop
def train_loop(job: TrainJob, runtime: Runtime) -> dict[str, Any]:
    """Train through every stage (resuming from the runtime's latest checkpoint); returns the final state."""
    section = TrainSection.model_validate(job.section)
    rank, world, device = runtime.rank, runtime.world_size, runtime.device
    threads = section.threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, section.workers))
    torch.set_num_threads(threads)
    torch.manual_seed(section.seed)

    model = _load_student(job.init_dir).to(device)
    freeze_parameters(model, section.freeze)
    state: dict[str, Any] = {
        "stage": 0,
        "stage_step": 0,
        "stage_tokens": 0,
        "stage_seconds": 0.0,  # training time of a ``minutes`` stage (the same on every rank)
        "step": 0,
        "tokens": 0,
        "data": None,
        "world_size": world,
        "history": [],
        "wall_seconds": 0.0,
    }
    resumed_from = None
    with runtime.latest_checkpoint() as path:
        if path is not None:  # full weights into the plain model; wrapping then shards / broadcasts them
            state = ckpt.load(path, model=model, optimizer=None)
            resumed_from = state["step"]
        module = runtime.wrap(DistillModule(model, section.loss_chunk_size), section)
        optimizer = build_optimizer(module, section)  # after wrapping: FSDP's parameters are the shards
        if path is not None:
            ckpt.load_optimizer(path, model=model, module=module, optimizer=optimizer)
    if resumed_from is not None and state.get("world_size") != world:
        state["data"] = None  # data positions are per rank; with another world size the stage's epoch restarts
    np_rng = np.random.default_rng([section.seed, rank])
    metrics_log = MetricsLog(job.metrics_uri, resumed_from if resumed_from is not None else -1) if rank == 0 else None
    callbacks = [pkgutil.resolve_name(c["target"])(**c.get("kwargs", {})) for c in job.callbacks]
    if rank == 0 and resumed_from is not None:
        metrics_log.write({"event": "resumed", "step": state["step"], "stage": state["stage"]})
    stages = section.stages
    labeller = None
    if any(s.on_policy for s in stages):
        from distill.teacher.service import LabelService

        if job.labeller is None:
            raise ConfigError("train.stages[].on_policy needs the teacher labelling service (TrainJob.labeller)")
        labeller = LabelService.attach(**job.labeller)
    started = time.perf_counter()
    wall_before = float(state.get("wall_seconds", 0.0))

    while state["stage"] < len(stages):
        stage_index = state["stage"]
        stage = stages[stage_index]
        weights = stage.loss
        stream = MixtureStream(
            runtime.sources(stage_index, stage, section.seed * 1000 + stage_index * 10),
            [c.weight for c in stage.mixture],
            seed=section.seed * 7919 + stage_index * 31 + rank,
            state=(state["data"] or [None] * world)[rank] if state["data"] else None,
        )
        window_start, window_tokens, window_positions = time.perf_counter(), 0, 0
        window_on_policy, window_train_s = OnPolicyStats(), 0.0
        while True:
            done, progress = _stage_length_done(stage, state)
            if done:
                break
            step_t0 = time.perf_counter()
            routing = apply_routing(model, stage, progress)
            warmup = stage.warmup_steps if stage.warmup_steps is not None else section.warmup_steps
            if state["stage_step"] <= warmup:
                state["decay_from"] = progress  # token-length stages: the decay starts where warmup ended
            lr = lr_at(section, stage, state["stage_step"], progress, state.get("decay_from", 0.0))
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            batches = []
            for micro in range(section.grad_accum):
                packed = next_batch(stream.take, stream.peek, section.micro_batch_size, section.seq_len)
                # the draw depends only on (seed, rank, step, micro-batch): a resumed run repeats it
                draw = np.random.default_rng([section.seed, rank, state["step"], micro]).random()
                if stage.on_policy is not None and draw < stage.on_policy.fraction:
                    # GKD: this micro-batch's prompts are completed by the student and scored by the teacher
                    rows = [r for seq in packed for r in seq]
                    batch = on_policy_batch(
                        model,
                        rows,
                        stage.on_policy,
                        labeller,
                        eos_ids=set(job.eos_ids),
                        pad_id=job.pad_id,
                        stats=window_on_policy,
                        generator=torch.Generator().manual_seed(int(draw * 2**62)),  # resume-exact too
                    )
                else:
                    batch = collate(packed, section.seq_len, job.pad_id, weights.needs_soft_labels)
                batches.append(batch.to(device))
            for callback in callbacks:
                callback.before_step(rank, state["step"] + 1, batches)
            train_t0 = time.perf_counter()
            result = train_step(
                module,
                batches,
                weights,
                world,
                device,
                lambda: _autocast(device, section),
                difficulty_coef=stage.routing.router_difficulty_loss_coef or 0.0,
            )
            out = result.out
            grad_norm = clip_and_step(module, optimizer, frozen_parameters(model, stage), section.grad_clip)
            window_train_s += time.perf_counter() - train_t0
            global_tokens, global_positions = result.global_tokens, result.global_positions
            state["step"] += 1
            state["stage_step"] += 1
            state["stage_tokens"] += int(global_tokens)
            state["tokens"] += int(global_tokens)
            window_tokens += int(global_tokens)
            window_positions += int(global_positions)
            if stage.minutes is not None:  # the slowest rank's step time, so every rank ends on the same step
                (step_s,) = _all_reduce([time.perf_counter() - step_t0], device, op="max")
                state["stage_seconds"] = state.get("stage_seconds", 0.0) + step_s

            done, progress = _stage_length_done(stage, state)
            log_now = state["stage_step"] % section.log_every == 0 or done
            ckpt_now = state["step"] % section.checkpoint_every == 0 or done
            metrics = None
            if log_now:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                means = step_metrics(result, world, device)
                metrics = {
                    "step": state["step"],
                    "stage": stage_index,
                    "stage_name": stage.name,
                    "lr": lr,
                    "loss": means["loss"],
                    "parts": means["parts"],
                    "top1": means["top1"],
                    "kl": means["kl"],
                    "tokens": state["tokens"],
                    "completion_tokens_per_s": window_tokens / elapsed,
                    "tokens_per_s": window_positions / elapsed,
                    "grad_norm": grad_norm,
                    "aux": means["aux"],
                    "routing": routing,
                    "experts_per_token": [round(float(s.experts_per_token), 4) for s in out.routing],
                    "expert_load": [[round(float(x), 4) for x in s.expert_load] for s in out.routing],
                    "world_size": world,
                }
                if stage.on_policy is not None:  # this rank's split of the window (rank 0 logs)
                    metrics["on_policy"] = window_on_policy.metrics(window_train_s)
                window_start, window_tokens, window_positions = time.perf_counter(), 0, 0
                window_on_policy, window_train_s = OnPolicyStats(), 0.0
            if not done and section.heldout_every and state["step"] % section.heldout_every == 0:
                held = evaluate_heldout(module, runtime, section, job, device)  # the budget curve's points
                if rank == 0:
                    metrics_log.write(
                        {
                            "event": "heldout",
                            "stage": stage_index,
                            "stage_name": stage.name,
                            "step": state["step"],
                            "train_tokens": state["tokens"],
                            **held,
                        }
                    )
            if done:
                held = evaluate_heldout(module, runtime, section, job, device)
                state["history"].append(
                    {
                        "stage": stage_index,
                        "name": stage.name,
                        "steps": state["stage_step"],
                        "tokens": state["stage_tokens"],
                        "end_step": state["step"],
                        "routing": routing,
                        "heldout": held,
                        **({"seconds": round(state["stage_seconds"], 2)} if stage.minutes is not None else {}),
                    }
                )
                if rank == 0:
                    metrics_log.write(
                        {
                            "event": "heldout",
                            "stage": stage_index,
                            "stage_name": stage.name,
                            "step": state["step"],
                            "train_tokens": state["tokens"],
                            **held,
                        }
                    )
                state["stage"] += 1
                state["stage_step"] = state["stage_tokens"] = 0
                state["stage_seconds"] = 0.0
                state["data"] = None
            else:
                state["data"] = None if not ckpt_now else _gather(stream.state())
            if rank == 0 and metrics is not None:
                metrics_log.write(metrics)
            if log_now or ckpt_now:
                staged = None
                if ckpt_now:
                    state["world_size"] = world
                    state["wall_seconds"] = wall_before + time.perf_counter() - started
                    state["np_rng"] = np_rng.bit_generator.state
                    sharded = ckpt.gather_sharded(module, optimizer)  # FSDP: collective, full state on rank 0
                    if rank == 0:
                        staged = ckpt.save(
                            _staging_dir(runtime), model=model, optimizer=optimizer, state=state, sharded=sharded
                        )
                runtime.report(metrics or {"step": state["step"]}, staged, state["step"])
            if done:
                break
    state["wall_seconds"] = wall_before + time.perf_counter() - started
    return state


def _staging_dir(runtime: Runtime) -> Path:
    if isinstance(runtime, LocalRuntime):
        return runtime.checkpoints.stage_dir()
    import tempfile

    return Path(tempfile.mkdtemp(prefix="raydistill-ckpt-"))


@torch.no_grad()
def evaluate_heldout(
    module: nn.Module, runtime: Runtime, section: TrainSection, job: TrainJob, device: torch.device
) -> dict[str, float]:
    """KL to the teacher (top-k + tail), top-1 agreement and CE on this rank's share of held-out rows, summed over ranks."""
    source = runtime.heldout(section.seed)
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # kl * n, top1 * n, ce * n, n, teacher ce * n
    rows = []
    if source is not None:
        limit = max(1, section.heldout_max_rows // runtime.world_size)
        for row in source.rows(0):
            if row["topk_ids"] is not None and len(row["input_ids"]) > row["prompt_len"]:
                rows.append(row)
            if len(rows) >= limit:
                break
    # Every rank runs the same number of forward passes (DDP/FSDP forwards are collective).
    batches = [rows[i : i + section.micro_batch_size] for i in range(0, len(rows), section.micro_batch_size)]
    count = int(_all_reduce([float(len(batches))], device, op="max")[0])
    weights = LossWeights(ce=1.0, forward_kl=1.0)
    was_training = module.training
    module.eval()
    for i in range(count):
        group = batches[i] if i < len(batches) else []
        if not group:
            # A rank with no rows left still joins the collective forward on a dummy row.
            dummy = {
                "prompt_id": "-",
                "input_ids": np.array([job.pad_id, job.pad_id]),
                "prompt_len": 1,
                "topk_ids": np.array([[job.pad_id]]),
                "topk_logprobs": np.array([[0.0]], dtype=np.float32),
            }
            group, real = [dummy], False
        else:
            real = True
        length = min(section.seq_len, max(len(r["input_ids"]) for r in group))
        batch = collate([[r] for r in group], length, job.pad_id).to(device)
        with _autocast(device, section):
            losses, _ = module(
                batch.input_ids,
                batch.attention_mask,
                batch.position_ids,
                batch.pred_index,
                batch.targets,
                batch.topk_ids,
                batch.topk_logprobs,
                weights=weights,
            )
        if real:
            n = float(batch.tokens)
            sums[0] += float(losses.parts["kl"]) * n
            sums[1] += float(losses.top1_agreement) * n
            sums[2] += float(losses.parts["ce"]) * n
            sums[3] += n
            sums[4] += float(teacher_token_nll(batch.targets, batch.topk_ids, batch.topk_logprobs).sum())
    module.train(was_training)
    kl, top1, ce, n, teacher_ce = _all_reduce(sums, device)
    if n == 0:
        return {"kl": float("nan"), "top1": float("nan"), "ce": float("nan"), "teacher_ce": float("nan"), "tokens": 0}
    # ce / teacher_ce on the same tokens = the student/teacher bits-per-byte ratio on them (same bytes)
    return {"kl": kl / n, "top1": top1 / n, "ce": ce / n, "teacher_ce": teacher_ce / n, "tokens": int(n)}
