"""The MoE student: hybrid sliding/full attention, top-k or top-p routing, HF and Qwen2-MoE export.

``from distill.student import StudentConfig, StudentForCausalLM``. Attributes load lazily so that
``cluster.config`` (which imports :mod:`distill.student.section`) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StudentConfig": "distill.student.config",
    "RoutingMode": "distill.student.config",
    "LayerType": "distill.student.config",
    "StudentSection": "distill.student.section",
    "StudentLM": "distill.student.model",
    "StudentModel": "distill.student.model",
    "KVCache": "distill.student.cache",
    "StudentForCausalLM": "distill.student.hf",
    "RaydistillMoeForCausalLM": "distill.student.hf",
    "RaydistillMoeConfig": "distill.student.hf",
    "init_from_teacher": "distill.student.init",
    "init_random": "distill.student.init",
    "export_qwen2_moe": "distill.student.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'distill.student' has no attribute {name!r}")
