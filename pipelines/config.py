"""The one YAML config for the whole pipeline, validated by pydantic: the root of the sections.

Every subcommand takes ``--config FILE`` plus repeatable ``--set a.b=value`` overrides. Unknown
keys and bad values raise :class:`ConfigError` naming the dotted field path and the allowed values.
Each section's model lives beside the code it configures; this module only composes them, and the
pipeline layer hands each stage its own typed sections.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from cluster import storage
from cluster.errors import ConfigError
from cluster.section import RaySection, Section
from distill.data.section import CorpusSection, FilterSection, GenerateSection, PromptsSection
from distill.eval.section import EvalSection
from distill.student.section import StudentSection
from distill.teacher.section import TeacherSection
from distill.training.section import TrainSection
from pipelines.section import PipelineSection, ScheduleSection
from serve.section import ServeSection


class PipelineConfig(Section):
    name: str = Field(default="quickstart", pattern=r"^[A-Za-z0-9_.-]+$")
    workdir: str = "./runs"
    ray: RaySection = Field(default_factory=RaySection)
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    prompts: PromptsSection = Field(default_factory=PromptsSection)
    generate: GenerateSection = Field(default_factory=GenerateSection)
    filter: FilterSection = Field(default_factory=FilterSection)
    corpus: CorpusSection = Field(default_factory=CorpusSection)
    student: StudentSection = Field(default_factory=StudentSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)

    # Where the YAML came from, so relative paths in it resolve against its folder.
    source_dir: str | None = Field(default=None, exclude=True)

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
        isinstance(value, dict) and not text.startswith("{")
    ):
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
                raise ConfigError(f"--set {item!r}: {'.'.join(keys[: depth + 1])} is not a section")
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
