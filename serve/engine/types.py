"""The engine's request and output types, shared by the engine, the HTTP API, eval and the teacher backend.

No torch and no Ray here: the API layer and tests build these without loading a model.
"""

from __future__ import annotations

import dataclasses

# The most top log-probs per position the engine returns; the API's limit (serve.max_top_logprobs, 20 by
# default as in OpenAI's API) may be set up to this.
MAX_TOP_LOGPROBS = 100


@dataclasses.dataclass
class SamplingOptions:
    """Per-request sampling. ``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` are off.

    ``json_schema``: constrain the output to JSON valid against this schema (``response_format``;
    :mod:`serve.structured`). ``logprobs``: return the sampled token's log-probability per generated
    token, plus the ``top_logprobs`` most likely alternatives. ``prompt_logprobs``: also score the prompt tokens
    (for ``echo`` + ``logprobs`` loglikelihood clients). Log-probabilities are the model's raw
    distribution (temperature 1, before penalties and top-k/top-p), as vLLM returns by default.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    json_schema: dict | None = None
    # OpenAI's penalties on tokens already generated (0 = off): logit -= frequency * count + presence * (count > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM / transformers (CTRL): tokens in the prompt or the output get logit / r if > 0, else logit * r (1 = off).
    repetition_penalty: float = 1.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclasses.dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingOptions = dataclasses.field(default_factory=SamplingOptions)


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (token id, logprob), best first


@dataclasses.dataclass
class GenerationOutput:
    """One streamed increment of a request. ``text`` and ``token_ids`` are the new part only.

    The last output of a request has ``finished=True`` and a ``finish_reason``: ``stop`` (EOS, a stop
    token or a stop string; the stop string is not included in ``text``), ``length`` (max_tokens or
    the context limit) or ``abort`` (cancelled). ``prompt_logprobs`` comes with the first output
    when asked for: one entry per prompt token, None for the first.
    """

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far


class EngineError(ValueError):
    """A request the engine cannot take (e.g. prompt longer than the context); the API maps it to 4xx."""


class EngineFailure(RuntimeError):
    """The engine failed while running a request (not the request's fault); the API maps it to a 5xx.

    The message is for logs: it may carry backend detail that never goes into a response body.
    """


class EngineUnavailable(EngineFailure):
    """The engine cannot run requests: shut down, or its loop thread died (the API answers 503)."""
