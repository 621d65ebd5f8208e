"""The pipeline config's ``train:`` section: workers, optimiser, and the multi-stage curriculum.

``pipelines.config`` composes it into the root config. A stage's ``loss`` is :class:`distill.losses.LossWeights`.

A stage says what data it reads (``mixture``), for how long (``steps``, ``tokens`` or ``minutes``), with what
learning rate schedule, loss weights and routing. The default is one stage over all the data with
forward KL on the teacher's top-k soft labels.
"""

from __future__ import annotations

import enum

from pydantic import Field, field_validator, model_validator

from cluster.section import Section
from distill.losses import LossWeights


class Schedule(str, enum.Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class Strategy(str, enum.Enum):
    ddp = "ddp"
    fsdp = "fsdp"


class Precision(str, enum.Enum):
    auto = "auto"  # bf16 autocast on GPU, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


class MixtureComponent(Section):
    """Rows a stage reads: all conditions given must hold. ``weight`` is the share of sampled rows."""

    source: str | None = Field(default=None, description="the rows' `source` tag, e.g. self_instruct")
    min_quality: float | None = Field(default=None, description="judge score threshold (rows without one fail)")
    files: str | None = Field(default=None, description="glob on the shard file name, e.g. 'part-0000*'")
    finish_reason: str | None = Field(default=None, description="stop = complete answers, length = truncated")
    weight: float = Field(default=1.0, gt=0)


class RoutingSchedule(Section):
    """Routing during a stage. ``top_p`` may be one value or [start, end], moved linearly over the stage."""

    top_p: float | list[float] | None = Field(default=None, description="top-p threshold (top_p routing)")
    num_experts_per_tok: int | None = Field(default=None, ge=1, description="k (top-k routing)")
    router_aux_loss_coef: float | None = Field(default=None, ge=0)
    router_z_loss_coef: float | None = Field(default=None, ge=0)
    router_entropy_loss_coef: float | None = Field(default=None, ge=0)
    router_difficulty_loss_coef: float | None = Field(
        default=None,
        ge=0,
        description="top-p: routing entropy against the teacher's entropy per token (lower "
        "where the teacher is confident, higher where it is unsure), so harder tokens take more experts",
    )
    freeze_router: bool = False

    @field_validator("top_p")
    @classmethod
    def _top_p_range(cls, value):
        values = value if isinstance(value, list) else [value] if value is not None else []
        if isinstance(value, list) and len(value) != 2:
            raise ValueError("top_p schedule must be [start, end]")
        if any(not 0 < v <= 1 for v in values):
            raise ValueError("top_p must be in (0, 1]")
        return value


class OnPolicy(Section):
    """On-policy distillation in a stage (GKD): the current student samples completions for the
    prompts of the stage's ``mixture`` rows (their prompt part, not the teacher's completions), the
    teacher labelling service (``teacher:`` section, Ray actors) scores them, and the stage's ``loss``
    is applied on the student's own tokens with the sampled token beside the teacher's top-k."""

    fraction: float = Field(
        default=1.0,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="share of micro-batches the student samples (GKD lmbda); the rest are stored teacher rows",
    )
    max_new_tokens: int = Field(default=64, ge=1, description="tokens sampled per prompt")
    temperature: float = Field(default=1.0, ge=0, allow_inf_nan=False, description="student sampling temperature")
    k: int = Field(default=16, ge=1, description="teacher top-k labels per sampled position")


class TrainStage(Section):
    name: str = "distill"
    steps: int | None = Field(default=None, ge=0, description="optimizer steps (or give `tokens`)")
    tokens: int | None = Field(default=None, ge=0, description="completion tokens to train on")
    minutes: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="wall-clock training time (data, on-policy sampling and labelling, optimizer steps; "
        "held-out scoring and checkpoints not counted): the stage ends after the step that reaches it",
    )
    mixture: list[MixtureComponent] = Field(default_factory=lambda: [MixtureComponent()])
    lr: float | None = Field(default=None, gt=0, description="peak learning rate (default train.lr)")
    min_lr_ratio: float | None = Field(default=None, ge=0, le=1)
    schedule: Schedule = Schedule.cosine
    warmup_steps: int | None = Field(default=None, ge=0)
    loss: LossWeights = Field(default_factory=LossWeights)
    routing: RoutingSchedule = Field(default_factory=RoutingSchedule)
    on_policy: OnPolicy | None = Field(default=None, description="sample from the student and label with the teacher")

    @model_validator(mode="after")
    def _has_length(self) -> TrainStage:
        given = [key for key in ("steps", "tokens", "minutes") if getattr(self, key) is not None]
        if len(given) > 1:
            raise ValueError(
                f"stage {self.name!r} gives {' and '.join(given)}; give only one of steps, tokens, minutes"
            )
        if not given:
            self.steps = 100
        if (self.steps is not None and self.steps == 0) or (self.steps is None and self.tokens == 0):
            raise ValueError(f"stage {self.name!r} has zero length; give it steps >= 1 or tokens >= 1, or remove it")
        if not self.mixture:
            raise ValueError(
                f"stage {self.name!r} has an empty mixture; list at least one component, e.g. [{{}}] for all rows"
            )
        return self


class TrainSection(Section):
    """``train:`` in the pipeline YAML."""

    # scale
    workers: int = Field(default=1, ge=1, description="Ray Train workers (DDP ranks)")
    gpus_per_worker: float = Field(default=0, ge=0)
    cpus_per_worker: float = Field(default=1, gt=0)
    threads_per_worker: int | None = Field(default=None, ge=1, description="torch threads (default: cores / workers)")
    strategy: Strategy = Strategy.ddp
    precision: Precision = Precision.auto
    # batches
    seq_len: int = Field(default=512, ge=16, description="packed sequence length")
    micro_batch_size: int = Field(default=4, ge=1, description="packed sequences per worker per micro-batch")
    grad_accum: int = Field(default=1, ge=1)
    loss_chunk_size: int = Field(default=1024, ge=16, description="positions per chunk of the vocab projection")
    # optimiser
    lr: float = Field(default=3e-4, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_steps: int = Field(default=10, ge=0)
    weight_decay: float = Field(default=0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(default=1.0, gt=0)
    freeze: list[str] = Field(
        default_factory=list,
        description="parameter names (fnmatch patterns) left untrained in every stage, e.g. "
        "model.embed_tokens.weight (the embedding, and the LM head tied to it): no gradient, no optimizer state",
    )
    # data
    heldout_fraction: float = Field(default=0.1, ge=0, lt=1, description="prompts kept out of training for eval")
    heldout_max_rows: int = Field(default=64, ge=1, description="held-out rows scored at each stage end")
    heldout_every: int | None = Field(
        default=None,
        ge=1,
        description="also score them every N steps: the "
        "report's student/teacher ratio vs training budget (None = stage ends)",
    )
    shuffle_buffer: int = Field(default=256, ge=1)
    seed: int = 0
    # checkpoints and logging
    checkpoint_every: int = Field(default=50, ge=1, description="steps between checkpoints (and at each stage end)")
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=2, ge=0, description="worker failures survived by restoring the last checkpoint")
    log_every: int = Field(default=5, ge=1)
    export_qwen2_moe: bool = Field(default=True, description="also write {run}/student-qwen2moe when routing is top-k")
    stages: list[TrainStage] = Field(default_factory=lambda: [TrainStage()])

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, stages: list[TrainStage]) -> list[TrainStage]:
        if not stages:
            raise ValueError("no training stages; list at least one under train.stages")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return stages

    @model_validator(mode="after")
    def _on_policy_needs_whole_weights(self) -> TrainSection:
        # On-policy stages sample with the student's own prefill/decode on each worker; under FSDP with
        # several workers the root's embeddings and LM head are DTensor shards outside a forward call.
        sampled = [s.name for s in self.stages if s.on_policy is not None]
        if sampled and self.strategy is Strategy.fsdp and self.workers > 1:
            raise ValueError(
                f"on-policy stages {sampled} need train.strategy: ddp with train.workers > 1 (FSDP shards the "
                "weights the student samples with); use ddp, or one worker"
            )
        return self
