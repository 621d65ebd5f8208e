"""Hugging Face integration: ``RaydistillMoeConfig`` + ``RaydistillMoeForCausalLM`` (model type ``raydistill_moe``).

Importing this module registers both with ``AutoConfig`` / ``AutoModelForCausalLM``, so after
``import distill.student`` a saved student loads with ``AutoModelForCausalLM.from_pretrained(dir)``.
Weights are saved as safetensors under the standard names (``model.layers.N.self_attn.q_proj.weight``,
``model.layers.N.mlp.experts.E.gate_proj.weight``, ``model.layers.N.mlp.gate.weight``, ``lm_head.weight``).

``generate()`` uses the student's own :class:`~distill.student.cache.KVCache` (ring buffers on
sliding layers) instead of a transformers ``DynamicCache``: the first forward call of ``generate``
prefills it, later calls decode one token per row.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as hf_init
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from distill.student.cache import KVCache
from distill.student.config import StudentConfig
from distill.student.model import CausalLMMixin, DecoderLayer, RMSNorm, StudentModel
from distill.student.router import Router

# transformers renamed the cache argument and output field ``past_key_values`` -> ``cache`` (5.2x);
# generate() passes and reads back whichever name its version uses, so forward() takes both.
_CACHE_FIELD = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(MoeCausalLMOutputWithPast)} else "past_key_values"
)


MODEL_TYPE = "raydistill_moe"


@dataclasses.dataclass
class StudentCausalLMOutput(MoeCausalLMOutputWithPast):
    """Adds the un-weighted aux losses and per-layer routing stats (for training logs)."""

    aux_losses: dict[str, torch.Tensor] | None = None
    routing_stats: list | None = None


class RaydistillMoeConfig(PretrainedConfig):
    """config.json form of :class:`StudentConfig`: its fields as attributes, validated by it.

    ``RaydistillMoeConfig(**student_config.model_dump())`` and ``.to_student_config()`` convert.
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]
    hidden_act: str = "silu"  # fixed; present for tools that read it (vLLM, converters)
    # A declared field, or transformers would take the router's top_p for a sampling parameter.
    top_p: float | int = StudentConfig.model_fields["top_p"].default

    def __post_init__(self, **kwargs: Any) -> None:
        # StudentConfig raises ConfigError on a bad value or combination
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k in StudentConfig.model_fields}
        student = StudentConfig(**{"top_p": self.top_p, **fields})
        self.__dict__.update(student.model_dump(mode="json"))
        super().__post_init__(**kwargs)

    def to_student_config(self) -> StudentConfig:
        return StudentConfig(**{name: getattr(self, name) for name in StudentConfig.model_fields})

    @classmethod
    def from_student_config(cls, config: StudentConfig, **kwargs: Any) -> RaydistillMoeConfig:
        return cls(**config.model_dump(), **kwargs)


class RaydistillMoePreTrainedModel(PreTrainedModel):
    config: RaydistillMoeConfig
    config_class = RaydistillMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True  # StudentModel checkpoints each decoder layer (non-reentrant)
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers.initialization functions skip tensors already loaded by from_pretrained.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            hf_init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                hf_init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            hf_init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            hf_init.ones_(module.weight)
        elif isinstance(module, Router):
            hf_init.normal_(module.weight, mean=0.0, std=std)


class RaydistillMoeForCausalLM(CausalLMMixin, RaydistillMoePreTrainedModel, GenerationMixin):
    """The student as a Hugging Face causal LM (also exported as ``StudentForCausalLM``)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RaydistillMoeConfig | StudentConfig):
        if isinstance(config, StudentConfig):
            config = RaydistillMoeConfig.from_student_config(config)
        # The base class derives a generation config from ours, sees the router's ``top_p`` and
        # warns that it is an unused sampling flag; that config is replaced below, so mute it.
        gen_logger = logging.getLogger("transformers.generation.configuration_utils")
        level = gen_logger.level
        gen_logger.setLevel(logging.ERROR)
        try:
            super().__init__(config)
        finally:
            gen_logger.setLevel(level)
        self.student_config = config.to_student_config()
        self.model = StudentModel(self.student_config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        # The router's ``top_p`` shares its name with the sampling parameter; keep it out of the
        # generation config, or generate() would sample with nucleus p = the routing threshold.
        self.generation_config = GenerationConfig.from_model_config(
            {k: v for k, v in config.to_dict().items() if k != "top_p"}
        )

    @classmethod
    def from_student_config(cls, config: StudentConfig, **kwargs: Any) -> RaydistillMoeForCausalLM:
        return cls(RaydistillMoeConfig.from_student_config(config, **kwargs))

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a DynamicCache; forward() makes our KVCache

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        compute_aux: bool | None = None,
        cache: KVCache | None = None,
        **kwargs: Any,
    ) -> StudentCausalLMOutput:
        """Logits [B, T, V]; ``loss`` = next-token cross-entropy + ``aux_loss`` when ``labels`` are given.

        With ``cache`` (or its older name ``past_key_values``: a :class:`KVCache` that already holds
        the prompt) the input must be one new token per row. With ``use_cache=True`` and no cache, the prompt is prefilled
        into a new cache returned as ``past_key_values``. Router aux losses are computed when
        ``compute_aux`` is True, by default when gradients are on or ``labels`` are given (they
        are training signals; generate() and inference skip them, ``aux_loss`` is then None).
        """
        if cache is not None and past_key_values is not None:
            raise TypeError("pass the KV cache as cache= or past_key_values=, not both")
        cache = past_key_values if cache is None else cache
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"the cache must be a distill.student KVCache, got {type(cache).__name__}")
        decode = cache is not None and cache.get_seq_length() > 0
        if cache is None and use_cache:
            ref = input_ids if input_ids is not None else inputs_embeds
            cache = self.new_cache(ref.shape[0], max_seq_len=ref.shape[1] + 64)
        if compute_aux is None:
            compute_aux = torch.is_grad_enabled() or labels is not None
        if decode:
            out = self.model(input_ids, cache=cache, decode=True, inputs_embeds=inputs_embeds, compute_aux=compute_aux)
        else:
            # With a cache, positions follow the mask (generate's position_ids say the same thing).
            out = self.model(
                input_ids,
                attention_mask,
                position_ids if cache is None else None,
                cache=cache,
                inputs_embeds=inputs_embeds,
                compute_aux=compute_aux,
            )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)

        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100) + out.aux_loss
        return StudentCausalLMOutput(
            loss=loss,
            aux_loss=out.aux_loss,
            logits=logits,
            aux_losses=out.aux_losses,
            routing_stats=out.routing,
            **{_CACHE_FIELD: cache if (use_cache or decode) else None},
        )


StudentForCausalLM = RaydistillMoeForCausalLM

AutoConfig.register(MODEL_TYPE, RaydistillMoeConfig, exist_ok=True)
AutoModelForCausalLM.register(RaydistillMoeConfig, RaydistillMoeForCausalLM, exist_ok=True)

__all__ = ["RaydistillMoeConfig", "RaydistillMoeForCausalLM", "StudentForCausalLM", "DecoderLayer", "MODEL_TYPE"]
