"""The pipeline config's ``eval:`` section (imports only pydantic and cluster modules)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from cluster.section import Section

# Metric names a gate may use; each model's ``report["models"][name]["metrics"]`` has these keys.
GATE_METRICS = {
    "bpb_heldout": "bits per byte on held-out teacher completions",
    "bpb_heldout_in_context": "bits per byte on the same completions, each after its prompt (as served)",
    "bpb_human": "bits per byte on the human-written corpora (byte-weighted over all of them)",
    "kl": "KL(teacher || model) over the stored top-k + tail, nats per token",
    "top1_agreement": "share of held-out positions where the model's argmax is the teacher's top-1",
    "decode_tokens_per_s": "decode tokens/s at the largest speed batch size",
    "ttft_s": "time to first token at batch 1, seconds",
    "cost_per_million_tokens": "hardware cost per million output tokens at the largest speed batch size",
}


class GateSection(Section):
    """``eval.gate``: the verdict the pipeline acts on (promote the student or not).

    ``direction: lower`` passes iff ``value <= reference + margin``; ``higher`` iff
    ``value >= reference - margin``. ``margin`` is in the metric's units: positive = allowed slack,
    negative = the student must beat the reference by at least ``-margin``.
    """

    metric: str = Field(default="bpb_heldout", description=f"one of {sorted(GATE_METRICS)}")
    direction: Literal["lower", "higher"] = "lower"
    margin: float = 0.0
    against: Literal["auto", "teacher", "baseline", "init"] = Field(
        default="auto", description="reference model: auto = baseline if given, else init if present, else teacher"
    )
    baseline: str | None = Field(default=None, description="HF dir of the model being served now (or --baseline)")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in GATE_METRICS:
            raise ValueError(f"unknown gate metric {value!r}; allowed: {', '.join(sorted(GATE_METRICS))}")
        return value


class SpeedSection(Section):
    """``eval.speed``: TTFT and decode tokens/s of teacher and student on the same engine."""

    enabled: bool = True
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 16], description="concurrent requests per measurement")
    prompt_tokens: int = Field(default=64, ge=1, description="prompt length of each timed request")
    new_tokens: int = Field(default=32, ge=2, description="tokens generated per timed request (EOS ignored)")
    warmup: bool = Field(
        default=True, description="one untimed prefill of every timed shape first (oneDNN primitives, allocations)"
    )
    repeats: int = Field(
        default=5,
        ge=1,
        description="prefills timed at the smallest batch size; TTFT is their median (decode tokens/s is the median "
        "step of one run): robust to CPU time a shared machine loses to its neighbours",
    )
    rounds: int = Field(
        default=2,
        ge=1,
        description="full runs per model and batch size, teacher and student in turn (ABBA order); each figure is "
        "the median over the rounds, so a ratio compares runs seconds apart",
    )

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(int(b) < 1 for b in value):
            raise ValueError("batch_sizes must be a non-empty list of positive integers, e.g. [1, 16]")
        return sorted({int(b) for b in value})


class EvalSection(Section):
    """``eval:`` in the pipeline YAML."""

    hardware_cost_per_hour: float | None = Field(
        default=None, ge=0, description="price of the machine running eval/serving, per hour (null = no cost numbers)"
    )
    corpora: list[str] = Field(
        default_factory=list,
        description="human-written text: URIs or globs of .txt (one document) or .jsonl ({'text': ...} per line)",
    )
    builtin_corpus: Literal["fortunes"] | None = Field(
        default="fortunes", description="fortunes: Debian's fortunes-min (BSD); null = only eval.corpora"
    )
    max_heldout_rows: int = Field(default=64, ge=1, description="held-out teacher rows scored per model")
    max_corpus_bytes: int = Field(default=32_000, ge=1, description="UTF-8 bytes read from each human corpus")
    window: int = Field(
        default=256, ge=8, description="tokens per scoring window; longer texts slide with half overlap"
    )
    batch_tokens: int = Field(default=2048, ge=8, description="tokens per scoring forward pass (memory: x vocab x 4 B)")
    models: list[Literal["teacher", "student", "init", "baseline"]] = Field(
        default_factory=lambda: ["teacher", "student", "init", "baseline"],
        description="which models to evaluate (absent init / baseline are skipped with a note)",
    )
    threads: int | None = Field(default=None, ge=1, description="torch threads (default: torch's)")
    samples: int = Field(
        default=3,
        ge=0,
        description="held-out prompts each model answers greedily (with the serving default repetition penalty), "
        "side by side in the report; 0 = none",
    )
    sample_max_tokens: int = Field(default=48, ge=1, description="new tokens per sample answer at most")
    speed: SpeedSection = Field(default_factory=SpeedSection)
    gate: GateSection = Field(default_factory=GateSection)

    @field_validator("corpora", mode="before")
    @classmethod
    def _one_uri_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value
