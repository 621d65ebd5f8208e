"""Ray Serve LLM's OpenAI ingress with raydistill's API keys and prompt log (see :mod:`serve.llm_app`).

This module imports ``ray.serve.llm``, which needs vLLM: only the replicas of a ``serve.backend: vllm``
app load it (by name, ``serve.llm_app.INGRESS_CLASS``).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from serve.auth import APIKeyAuth
from serve.errors import invalid_api_key
from serve.prompt_log import PromptLog, make_record
from serve.section import ServeSection

logger = logging.getLogger("raydistill.serve")


class RaydistillIngress(OpenAiIngress):
    """``OpenAiIngress`` whose every route checks the bearer key (against hashes the deploying driver
    read) and whose chat / completion routes append finished requests to the prompt log."""

    def __init__(
        self,
        llm_deployments: dict[str, Any],
        model_cards: dict[str, Any],
        *,
        api_key_hashes: list[str] | None = None,
        section: dict | None = None,
        model_dir: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(llm_deployments, model_cards, **kwargs)
        self.section = ServeSection(**(section or {}))
        self.model_dir = model_dir
        self.auth = APIKeyAuth.from_hashes(api_key_hashes or [])
        self.auth.warn_if_open()
        self.prompt_log = PromptLog.from_section(self.section)

    # -- auth ------------------------------------------------------------------------------------------
    def denied(self, request: Request) -> Response | None:
        """A 401 in OpenAI's shape unless the request carries a configured key (or none is configured)."""
        return None if self.auth.check(request.headers.get("authorization")) else invalid_api_key().response()

    async def models(self, request: Request) -> Any:
        return self.denied(request) or await super().models()

    async def model_data(self, model: str, request: Request) -> Any:
        return self.denied(request) or await super().model_data(model)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        denied = self.denied(request)
        if denied is not None:
            return denied
        response = await super().completions(body, request)
        prompt = body.prompt[0] if isinstance(body.prompt, list) and len(body.prompt) == 1 else body.prompt
        return self._logged(response, "completions", prompt=prompt if isinstance(prompt, str) else json.dumps(prompt))

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        denied = self.denied(request)
        if denied is not None:
            return denied
        response = await super().chat(body, request)
        messages = [m if isinstance(m, dict) else m.model_dump() for m in body.messages]
        return self._logged(response, "chat", messages=messages)

    def info(self) -> dict:
        """What this app serves (``serve.app.served_model_dir`` asks it through a handle)."""
        return {"model_dir": self.model_dir}

    # -- prompt log ------------------------------------------------------------------------------------
    def _logged(self, response: Response, endpoint: str, **request: Any) -> Response:
        if self.prompt_log is None:
            return response
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._tee(response.body_iterator, endpoint, request)
        elif isinstance(response, JSONResponse):
            body = json.loads(response.body)
            usage = body.get("usage") or {}
            for choice in body.get("choices") or []:
                self._append(
                    body.get("id", ""),
                    body.get("model", ""),
                    endpoint,
                    request,
                    _choice_text(choice),
                    usage.get("prompt_tokens", 0),
                    usage.get("completion_tokens", 0),
                )
        return response

    async def _tee(self, chunks: AsyncIterator[Any], endpoint: str, request: dict) -> AsyncIterator[Any]:
        """Pass the SSE chunks on unchanged; log the request when the engine's ``[DONE]`` arrives, before that
        chunk is passed on (a client that got ``[DONE]`` may hang up at once, and the HTTP server then cancels
        this generator at its next await). A stream the client dropped earlier, one that failed, or one that
        carried vLLM's in-band error event before its ``[DONE]`` is not a finished generation: not logged."""
        texts: dict[int, list[str]] = {}
        meta: dict[str, Any] = {}
        failed = False
        async for chunk in chunks:
            for line in (chunk.decode() if isinstance(chunk, bytes) else str(chunk)).splitlines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :].strip()
                if data == "[DONE]":
                    if not failed:
                        self._log_stream(texts, meta, endpoint, request)
                    continue
                try:
                    event = json.loads(data)
                except json.JSONDecodeError:
                    continue
                if event.get("error"):  # vLLM's in-band error event: the generation was aborted, not finished
                    failed = True
                meta.setdefault("id", event.get("id", ""))
                meta.setdefault("model", event.get("model", ""))
                if event.get("usage"):
                    meta["usage"] = event["usage"]
                for choice in event.get("choices") or []:
                    text = _choice_text(choice)
                    if text:
                        texts.setdefault(choice.get("index", 0), []).append(text)
            yield chunk

    def _log_stream(self, texts: dict[int, list[str]], meta: dict[str, Any], endpoint: str, request: dict) -> None:
        usage = meta.get("usage") or {}
        for index in sorted(texts) or [0]:
            self._append(
                meta.get("id", ""),
                meta.get("model", ""),
                endpoint,
                request,
                "".join(texts.get(index, [])),
                usage.get("prompt_tokens", 0),
                usage.get("completion_tokens", len(texts.get(index, []))),  # content chunks without usage
            )

    def _append(
        self,
        request_id: str,
        model: str,
        endpoint: str,
        request: dict,
        completion: str,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        try:
            self.prompt_log.append(
                make_record(
                    request_id=request_id,
                    model=model,
                    endpoint=endpoint,
                    completion=completion,
                    prompt_tokens=prompt_tokens or 0,
                    completion_tokens=completion_tokens or 0,
                    **request,
                )
            )
        except Exception:  # noqa: BLE001 - the prompt log never fails a request
            logger.exception("prompt log append failed")

    def __del__(self) -> None:
        """Serve calls this when the replica stops: write what the log still holds."""
        if getattr(self, "prompt_log", None) is not None:
            self.prompt_log.close()


def _choice_text(choice: dict) -> str:
    """The text of one (streamed or whole) choice: chat message / delta content, or completion text."""
    message = choice.get("message") or choice.get("delta") or {}
    return str(message.get("content") or choice.get("text") or "")


def _guarded(name: str) -> Any:
    """``OpenAiIngress.<name>(body, request)`` behind the API key check."""
    original = getattr(OpenAiIngress, name)

    @functools.wraps(original)
    async def route(self: RaydistillIngress, body: Any, request: Request) -> Any:
        return self.denied(request) or await original(self, body, request)

    return route


for _name in ("embeddings", "transcriptions", "score", "tokenize", "detokenize"):
    if hasattr(OpenAiIngress, _name):
        setattr(RaydistillIngress, _name, _guarded(_name))
