"""vLLM out-of-tree model plugin for raydistill students.

Installed through the ``vllm.general_plugins`` entry point in pyproject.toml; vLLM calls
:func:`register` in every process before loading a model. vLLM is imported lazily so this module
(and the package) import fine where vLLM is not installed.
"""

from __future__ import annotations

ARCHITECTURE = "RaydistillMoeForCausalLM"
MODEL_CLASS = "distill.student.vllm_model:RaydistillMoeForCausalLM"


def register() -> None:
    """Register the student architecture with vLLM's ModelRegistry (lazy string, loaded on first use)."""
    from vllm import ModelRegistry

    # vLLM reads config.json through transformers' AutoConfig; this registers model_type raydistill_moe.
    import distill.student.hf  # noqa: F401

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
