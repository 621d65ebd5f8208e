"""The pipeline config's ``student:`` section.

It accepts every :class:`~distill.student.config.StudentConfig` field (same names), each optional:
a field left out is taken from the teacher (shapes, vocabulary, RoPE) when the student is built
from it, else from the StudentConfig default. Two extra keys say how to initialise:
``init: from_teacher | random``, ``teacher_layers`` (which teacher layers to keep) and
``calibration`` (the text a from-teacher init measures).

Only pydantic and :mod:`cluster.errors` are imported at module level: ``cluster.config`` imports
this file, so it must not pull in torch, transformers or ``cluster.config`` itself.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.errors import ConfigError

# Fields copied from the teacher's config when the section leaves them out.
_TEACHER_FIELDS = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                   "rope_theta", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "attention_bias",
                   "intermediate_size", "bos_token_id", "eos_token_id", "pad_token_id")


def _fail(field: str, problem: str, fix: str) -> None:
    raise ConfigError(f"invalid config:\n  student.{field}: {problem}; {fix}")


class CalibrationSection(BaseModel):
    """``student.calibration``: the text a from-teacher init measures (:mod:`distill.student.calibrate`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: Union[Literal["run", "none"], list[str]] = Field(
        default="run", description="run: the run's teacher data (training rows); a list of URIs (run dirs, "
                                   "Parquet shard folders, .txt/.jsonl files); none: the data-free init")
    tokens: int = Field(default=8192, ge=64, description="calibration tokens for FFN statistics and router fits")
    importance_tokens: int = Field(default=1024, ge=64,
                                   description="tokens scored by each drop-one layer pass (cost: layers x this)")
    heldout_tokens: int = Field(default=2048, ge=0,
                                description="calibration text kept out of the fit, scored for the init report")
    seq_len: int = Field(default=256, ge=16, description="tokens per calibration window")
    rounds: int = Field(default=1, ge=1, description="layer-importance rounds: 1 = one-shot drop-one, more = "
                                                     "iterative (re-score after each round of removals)")
    sharpness: float = Field(default=1.0, gt=0, description="router target = expert output-norm shares ** this")
    difficulty: float = Field(default=0.0, ge=0, description="per-token sharpness * exp(-difficulty * z), z = the "
                              "teacher's standardised next-token entropy: harder tokens get more experts (0 = off)")
    active_fraction: float = Field(default=0.25, gt=0, le=1,
                                   description="a neuron is active for a token when among its top contributors")

    def sources(self) -> list[str]:
        return [] if self.data == "none" else (["run"] if self.data == "run" else list(self.data))


class StudentSection(BaseModel):
    """``student:`` in the pipeline YAML. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    init: Literal["from_teacher", "random"] = Field(
        default="from_teacher", description="from_teacher: copy and split the teacher's layers; random: from scratch")
    teacher_layers: Optional[list[int]] = Field(
        default=None, description="teacher layer indices to keep (default: chosen by measured importance on the "
                                  "calibration text; evenly spaced when calibration.data is none)")
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)

    vocab_size: Optional[int] = Field(default=None, ge=1)
    hidden_size: Optional[int] = Field(default=None, ge=1)
    num_hidden_layers: Optional[int] = Field(default=None, ge=1)
    num_attention_heads: Optional[int] = Field(default=None, ge=1)
    num_key_value_heads: Optional[int] = Field(default=None, ge=1)
    head_dim: Optional[int] = Field(default=None, ge=2)
    rope_theta: Optional[float] = Field(default=None, gt=0)
    rms_norm_eps: Optional[float] = Field(default=None, gt=0)
    max_position_embeddings: Optional[int] = Field(default=None, ge=1)
    layer_types: Optional[list[Literal["sliding_attention", "full_attention"]]] = None
    sliding_window: Optional[int] = Field(default=None, ge=1)
    attention_bias: Optional[bool] = None
    tie_word_embeddings: Optional[bool] = None
    num_experts: Optional[int] = Field(default=None, ge=1)
    moe_intermediate_size: Optional[int] = Field(default=None, ge=1)
    shared_expert_intermediate_size: Optional[int] = Field(default=None, ge=0)
    mlp_only_layers: Optional[list[int]] = None
    intermediate_size: Optional[int] = Field(default=None, ge=1)
    routing: Optional[Literal["topk", "topp"]] = None
    num_experts_per_tok: Optional[int] = Field(default=None, ge=1)
    norm_topk_prob: Optional[bool] = None
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    min_k: Optional[int] = Field(default=None, ge=1)
    max_k: Optional[int] = Field(default=None, ge=1)
    router_aux_loss_coef: Optional[float] = Field(default=None, ge=0)
    router_z_loss_coef: Optional[float] = Field(default=None, ge=0)
    router_entropy_loss_coef: Optional[float] = Field(default=None, ge=0)
    initializer_range: Optional[float] = Field(default=None, gt=0)
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list[int]]] = None
    pad_token_id: Optional[int] = None

    @model_validator(mode="after")
    def _check_combinations(self) -> "StudentSection":
        # Only combinations of values given here; the rest is checked once the teacher is known.
        # ConfigError (not ValueError) escapes pydantic untouched, so the message stays as written.
        routing = self.routing or "topk"
        if routing == "topk":
            for name in ("top_p", "min_k", "max_k"):
                if getattr(self, name) is not None:
                    _fail(name, "only used with routing: topp", "remove it, or set student.routing: topp")
            if self.router_entropy_loss_coef:
                _fail("router_entropy_loss_coef", "the routing-entropy (dynamic) loss only applies to routing: topp",
                      "set it to 0 or remove it, or set student.routing: topp")
        elif self.num_experts_per_tok is not None:
            _fail("num_experts_per_tok", "only used with routing: topk",
                  "remove it; with routing: topp the number of experts is set by top_p, min_k and max_k")
        if self.min_k is not None and self.max_k is not None and self.min_k > self.max_k:
            _fail("min_k", f"{self.min_k} > max_k={self.max_k}", "min_k must be <= max_k")
        for name in ("num_experts_per_tok", "max_k", "min_k"):
            value = getattr(self, name)
            if value is not None and self.num_experts is not None and value > self.num_experts:
                _fail(name, f"{value} > num_experts={self.num_experts}", f"use at most {self.num_experts}")
        if self.teacher_layers is not None:
            if self.init == "random":
                _fail("teacher_layers", "only used with init: from_teacher",
                      "remove it or set student.init: from_teacher")
            if not self.teacher_layers or len(set(self.teacher_layers)) != len(self.teacher_layers) or min(
                    self.teacher_layers) < 0:
                _fail("teacher_layers", f"{self.teacher_layers} must be distinct 0-based layer indices",
                      "list each teacher layer once, e.g. [0, 9, 19, 29]")
            if self.num_hidden_layers is not None and self.num_hidden_layers != len(self.teacher_layers):
                _fail("num_hidden_layers",
                      f"{self.num_hidden_layers} != len(teacher_layers)={len(self.teacher_layers)}",
                      "drop num_hidden_layers (it follows teacher_layers) or list that many teacher layers")
        layers = self.num_hidden_layers or (len(self.teacher_layers) if self.teacher_layers else None)
        if layers is not None and self.layer_types is not None and len(self.layer_types) != layers:
            _fail("layer_types", f"has {len(self.layer_types)} entries for {layers} layers",
                  "give one entry per layer, or omit layer_types for the default 3 sliding : 1 full pattern")
        if layers is not None:
            bad = [i for i in self.mlp_only_layers or [] if not 0 <= i < layers]
            if bad:
                _fail("mlp_only_layers", f"{bad} are not layer indices in [0, {layers - 1}]", "list 0-based indices")
        return self

    def explicit_fields(self) -> dict[str, Any]:
        """The StudentConfig fields this section sets (None = not set)."""
        skip = {"init", "teacher_layers", "calibration"}
        return {k: v for k, v in self.model_dump().items() if k not in skip and v is not None}

    def to_student_config(self, teacher_config: Any = None):
        """Build the validated :class:`StudentConfig`; ``teacher_config`` (an HF config or dict) fills gaps.

        With a teacher: shapes, vocabulary, RoPE, norms and special tokens default to the teacher's;
        ``num_hidden_layers`` defaults to ``len(teacher_layers)``, else half the teacher's depth;
        ``moe_intermediate_size`` defaults to the teacher's FFN width minus the shared expert, split
        evenly over ``num_experts`` (so that the experts partition the teacher's neurons exactly).
        """
        from distill.student.config import StudentConfig

        values = self.explicit_fields()
        if teacher_config is not None:
            teacher = teacher_fields(teacher_config)
            for name in _TEACHER_FIELDS:
                if name not in values and teacher.get(name) is not None:
                    values[name] = teacher[name]
            if "num_hidden_layers" not in values:
                values["num_hidden_layers"] = (len(self.teacher_layers) if self.teacher_layers
                                               else max(1, teacher["num_hidden_layers"] // 2))
            if "moe_intermediate_size" not in values and teacher.get("intermediate_size"):
                num_experts = values.get("num_experts", StudentConfig.num_experts)
                free = teacher["intermediate_size"] - values.get("shared_expert_intermediate_size", 0)
                if free <= 0 or free % num_experts:
                    _fail("moe_intermediate_size",
                          f"the teacher's FFN width {teacher['intermediate_size']} minus the shared expert "
                          f"({values.get('shared_expert_intermediate_size', 0)}) does not split evenly into "
                          f"num_experts={num_experts}",
                          "set num_experts to a divisor of that width, or set moe_intermediate_size and "
                          "shared_expert_intermediate_size explicitly")
                values["moe_intermediate_size"] = free // num_experts
        elif self.teacher_layers and "num_hidden_layers" not in values:
            values["num_hidden_layers"] = len(self.teacher_layers)
        try:
            return StudentConfig.from_dict(values)
        except ConfigError as exc:
            raise ConfigError(f"invalid config:\n  student.{exc}") from None


def teacher_fields(teacher_config: Any) -> dict[str, Any]:
    """The StudentConfig-named fields of an HF (Llama-family) config object or config.json dict."""
    get = teacher_config.get if isinstance(teacher_config, dict) else (lambda k, d=None: getattr(teacher_config, k, d))
    out: dict[str, Any] = {k: get(k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                                               "intermediate_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    out["num_key_value_heads"] = get("num_key_value_heads") or out["num_attention_heads"]
    out["head_dim"] = get("head_dim") or (out["hidden_size"] // out["num_attention_heads"])
    rope = get("rope_parameters") or {}
    out["rope_theta"] = (rope.get("rope_theta") if isinstance(rope, dict) else None) or get("rope_theta") or 10000.0
    attention_bias = get("attention_bias")
    out["attention_bias"] = bool(attention_bias) if attention_bias is not None else get("model_type") == "qwen2"
    if isinstance(out["rms_norm_eps"], float):
        out["rms_norm_eps"] = float(out["rms_norm_eps"])
    return out
