"""The pipeline config's ``student:`` section.

It accepts every :class:`~distill.student.config.StudentConfig` field (same names, taken from that
class), each optional: a field left out is taken from the teacher (shapes, vocabulary, RoPE) when
the student is built from it, else from the StudentConfig default. Three extra keys say how to
initialise: ``init: from_teacher | random``, ``teacher_layers`` (which teacher layers to keep) and
``calibration`` (the text a from-teacher init measures).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import Field, create_model, model_validator

from cluster.errors import ConfigError
from cluster.section import Section
from distill.student.config import StudentConfig, check_fields

# Fields copied from the teacher's config when the section leaves them out.
_TEACHER_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "intermediate_size",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def _fail(field: str, problem: str, fix: str) -> None:
    raise ConfigError(f"invalid config:\n  student.{field}: {problem}; {fix}")


def _student_errors(check: Any, *args: Any) -> Any:
    """``check(*args)`` with its ConfigError reported under ``student.`` in the pipeline config."""
    try:
        return check(*args)
    except ConfigError as exc:
        raise ConfigError(f"invalid config:\n  student.{exc}") from None


class CalibrationSection(Section):
    """``student.calibration``: the text a from-teacher init measures (:mod:`distill.student.calibrate`)."""

    data: Literal["run", "none"] | list[str] = Field(
        default="run",
        description="run: the run's teacher data (training rows); a list of URIs (run dirs, "
        "Parquet shard folders, .txt/.jsonl files); none: the data-free init",
    )
    tokens: int = Field(default=8192, ge=64, description="calibration tokens for FFN statistics and router fits")
    importance_tokens: int = Field(
        default=1024, ge=64, description="tokens scored by each drop-one layer pass (cost: layers x this)"
    )
    heldout_tokens: int = Field(
        default=2048, ge=0, description="calibration text kept out of the fit, scored for the init report"
    )
    seq_len: int = Field(default=256, ge=16, description="tokens per calibration window")
    rounds: int = Field(
        default=4,
        ge=1,
        description="layer-importance rounds: 1 = one-shot drop-one, more = "
        "iterative (re-score after each round of removals)",
    )
    criterion: Literal["kl", "nll"] = Field(
        default="kl",
        description="layer importance: kl = how far dropping a layer moves the next-token "
        "distribution; nll = how much it raises the loss on the calibration text",
    )
    sharpness: float = Field(default=1.0, gt=0, description="router target = expert output-norm shares ** this")
    difficulty: float = Field(
        default=0.0,
        ge=0,
        description="per-token sharpness * exp(-difficulty * z), z = the "
        "teacher's standardised next-token entropy: harder tokens get more experts (0 = off)",
    )
    active_fraction: float = Field(
        default=0.25, gt=0, le=1, description="a neuron is active for a token when among its top contributors"
    )
    down_ridge: float | None = Field(
        default=0.01,
        gt=0,
        description="refit the experts' and shared expert's down projections so the routed block "
        "reproduces the dense FFN under the fitted routing (ridge regression, this strength relative "
        "to the mean feature energy, pulled towards the scale-only fit); null = scales only",
    )

    sequential: bool | Literal["correct"] = Field(
        default=False,
        description="fit each layer on the hidden states the student's already-built layers produce "
        "(GPTQ-style), not the dense pruned teacher's; correct = also aim each layer's FFN at the dense "
        "model's residual stream (undoing upstream error). Quickstart shape, bits/byte on fortunes / "
        "held-out teacher text at init: off 2.720/1.642, true 2.690/1.637, correct 2.702/1.610",
    )

    def options(self) -> Any:
        """These settings as :class:`distill.student.init.CalibrationOptions`."""
        from distill.student.init import CalibrationOptions

        return CalibrationOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(CalibrationOptions)})

    def sources(self) -> list[str]:
        return [] if self.data == "none" else (["run"] if self.data == "run" else list(self.data))


# Every StudentConfig field, optional (None = not set).
_StudentFields = create_model(
    "_StudentFields",
    __base__=Section,
    **{name: (field.annotation | None, None) for name, field in StudentConfig.model_fields.items()},
)


class StudentSection(_StudentFields):
    """``student:`` in the pipeline YAML. Unknown keys are errors."""

    init: Literal["from_teacher", "random"] = Field(
        default="from_teacher", description="from_teacher: copy and split the teacher's layers; random: from scratch"
    )
    teacher_layers: list[int] | None = Field(
        default=None,
        description="teacher layer indices to keep (default: chosen by measured importance on the "
        "calibration text; evenly spaced when calibration.data is none)",
    )
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)

    @model_validator(mode="after")
    def _check_combinations(self) -> StudentSection:
        # Only values given here; the rest is checked once the teacher is known.
        # ConfigError (not ValueError) escapes pydantic untouched, so the message stays as written.
        if (self.routing or "topk") == "topk":
            for name in ("top_p", "min_k", "max_k"):
                if getattr(self, name) is not None:
                    _fail(name, "only used with routing: topp", "remove it, or set student.routing: topp")
        elif self.num_experts_per_tok is not None:
            _fail(
                "num_experts_per_tok",
                "only used with routing: topk",
                "remove it; with routing: topp the number of experts is set by top_p, min_k and max_k",
            )
        if self.teacher_layers is not None:
            if self.init == "random":
                _fail(
                    "teacher_layers", "only used with init: from_teacher", "remove it or set student.init: from_teacher"
                )
            if (
                not self.teacher_layers
                or len(set(self.teacher_layers)) != len(self.teacher_layers)
                or min(self.teacher_layers) < 0
            ):
                _fail(
                    "teacher_layers",
                    f"{self.teacher_layers} must be distinct 0-based layer indices",
                    "list each teacher layer once, e.g. [0, 9, 19, 29]",
                )
            if self.num_hidden_layers is not None and self.num_hidden_layers != len(self.teacher_layers):
                _fail(
                    "num_hidden_layers",
                    f"{self.num_hidden_layers} != len(teacher_layers)={len(self.teacher_layers)}",
                    "drop num_hidden_layers (it follows teacher_layers) or list that many teacher layers",
                )
        layers = self.num_hidden_layers or (len(self.teacher_layers) if self.teacher_layers else None)
        _student_errors(check_fields, {**self.explicit_fields(), "num_hidden_layers": layers})
        return self

    def explicit_fields(self) -> dict[str, Any]:
        """The StudentConfig fields this section sets (None = not set)."""
        return {k: getattr(self, k) for k in StudentConfig.model_fields if getattr(self, k) is not None}

    def to_student_config(self, teacher_config: Any = None) -> StudentConfig:
        """Build the validated :class:`StudentConfig`; ``teacher_config`` (an HF config or dict) fills gaps.

        With a teacher: shapes, vocabulary, RoPE, norms and special tokens default to the teacher's;
        ``num_hidden_layers`` defaults to ``len(teacher_layers)``, else half the teacher's depth;
        ``moe_intermediate_size`` defaults to the teacher's FFN width minus the shared expert, split
        evenly over ``num_experts`` (so that the experts partition the teacher's neurons exactly).
        """
        values = self.explicit_fields()
        if teacher_config is not None:
            teacher = teacher_fields(teacher_config)
            for name in _TEACHER_FIELDS:
                if name not in values and teacher.get(name) is not None:
                    values[name] = teacher[name]
            if "num_hidden_layers" not in values:
                values["num_hidden_layers"] = (
                    len(self.teacher_layers) if self.teacher_layers else max(1, teacher["num_hidden_layers"] // 2)
                )
            if "moe_intermediate_size" not in values and teacher.get("intermediate_size"):
                num_experts = values.get("num_experts", StudentConfig.model_fields["num_experts"].default)
                free = teacher["intermediate_size"] - values.get("shared_expert_intermediate_size", 0)
                if free <= 0 or free % num_experts:
                    _fail(
                        "moe_intermediate_size",
                        f"the teacher's FFN width {teacher['intermediate_size']} minus the shared expert "
                        f"({values.get('shared_expert_intermediate_size', 0)}) does not split evenly into "
                        f"num_experts={num_experts}",
                        "set num_experts to a divisor of that width, or set moe_intermediate_size and "
                        "shared_expert_intermediate_size explicitly",
                    )
                values["moe_intermediate_size"] = free // num_experts
        elif self.teacher_layers and "num_hidden_layers" not in values:
            values["num_hidden_layers"] = len(self.teacher_layers)
        return _student_errors(StudentConfig.from_dict, values)


def teacher_fields(teacher_config: Any) -> dict[str, Any]:
    """The StudentConfig-named fields of an HF (Llama-family) config object or config.json dict."""
    get = teacher_config.get if isinstance(teacher_config, dict) else (lambda k, d=None: getattr(teacher_config, k, d))
    out: dict[str, Any] = {
        k: get(k)
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "rms_norm_eps",
            "max_position_embeddings",
            "tie_word_embeddings",
            "intermediate_size",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        )
    }
    out["num_key_value_heads"] = get("num_key_value_heads") or out["num_attention_heads"]
    out["head_dim"] = get("head_dim") or (out["hidden_size"] // out["num_attention_heads"])
    rope = get("rope_parameters") or {}
    out["rope_theta"] = (rope.get("rope_theta") if isinstance(rope, dict) else None) or get("rope_theta") or 10000.0
    attention_bias = get("attention_bias")
    out["attention_bias"] = bool(attention_bias) if attention_bias is not None else get("model_type") == "qwen2"
    if isinstance(out["rms_norm_eps"], float):
        out["rms_norm_eps"] = float(out["rms_norm_eps"])
    return out
