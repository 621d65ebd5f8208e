"""The ``teacher:`` section of the pipeline config: which model teaches, through which backend."""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import Field, field_validator

from cluster.section import Section


class TeacherBackendName(str, enum.Enum):
    hf = "hf"
    vllm = "vllm"
    openai = "openai"
    engine = "engine"


class TeacherSection(Section):
    model: str = "smollm2-135m-instruct"
    backend: str = Field(default="hf", description="hf | vllm | openai | engine, or 'package.module:Class'")
    revision: str | None = None
    replicas: int = Field(default=1, ge=1)
    num_gpus: float = Field(default=0, ge=0)
    num_cpus: float = Field(default=1, gt=0, description="Ray CPUs reserved per teacher replica")
    threads: int | None = Field(default=None, ge=1, description="torch threads per replica (default: cores / replicas)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="auto: engine backend bfloat16 on a CPU with AMX (bf16 matmul units), else float32; hf "
        "bfloat16 on GPU, float32 on CPU; vllm its own choice",
    )
    batch_size: int = Field(default=16, ge=1, description="prompts per teacher batch")
    batches_in_flight: int = Field(
        default=2,
        ge=1,
        description="batches each replica works on at once, for backends that share one engine batch "
        "between them (engine): a batch's finished rows are refilled from the next instead of idling",
    )
    max_model_len: int | None = Field(default=None, ge=16)
    tensor_parallel_size: int = Field(default=1, ge=1)
    accelerator_type: str | None = Field(
        default=None,
        description="vllm backend: Ray accelerator type of the engine's GPUs, e.g. H100 (default: any GPU)",
    )
    vllm_engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm backend: extra vLLM engine arguments (e.g. enforce_eager, gpu_memory_utilization); they "
        "override the derived ones",
    )
    vllm_env: dict[str, str] = Field(
        default_factory=dict,
        description="vllm backend: environment of the engine actors (e.g. VLLM_CPU_KVCACHE_SPACE); workers on a "
        "cluster do not inherit the driver's",
    )
    base_url: str | None = None
    api_key_env: str | None = None
    tokenizer: str | None = Field(
        default=None, description="tokenizer for the openai backend (maps token strings to ids)"
    )
    qps: int | None = Field(default=None, ge=1)
    max_retries: int = Field(default=2, ge=0)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value in {b.value for b in TeacherBackendName} or ":" in value:
            return value
        raise ValueError(f"unknown teacher backend {value!r}; allowed: hf, vllm, openai, engine, or 'module:Class'")
