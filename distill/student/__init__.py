"""The MoE student: hybrid sliding/full attention, top-k or top-p routing, HF and Qwen2-MoE export.

``from distill.student import StudentConfig, StudentForCausalLM``.
"""

from distill.student.cache import KVCache
from distill.student.config import LayerType, RoutingMode, StudentConfig
from distill.student.export import export_qwen2_moe
from distill.student.hf import RaydistillMoeConfig, RaydistillMoeForCausalLM, StudentForCausalLM
from distill.student.init import init_from_teacher, init_random
from distill.student.model import StudentLM, StudentModel
from distill.student.section import StudentSection

__all__ = [
    "KVCache",
    "LayerType",
    "RaydistillMoeConfig",
    "RaydistillMoeForCausalLM",
    "RoutingMode",
    "StudentConfig",
    "StudentForCausalLM",
    "StudentLM",
    "StudentModel",
    "StudentSection",
    "export_qwen2_moe",
    "init_from_teacher",
    "init_random",
]
