"""Base class of the pipeline config's sections.

Sections live beside the code that reads them (``distill/training/section.py``, ``serve/section.py``, ...)
and import only pydantic and this module, so ``cluster.config`` can import them without pulling in
torch, Ray or each other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Unknown keys are errors, assignment is validated."""

    # coerce_numbers_to_str: YAML and --set read `name: 2024` or `revision: 1234567` as numbers.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False,
                              coerce_numbers_to_str=True)
