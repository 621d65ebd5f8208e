"""The OpenAI protocol layer of the HTTP API: request models, request parsing, SSE framing, logprob formatting.

No routes here (:mod:`serve.api`), no serving logic (:mod:`serve.serving`); errors are :mod:`serve.errors`.
Everything is importable without a model or an engine.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serve.engine.types import TokenLogprob
from serve.errors import APIError


# ---------------------------------------------------------------------------------------------------
# request models (OpenAI fields we honour; unknown fields are ignored like OpenAI-compatible servers do)
# ---------------------------------------------------------------------------------------------------
class _NullMeansDefault(BaseModel):
    """Explicit ``null`` means "use the default" (LangChain and other clients send every optional field)."""

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class JSONSchemaFormat(_NullMeansDefault):
    """``response_format.json_schema``: the schema the output must validate against (``strict`` is implied:
    the grammar enforces the schema)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``response_format``: ``text`` (free), ``json_object`` (any JSON object) or ``json_schema``."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object: {'name': ..., 'schema': {...}}")
        return self

    def output_schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must follow (None: free text)."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            return self.json_schema.schema_ or {}  # type: ignore[union-attr]
        return None


class _Req(_NullMeansDefault):
    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(default=1, ge=1)
    stream: bool = False
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, description="extension (vLLM style): 0 = off")
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0, le=2, description="extension (vLLM style): 1 = off")
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else list(value)
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops


class StreamOptions(_NullMeansDefault):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported ({'type': 'text', 'text': ...})")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Req):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)  # upper bound: serve.limits

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        for m in self.messages:
            m.text()  # validates content parts
        return self


class CompletionRequest(_Req):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: int | None = Field(default=None, ge=0)  # upper bound: serve.limits
    echo: bool = False
    suffix: str | None = None


_Req.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
# Fields of OpenAI's API this server does not implement: field -> "is this value a no-op?". Anything else
# is a 400 naming the field (a silent drop would change what the client asked for).
def _empty(value: Any) -> bool:
    return value in ([], {}, "")


_COMMON_UNSUPPORTED = {"logit_bias": _empty}
UNSUPPORTED: dict[str, dict[str, Any]] = {
    "chat": {
        **_COMMON_UNSUPPORTED,
        "tools": _empty,
        "functions": _empty,
        "tool_choice": lambda v: v == "none",
        "function_call": lambda v: v == "none",
    },
    "completions": {**_COMMON_UNSUPPORTED, "suffix": _empty, "best_of": lambda v: v == 1},
}


def check_unsupported(data: dict, endpoint: str) -> None:
    """400 ``unsupported_parameter`` for a field we would otherwise ignore; ``null`` and no-op values pass."""
    for field, neutral in UNSUPPORTED[endpoint].items():
        value = data.get(field)
        if value is None or neutral(value):
            continue
        if field == "best_of" and value == data.get("n"):
            continue  # best_of == n returns every candidate: plain sampling
        raise APIError(
            400,
            f"`{field}` is not supported by this server (got {json.dumps(value)[:80]}); remove it or send null",
            param=field,
            code="unsupported_parameter",
        )


def param_of(err: dict) -> str | None:
    loc = [str(p) for p in err.get("loc", ()) if not str(p).startswith(("function-after", "union["))]
    return ".".join(loc) or None


def validation_error(exc: ValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    param = param_of(first)
    msg = "; ".join(f"{param_of(e) or 'body'}: {e.get('msg')}" for e in errors[:5])
    return APIError(400, f"invalid request: {msg}", param=param, code="invalid_value")


def parse_request(body: bytes, model: type[BaseModel], endpoint: str | None = None) -> Any:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    if endpoint is not None:
        check_unsupported(data, endpoint)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


LOGPROB_FLOOR = -9999.0  # -inf (masked tokens) is not JSON; vLLM clamps to the same value


def clamp_logprob(value: float) -> float:
    value = float(value)
    return LOGPROB_FLOOR if value != value or value < LOGPROB_FLOOR else value  # NaN too


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character standing for each byte -> the byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _byte_decoder()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenText:
    """Token id -> text (decoded one token at a time, like OpenAI/vLLM) and -> the token's own bytes."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}
        self.bytes_cache: dict[int, list[int]] = {}
        decoder = repr(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None))
        self.byte_level = "ByteLevel" in decoder
        self.metaspace = "Metaspace" in decoder or "Replace" in decoder

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tokenizer.decode([token_id])
        return text

    def bytes_of(self, token_id: int) -> list[int]:
        """The token's bytes: a byte-level BPE piece or a ``<0xNN>`` byte-fallback piece may be part of a
        multi-byte character, whose decoded text alone is U+FFFD; the bytes of a response's tokens concatenate
        to the response's UTF-8."""
        cached = self.bytes_cache.get(token_id)
        if cached is not None:
            return cached
        raw: bytes | None = None
        try:
            piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        except Exception:  # noqa: BLE001 - tokenizers without pieces: fall back to the decoded text
            piece = None
        if isinstance(piece, str) and piece:
            fallback = _BYTE_FALLBACK.fullmatch(piece)
            if fallback:
                raw = bytes([int(fallback.group(1), 16)])
            elif self.byte_level and all(ch in _BYTE_DECODER for ch in piece):
                raw = bytes(_BYTE_DECODER[ch] for ch in piece)
            elif self.metaspace and "\u2581" in piece:  # SentencePiece: the piece keeps its leading space
                raw = piece.replace("\u2581", " ").encode("utf-8")
        if raw is None:
            raw = self(token_id).encode("utf-8")
        out = self.bytes_cache[token_id] = list(raw)
        return out


def chat_logprobs(lps: list[TokenLogprob], text_of: TokenText, top_n: int) -> dict:
    def entry(tid: int, lp: float) -> dict:
        return {"token": text_of(tid), "logprob": clamp_logprob(lp), "bytes": text_of.bytes_of(tid)}

    content = []
    for lp in lps:
        e = entry(lp.token_id, lp.logprob)
        e["top_logprobs"] = [entry(t, v) for t, v in (lp.top or [])[:top_n]]
        content.append(e)
    return {"content": content}


def completion_logprobs(
    prompt_ids: list[int] | None,
    prompt_lps: list[TokenLogprob | None] | None,
    lps: list[TokenLogprob],
    text_of: TokenText,
    top_n: int,
    offset0: int = 0,
) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = offset0

    def add(tid: int, lp: TokenLogprob | None) -> None:
        nonlocal pos
        s = text_of(tid)
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
        if lp is None:
            token_lps.append(None)
            tops.append(None)
        else:
            token_lps.append(clamp_logprob(lp.logprob))
            top: dict[str, float] = {}
            for t, v in (lp.top or [])[:top_n]:
                top.setdefault(text_of(t), clamp_logprob(v))
            if top_n:
                top.setdefault(s, clamp_logprob(lp.logprob))  # OpenAI includes the chosen token
            tops.append(top)

    if prompt_ids is not None:
        for i, tid in enumerate(prompt_ids):
            add(tid, prompt_lps[i] if prompt_lps and i < len(prompt_lps) else None)
    for lp in lps:
        add(lp.token_id, lp)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
