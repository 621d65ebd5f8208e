"""Student initialisation: from scratch (:func:`init_random`) or from a Llama-family teacher.

From a teacher (LLaMA-MoE style "expert construction by neuron partition"):

1. Embeddings, final norm, LM head (and the tokenizer, copied by the CLI) are the teacher's.
2. The student keeps a subset of the teacher's layers: ``teacher_layers`` if given, else evenly
   spaced from the first to the last. Attention and norms are copied unchanged.
3. Each kept dense SwiGLU FFN with I neurons becomes ``E`` routed experts of ``m`` neurons plus an
   optional shared expert of ``S`` neurons, with ``S + E*m == I``: every neuron goes to exactly one
   expert. The shared expert takes the ``S`` neurons with the largest weight-norm product
   ``|gate_j| * |up_j| * |down_j|`` (a data-free proxy for how much a neuron contributes; it is
   always on, so it should hold the most important ones); the rest are split into ``E`` slices
   in their original order (``expert_split="contiguous"``) or at random (``"random"``).
4. Scaling. A SwiGLU FFN is a sum over its neurons, so ``dense(x) = sum_e slice_e(x) + shared(x)``.
   The router starts (almost) uniform, so each expert's routing weight is ``1/E`` when all experts
   are active; expert down-projections are multiplied by ``E`` to cancel it. The shared expert's
   gate weight is 0, so its sigmoid gate is 1/2; its down-projection is multiplied by 2. With
   every expert active the block therefore reproduces the teacher's FFN (to float rounding).
   With top-k (renormalised) the output is ``(E/k) * sum of the k chosen slices``, an unbiased
   estimate of the dense FFN over the uniform choice of experts at initialisation; top-p behaves
   the same with ``k`` = the number of experts kept. Training then specialises the router.
5. Router. Weights ~ N(0, (router_logit_std / sqrt(H))^2), i.e. logits of order
   ``router_logit_std`` (1e-6 by default): probabilities stay 1/E to about 1e-6 relative, so the
   model starts at the pruned teacher, while the tiny differences still break ties per token, so
   top-k picks a different, balanced set of experts for different tokens instead of experts
   0..k-1 for all of them. (Gradients, not the initial scale, then set the router's scale.)
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cluster.errors import ConfigError
from distill.student.config import StudentConfig, evenly_spaced_layers
from distill.student.section import teacher_fields

SUPPORTED_TEACHERS = ("llama", "mistral", "qwen2")


def init_random(config: StudentConfig, seed: int = 0):
    """A from-scratch student: N(0, initializer_range) weights, unit norms (the HF ``_init_weights``)."""
    from distill.student.hf import RaydistillMoeForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RaydistillMoeForCausalLM.from_student_config(config)
    return model.eval()


def load_teacher(teacher_model_or_dir: Any) -> nn.Module:
    """An HF causal LM instance, or a local HF model dir loaded in fp32."""
    if isinstance(teacher_model_or_dir, nn.Module):
        return teacher_model_or_dir
    from transformers import AutoModelForCausalLM

    path = Path(teacher_model_or_dir)
    if not (path / "config.json").exists():
        raise ConfigError(
            f"teacher {path} is not an HF model directory (no config.json); resolve it with "
            "distill.teacher.sources.resolve_model first"
        )
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def check_teacher(teacher_config: Any) -> None:
    """Raise ConfigError unless the teacher is a plain Llama-family decoder this module can split."""
    model_type = getattr(teacher_config, "model_type", None)
    if model_type not in SUPPORTED_TEACHERS:
        raise ConfigError(
            f"teacher model_type {model_type!r} is not supported by init: from_teacher "
            f"(supported: {', '.join(SUPPORTED_TEACHERS)}); use student.init: random"
        )
    if getattr(teacher_config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"teacher hidden_act {teacher_config.hidden_act!r}: only SwiGLU (silu) FFNs can be split")
    if getattr(teacher_config, "mlp_bias", False):
        raise ConfigError("teacher has mlp_bias=true; biased FFNs cannot be split into experts exactly")
    if model_type in ("llama", "mistral") and getattr(teacher_config, "attention_bias", False):
        raise ConfigError("teacher has attention_bias=true, which biases o_proj too; the student has no o_proj bias")
    # transformers 5 keeps RoPE settings in rope_parameters (4.x: rope_scaling, None when plain).
    rope = getattr(teacher_config, "rope_parameters", None) or getattr(teacher_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise ConfigError(f"teacher uses RoPE scaling ({rope_type!r}); the student implements plain RoPE only")


def _check_compatible(student: StudentConfig, teacher: dict[str, Any]) -> None:
    for name in (
        "vocab_size",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "attention_bias",
    ):
        if getattr(student, name) != teacher[name]:
            raise ConfigError(
                f"student.{name}={getattr(student, name)!r} differs from the teacher's "
                f"{teacher[name]!r}; "
                f"init: from_teacher copies the teacher's attention and embeddings, so remove "
                f"student.{name} (it defaults to the teacher's) or use init: random"
            )
    if not math.isclose(student.rope_theta, float(teacher["rope_theta"]), rel_tol=1e-6):
        raise ConfigError(
            f"student.rope_theta={student.rope_theta} differs from the teacher's "
            f"{teacher['rope_theta']}; "
            "remove it so the copied attention sees the positions it was trained with"
        )
    if student.tie_word_embeddings and not teacher["tie_word_embeddings"]:
        raise ConfigError("student.tie_word_embeddings=true but the teacher has a separate lm_head; set it to false")


def resolve_teacher_layers(
    num_teacher_layers: int, student: StudentConfig, teacher_layers: Sequence[int] | None
) -> list[int]:
    if teacher_layers is None:
        return evenly_spaced_layers(num_teacher_layers, student.num_hidden_layers)
    layers = [int(i) for i in teacher_layers]
    if len(layers) != student.num_hidden_layers:
        raise ConfigError(
            f"student.teacher_layers has {len(layers)} entries but num_hidden_layers="
            f"{student.num_hidden_layers}; list one teacher layer per student layer"
        )
    bad = [i for i in layers if not 0 <= i < num_teacher_layers]
    if bad or len(set(layers)) != len(layers):
        raise ConfigError(f"student.teacher_layers={layers}: need distinct indices in [0, {num_teacher_layers - 1}]")
    return layers


def neuron_partition(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    num_experts: int,
    expert_size: int,
    shared_size: int,
    expert_split: str = "contiguous",
    seed: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Split neuron indices of one FFN: (shared [S], experts E x [m]). gate, up [I, H]; down [H, I]."""
    total = gate.shape[0]
    check_partition(total, num_experts, expert_size, shared_size)
    importance = gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)  # [I]
    shared = (
        torch.sort(torch.topk(importance, shared_size).indices).values
        if shared_size
        else torch.empty(0, dtype=torch.long)
    )
    is_shared = torch.zeros(total, dtype=torch.bool)
    is_shared[shared] = True
    rest = torch.nonzero(~is_shared).flatten()  # [E*m] ascending
    if expert_split == "random":
        generator = torch.Generator().manual_seed(seed)
        rest = rest[torch.randperm(rest.numel(), generator=generator)]
    elif expert_split != "contiguous":
        raise ConfigError(f"expert_split={expert_split!r}; allowed: contiguous, random")
    return shared, [torch.sort(chunk).values for chunk in rest.split(expert_size)]


def check_partition(total: int, num_experts: int, expert_size: int, shared_size: int, calibrated: bool = False) -> None:
    """The experts and the shared expert must partition the teacher FFN's ``total`` neurons exactly; a
    calibrated init may keep fewer (width pruning: it drops the neurons that contribute least)."""
    kept = shared_size + num_experts * expert_size
    if calibrated and kept > total:
        raise ConfigError(
            f"student.moe_intermediate_size={expert_size} x num_experts={num_experts} + "
            f"shared_expert_intermediate_size={shared_size} = {kept}, but the teacher FFN has only {total} "
            f"neurons; make them sum to at most {total} (fewer = the least-contributing neurons are pruned)"
        )
    if not calibrated and kept != total:
        raise ConfigError(
            f"student.moe_intermediate_size={expert_size} x num_experts={num_experts} + "
            f"shared_expert_intermediate_size={shared_size} = {shared_size + num_experts * expert_size}, but the teacher FFN has {total} neurons; "
            f"the data-free init partitions the neurons exactly, so make them sum to {total} (e.g. "
            f"moe_intermediate_size={(total - shared_size) // num_experts} if it divides evenly)"
        )


def prune_teacher(teacher: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A copy of a Llama-family teacher keeping only ``layers`` (the dense baseline of a student)."""
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [teacher.config.layer_types[i] for i in layers]
    pruned = type(teacher)(config).to(next(teacher.parameters()).dtype)
    source = teacher.state_dict()
    state = {}
    for name in pruned.state_dict():
        if name.startswith("model.layers."):
            idx, rest = name[len("model.layers.") :].split(".", 1)
            state[name] = source[f"model.layers.{layers[int(idx)]}.{rest}"]
        else:
            state[name] = source[name]
    pruned.load_state_dict(state)
    return pruned.eval()


@dataclasses.dataclass
class CalibrationOptions:
    """How :func:`build_from_teacher` uses calibration text (see :mod:`distill.student.calibrate`)."""

    tokens: int = 8192  # calibration tokens for the FFN statistics and router fit
    importance_tokens: int = 1024  # of those, scored by the drop-one passes (the costly part)
    seq_len: int = 256
    rounds: int = 4  # layer-importance rounds (1 = one-shot drop-one; more = iterative)
    criterion: str = "kl"  # layer importance: kl (output distribution moved) or nll (calibration loss)
    active_fraction: float = 0.25  # a neuron is active for a token when among its top 25% contributors
    sharpness: float = 1.0  # router target = expert output-norm shares ** sharpness, renormalised
    difficulty: float = 0.0  # per-token sharpness * exp(-difficulty * z(teacher entropy)): hard tokens, more experts
    down_ridge: float | None = 0.01  # refit the down projections to the dense FFN under the routing (None: scales only)
    # fit layer i on the hidden states the built layers < i produce (calibrate.SequentialFFN); "correct": and
    # aim its FFN at the dense model's residual stream
    sequential: bool | str = False


@dataclasses.dataclass
class InitResult:
    model: Any  # RaydistillMoeForCausalLM, fp32, eval mode
    layers: list[int]  # teacher layers kept
    layer_importance: dict[int, float]  # drop-one damage (nats/token, KL or NLL); empty when data-free
    calibration_tokens: int  # 0 = data-free


@torch.no_grad()
def init_from_teacher(
    teacher_model_or_dir: Any, student_config: StudentConfig, teacher_layers: Sequence[int] | None = None, **kwargs: Any
):
    """:func:`build_from_teacher`, returning only the model."""
    return build_from_teacher(teacher_model_or_dir, student_config, teacher_layers, **kwargs).model


@torch.no_grad()
def build_from_teacher(
    teacher_model_or_dir: Any,
    student_config: StudentConfig,
    teacher_layers: Sequence[int] | None = None,
    *,
    calibration: Sequence[Sequence[int]] | None = None,
    options: CalibrationOptions | None = None,
    expert_split: str = "contiguous",
    router_logit_std: float = 1e-6,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> InitResult:
    """Build a student from a Llama-family teacher (model instance or local HF dir).

    Without ``calibration`` (token-id sequences): data-free, as in the module docstring. With it:
    layers by measured importance (unless ``teacher_layers`` is given), experts from co-active
    neurons, routers fitted to each token's expert contributions, and expert scales fitted so the
    routed block reproduces the dense FFN (:mod:`distill.student.calibrate`).
    """
    from distill.student import calibrate

    options = options or CalibrationOptions()
    teacher = load_teacher(teacher_model_or_dir)
    check_teacher(teacher.config)
    tfields = teacher_fields(teacher.config)
    _check_compatible(student_config, tfields)
    chunks = calibrate.batches(calibration, options.seq_len, options.tokens) if calibration else []
    importance: dict[int, float] = {}
    if teacher_layers is None and chunks:
        score_chunks = calibrate.batches(calibration, options.seq_len, options.importance_tokens)
        choice = calibrate.layer_importance(
            teacher,
            score_chunks,
            student_config.num_hidden_layers,
            rounds=options.rounds,
            criterion=options.criterion,
            progress=progress,
        )
        layers, importance = choice.layers, choice.importance
    else:
        layers = resolve_teacher_layers(tfields["num_hidden_layers"], student_config, teacher_layers)
    if chunks and progress:
        progress(f"layers {list(layers)}; grouping neurons into experts and fitting routers")
    calibrated = bool(chunks)
    captured = None  # every layer's FFN samples, taken on the pruned teacher at once
    sequential: calibrate.SequentialFFN | None = None  # or one layer at a time, on the student's own inputs
    if calibrated:
        pruned = prune_teacher(teacher, layers)
        if options.sequential:
            sequential = calibrate.SequentialFFN(pruned, chunks, correct=options.sequential == "correct")
        else:
            captured = calibrate.capture_ffn(pruned, chunks)
    sharpness = (
        calibrate.difficulty_sharpness(
            options.sharpness, calibrate.next_token_entropy(teacher, chunks), options.difficulty
        )
        if chunks and options.difficulty
        else options.sharpness
    )  # float, or [N] per calibration token

    student = init_random(student_config, seed=seed).float()
    src = {k: v.detach().float() for k, v in teacher.state_dict().items()}
    dst = dict(student.named_parameters())

    def put(name: str, value: torch.Tensor) -> None:
        if dst[name].shape != value.shape:
            raise ConfigError(
                f"cannot copy teacher tensor into {name}: shape {tuple(value.shape)} vs {tuple(dst[name].shape)}"
            )
        dst[name].copy_(value)

    put("model.embed_tokens.weight", src["model.embed_tokens.weight"])
    put("model.norm.weight", src["model.norm.weight"])
    if not student_config.tie_word_embeddings:
        put("lm_head.weight", src.get("lm_head.weight", src["model.embed_tokens.weight"]))

    num_experts, hidden = student_config.num_experts, student_config.hidden_size
    expert_size, shared_size = student_config.moe_intermediate_size, student_config.shared_expert_intermediate_size
    generator = torch.Generator().manual_seed(seed)
    for i, t in enumerate(layers):
        s_pre, t_pre = f"model.layers.{i}.", f"model.layers.{t}."
        for name in (
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
        ):
            put(s_pre + name, src[t_pre + name])
        if student_config.attention_bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                put(f"{s_pre}self_attn.{proj}.bias", src[f"{t_pre}self_attn.{proj}.bias"])
        gate, up, down = (src[f"{t_pre}mlp.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj"))
        if not student_config.is_moe_layer(i):
            if student_config.intermediate_size != gate.shape[0]:
                raise ConfigError(
                    f"student.intermediate_size={student_config.intermediate_size} but teacher layer {t} "
                    f"has {gate.shape[0]} FFN neurons; dense layers are copied, so remove the field"
                )
            for p, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
                put(f"{s_pre}mlp.{p}.weight", w)
            if sequential is not None:
                sequential.sample(i)
                sequential.advance(student.model.layers[i].mlp)
            continue
        check_partition(gate.shape[0], num_experts, expert_size, shared_size, calibrated=calibrated)
        if not calibrated:
            shared, experts = neuron_partition(
                gate, up, down, num_experts, expert_size, shared_size, expert_split, seed + i
            )
            scales = torch.full((num_experts,), float(num_experts))  # cancels the uniform weight 1/E
            router = torch.randn(num_experts, hidden, generator=generator) * (router_logit_std / math.sqrt(hidden))
        else:
            sample = sequential.sample(i) if sequential is not None else captured[i]
            act = sample.act  # [N, J]
            shared, experts = calibrate.cluster_neurons(
                calibrate.neuron_contributions(act, down),
                num_experts,
                expert_size,
                shared_size,
                options.active_fraction,
                seed=seed + i,
            )
            outputs = calibrate.expert_outputs(act, down, experts)  # [N, E, H]
            router = calibrate.fit_router(sample.x, outputs, sharpness, seed=seed + i)
            weights = calibrate.route(
                sample.x @ router.t(),
                student_config.routing.value,
                student_config.num_experts_per_tok,
                student_config.top_p,
                student_config.min_k,
                int(student_config.max_k),
                student_config.norm_topk_prob,
            )
            dense = act @ down.t()  # [N, H] the dense FFN
            if sequential is not None and sequential.target is not None:
                dense = sequential.target  # [N, H] what brings the student back onto the dense model's stream
            target = dense - act[:, shared] @ down[:, shared].t() if shared.numel() else dense
            scales = calibrate.fit_expert_scales(weights, outputs, target)
        downs = [down[:, shared]] + [down[:, idx] * scales[e] for e, idx in enumerate(experts)]  # [H, .] each
        if calibrated and options.down_ridge is not None:
            fitted = calibrate.fit_down_projections(
                act, weights, shared, experts, torch.cat(downs, dim=1), dense, options.down_ridge
            )
            downs = list(fitted.split([len(shared)] + [len(idx) for idx in experts], dim=1))
        for e, idx in enumerate(experts):
            put(f"{s_pre}mlp.experts.{e}.gate_proj.weight", gate[idx])
            put(f"{s_pre}mlp.experts.{e}.up_proj.weight", up[idx])
            put(f"{s_pre}mlp.experts.{e}.down_proj.weight", downs[1 + e])
        if shared.numel():
            put(f"{s_pre}mlp.shared_expert.gate_proj.weight", gate[shared])
            put(f"{s_pre}mlp.shared_expert.up_proj.weight", up[shared])
            put(f"{s_pre}mlp.shared_expert.down_proj.weight", downs[0] * 2.0)  # cancels sigmoid(0) = 1/2
            dst[f"{s_pre}mlp.shared_expert_gate.weight"].zero_()
        put(f"{s_pre}mlp.gate.weight", router)
        if sequential is not None:
            block = student.model.layers[i].mlp
            sequential.advance(lambda x, block=block: block(x, compute_aux=False)[0])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(student.config, name) is None and tfields.get(name) is not None:
            setattr(student.config, name, tfields[name])
            setattr(student.generation_config, name, tfields[name])
    if student_config.tie_word_embeddings:
        student.tie_weights()
    return InitResult(
        model=student.eval(),
        layers=list(layers),
        layer_importance=importance,
        calibration_tokens=sum(int(c.numel()) for c in chunks),
    )
