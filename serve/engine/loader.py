"""Find and load a model for the engine: our MoE student or a dense LLaMA/Qwen2/Mistral HF model.

Dense models are loaded into the student's own decoder (:class:`~distill.student.model.StudentLM`
with every layer a dense SwiGLU, ``mlp_only_layers``) so one KV-cache / rows / chunked-prefill
implementation serves the student and the teacher alike. Tensor names are identical
(``model.layers.N.self_attn.q_proj.weight``, ``model.layers.N.mlp.gate_proj.weight``, ...), so the
safetensors load straight in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from cluster.errors import ConfigError, RaydistillError
from distill.teacher import sources

DENSE_MODEL_TYPES = ("llama", "mistral", "qwen2")
STUDENT_MODEL_TYPE = "raydistill_moe"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def resolve_model_dir(path: str) -> str:
    """A local HF model dir for ``path``.

    ``path`` may be a student run dir (its ``student/`` subdir is used), an HF model dir, or a
    builtin alias / Hugging Face id (:func:`distill.teacher.sources.resolve_model`). Raises
    :class:`RaydistillError` naming what is missing (no config.json, no tokenizer).
    """
    local = Path(os.path.expanduser(str(path)))
    if local.is_dir():
        if (local / "student" / "config.json").exists():
            local = local / "student"
        elif not (local / "config.json").exists():
            raise RaydistillError(
                f"{local} is neither an HF model dir (no config.json) nor a student run dir "
                f"(no student/config.json); pass a model dir, a run dir or an alias such as "
                f"smollm2-135m-instruct"
            )
        resolved = str(local)
    elif local.exists():
        raise RaydistillError(f"{local} is a file; pass a model directory, a student run dir or an alias")
    else:
        from distill.teacher.sources import resolve_model

        try:
            resolved = resolve_model(str(path))
        except ConfigError as exc:
            raise RaydistillError(f"model {path!r}: {exc}") from None
    if not any((Path(resolved) / name).exists() for name in TOKENIZER_FILES):
        raise RaydistillError(
            f"model dir {resolved} has no tokenizer ({', '.join(TOKENIZER_FILES)} missing); "
            f"save the teacher's tokenizer into it (tokenizer.save_pretrained(dir))"
        )
    return resolved


def read_config(model_dir: str) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())


def dense_student_config(hf_config: Any):
    """A :class:`StudentConfig` that reproduces a dense LLaMA/Qwen2/Mistral exactly (every layer dense)."""
    from distill.student.config import StudentConfig
    from distill.student.init import check_teacher
    from distill.student.section import teacher_fields

    check_teacher(hf_config)  # RoPE scaling, o_proj bias, non-SwiGLU -> ConfigError
    fields = teacher_fields(hf_config)
    layers = fields["num_hidden_layers"]

    def get(key: str, default: Any = None) -> Any:
        return getattr(hf_config, key, default)

    window = get("sliding_window")
    layer_types = get("layer_types")
    if get("model_type") == "qwen2" and not get("use_sliding_window", False):
        window = None
    if layer_types and window:
        layer_types = ["sliding_attention" if t == "sliding_attention" else "full_attention" for t in layer_types]
    elif window and get("model_type") == "mistral":
        layer_types = ["sliding_attention"] * layers
    else:
        layer_types = ["full_attention"] * layers
    fields.update(
        num_hidden_layers=layers,
        layer_types=layer_types,
        sliding_window=int(window or 4096),
        mlp_only_layers=list(range(layers)),
        num_experts=1,
        num_experts_per_tok=1,
        moe_intermediate_size=1,
        max_position_embeddings=fields["max_position_embeddings"] or 2048,
    )
    return StudentConfig.from_dict(fields)


def load_model(model_dir: str, dtype: str = "float32") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load ``model_dir`` into a module with the student's serving API (``append``/``decode_step``/``new_cache``).

    Returns the model (eval mode, ``dtype``) and its config.json dict.
    """
    torch_dtype = sources.torch_dtype(dtype)
    raw = read_config(model_dir)
    model_type = raw.get("model_type")
    if model_type == STUDENT_MODEL_TYPE:
        import distill.student  # noqa: F401 - registers the HF classes
        from distill.student.hf import RaydistillMoeForCausalLM

        model = RaydistillMoeForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
        return model.eval(), raw
    if model_type not in DENSE_MODEL_TYPES:
        raise RaydistillError(
            f"model {model_dir} has model_type {model_type!r}; the engine serves "
            f"{STUDENT_MODEL_TYPE} students and dense {', '.join(DENSE_MODEL_TYPES)} models"
        )
    from transformers import AutoConfig

    return load_dense(model_dir, AutoConfig.from_pretrained(model_dir), torch_dtype), raw


def load_dense(model_dir: str, hf_config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """Dense HF weights (safetensors, single or sharded) into a :class:`StudentLM` built on the meta device."""
    from safetensors.torch import load_file

    from distill.student.model import StudentLM

    config = dense_student_config(hf_config)
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise RaydistillError(
            f"model dir {model_dir} has no *.safetensors weights; re-save the model with "
            "save_pretrained(dir, safe_serialization=True)"
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    if "lm_head.weight" not in state or config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: v.to(dtype) for k, v in state.items() if "rotary_emb" not in k}
    with torch.device("meta"):
        model = StudentLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RaydistillError(
            f"cannot load {model_dir} into the engine's decoder: missing={missing[:5]} unexpected={unexpected[:5]}"
        )
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
