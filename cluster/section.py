"""Base class of the pipeline config's sections.

Sections live beside the code that reads them (``distill/training/section.py``, ``serve/section.py``, ...)
and import only pydantic and this module, so ``cluster.config`` can import them without pulling in
torch, Ray or each other.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from cluster.errors import ConfigError


class Section(BaseModel):
    """Unknown keys are errors, assignment is validated."""

    # coerce_numbers_to_str: YAML and --set read `name: 2024` or `revision: 1234567` as numbers.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False,
                              coerce_numbers_to_str=True)


class BuiltInCode(BaseModel):
    """A model that code also builds directly: a bad value raises :class:`ConfigError` naming the field.

    (Inside the pipeline config, pydantic validates it as a nested model and ``cluster.config``
    reports the error with its dotted path.)
    """

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError("; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']} "
                                        f"(got {e.get('input')!r})" for e in exc.errors())) from None
