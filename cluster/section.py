"""Base class of the pipeline config's sections, and the ``ray:`` section.

Sections live beside the code that reads them (``distill/training/section.py``, ``serve/section.py``, ...);
the root config that composes them is ``pipelines.config.PipelineConfig``. Lower packages receive their
typed sections, never the root config.
"""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.errors import ConfigError


class Section(BaseModel):
    """Unknown keys are errors, assignment is validated."""

    # coerce_numbers_to_str: YAML and --set read `name: 2024` or `revision: 1234567` as numbers.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_enum_values=False, coerce_numbers_to_str=True
    )


class BuiltInCode(BaseModel):
    """A model that code also builds directly: a bad value raises :class:`ConfigError` naming the field.

    (Inside the pipeline config, pydantic validates it as a nested model and ``pipelines.config``
    reports the error with its dotted path.)
    """

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(
                "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']} (got {e.get('input')!r})"
                    for e in exc.errors()
                )
            ) from None


class RaySection(Section):
    address: str | None = None  # null = start a local Ray (embedded default)
    num_cpus: int | None = Field(default=None, ge=1)
    dashboard: bool = False
    extras: list[str] = Field(default_factory=list, description="pip extras installed on cluster nodes")


class RunConfig(Protocol):
    """What a stage reads of the root config besides its own sections: where runs live, how a relative
    path in the YAML resolves, a hash of named sections (manifests, resume checks).
    ``pipelines.config.PipelineConfig`` is the implementation; lower packages name only this."""

    name: str
    workdir: str

    def section_hash(self, *sections: str) -> str: ...

    def resolve_path(self, path: str) -> str: ...


class RayConfigHolder(Protocol):
    ray: RaySection
