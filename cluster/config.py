"""The one YAML config for the whole pipeline, validated by pydantic.

Every subcommand takes ``--config FILE`` plus repeatable ``--set a.b=value`` overrides. Unknown
keys and bad values raise :class:`ConfigError` naming the dotted field path and the allowed values.
Later stages (student, train, eval, serve, schedule) own their sections; each is a model here.
"""

from __future__ import annotations

import enum
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, ValidationError, field_validator

from cluster.errors import ConfigError
from cluster.section import Section
from distill.eval.section import EvalSection
from distill.student.section import StudentSection
from distill.training.section import TrainSection
from pipelines.section import PipelineSection, ScheduleSection
from serve.section import ServeSection


class TeacherBackend(str, enum.Enum):
    hf = "hf"
    vllm = "vllm"
    openai = "openai"
    engine = "engine"


class PromptSource(str, enum.Enum):
    file = "file"
    self_instruct = "self_instruct"
    magpie = "magpie"
    served_prompts = "served_prompts"


class DedupMode(str, enum.Enum):
    none = "none"
    exact = "exact"
    minhash = "minhash"


class RaySection(Section):
    address: Optional[str] = None  # null = start a local Ray (embedded default)
    num_cpus: Optional[int] = Field(default=None, ge=1)
    dashboard: bool = False
    extras: list[str] = Field(default_factory=list, description="pip extras installed on cluster nodes")


class TeacherSection(Section):
    model: str = "smollm2-135m-instruct"
    backend: str = Field(default="hf", description="hf | vllm | openai | engine, or 'package.module:Class'")
    revision: Optional[str] = None
    replicas: int = Field(default=1, ge=1)
    num_gpus: float = Field(default=0, ge=0)
    num_cpus: float = Field(default=1, gt=0, description="Ray CPUs reserved per teacher replica")
    threads: Optional[int] = Field(default=None, ge=1, description="torch threads per replica (default: cores / replicas)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(default=16, ge=1, description="prompts per teacher batch")
    max_model_len: Optional[int] = Field(default=None, ge=16)
    tensor_parallel_size: int = Field(default=1, ge=1)
    accelerator_type: Optional[str] = Field(default=None, description="vllm backend: Ray accelerator type of the "
                                            "engine's GPUs, e.g. H100 (default: any GPU)")
    base_url: Optional[str] = None
    api_key_env: Optional[str] = None
    tokenizer: Optional[str] = Field(default=None, description="tokenizer for the openai backend (maps token strings to ids)")
    qps: Optional[int] = Field(default=None, ge=1)
    max_retries: int = Field(default=2, ge=0)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value in {b.value for b in TeacherBackend} or ":" in value:
            return value
        raise ValueError(f"unknown teacher backend {value!r}; allowed: hf, vllm, openai, engine, or 'module:Class'")


class PromptsSection(Section):
    source: PromptSource = PromptSource.file
    path: Optional[str | list[str]] = Field(default=None, description="file URI(s) or globs (source: file)")
    count: Optional[int] = Field(default=256, ge=1, description="number of prompts (null = all in the files)")
    samples_per_prompt: int = Field(default=1, ge=1)
    prompt_column: str = "prompt"
    messages_column: str = "messages"
    system_prompt: Optional[str] = None
    topics_path: Optional[str] = Field(default=None, description="seed topics for self_instruct (default: shipped list)")
    seed: int = 0


class GenerateSection(Section):
    max_new_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.7, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, description="0 = off")
    logprobs: int = Field(default=20, ge=1, le=1000, description="top-k soft labels stored per position")
    logprob_dtype: Literal["float32", "float16"] = "float32"
    judge: bool = False
    seed: int = 0
    max_retries: int = Field(default=2, ge=0, description="retries of a failed teacher batch inside its actor")


class FilterSection(Section):
    dedup: DedupMode = DedupMode.minhash
    minhash_threshold: float = Field(default=0.85, gt=0, le=1)
    num_perm: int = Field(default=128, ge=16)
    min_quality: Optional[float] = Field(default=None, ge=1, le=10)
    decontaminate: list[str] = Field(default_factory=list, description="eval-set URIs whose n-grams must not appear")
    ngram: int = Field(default=13, ge=1, description="decontamination n-gram size in normalised words")
    decontaminate_min_tokens: int = Field(
        default=8, ge=1, description="eval items shorter than ngram but at least this long must match whole")
    drop_truncated: bool = True
    min_completion_tokens: int = Field(default=1, ge=0)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    max_repetition: float = Field(default=0.5, gt=0, le=1, description="max share of repeated 4-grams")

    @field_validator("decontaminate", mode="before")
    @classmethod
    def _one_uri_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # --set filter.decontaminate=evals/*.jsonl


class PipelineConfig(Section):
    name: str = Field(default="quickstart", pattern=r"^[A-Za-z0-9_.-]+$")
    workdir: str = "./runs"
    ray: RaySection = Field(default_factory=RaySection)
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    prompts: PromptsSection = Field(default_factory=PromptsSection)
    generate: GenerateSection = Field(default_factory=GenerateSection)
    filter: FilterSection = Field(default_factory=FilterSection)
    student: StudentSection = Field(default_factory=StudentSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)

    # Where the YAML came from, so relative paths in it resolve against its folder.
    source_dir: Optional[str] = Field(default=None, exclude=True)

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections (all when none), for manifests and resume checks."""
        data = self.model_dump(mode="json", exclude={"source_dir"})
        if sections:
            data = {k: data[k] for k in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def resolve_path(self, path: str) -> str:
        """A relative local path in the config resolves against the config file's folder, else CWD."""
        if "://" in path or Path(path).is_absolute():
            return path
        if self.source_dir and (Path(self.source_dir) / path).exists():
            return str(Path(self.source_dir) / path)
        return str(Path(path).resolve())


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value); values parse as YAML (``8``, ``null``, ``[1,2]``)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set prompts.count=8")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {item!r}: empty key")
    text = raw.strip()
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = raw
    # YAML would read `Be brief: answer` as a mapping and cut `Use #tags` at the comment; on the
    # command line an unquoted string or a non-flow mapping is meant literally.
    if (isinstance(value, str) and not text.startswith(("'", '"'))) or (
            isinstance(value, dict) and not text.startswith("{")):
        value = text
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(keys[:depth + 1])} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check the spelling in the README's config reference"
        elif err["type"] == "enum" and "expected" in err.get("ctx", {}):
            msg = f"invalid value {err.get('input')!r}; allowed: {err['ctx']['expected']}"
        elif err["type"] == "literal_error" and "expected" in err.get("ctx", {}):
            msg = f"invalid value {err.get('input')!r}; allowed: {err['ctx']['expected']}"
        else:
            msg = f"{msg} (got {err.get('input')!r})"
        lines.append(f"  {path}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def build_config(data: dict[str, Any], source_dir: str | None = None) -> PipelineConfig:
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
    cfg.source_dir = source_dir
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read YAML (or start from defaults when ``path`` is None), apply ``--set`` items, validate."""
    data: dict[str, Any] = {}
    source_dir = None
    if path is not None:
        from cluster import storage

        try:
            text = storage.read_text(str(path))
        except Exception as exc:  # noqa: BLE001 - reported with the path
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        if "://" not in str(path):
            source_dir = str(Path(path).resolve().parent)
    data = apply_overrides(data, overrides)
    return build_config(data, source_dir)
