"""The ``openai`` teacher: any OpenAI-compatible HTTP server (a hosted DeepSeek/Qwen, vLLM's
``vllm serve``, or our own ``raydistill serve``).

Legend: ``T`` completion length, ``k`` top-k soft labels per position, ``L`` sequence length.

Config (``teacher:``): ``base_url`` (ends in ``/v1``, like the OpenAI client's), ``model`` (the
served model name), ``tokenizer`` (HF id, local dir or the builtin alias: the teacher's tokenizer,
needed for prompt ids and chat templates), ``api_key_env`` (name of the env var holding the key;
unset = no ``Authorization`` header), ``qps``, ``max_retries``, ``replicas`` (concurrent HTTP actors
in the Ray Data stage), ``batch_size`` (requests in flight per actor), ``max_model_len``.

How requests are made:

* The server is probed once (``GET {base_url}/models``). A vLLM server (``owned_by: vllm``) gets
  vLLM's extensions: ``return_tokens_as_token_ids`` (top-k tokens come back as ``"token_id:123"``)
  and ``return_token_ids``; prompts *and chat messages* go to ``/completions`` as token ids that
  we render with the tokenizer's chat template, so ``input_ids`` are exactly what the teacher saw
  (vLLM's chat endpoint also drops the k-th entry when the sampled token is outside the top-k).
* Any other server gets the plain OpenAI API: plain prompts to ``/completions`` (``logprobs: k``),
  messages to ``/chat/completions`` (``logprobs: true, top_logprobs: k``); token strings are
  mapped back to ids through the tokenizer (exact for the raw vocab form, best effort for decoded
  text). OpenAI-style APIs return at most :data:`OPENAI_TOP_LOGPROBS_CAP` (20) top log-probs per
  position; a larger ``generate.logprobs`` is a config error unless the server is vLLM (whose own
  cap is its ``--max-logprobs``, default 20).
* ``score`` uses ``/completions`` with ``echo: true, logprobs: k, max_tokens: 0``.

Soft labels are whatever the server reports: vLLM (V1) reports the *raw* distribution (temperature
1, before top-p/top-k) by default (``--logprobs-mode raw_logprobs``); hosted APIs may not document it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cluster.errors import ConfigError, RaydistillError
from distill.teacher.base import (
    Completion,
    PromptInput,
    SamplingParams,
    ScoredSequence,
    StageSpec,
    TeacherBackend,
    completion_row,
    row_seed,
    stream_seed,
)
from distill.teacher.section import TeacherSection
from distill.teacher.sources import encode_prompt
from distill.teacher.vllm_backend import (
    TOKEN_ID_PREFIX,
    cached_tokenizer,
    context_of,
    flatten_logprob_dicts,
    padded_skip,
    plain_messages,
    request_of,
    to_plain,
)

log = logging.getLogger(__name__)

OPENAI_TOP_LOGPROBS_CAP = 20
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
CANONICAL_KEYS = (
    "error",
    "text",
    "finish_reason",
    "prompt_token_ids",
    "token_ids",
    "tokens",
    "token_logprobs",
    "top_tokens",
    "top_logprobs",
)
#: ray.data.llm's HttpRequestUDF retries 408/429/502/503/504 with this base backoff (doubling).
RAY_RETRY_BASE_S = 1.0


# ---------------------------------------------------------------------------------------------
# Requests (pure)
# ---------------------------------------------------------------------------------------------


def build_request(
    prompt: PromptInput,
    prompt_ids: Sequence[int],
    sampling: SamplingParams,
    *,
    model: str,
    k: int,
    vllm: bool,
    max_tokens: int,
) -> dict[str, Any]:
    """A generic request body, the same keys for every row (Ray keeps it as one Arrow struct):
    ``finalize_request`` turns it into a chat or completions body."""
    messages = None if isinstance(prompt, str) else [dict(m) for m in prompt]
    return {
        "model": model,
        # vLLM: always token ids to /completions (exact prompt ids); others: text or messages.
        "prompt": [int(t) for t in prompt_ids] if vllm else (prompt if messages is None else None),
        "messages": None if vllm else messages,
        "max_tokens": int(max_tokens),
        "temperature": float(sampling.temperature),
        "top_p": float(sampling.top_p),
        "top_k": int(sampling.top_k),
        "seed": sampling.seed,
        "stop": list(sampling.stop),
        "logprobs": int(k),
        "return_tokens_as_token_ids": True if vllm else None,
        "return_token_ids": True if vllm else None,
    }


def finalize_request(payload: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Generic body -> (route under base_url, the body to send): drop unset fields; chat bodies get
    ``logprobs: true, top_logprobs: k``, completions bodies ``logprobs: k``."""
    body = {key: to_plain(value) for key, value in payload.items() if value is not None}
    if not body.get("stop"):
        body.pop("stop", None)
    if not body.get("top_k"):
        body.pop("top_k", None)
    if body.get("messages"):
        body.pop("prompt", None)
        k = int(body.pop("logprobs", 0) or 0)
        if k:
            body["logprobs"] = True
            body["top_logprobs"] = k
        return "chat/completions", body
    body.pop("messages", None)
    return "completions", body


def score_request(sequence: Sequence[int], *, model: str, k: int, vllm: bool, max_tokens: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": [int(t) for t in sequence],
        "echo": True,
        "max_tokens": max_tokens,
        "logprobs": int(k),
        "temperature": 0.0,
    }
    if vllm:
        body["return_tokens_as_token_ids"] = True
    return body


def check_logprobs(k: int, vllm: bool) -> None:
    if k < 1:
        raise ConfigError(f"generate.logprobs must be >= 1 (got {k})")
    if k > OPENAI_TOP_LOGPROBS_CAP and not vllm:
        raise ConfigError(
            f"generate.logprobs={k}: OpenAI-compatible APIs return at most {OPENAI_TOP_LOGPROBS_CAP} "
            "top log-probs per position; lower generate.logprobs, or serve the teacher with vLLM "
            f"(`vllm serve ... --max-logprobs {k}`)"
        )


# ---------------------------------------------------------------------------------------------
# Responses (pure): any OpenAI JSON -> one flat, typed "canonical" dict
# ---------------------------------------------------------------------------------------------


def empty_canonical(error: str = "") -> dict[str, Any]:
    return {
        "error": error,
        "text": "",
        "finish_reason": "",
        "prompt_token_ids": [],
        "token_ids": [],
        "tokens": [],
        "token_logprobs": [],
        "top_tokens": [],
        "top_logprobs": [],
    }


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def normalize_response(body: Mapping[str, Any]) -> dict[str, Any]:
    """A chat or completions response (first choice) -> the canonical dict.

    Every field has one type whatever the server: lists of str / float / int, so Ray stores it as
    typed Arrow columns instead of pickled objects (completions' ``top_logprobs`` dicts keyed by
    token would otherwise become a struct with one field per distinct token).
    """
    if body.get("error") and not body.get("choices"):
        error = body["error"]
        message = error.get("message") if isinstance(error, Mapping) else error
        return empty_canonical(str(message)[:300])
    choices = body.get("choices") or []
    if not choices:
        return empty_canonical("response has no choices")
    choice = choices[0]
    out = empty_canonical()
    message = choice.get("message") or {}
    out["text"] = choice.get("text") if choice.get("text") is not None else (message.get("content") or "")
    out["finish_reason"] = choice.get("finish_reason") or ""
    out["prompt_token_ids"] = [int(t) for t in (choice.get("prompt_token_ids") or body.get("prompt_token_ids") or [])]
    out["token_ids"] = [int(t) for t in (choice.get("token_ids") or [])]
    logprobs = choice.get("logprobs") or {}
    if "content" in logprobs:  # chat: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]
        for entry in logprobs.get("content") or []:
            out["tokens"].append(str(entry.get("token", "")))
            out["token_logprobs"].append(_float(entry.get("logprob")))
            tops = entry.get("top_logprobs") or []
            out["top_tokens"].append([str(t.get("token", "")) for t in tops])
            out["top_logprobs"].append([_float(t.get("logprob")) for t in tops])
    elif logprobs:  # completions: tokens, token_logprobs, top_logprobs: [{token: logprob} | None]
        out["tokens"] = [str(t) for t in logprobs.get("tokens") or []]
        out["token_logprobs"] = [_float(v) for v in logprobs.get("token_logprobs") or []]
        for tops in logprobs.get("top_logprobs") or []:
            tops = tops or {}
            out["top_tokens"].append([str(t) for t in tops])
            out["top_logprobs"].append([_float(v) for v in tops.values()])
    return out


def normalize_http_response(status: int, text: str) -> dict[str, Any]:
    """An HTTP status + body -> the canonical dict; errors become ``error: "<status>: <message>"``."""
    try:
        body = json.loads(text) if text else {}
    except ValueError:
        body = None
    if status >= 400:
        message = text[:300]
        if isinstance(body, Mapping):
            error = body.get("error", body.get("message", body.get("detail", message)))
            message = error.get("message", str(error)) if isinstance(error, Mapping) else str(error)
        return empty_canonical(f"{status}: {message[:300]}")
    if not isinstance(body, Mapping):
        return empty_canonical(f"{status}: response is not a JSON object: {text[:200]!r}")
    try:
        return normalize_response(body)
    except (TypeError, ValueError, AttributeError) as exc:
        return empty_canonical(f"{status}: malformed response ({type(exc).__name__}: {exc})")


class TokenMapper:
    """Token strings from a server -> ids of the teacher tokenizer.

    ``"token_id:123"`` (vLLM's ``return_tokens_as_token_ids``) is exact. Otherwise the string is
    looked up as a raw vocab entry (``Ġthe``), then as the decoded text of one token (`` the``): the
    best that can be done with an API that only returns text; unknown strings map to ``None``.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._table: dict[str, int] | None = None
        self._lock = threading.Lock()

    def _build(self) -> dict[str, int]:
        tok = self.tokenizer
        size = len(tok)
        raw = tok.convert_ids_to_tokens(list(range(size)))
        table: dict[str, int] = {}
        for i, piece in enumerate(raw):
            if piece is not None:
                table.setdefault(piece, i)
        for i, piece in enumerate(raw):
            if piece is not None:
                try:
                    table.setdefault(tok.convert_tokens_to_string([piece]), i)
                except Exception:  # noqa: BLE001 - some pieces do not round-trip
                    pass
        for i in range(size):
            table.setdefault(tok.decode([i], clean_up_tokenization_spaces=False), i)
        return table

    def __call__(self, token: str) -> int | None:
        if token.startswith(TOKEN_ID_PREFIX):
            try:
                return int(token[len(TOKEN_ID_PREFIX) :])
            except ValueError:
                return None
        if self._table is None:
            with self._lock:
                if self._table is None:
                    self._table = self._build()
        return self._table.get(token)


@functools.lru_cache(maxsize=8)
def cached_mapper(source: str, revision: str | None = None) -> TokenMapper:
    return TokenMapper(cached_tokenizer(source, revision))


def completion_from_canonical(
    canon: Mapping[str, Any], prompt_ids: Sequence[int], k: int, mapper: Callable[[str], int | None]
) -> Completion:
    """The canonical dict of a generation -> a :class:`Completion` (raises RaydistillError if unusable)."""
    if canon["error"]:
        raise RaydistillError(canon["error"])
    tokens = list(canon["tokens"])
    text = canon["text"] or ""
    if not tokens and text:
        raise RaydistillError("the server returned text but no log-probs; it must support `logprobs`")
    server_ids = [int(t) for t in canon["token_ids"]]
    if len(server_ids) == len(tokens):
        completion_ids = server_ids
    else:
        completion_ids = []
        for token in tokens:
            tid = mapper(token)
            if tid is None:
                raise RaydistillError(f"token {token!r} is not in the teacher.tokenizer vocabulary")
            completion_ids.append(tid)
    dicts = []
    for names, values in zip(canon["top_tokens"], canon["top_logprobs"]):
        mapping: dict[int, float] = {}
        for name, value in zip(names, values):
            tid = mapper(str(name))
            value = float(value)
            if tid is not None and not math.isnan(value) and value > mapping.get(tid, -math.inf):
                mapping[tid] = value
        dicts.append(mapping)
    if len(dicts) != len(completion_ids):
        raise RaydistillError(f"{len(dicts)} top-logprob positions for {len(completion_ids)} tokens")
    topk_ids, topk_logprobs = flatten_logprob_dicts(dicts, k)
    prompt = [int(t) for t in canon["prompt_token_ids"]] or [int(t) for t in prompt_ids]
    return Completion(
        prompt_ids=prompt,
        completion_ids=completion_ids,
        text=text,
        finish_reason="length" if canon["finish_reason"] == "length" else "stop",
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
    )


def scored_from_canonical(
    canon: Mapping[str, Any], sequence: Sequence[int], start: int, k: int, mapper: Callable[[str], int | None]
) -> ScoredSequence:
    """The canonical dict of an ``echo`` request -> the top-k at positions ``start..L-1``."""
    if canon["error"]:
        raise RaydistillError(canon["error"])
    length = len(sequence)
    if not 1 <= start <= length:
        raise ValueError(f"score start {start} must be in [1, {length}]")
    if len(canon["tokens"]) < length or len(canon["top_tokens"]) < length:
        raise RaydistillError(
            f"echo returned {len(canon['tokens'])} prompt positions for {length} tokens; the "
            "server must support `echo` with `logprobs` on /completions"
        )
    dicts = []
    for names, values in zip(canon["top_tokens"][start:length], canon["top_logprobs"][start:length]):
        mapping: dict[int, float] = {}
        for name, value in zip(names, values):
            tid = mapper(str(name))
            if tid is not None and not math.isnan(float(value)) and float(value) > mapping.get(tid, -math.inf):
                mapping[tid] = float(value)
        dicts.append(mapping)
    topk_ids, topk_logprobs = flatten_logprob_dicts(dicts, k)
    token_logprobs = np.asarray([float(v) for v in canon["token_logprobs"][start:length]], dtype=np.float32)
    return ScoredSequence(topk_ids=topk_ids, topk_logprobs=topk_logprobs, token_logprobs=token_logprobs)


# ---------------------------------------------------------------------------------------------
# Server probe, API key, rate limit
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    vllm: bool = False
    max_model_len: int | None = None
    models: tuple[str, ...] = ()


def probe_server(
    base_url: str,
    headers: Mapping[str, str],
    *,
    model: str | None = None,
    api_key_env: str | None = None,
    timeout_s: float = 10.0,
) -> ServerInfo:
    """``GET {base_url}/models``: is it vLLM, its context length, and is ``model`` served?

    An auth failure is an error (naming ``teacher.api_key_env``); an unreachable server or one
    without ``/models`` is assumed to be a plain OpenAI-compatible server.
    """
    import httpx

    try:
        response = httpx.get(f"{base_url}/models", headers=dict(headers), timeout=timeout_s)
    except httpx.HTTPError as exc:
        log.warning("could not probe %s/models (%s); assuming a plain OpenAI-compatible server", base_url, exc)
        return ServerInfo()
    if response.status_code in (401, 403):
        where = (
            f"the key in ${api_key_env} (teacher.api_key_env)"
            if api_key_env
            else "no API key (set teacher.api_key_env to the name of the env var holding it)"
        )
        raise RaydistillError(
            f"teacher server {base_url} rejected {where}: HTTP {response.status_code} {response.text[:200]}"
        )
    try:
        data = response.json().get("data") or []
    except (ValueError, AttributeError):
        return ServerInfo()
    if response.status_code >= 400 or not isinstance(data, list):
        return ServerInfo()
    ids = tuple(str(m.get("id")) for m in data if isinstance(m, Mapping))
    entry = next((m for m in data if isinstance(m, Mapping) and m.get("id") == model), None)
    is_vllm = any(isinstance(m, Mapping) and m.get("owned_by") == "vllm" for m in data)
    if model is not None and ids and entry is None:
        raise ConfigError(f"teacher.model={model!r} is not served by {base_url}; it serves: {', '.join(ids[:20])}")
    max_len = (entry or {}).get("max_model_len")
    return ServerInfo(vllm=is_vllm, max_model_len=int(max_len) if max_len else None, models=ids)


def read_api_key(api_key_env: str | None) -> str | None:
    if not api_key_env:
        return None
    key = os.environ.get(api_key_env)
    if not key:
        raise ConfigError(
            f"teacher.api_key_env: environment variable {api_key_env} is not set (or empty); "
            f"export {api_key_env}=<your API key>, or unset teacher.api_key_env for a server "
            "without authentication"
        )
    return key


class RateLimiter:
    """At most ``qps`` request starts per second across this process's threads (None = unlimited)."""

    def __init__(self, qps: float | None):
        self.interval = 1.0 / qps if qps else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------


def load_teacher_tokenizer(source: str | None, revision: str | None = None) -> Any:
    if not source:
        raise ConfigError(
            "teacher.tokenizer: the openai backend needs the teacher's tokenizer (an HF id, a local "
            "dir, or 'smollm2-135m-instruct') to build prompt ids and chat templates; set "
            "teacher.tokenizer, e.g. --set teacher.tokenizer=Qwen/Qwen2.5-7B-Instruct"
        )
    try:
        return cached_tokenizer(source, revision)
    except RaydistillError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        raise ConfigError(f"teacher.tokenizer={source!r} cannot be loaded ({type(exc).__name__}: {exc})") from exc


class OpenAITeacher(TeacherBackend):
    """An OpenAI-compatible HTTP teacher, called in process with httpx (threads for concurrency)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        tokenizer: str,
        api_key: str | None = None,
        api_key_env: str | None = None,
        revision: str | None = None,
        max_model_len: int | None = None,
        qps: float | None = None,
        max_retries: int = 2,
        concurrency: int = 16,
        timeout_s: float = 300.0,
        retry_base_s: float = 0.5,
        vllm: bool | None = None,
        name: str | None = None,
    ):
        import httpx

        if not base_url:
            raise ConfigError(
                "teacher.base_url: the openai backend needs the server's base URL, e.g. "
                "http://localhost:8000/v1 or https://api.deepseek.com/v1"
            )
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.revision = revision
        self.tokenizer_source = tokenizer
        self.tokenizer = load_teacher_tokenizer(tokenizer, None)
        self.mapper = cached_mapper(tokenizer, None)
        self.api_key_env = api_key_env
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.server = probe_server(self.base_url, self.headers, model=model, api_key_env=api_key_env)
        self.vllm = self.server.vllm if vllm is None else vllm
        self.max_retries = max_retries
        self.retry_base_s = retry_base_s
        self.concurrency = max(1, concurrency)
        self.limiter = RateLimiter(qps)
        self.name = name or f"{model}@{revision or 'api'}"
        self._context = context_of(self.tokenizer, max_model_len or self.server.max_model_len)
        self._client = httpx.Client(headers=self.headers, timeout=timeout_s)

    @classmethod
    def from_config(cls, teacher_cfg: TeacherSection) -> OpenAITeacher:
        return cls(
            teacher_cfg.base_url,
            teacher_cfg.model,
            tokenizer=teacher_cfg.tokenizer,
            api_key=read_api_key(teacher_cfg.api_key_env),
            api_key_env=teacher_cfg.api_key_env,
            revision=teacher_cfg.revision,
            max_model_len=teacher_cfg.max_model_len,
            qps=teacher_cfg.qps,
            max_retries=teacher_cfg.max_retries,
            concurrency=teacher_cfg.batch_size,
            name=f"{teacher_cfg.model}@{teacher_cfg.revision or 'api'}",
        )

    @property
    def context_length(self) -> int:
        return self._context or (1 << 30)

    def encode_prompt(self, prompt: PromptInput) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def max_tokens_for(self, prompt_len: int, wanted: int) -> int:
        return wanted if self._context is None else min(wanted, self._context - prompt_len)

    def post(self, route: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST with qps limit and retries (408/429/5xx and connection errors, exponential backoff);
        returns the canonical dict, whose ``error`` is set for a non-retryable HTTP error."""
        import httpx

        url = f"{self.base_url}/{route}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_base_s * 2 ** (attempt - 1))
            self.limiter.wait()
            try:
                response = self._client.post(url, json=body)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code in RETRYABLE_STATUS:
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            return normalize_http_response(response.status_code, response.text)
        raise RaydistillError(
            f"teacher server {url} failed {self.max_retries + 1} times (teacher.max_retries="
            f"{self.max_retries}); last error: {last}"
        )

    def _raise(self, route: str, error: str) -> None:
        hint = ""
        if error.startswith(("401", "403")):
            hint = (
                f"; check the key in ${self.api_key_env} (teacher.api_key_env)"
                if self.api_key_env
                else "; the server wants an API key: set teacher.api_key_env to the name of the env var holding it"
            )
        raise RaydistillError(f"teacher server {self.base_url}/{route} rejected the request: {error}{hint}")

    def _generate_one(self, prompt: PromptInput, sampling: SamplingParams) -> Completion:
        prompt_ids = self.encode_prompt(prompt)
        max_tokens = self.max_tokens_for(len(prompt_ids), sampling.max_new_tokens)
        if max_tokens < 1:
            raise ConfigError(
                f"prompt of {len(prompt_ids)} tokens leaves no room in the teacher's context of {self.context_length}"
            )
        payload = build_request(
            prompt, prompt_ids, sampling, model=self.model, k=sampling.logprobs, vllm=self.vllm, max_tokens=max_tokens
        )
        route, body = finalize_request(payload)
        canon = self.post(route, body)
        if canon["error"]:
            self._raise(route, canon["error"])
        return completion_from_canonical(canon, prompt_ids, sampling.logprobs, self.mapper)

    def generate(
        self, prompts: Sequence[PromptInput], sampling: SamplingParams, seeds: Sequence[int] | None = None
    ) -> list[Completion]:
        check_logprobs(sampling.logprobs, self.vllm)
        # Each prompt its own seed: two samples of one prompt must not be the same completion.
        own = [dataclasses.replace(sampling, seed=stream_seed(sampling, seeds, i)) for i in range(len(prompts))]
        prompts = list(prompts)
        if len(prompts) <= 1:
            return [self._generate_one(p, s) for p, s in zip(prompts, own)]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(self._generate_one, prompts, own))

    def _score_one(self, sequence: Sequence[int], start: int, k: int) -> ScoredSequence:
        body = score_request(sequence, model=self.model, k=k, vllm=self.vllm)
        canon = self.post("completions", body)
        if canon["error"] and canon["error"].startswith("400"):
            # Some servers refuse max_tokens=0: generate one token and ignore it.
            canon = self.post(
                "completions", score_request(sequence, model=self.model, k=k, vllm=self.vllm, max_tokens=1)
            )
        if canon["error"]:
            self._raise("completions", canon["error"])
        return scored_from_canonical(canon, sequence, start, k, self.mapper)

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int) -> list[ScoredSequence]:
        check_logprobs(k, self.vllm)
        items = list(zip(sequences, starts))
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(items)))) as pool:
            return list(pool.map(lambda item: self._score_one(item[0], item[1], k), items))

    def close(self) -> None:
        self._client.close()

    @classmethod
    def build_dataset_stage(
        cls, teacher_cfg: TeacherSection, sampling: SamplingParams, logprob_dtype: str
    ) -> Callable[[Any], Any]:
        """ds -> ds of teacher rows through ``ray.data.llm``'s ``HttpRequestProcessorConfig``.

        Checks the config on the driver first (base_url, API key, tokenizer, model served, top-k
        cap) and sends one 1-token request, so a bad setup fails here instead of in every row.
        """
        from ray.data.llm import HttpRequestProcessorConfig, build_processor

        teacher = cls.from_config(teacher_cfg)
        try:
            check_logprobs(sampling.logprobs, teacher.vllm)
            teacher.generate(["Hello"], dataclasses.replace(sampling, max_new_tokens=1))
        finally:
            teacher.close()
        spec = HttpStageSpec(
            base_url=teacher.base_url,
            model=teacher.model,
            tokenizer=teacher.tokenizer_source,
            vllm=teacher.vllm,
            context=teacher._context,
            sampling=json.dumps(sampling.to_json()),
            k=int(sampling.logprobs),
            logprob_dtype=logprob_dtype,
            teacher=teacher.name,
        )
        config = HttpRequestProcessorConfig(**http_processor_kwargs(teacher_cfg, teacher.base_url, teacher.headers))
        return build_processor(
            config,
            preprocess=functools.partial(http_preprocess_row, spec),
            postprocess=functools.partial(http_postprocess_row, spec),
        )


# ---------------------------------------------------------------------------------------------
# Ray Data stage: preprocess -> HttpRequestStage (RoutingSession) -> postprocess
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HttpStageSpec(StageSpec):
    """The shared stage spec plus where the HTTP teacher is."""

    base_url: str
    model: str
    vllm: bool


def http_processor_kwargs(teacher_cfg: TeacherSection, base_url: str, headers: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments of ``ray.data.llm.HttpRequestProcessorConfig`` for a teacher stage.

    ``qps`` in ray.data.llm is per actor (and per batch), so the configured total is split across
    ``replicas``; ``url`` is the completions route, :class:`RoutingSession` sends chat bodies to
    ``/chat/completions``.
    """
    replicas = int(teacher_cfg.replicas)
    return dict(
        url=f"{base_url}/completions",
        headers=dict(headers) or None,
        qps=max(1, int(teacher_cfg.qps) // replicas) if teacher_cfg.qps else None,
        max_retries=int(teacher_cfg.max_retries),
        base_retry_wait_time_in_s=RAY_RETRY_BASE_S,
        concurrency=replicas,
        batch_size=int(teacher_cfg.batch_size),
        session_factory=functools.partial(RoutingSession, base_url),
        http_request_stage={"num_cpus": float(teacher_cfg.num_cpus)},
    )


def http_preprocess_row(spec: HttpStageSpec, row: dict[str, Any]) -> dict[str, Any]:
    """Input row -> ``payload`` (generic body) + prompt ids. An over-long prompt still flows through
    the stage (it cannot drop rows) as a 1-token request; the postprocess makes it a skip row."""
    tokenizer = cached_tokenizer(spec.tokenizer)
    messages = plain_messages(row.get("messages"))
    prompt: PromptInput = messages or row.get("prompt") or ""
    prompt_ids = encode_prompt(tokenizer, prompt)
    params = dataclasses.replace(spec.params, seed=row_seed(spec.params.seed, str(row["prompt_id"])))
    max_tokens = (
        params.max_new_tokens if spec.context is None else min(params.max_new_tokens, spec.context - len(prompt_ids))
    )
    skip = ""
    if max_tokens < 1:
        skip = f"prompt_too_long ({len(prompt_ids)} tokens > context {spec.context})"
    elif not prompt_ids:
        skip = "empty_prompt"
    if skip:
        # Cheapest request that every server accepts; same body shape as the real ones.
        first = prompt_ids[:1] or [int(tokenizer.eos_token_id or 0)]
        stub = prompt if (messages and not spec.vllm) else tokenizer.decode(first)
        payload = build_request(
            stub, first, dataclasses.replace(params, stop=()), model=spec.model, k=1, vllm=spec.vllm, max_tokens=1
        )
    else:
        payload = build_request(
            prompt, prompt_ids, params, model=spec.model, k=spec.k, vllm=spec.vllm, max_tokens=max_tokens
        )
    return {"payload": payload, "rd_prompt_ids": prompt_ids, "rd_skip": skip}


def http_postprocess_row(spec: HttpStageSpec, row: dict[str, Any]) -> dict[str, Any]:
    """Canonical response -> a teacher-stage row (typed lists) or a padded skip row."""
    request = request_of(row)
    if row.get("rd_skip"):
        return padded_skip(request, row["rd_skip"])
    canon = {key: to_plain(value) for key, value in dict(row["http_response"]).items()}
    for key in CANONICAL_KEYS:
        canon.setdefault(key, empty_canonical()[key])
    if canon["error"]:
        reason = "prompt_too_long" if _is_context_error(str(canon["error"])) else "http_error"
        return padded_skip(request, f"{reason} ({canon['error']})")
    try:
        completion = completion_from_canonical(
            canon, to_plain(row["rd_prompt_ids"]), spec.k, cached_mapper(spec.tokenizer)
        )
    except RaydistillError as exc:
        return padded_skip(request, f"bad_response ({exc})")
    return completion_row(request, completion, spec.teacher, spec.params, spec.logprob_dtype)


def _is_context_error(error: str) -> bool:
    text = error.lower()
    return error.startswith("400") and (
        "maximum context length" in text
        or "maximum model length" in text
        or "context_length_exceeded" in text
        or "too long" in text
    )


class RoutingSession:
    """The ``session_factory`` handed to ray.data.llm's HttpRequestUDF (an aiohttp session façade).

    * routes each generic body (see :func:`finalize_request`) to ``/completions`` or
      ``/chat/completions``: one processor serves datasets mixing prompts and messages;
    * starts every request as soon as the UDF creates it: the UDF awaits its requests one by one,
      so without this a batch would be sent sequentially (``qps`` still paces the starts);
    * answers ``json()`` with the flat canonical dict (``normalize_http_response``), HTTP errors
      included, so the postprocess turns them into skip rows instead of failing the job. (408/429/
      502/503/504 and connection errors are retried by the UDF; when its retries run out it raises.)
    """

    def __init__(self, base_url: str, timeout_s: float = 600.0):
        import aiohttp

        self._base = base_url.rstrip("/")
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def __aenter__(self) -> RoutingSession:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._session.close()

    def post(self, url: str, *, data: Any = None, **kwargs: Any) -> _InFlight:
        if isinstance(data, str):
            try:
                payload = json.loads(data)
            except ValueError:
                payload = None
            if isinstance(payload, dict) and ("prompt" in payload or "messages" in payload):
                route, body = finalize_request(payload)
                url, data = f"{self._base}/{route}", json.dumps(body)
        return _InFlight(self._session.post(url, data=data, **kwargs))


class _InFlight:
    """An already-started request; awaiting it gives a :class:`_CanonicalResponse`."""

    def __init__(self, request: Any):
        self._task = asyncio.ensure_future(self._run(request))

    @staticmethod
    async def _run(request: Any) -> _CanonicalResponse:
        return _CanonicalResponse(await request)

    def __await__(self):
        return self._task.__await__()


class _CanonicalResponse:
    def __init__(self, response: Any):
        self._response = response
        self.status = response.status
        self.reason = response.reason

    async def __aenter__(self) -> _CanonicalResponse:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._response.release()

    async def json(self, **_: Any) -> dict[str, Any]:
        return normalize_http_response(self.status, await self._response.text())
