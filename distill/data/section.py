"""The ``prompts:``, ``generate:`` and ``filter:`` sections of the pipeline config (the data stages)."""

from __future__ import annotations

import enum
from typing import Any, Literal, Protocol

from pydantic import Field, field_validator

from cluster.section import RunConfig, Section
from distill.teacher.section import TeacherSection


class PromptSource(str, enum.Enum):
    file = "file"
    self_instruct = "self_instruct"
    magpie = "magpie"
    served_prompts = "served_prompts"


class DedupMode(str, enum.Enum):
    none = "none"
    exact = "exact"
    minhash = "minhash"


class PromptsSection(Section):
    source: PromptSource = PromptSource.file
    path: str | list[str] | None = Field(default=None, description="file URI(s) or globs (source: file)")
    count: int | None = Field(default=256, ge=1, description="number of prompts (null = all in the files)")
    samples_per_prompt: int = Field(default=1, ge=1)
    prompt_column: str = "prompt"
    messages_column: str = "messages"
    raw_column: str = Field(
        default="raw",
        description="column of plain-text prefixes the teacher continues as they are, no chat template "
        "(general text rather than answers; source: file)",
    )
    system_prompt: str | None = None
    topics_path: str | None = Field(default=None, description="seed topics for self_instruct (default: shipped list)")
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
    min_quality: float | None = Field(default=None, ge=1, le=10)
    decontaminate: list[str] = Field(default_factory=list, description="eval-set URIs whose n-grams must not appear")
    ngram: int = Field(default=13, ge=1, description="decontamination n-gram size in normalised words")
    decontaminate_min_tokens: int = Field(
        default=8, ge=1, description="eval items shorter than ngram but at least this long must match whole"
    )
    drop_truncated: bool = True
    min_completion_tokens: int = Field(default=1, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_repetition: float = Field(default=0.5, gt=0, le=1, description="max share of repeated 4-grams")

    @field_validator("decontaminate", mode="before")
    @classmethod
    def _one_uri_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # --set filter.decontaminate=evals/*.jsonl


class CorpusSection(Section):
    """``corpus:``: human-written text the teacher labels as it is (teacher-forced, nothing generated).

    Off unless ``builtin`` or ``path`` is set. Texts are shuffled (``seed``), packed into rows of at
    most ``row_tokens`` tokens and taken until ``tokens``; any text that shares an n-gram with the
    builtin human eval corpus is dropped first. See :mod:`distill.data.corpus`.
    """

    builtin: Literal["fortunes"] | None = Field(
        default=None,
        description="fortunes: Debian's `fortunes` package (apt-get install fortunes), every file but the "
        "eval's fortunes-min ones, ASCII art and non-English",
    )
    exclude: list[str] = Field(
        default_factory=list, description="builtin files to leave out (e.g. to keep them for an eval of your own)"
    )
    path: list[str] = Field(
        default_factory=list, description=".txt (split on blank lines) or .jsonl (a text field per line) URIs or globs"
    )
    tokens: int | None = Field(default=40_000, ge=1, description="teacher-labelled tokens to take (null = all)")
    row_tokens: int = Field(default=256, ge=16, description="texts are packed into rows of at most this many tokens")
    seed: int = 0

    @field_validator("path", "exclude", mode="before")
    @classmethod
    def _one_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @property
    def enabled(self) -> bool:
        return bool(self.builtin or self.path)


class PromptLogSettings(Protocol):
    prompt_log: str | None  # the serve section's prompt log: the default log of ``source: served_prompts``


class DataConfig(RunConfig, Protocol):
    """The sections the data stages (prompts, generate, filter) read."""

    teacher: TeacherSection
    prompts: PromptsSection
    generate: GenerateSection
    filter: FilterSection
    corpus: CorpusSection
    serve: PromptLogSettings
