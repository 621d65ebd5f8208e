"""Bounds on everything a client controls in one request (``serve:`` settings; 400s name the field and limit).

The engine thread runs the stop-string check every token and every engine job holds a batch slot, so the
number of jobs (prompts x ``n``), stop strings, ``max_tokens`` and ``top_logprobs`` are capped here, before
any tokenization or engine work.
"""

from __future__ import annotations

from serve.errors import APIError
from serve.protocol import ChatCompletionRequest, CompletionRequest
from serve.section import ServeSection

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _limit(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="limit_exceeded")


def prompt_count(req: CompletionRequest) -> int:
    """Prompts in a completions request: a string or a token-id list is one, a list of either is many."""
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt)):
        return 1
    return len(prompt)


def check_limits(req: ChatCompletionRequest | CompletionRequest, section: ServeSection) -> int:
    """Raise a 400 for a request beyond the server's limits; return its number of engine jobs."""
    if req.n > section.max_n:
        raise _limit("n", f"n={req.n} is above this server's limit of {section.max_n} (serve.max_n)")
    prompts = prompt_count(req) if isinstance(req, CompletionRequest) else 1
    jobs = prompts * req.n
    if jobs > section.max_choices_per_request:
        raise _limit(
            "n" if req.n > 1 else "prompt",
            f"{prompts} prompts x n={req.n} = {jobs} choices is above this server's limit of "
            f"{section.max_choices_per_request} per request (serve.max_choices_per_request)",
        )
    stops = req.stop or []
    if len(stops) > section.max_stop_sequences:
        raise _limit(
            "stop",
            f"{len(stops)} stop sequences is above this server's limit of "
            f"{section.max_stop_sequences} (serve.max_stop_sequences)",
        )
    longest = max((len(s) for s in stops), default=0)
    if longest > section.max_stop_length:
        raise _limit(
            "stop",
            f"a stop sequence of {longest} characters is above this server's limit of "
            f"{section.max_stop_length} (serve.max_stop_length)",
        )
    if isinstance(req, ChatCompletionRequest):
        tokens = [("max_completion_tokens", req.max_completion_tokens), ("max_tokens", req.max_tokens)]
        top = ("top_logprobs", req.top_logprobs)
    else:
        tokens = [("max_tokens", req.max_tokens)]
        top = ("logprobs", req.logprobs)
    for param, value in tokens:
        if value is not None and value > section.max_tokens_limit:
            raise _limit(
                param,
                f"{param}={value} is above this server's limit of {section.max_tokens_limit} (serve.max_tokens_limit)",
            )
    if top[1] is not None and top[1] > section.max_top_logprobs:
        raise _limit(
            top[0],
            f"{top[0]}={top[1]} is above this server's limit of {section.max_top_logprobs} (serve.max_top_logprobs)",
        )
    if req.seed is not None and not INT64_MIN <= req.seed <= INT64_MAX:
        raise _limit("seed", f"seed must be a 64-bit signed integer in [{INT64_MIN}, {INT64_MAX}]")
    check_response_format(req)
    return jobs


def check_response_format(req: ChatCompletionRequest | CompletionRequest) -> None:
    """400 for a ``response_format`` schema the grammar compiler cannot use (or a server without it)."""
    schema = req.response_format.output_schema() if req.response_format is not None else None
    if schema is None:
        return
    from serve.structured import StructuredOutputUnavailable, grammar_for

    try:
        grammar_for(schema)
    except StructuredOutputUnavailable as exc:
        raise APIError(400, str(exc), param="response_format", code="unsupported_parameter") from None
    except ValueError as exc:
        raise APIError(
            400,
            f"response_format: this JSON schema cannot be enforced: {exc}",
            param="response_format.json_schema.schema",
            code="invalid_value",
        ) from None


def choice_seed(seed: int, offset: int) -> int:
    """The seed of choice ``offset`` (seed + offset, wrapped into int64 like a C integer would)."""
    return ((seed + offset - INT64_MIN) % 2**64) + INT64_MIN
