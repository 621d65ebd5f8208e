"""The student's architecture: one typed, validated dataclass with Hugging Face field names.

Dimension legend used across ``distill/student``:

    B  batch (sequences)          T  tokens per sequence in this call     N  B*T flattened tokens
    H  hidden_size                NH num_attention_heads                  KVH num_key_value_heads
    D  head_dim                   S  key/value slots attended to          W  sliding_window
    E  num_experts                K  expert slots per token (k, or max_k for top-p)
    I  moe_intermediate_size      V  vocab_size

No torch here: the pipeline config (``cluster.config``) validates ``student:`` through
:mod:`distill.student.section`, which builds this class without importing the model code.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Any, Optional

from cluster.errors import ConfigError


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


@dataclasses.dataclass
class StudentConfig:
    """Architecture of the MoE student. Field names follow Hugging Face (Qwen2-MoE / Llama).

    ``routing`` selects how ``num_experts_per_tok`` (top-k) or ``top_p``/``min_k``/``max_k``
    (top-p) are used. ``max_k=None`` means ``num_experts``. Layers listed in ``mlp_only_layers``
    get a dense SwiGLU FFN of ``intermediate_size`` instead of experts.
    """

    vocab_size: int = 49152
    hidden_size: int = 576
    num_hidden_layers: int = 8
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    layer_types: Optional[list[str]] = None  # None -> default_layer_types(num_hidden_layers)
    sliding_window: int = 512
    attention_bias: bool = False  # bias on q/k/v (Qwen2's qkv_bias); o_proj never has one
    tie_word_embeddings: bool = True
    # mixture of experts
    num_experts: int = 8
    moe_intermediate_size: int = 192
    shared_expert_intermediate_size: int = 0  # 0 = no shared expert
    mlp_only_layers: list[int] = dataclasses.field(default_factory=list)
    intermediate_size: int = 1536  # dense FFN width, used by mlp_only_layers
    routing: RoutingMode = RoutingMode.topk
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True  # top-k only; top-p always renormalises (see router.py)
    top_p: float = 0.5
    min_k: int = 1
    max_k: Optional[int] = None  # None -> num_experts
    # auxiliary losses (weights of the terms summed into ``aux_loss``)
    router_aux_loss_coef: float = 0.01  # load balance (Switch Transformer)
    router_z_loss_coef: float = 0.001  # ST-MoE router z-loss
    router_entropy_loss_coef: float = 0.0  # "dynamic" loss for top-p: low routing entropy = fewer experts
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int | list[int]] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        try:
            self.routing = RoutingMode(self.routing)
        except ValueError:
            raise ConfigError(
                f"routing: invalid value {self.routing!r}; allowed: {', '.join(m.value for m in RoutingMode)}"
            ) from None
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.num_hidden_layers)
        else:
            self.layer_types = [getattr(t, "value", t) for t in self.layer_types]
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if self.max_k is None:
            self.max_k = self.num_experts
        for name in ("rope_theta", "rms_norm_eps", "top_p", "router_aux_loss_coef", "router_z_loss_coef",
                     "router_entropy_loss_coef", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name}: expected a number, got {value!r}")
            setattr(self, name, float(value))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field and the fix for any bad value or combination."""

        def fail(field: str, problem: str, fix: str) -> None:
            raise ConfigError(f"{field}: {problem}; {fix}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "max_position_embeddings", "sliding_window", "num_experts", "moe_intermediate_size",
                     "intermediate_size", "num_experts_per_tok", "min_k", "max_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, f"must be a positive integer, got {value!r}", f"set {name} to an integer >= 1")
        if (not isinstance(self.shared_expert_intermediate_size, int)
                or isinstance(self.shared_expert_intermediate_size, bool) or self.shared_expert_intermediate_size < 0):
            fail("shared_expert_intermediate_size",
                 f"must be an integer >= 0, got {self.shared_expert_intermediate_size!r}",
                 "use 0 for no shared expert")
        if self.num_attention_heads % self.num_key_value_heads:
            divisors = [d for d in range(1, self.num_attention_heads + 1) if self.num_attention_heads % d == 0]
            fail("num_key_value_heads", f"{self.num_key_value_heads} does not divide num_attention_heads="
                 f"{self.num_attention_heads} (grouped-query attention shares each KV head by a whole group)",
                 f"pick one of {divisors}")
        if self.head_dim % 2:
            fail("head_dim", f"{self.head_dim} is odd but RoPE rotates pairs of dimensions", "use an even head_dim")
        if self.rope_theta <= 0:
            fail("rope_theta", f"must be > 0, got {self.rope_theta}", "the usual values are 10000 to 1000000")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}", "use e.g. 1e-5 or 1e-6")
        if len(self.layer_types) != self.num_hidden_layers:
            fail("layer_types", f"has {len(self.layer_types)} entries but num_hidden_layers={self.num_hidden_layers}",
                 "give one entry per layer, or omit layer_types for the default 3 sliding : 1 full pattern")
        allowed = {m.value for m in LayerType}
        for i, kind in enumerate(self.layer_types):
            if kind not in allowed:
                fail(f"layer_types[{i}]", f"invalid value {kind!r}", f"allowed: {', '.join(sorted(allowed))}")
        for i in self.mlp_only_layers:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_hidden_layers:
                fail("mlp_only_layers", f"entry {i!r} is not a layer index in [0, {self.num_hidden_layers - 1}]",
                     "list 0-based layer indices")
        if len(set(self.mlp_only_layers)) != len(self.mlp_only_layers):
            fail("mlp_only_layers", f"{self.mlp_only_layers} lists a layer twice", "list each layer once")
        if self.routing is RoutingMode.topk:
            if self.num_experts_per_tok > self.num_experts:
                fail("num_experts_per_tok", f"{self.num_experts_per_tok} > num_experts={self.num_experts}",
                     f"use at most {self.num_experts} (or raise num_experts)")
            if self.router_entropy_loss_coef:
                fail("router_entropy_loss_coef", "the routing-entropy (dynamic) loss only applies to routing: topp",
                     "set it to 0 or use routing: topp")
        else:
            if not 0.0 < self.top_p <= 1.0:
                fail("top_p", f"must be in (0, 1], got {self.top_p}", "e.g. 0.4 keeps the experts covering 40% "
                     "of the router mass")
            if self.max_k > self.num_experts:
                fail("max_k", f"{self.max_k} > num_experts={self.num_experts}",
                     f"use at most {self.num_experts}, or leave it unset (= num_experts)")
            if self.min_k > self.max_k:
                fail("min_k", f"{self.min_k} > max_k={self.max_k}", "min_k must be <= max_k")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_entropy_loss_coef"):
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}", "use 0 to switch the loss off")
        if self.initializer_range <= 0:
            fail("initializer_range", f"must be > 0, got {self.initializer_range}", "the usual value is 0.02")
        for name in ("attention_bias", "tie_word_embeddings", "norm_topk_prob"):
            if not isinstance(getattr(self, name), bool):
                fail(name, f"expected true or false, got {getattr(self, name)!r}", f"set {name} to a boolean")

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

    def window_of(self, layer_idx: int) -> Optional[int]:
        """The layer's attention window in keys (itself included), or None for full attention."""
        return self.sliding_window if self.layer_types[layer_idx] == LayerType.sliding.value else None

    @property
    def expected_experts_per_token(self) -> Optional[float]:
        """k for top-k; None for top-p (data dependent: measure it with routing stats)."""
        return float(self.num_experts_per_tok) if self.routing is RoutingMode.topk else None

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (enums as strings); ``from_dict(to_dict())`` round-trips exactly."""
        out = dataclasses.asdict(self)
        out["routing"] = self.routing.value
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, ignore_unknown: bool = False) -> "StudentConfig":
        known = set(cls.field_names())
        unknown = sorted(set(data) - known)
        if unknown and not ignore_unknown:
            raise ConfigError(f"unknown student config key(s) {unknown}; allowed: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "StudentConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "StudentConfig":
        """A validated copy with some fields changed (``max_k`` follows ``num_experts`` when unset)."""
        data = self.to_dict()
        if "num_experts" in changes and "max_k" not in changes and self.max_k == self.num_experts:
            data["max_k"] = None
        data.update(changes)
        return StudentConfig.from_dict(data)


def evenly_spaced_layers(num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """``n`` teacher layer indices spread from the first to the last layer, both included."""
    if num_student_layers > num_teacher_layers:
        raise ConfigError(f"num_hidden_layers: {num_student_layers} > the teacher's {num_teacher_layers} layers; "
                          f"a student built from the teacher can keep at most {num_teacher_layers}")
    if num_student_layers == 1:
        return [num_teacher_layers - 1]
    step = (num_teacher_layers - 1) / (num_student_layers - 1)
    return [int(math.floor(i * step + 0.5)) for i in range(num_student_layers)]
