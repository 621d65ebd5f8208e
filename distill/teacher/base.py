"""The teacher interface.

Legend: ``T`` completion length, ``k`` top-k soft labels per position.

Every backend returns, for every completion position, the top-k token ids and log-probs of the
teacher's *raw* distribution: temperature 1, before any top-p/top-k filtering, whatever the
sampling temperature was. Those are the soft labels the student learns from.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import pkgutil
from collections.abc import Sequence
from typing import Any

import numpy as np

from cluster.errors import ConfigError
from distill.teacher.section import TeacherSection

Messages = list[dict[str, str]]
PromptInput = str | Messages


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    logprobs: int = 20  # k soft labels stored per position
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> SamplingParams:
        """Inverse of :meth:`to_json` (a dict, or its JSON text as stored in the ``sampling`` column)."""
        import json

        raw = json.loads(data) if isinstance(data, str) else data
        return cls(**{**raw, "stop": tuple(raw.get("stop") or ())})


def row_seed(seed: int | None, prompt_id: str) -> int | None:
    """The sampling seed of one teacher row: ``generate.seed`` mixed with the row's prompt id (which
    includes its sample index). Each sample of a prompt draws its own stream, and a row's seed does not
    depend on the batch it lands in (a resume or another batch size seeds each row as before)."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"{int(seed)}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def stream_seed(sampling: SamplingParams, seeds: Sequence[int] | None, i: int) -> int | None:
    """Prompt ``i``'s seed in a ``generate`` call: its own from ``seeds``, else ``sampling.seed + i``."""
    if seeds is not None:
        return int(seeds[i])
    return None if sampling.seed is None else sampling.seed + i


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """What a Ray Data teacher stage's row functions need (pickled to Ray workers)."""

    tokenizer: str
    context: int | None
    sampling: str  # SamplingParams JSON
    k: int
    logprob_dtype: str
    teacher: str

    @functools.cached_property
    def params(self) -> SamplingParams:
        return SamplingParams.from_json(self.sampling)


@dataclasses.dataclass
class Completion:
    prompt_ids: list[int]
    completion_ids: list[int]  # [T], includes the end-of-sequence token when one was emitted
    text: str
    finish_reason: str  # "stop" (end token or stop string) | "length"
    topk_ids: np.ndarray  # [T, k] int32
    topk_logprobs: np.ndarray  # [T, k] float32, each row sorted descending

    @property
    def num_tokens(self) -> int:
        return len(self.completion_ids)


@dataclasses.dataclass
class ScoredSequence:
    topk_ids: np.ndarray  # [L - start, k] int32: distribution over token start..L-1
    topk_logprobs: np.ndarray  # [L - start, k] float32
    token_logprobs: np.ndarray  # [L - start] float32: log-prob of the actual token


class TeacherBackend(abc.ABC):
    """A teacher model. Construct once per actor (it loads weights), then call many times."""

    #: "name@revision", stored in every row's ``teacher`` column
    name: str = "teacher"

    @property
    @abc.abstractmethod
    def context_length(self) -> int:
        """Max prompt + completion tokens."""

    @abc.abstractmethod
    def encode_prompt(self, prompt: PromptInput) -> list[int]:
        """Token ids of a plain prompt, or of chat messages with the generation prompt appended."""

    @abc.abstractmethod
    def generate(
        self, prompts: Sequence[PromptInput], sampling: SamplingParams, seeds: Sequence[int] | None = None
    ) -> list[Completion]:
        """Complete each prompt (text or chat messages); soft labels are the raw top-k.

        ``seeds``: one sampling seed per prompt (the generate stage's :func:`row_seed`), in place of
        ``sampling.seed``; without them prompt ``i`` of the call draws with ``sampling.seed + i``."""

    @abc.abstractmethod
    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int) -> list[ScoredSequence]:
        """Teacher-force each token sequence and return the top-k at positions ``start..L-1``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (GPU memory, HTTP sessions)."""


BUILTIN_BACKENDS = {
    "hf": "distill.teacher.hf:HFTeacher",
    "vllm": "distill.teacher.vllm_backend:VLLMTeacher",
    "openai": "distill.teacher.openai_backend:OpenAITeacher",
    "engine": "serve.engine.teacher:EngineTeacher",  # a plugin from the layer above, named, never imported here
}


def backend_class(backend: str) -> type:
    """Resolve ``hf`` / ``vllm`` / ``openai`` or a ``package.module:Class`` path to a class."""
    target = BUILTIN_BACKENDS.get(backend, backend)
    if ":" not in target:
        raise ConfigError(
            f"teacher.backend: unknown backend {backend!r}; allowed: {sorted(BUILTIN_BACKENDS)} "
            "or 'package.module:Class'"
        )
    try:
        return pkgutil.resolve_name(target)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"teacher.backend: cannot import {target!r} ({exc})") from exc


def load_backend(teacher_cfg: TeacherSection) -> TeacherBackend:
    """Build the backend named by a ``teacher:`` config section (loads the model)."""
    return backend_class(teacher_cfg.backend).from_config(teacher_cfg)


def topk_from_logits(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: F821
    """Raw top-k of ``log_softmax(logits)`` in fp32: [N, V] -> ([N, k] int32, [N, k] float32)."""
    import torch

    return topk_from_logprobs(torch.log_softmax(logits.float(), dim=-1), k)


def topk_from_logprobs(logprobs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: F821
    """Top-k of log-probs [N, V] -> ([N, k] int32 ids, [N, k] float32 values, sorted descending)."""
    import torch

    values, ids = torch.topk(logprobs, k=min(k, logprobs.shape[-1]), dim=-1)
    return ids.to(torch.int32).cpu().numpy(), values.cpu().numpy().astype(np.float32)


def check_score_inputs(
    sequences: Sequence[Sequence[int]], starts: Sequence[int], context_length: int
) -> list[list[int]]:
    """The token lists of a ``score`` call, checked before any forward pass: one start per sequence,
    each sequence within the teacher's context, each start in ``[1, len(sequence)]`` (position 0 has
    no prediction)."""
    if len(sequences) != len(starts):
        raise ValueError(f"score: {len(sequences)} sequences but {len(starts)} starts (one start per sequence)")
    seqs = [[int(t) for t in seq] for seq in sequences]
    for index, (seq, start) in enumerate(zip(seqs, starts)):
        if len(seq) > context_length:
            raise ConfigError(
                f"score: sequence {index} has {len(seq)} tokens, more than the teacher's context of "
                f"{context_length}; cut the rows shorter (corpus.row_tokens, train.seq_len)"
            )
        if not 1 <= start <= len(seq):
            raise ValueError(f"score: start {start} of sequence {index} must be in [1, {len(seq)}]")
    return seqs


def score_row(logprobs: torch.Tensor, targets: Sequence[int], k: int) -> ScoredSequence:  # noqa: F821
    """One scored sequence from the log-probs [N, V] (fp32) that predict ``targets`` (N tokens)."""
    import torch

    top_ids, top_lp = topk_from_logprobs(logprobs, k)
    actual = torch.tensor(list(targets), dtype=torch.long, device=logprobs.device)
    token_lp = logprobs.gather(-1, actual[:, None])[:, 0].cpu().numpy().astype(np.float32)
    return ScoredSequence(topk_ids=top_ids, topk_logprobs=top_lp, token_logprobs=token_lp)


def completion_row(
    request: dict[str, Any],
    completion: Completion,
    teacher: str,
    sampling: SamplingParams,
    logprob_dtype: str = "float32",
) -> dict[str, Any]:
    """One output row of the teacher stage (the Parquet schema in ``distill.data.schema``).

    ``request`` is an input row: ``prompt_id``, ``prompt`` or ``messages``, ``source``.
    """
    import json

    dtype = np.float16 if logprob_dtype == "float16" else np.float32
    return {
        "prompt_id": request["prompt_id"],
        "prompt": request.get("prompt"),
        "messages": request.get("messages"),
        "completion": completion.text,
        "input_ids": [int(t) for t in completion.prompt_ids] + [int(t) for t in completion.completion_ids],
        "prompt_len": len(completion.prompt_ids),
        "completion_len": len(completion.completion_ids),
        "topk_ids": np.asarray(completion.topk_ids, dtype=np.int32).tolist(),
        "topk_logprobs": np.asarray(completion.topk_logprobs, dtype=dtype).tolist(),
        "teacher": teacher,
        "sampling": json.dumps(sampling.to_json(), sort_keys=True),
        "finish_reason": completion.finish_reason,
        "quality": None,
        "source": request.get("source", ""),
        "skip_reason": None,
    }


def skipped_row(request: dict[str, Any], reason: str) -> dict[str, Any]:
    """A request the teacher could not complete (e.g. prompt longer than its context).

    The generate stage drops these and counts ``reason`` in the manifest.
    """
    return {"prompt_id": request["prompt_id"], "source": request.get("source", ""), "skip_reason": reason}
