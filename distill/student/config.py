"""The student's architecture: one typed, validated pydantic model with Hugging Face field names.

Dimension legend used across ``distill/student``:

    B  batch (sequences)          T  tokens per sequence in this call     N  B*T flattened tokens
    H  hidden_size                NH num_attention_heads                  KVH num_key_value_heads
    D  head_dim                   S  key/value slots attended to          W  sliding_window
    E  num_experts                K  expert slots per token (k, or max_k for top-p)
    I  moe_intermediate_size      V  vocab_size

No torch here: the pipeline config's ``student:`` section (:mod:`distill.student.section`) takes
its fields from this class and checks them with :func:`check_fields`.
"""

from __future__ import annotations

import enum
import json
import math
from typing import Any

from pydantic import ConfigDict, field_validator, model_validator

from cluster.errors import ConfigError
from cluster.section import BuiltInCode


class RoutingMode(str, enum.Enum):
    """How a token picks experts."""

    topk = "topk"  # a fixed k experts per token (Mixtral, Qwen2-MoE)
    topp = "topp"  # the fewest experts whose router mass reaches top_p, within [min_k, max_k]


class LayerType(str, enum.Enum):
    sliding = "sliding_attention"
    full = "full_attention"


def default_layer_types(num_hidden_layers: int) -> list[str]:
    """Three sliding layers to one full one, and the last layer always full.

    The last layer is global so that the representation feeding ``lm_head`` can see the whole
    context even when the depth is not a multiple of four (e.g. 6 layers -> S S S F S F).
    """
    return [
        LayerType.full.value if (i + 1) % 4 == 0 or i == num_hidden_layers - 1 else LayerType.sliding.value
        for i in range(num_hidden_layers)
    ]


class StudentConfig(BuiltInCode):
    """Architecture of the MoE student. Field names follow Hugging Face (Qwen2-MoE / Llama).

    ``routing`` selects how ``num_experts_per_tok`` (top-k) or ``top_p``/``min_k``/``max_k``
    (top-p) are used. ``max_k=None`` means ``num_experts``. Layers listed in ``mlp_only_layers``
    get a dense SwiGLU FFN of ``intermediate_size`` instead of experts.

    The one definition of these fields: the pipeline config's ``student:`` section
    (:mod:`distill.student.section`) and the HF ``config.json`` (:mod:`distill.student.hf`) are built from it.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    vocab_size: int = 49152
    hidden_size: int = 576
    num_hidden_layers: int = 8
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    layer_types: list[str] | None = None  # None -> default_layer_types(num_hidden_layers)
    sliding_window: int = 512
    attention_bias: bool = False  # bias on q/k/v (Qwen2's qkv_bias); o_proj never has one
    tie_word_embeddings: bool = True
    # mixture of experts
    num_experts: int = 8
    moe_intermediate_size: int = 192
    shared_expert_intermediate_size: int = 0  # 0 = no shared expert
    mlp_only_layers: list[int] = []
    intermediate_size: int = 1536  # dense FFN width, used by mlp_only_layers
    routing: RoutingMode = RoutingMode.topk
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True  # top-k only; top-p always renormalises (see router.py)
    top_p: float = 0.5
    min_k: int = 1
    max_k: int | None = None  # None -> num_experts
    # auxiliary losses (weights of the terms summed into ``aux_loss``)
    router_aux_loss_coef: float = 0.01  # load balance (Switch Transformer)
    router_z_loss_coef: float = 0.001  # ST-MoE router z-loss
    router_entropy_loss_coef: float = 0.0  # "dynamic" loss for top-p: low routing entropy = fewer experts
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @field_validator("routing", mode="before")
    @classmethod
    def _routing(cls, value: Any) -> RoutingMode:
        try:
            return RoutingMode(value)
        except ValueError:
            raise ConfigError(
                f"routing: invalid value {value!r}; allowed: {', '.join(m.value for m in RoutingMode)}"
            ) from None

    @field_validator("layer_types", "mlp_only_layers", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        return None if value is None else [getattr(v, "value", v) for v in value]

    @model_validator(mode="after")
    def _complete_and_check(self) -> StudentConfig:
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.num_hidden_layers)
        if self.max_k is None:
            self.max_k = self.num_experts
        check_fields(self.__dict__)
        return self

    # ------------------------------------------------------------------ derived
    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def slots_per_token(self) -> int:
        """K: expert slots a token can occupy (top-k: k; top-p: max_k)."""
        return self.num_experts_per_tok if self.routing is RoutingMode.topk else int(self.max_k)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx not in self.mlp_only_layers

    def window_of(self, layer_idx: int) -> int | None:
        """The layer's attention window in keys (itself included), or None for full attention."""
        return self.sliding_window if self.layer_types[layer_idx] == LayerType.sliding.value else None

    @property
    def expected_experts_per_token(self) -> float | None:
        """k for top-k; None for top-p (data dependent: measure it with routing stats)."""
        return float(self.num_experts_per_tok) if self.routing is RoutingMode.topk else None

    # ------------------------------------------------------------------ serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, ignore_unknown: bool = False) -> StudentConfig:
        known = set(cls.model_fields)
        unknown = sorted(set(data) - known)
        if unknown and not ignore_unknown:
            raise ConfigError(f"unknown student config key(s) {unknown}; allowed: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> StudentConfig:
        """A validated copy with some fields changed (``max_k`` follows ``num_experts`` when unset)."""
        data = self.model_dump()
        if "num_experts" in changes and "max_k" not in changes and self.max_k == self.num_experts:
            data["max_k"] = None
        data.update(changes)
        return StudentConfig.from_dict(data)


_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "sliding_window",
    "num_experts",
    "moe_intermediate_size",
    "intermediate_size",
    "num_experts_per_tok",
    "min_k",
    "max_k",
)


def check_fields(values: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the field and the fix for any bad value or combination.

    Checks what ``values`` sets (None = unset; types are already checked by pydantic): a
    :class:`StudentConfig` passes all its fields, the ``student:`` section the ones it gives.
    """
    v = {k: x for k, x in values.items() if x is not None}

    def fail(field: str, problem: str, fix: str) -> None:
        raise ConfigError(f"{field}: {problem}; {fix}")

    for name in _POSITIVE_INTS:
        if v.get(name, 1) < 1:
            fail(name, f"must be a positive integer, got {v[name]!r}", f"set {name} to an integer >= 1")
    if v.get("shared_expert_intermediate_size", 0) < 0:
        fail(
            "shared_expert_intermediate_size",
            f"must be an integer >= 0, got {v['shared_expert_intermediate_size']!r}",
            "use 0 for no shared expert",
        )
    heads, kv_heads = v.get("num_attention_heads"), v.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        fail(
            "num_key_value_heads",
            f"{kv_heads} does not divide num_attention_heads={heads} (grouped-query "
            "attention shares each KV head by a whole group)",
            f"pick one of {divisors}",
        )
    if v.get("head_dim", 2) % 2:
        fail("head_dim", f"{v['head_dim']} is odd but RoPE rotates pairs of dimensions", "use an even head_dim")
    if v.get("rope_theta", 1) <= 0:
        fail("rope_theta", f"must be > 0, got {v['rope_theta']}", "the usual values are 10000 to 1000000")
    if v.get("rms_norm_eps", 1) <= 0:
        fail("rms_norm_eps", f"must be > 0, got {v['rms_norm_eps']}", "use e.g. 1e-5 or 1e-6")
    layers, layer_types, mlp_only = v.get("num_hidden_layers"), v.get("layer_types", []), v.get("mlp_only_layers", [])
    if layers and "layer_types" in v and len(layer_types) != layers:
        fail(
            "layer_types",
            f"has {len(layer_types)} entries but num_hidden_layers={layers}",
            "give one entry per layer, or omit layer_types for the default 3 sliding : 1 full pattern",
        )
    allowed = {m.value for m in LayerType}
    for i, kind in enumerate(layer_types):
        if kind not in allowed:
            fail(f"layer_types[{i}]", f"invalid value {kind!r}", f"allowed: {', '.join(sorted(allowed))}")
    for i in mlp_only:
        if layers and not 0 <= i < layers:
            fail(
                "mlp_only_layers",
                f"entry {i!r} is not a layer index in [0, {layers - 1}]",
                "list 0-based layer indices",
            )
    if len(set(mlp_only)) != len(mlp_only):
        fail("mlp_only_layers", f"{mlp_only} lists a layer twice", "list each layer once")
    experts = v.get("num_experts")
    if v.get("routing", RoutingMode.topk) == RoutingMode.topk:
        if experts and v.get("num_experts_per_tok", 0) > experts:
            fail(
                "num_experts_per_tok",
                f"{v['num_experts_per_tok']} > num_experts={experts}",
                f"use at most {experts} (or raise num_experts)",
            )
        if v.get("router_entropy_loss_coef"):
            fail(
                "router_entropy_loss_coef",
                "the routing-entropy (dynamic) loss only applies to routing: topp",
                "set it to 0 or use routing: topp",
            )
    else:
        if not 0.0 < v.get("top_p", 1.0) <= 1.0:
            fail(
                "top_p",
                f"must be in (0, 1], got {v['top_p']}",
                "e.g. 0.4 keeps the experts covering 40% of the router mass",
            )
        if experts and v.get("max_k", 0) > experts:
            fail(
                "max_k",
                f"{v['max_k']} > num_experts={experts}",
                f"use at most {experts}, or leave it unset (= num_experts)",
            )
        if v.get("min_k", 0) > v.get("max_k", experts or float("inf")):
            fail("min_k", f"{v['min_k']} > max_k={v.get('max_k', experts)}", "min_k must be <= max_k")
    for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_entropy_loss_coef"):
        if v.get(name, 0) < 0:
            fail(name, f"must be >= 0, got {v[name]}", "use 0 to switch the loss off")
    if v.get("initializer_range", 1) <= 0:
        fail("initializer_range", f"must be > 0, got {v['initializer_range']}", "the usual value is 0.02")


def evenly_spaced_layers(num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """``n`` teacher layer indices spread from the first to the last layer, both included."""
    if num_student_layers > num_teacher_layers:
        raise ConfigError(
            f"num_hidden_layers: {num_student_layers} > the teacher's {num_teacher_layers} layers; "
            f"a student built from the teacher can keep at most {num_teacher_layers}"
        )
    if num_student_layers == 1:
        return [num_teacher_layers - 1]
    step = (num_teacher_layers - 1) / (num_student_layers - 1)
    return [int(math.floor(i * step + 0.5)) for i in range(num_student_layers)]
