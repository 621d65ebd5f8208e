"""OpenAI-compatible HTTP API (FastAPI) over one or more engine backends.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models[/{id}]``, ``GET /health``,
``GET /metrics`` (Prometheus text). Streaming is SSE ending with ``data: [DONE]``. Every error has
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``; bad input is always a 4xx.

The app talks to a :class:`Backend`: anything with ``name``, ``tokenizer``, ``context_length`` and an
async ``generate(GenerationRequest)`` stream of :class:`GenerationOutput`. :class:`EngineBackend`
wraps an in-process ``AsyncEngine`` (``raydistill serve --no-ray``, tests); ``serve.app`` supplies a
backend that forwards to the Ray Serve model deployment. Tokenization (chat template, prompt length
checks, token strings for logprobs) happens here, generation behind the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Optional, Protocol, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.auth import APIKeyAuth, load_api_keys
from serve.engine.types import (EngineError, EngineFailure, EngineUnavailable, GenerationOutput, GenerationRequest,
                                SamplingOptions, TokenLogprob)
from serve.limits import check_limits, choice_seed
from serve.metrics import ServerMetrics
from serve.protocol import (  # noqa: F401 - re-exported (serve.app, tests)
    APIError, ChatCompletionRequest, ChatMessage, CompletionRequest, Overloaded,
    StreamOptions, TokenText, _Req, chat_logprobs, completion_logprobs, parse_request, sse)
from serve.prompt_log import PromptLog, make_record
from serve.section import ServeSection

logger = logging.getLogger("raydistill.serve")


# ---------------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------------
class Backend(Protocol):
    name: str
    tokenizer: Any
    context_length: int

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]: ...

    async def stats(self) -> dict: ...


class EngineBackend:
    """An in-process ``AsyncEngine`` (``serve.engine.AsyncEngine`` or anything with its interface)."""

    def __init__(self, engine: Any, name: Optional[str] = None):
        self.engine = engine
        self.name = name or engine.model_name
        self.tokenizer = engine.tokenizer
        self.context_length = int(engine.context_length)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        return self.engine.generate(request)

    async def stats(self) -> dict:
        return dict(self.engine.stats())

    def shutdown(self) -> None:
        self.engine.shutdown()

    def check_health(self) -> None:
        """Raise when the engine cannot serve (its loop thread died); ``GET /health`` then answers 503."""
        check = getattr(self.engine, "check_health", None)
        if check is not None:
            check()


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body is {length} bytes; the limit is {limit} (serve.max_body_bytes)",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes (serve.max_body_bytes)",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------------
class _Choice:
    """Accumulates one choice's outputs."""

    def __init__(self, index: int):
        self.index = index
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None
        self.finish_reason: Optional[str] = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.text_offset = 0  # streamed completion logprobs: offsets continue across chunks

    def add(self, out: GenerationOutput) -> None:
        self.text.append(out.text)
        self.token_ids.extend(out.token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
        self.completion_tokens = max(self.completion_tokens, out.completion_tokens, len(self.token_ids))
        if out.finished:
            if out.finish_reason not in ("stop", "length"):
                # Aborted by the server (shutdown, model swap, engine reset): never report it as finished.
                raise EngineUnavailable(f"the engine ended the request with finish_reason={out.finish_reason!r}")
            self.finish_reason = out.finish_reason


class _Job:
    """One engine request of a choice: the prompt, its sampling, and the open output stream."""

    def __init__(self, index: int, prompt_index: int, request: GenerationRequest):
        self.index = index
        self.prompt_index = prompt_index
        self.request = request
        self.stream: Optional[AsyncIterator[GenerationOutput]] = None
        self.first: Optional[GenerationOutput] = None


class OpenAIServer:
    """State shared by the routes: backends, auth, metrics, prompt log, admission limit."""

    def __init__(self, backends: Sequence[Backend], section: ServeSection, *, metrics: ServerMetrics,
                 auth: APIKeyAuth, prompt_log: Optional[PromptLog], admission_limit: Optional[int],
                 replicas_fn: Optional[Any] = None):
        self.backends = {b.name: b for b in backends}
        self.section = section
        self.metrics = metrics
        self.auth = auth
        self.prompt_log = prompt_log
        self.admission_limit = admission_limit
        self.in_flight = 0
        self.replicas_fn = replicas_fn
        self._token_text = {b.name: TokenText(b.tokenizer) for b in backends}

    # -- lookups ------------------------------------------------------------------------------------
    def backend(self, model: str) -> Backend:
        backend = self.backends.get(model)
        if backend is None:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                           f"{', '.join(sorted(self.backends))} (GET /v1/models)", param="model",
                           code="model_not_found")
        return backend

    def authorize(self, request: Request) -> None:
        if not self.auth.check(request.headers.get("authorization")):
            raise APIError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    # -- prompt preparation ---------------------------------------------------------------------------
    def chat_prompt(self, backend: Backend, req: ChatCompletionRequest) -> tuple[list[int], list[dict]]:
        tok = backend.tokenizer
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"model {backend.name} has no chat template; use /v1/completions",
                           param="messages", code="no_chat_template")
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - templates raise for e.g. unsupported role orders
            raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
        ids = tok(text, add_special_tokens=False).input_ids
        return list(ids), messages

    def completion_prompts(self, backend: Backend, req: CompletionRequest) -> list[tuple[list[int], str]]:
        prompt = req.prompt
        tok = backend.tokenizer
        if isinstance(prompt, str):
            items: list[Union[str, list[int]]] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            items = [list(prompt)]  # type: ignore[arg-type]
        else:
            items = list(prompt)  # type: ignore[arg-type]
        if not items:
            raise APIError(400, "prompt must not be empty", param="prompt")
        out = []
        vocab = len(tok)
        for item in items:
            if isinstance(item, str):
                ids = list(tok(item, add_special_tokens=True).input_ids)
                text = item
            else:
                if any(t < 0 or t >= vocab for t in item):
                    raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
                ids = list(item)
                text = tok.decode(ids)
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            out.append((ids, text))
        return out

    def max_tokens(self, backend: Backend, prompt_len: int, requested: Optional[int], param: str,
                   prompt_param: str) -> int:
        ctx = backend.context_length
        if requested is None:
            room = ctx - prompt_len
            if room < 1:
                raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your prompt "
                               f"has {prompt_len} tokens, leaving no room for the completion. Please shorten the "
                               "prompt.", param=prompt_param, code="context_length_exceeded")
            return min(self.section.max_tokens_default, room)
        if prompt_len + requested > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                           f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                           f"completion). Please reduce the prompt or {param}.", param=param,
                           code="context_length_exceeded")
        return requested

    # -- running engine requests -------------------------------------------------------------------------
    def deadline(self, start: float) -> Optional[float]:
        """``time.perf_counter()`` by which a request started at ``start`` must be done (serve.request_timeout_s)."""
        timeout = self.section.request_timeout_s
        return None if timeout is None else start + timeout

    def timeout_error(self) -> APIError:
        return APIError(504, f"the request did not finish within {self.section.request_timeout_s:g}s "
                        "(serve.request_timeout_s); it was cancelled", code="timeout", type="server_error")

    async def open_jobs(self, backend: Backend, jobs: list[_Job], deadline: Optional[float] = None) -> None:
        """Start every job and wait for its first output, so bad requests fail before any byte is sent."""

        async def open_one(job: _Job) -> None:
            job.stream = backend.generate(job.request).__aiter__()
            try:
                job.first = await job.stream.__anext__()
            except StopAsyncIteration:
                job.first = None

        opening = asyncio.gather(*(open_one(j) for j in jobs), return_exceptions=True)
        try:
            results = await asyncio.wait_for(opening, None if deadline is None
                                             else max(0.0, deadline - time.perf_counter()))
        except asyncio.TimeoutError:
            await self.close_jobs(jobs)
            raise self.timeout_error() from None
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close_jobs(jobs)
            raise self.map_error(errors[0], jobs[0].request.request_id.rsplit("-", 1)[0])

    @staticmethod
    async def close_jobs(jobs: list[_Job]) -> None:
        for job in jobs:
            if job.stream is not None and hasattr(job.stream, "aclose"):
                with contextlib.suppress(BaseException):
                    await job.stream.aclose()

    @staticmethod
    def map_error(exc: BaseException, rid: Optional[str] = None) -> BaseException:
        """The HTTP error for ``exc``: 4xx for the client's mistakes, 5xx (type ``server_error``) for ours.
        A 5xx body never carries backend exception text: that goes to the log with the request id."""
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, EngineError):
            return APIError(400, str(exc), code="invalid_request")
        if isinstance(exc, Overloaded):
            return APIError(429, "server overloaded: too many requests queued; retry later",
                            code="rate_limit_exceeded")
        if isinstance(exc, asyncio.CancelledError):
            return exc
        if isinstance(exc, EngineUnavailable):
            logger.warning("request %s: engine unavailable: %s", rid or "-", exc)
            return APIError(503, f"the model engine is not available; retry later (request id {rid})",
                            code="engine_unavailable")
        logger.error("request %s: engine failure: %r", rid or "-", exc, exc_info=exc)
        if isinstance(exc, EngineFailure):
            return APIError(500, f"the model engine failed while running this request (request id {rid}); "
                            "the details are in the server log", code="engine_error")
        return APIError(503, f"the model backend failed (request id {rid}); the details are in the server log",
                        code="backend_error")

    def admit(self, jobs: int) -> None:
        """429 unless ``jobs`` more engine jobs fit (a request of n choices over p prompts is n x p jobs; one
        request alone on an idle server is always admitted)."""
        if self.admission_limit is not None and self.in_flight and self.in_flight + jobs > self.admission_limit:
            raise APIError(429, f"server overloaded: {self.in_flight} engine jobs in flight, this request needs "
                           f"{jobs} more (limit {self.admission_limit} = serve.max_ongoing_requests + "
                           "serve.max_queued_requests); retry later", code="rate_limit_exceeded")

    async def merged(self, jobs: list[_Job], deadline: Optional[float] = None,
                     ) -> AsyncIterator[tuple[_Job, GenerationOutput]]:
        """Outputs of all jobs as they arrive (first outputs first); closing this closes every job.
        Past ``deadline`` (perf_counter) it raises the 504 of :meth:`timeout_error`."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(job: _Job) -> None:
            try:
                finished = False
                if job.first is not None:
                    await queue.put((job, job.first))
                    finished = job.first.finished
                    # Iterate to the natural end (not break) so the engine sees a finished, not aborted, request.
                    async for out in job.stream:  # type: ignore[union-attr]
                        await queue.put((job, out))
                        finished = finished or out.finished
                if not finished:  # the stream stopped without a finish_reason: never report that as done
                    raise EngineUnavailable(f"engine request {job.request.request_id} ended without finishing")
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
                await queue.put((job, exc))
            finally:
                if job.stream is not None and hasattr(job.stream, "aclose"):
                    with contextlib.suppress(BaseException):
                        await job.stream.aclose()
                await queue.put((job, done))

        tasks = [asyncio.ensure_future(pump(j)) for j in jobs]
        remaining = len(jobs)
        try:
            while remaining:
                if deadline is None:
                    job, item = await queue.get()
                else:
                    try:
                        job, item = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.perf_counter()))
                    except asyncio.TimeoutError:
                        raise self.timeout_error() from None
                if item is done:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield job, item
        finally:
            for t in tasks:
                t.cancel()
            # Wait so the engine sees the abort before the handler returns (frees the batch slot now).
            await asyncio.gather(*tasks, return_exceptions=True)

    def releaser(self, jobs: int) -> Any:
        """An idempotent callable giving back a request's in-flight jobs (streams end in several ways)."""
        done = [False]

        def release() -> None:
            if not done[0]:
                done[0] = True
                self.in_flight -= jobs

        return release

    def log_prompt(self, **kw: Any) -> None:
        if self.prompt_log is None:
            return
        try:
            self.prompt_log.append(make_record(**kw))
        except Exception:  # noqa: BLE001 - the prompt log never fails a request
            logger.exception("prompt log append failed")

    def token_text(self, backend: Backend) -> TokenText:
        cached = self._token_text.get(backend.name)
        if cached is None or cached.tokenizer is not backend.tokenizer:  # the model (tokenizer) was swapped
            cached = self._token_text[backend.name] = TokenText(backend.tokenizer)
        return cached

    @staticmethod
    async def ready(backend: Backend) -> None:
        """Backends that learn their context length lazily (the Ray handle backend) fetch it here."""
        refresh = getattr(backend, "refresh", None)
        if refresh is not None:
            try:
                await refresh()
            except Overloaded:
                raise APIError(429, "server overloaded; retry later", code="rate_limit_exceeded") from None
            except Exception as exc:  # noqa: BLE001 - the model deployment is not reachable
                logger.warning("model %s is not available: %r", backend.name, exc)
                raise APIError(503, "the model is not available yet; retry later", code="model_unavailable") from None


async def _close_quietly(agen: Any) -> None:
    with contextlib.suppress(Exception):
        await agen.aclose()


class _SSEResponse(StreamingResponse):
    """Closes its body generator as soon as the response ends, however it ends: a server that reports a
    gone client by failing ``send`` (ASGI 2.4) would otherwise leave the generator suspended at a ``yield``
    (and its engine jobs generating) until garbage collection."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


def _streaming(events: Any, release: Any) -> StreamingResponse:
    """SSE response; if the body is never iterated (client gone before the first byte) the slot is still freed."""
    import weakref

    body = events()
    weakref.finalize(body, release)
    return _SSEResponse(body, media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(backends: Union[Backend, Sequence[Backend]], section: Optional[ServeSection] = None, *,
               api_keys: Optional[list[str]] = None, auth: Optional[APIKeyAuth] = None,
               metrics: Optional[ServerMetrics] = None,
               prompt_log: Optional[PromptLog] = None, admission_limit: Union[int, None, str] = "auto",
               replicas_fn: Optional[Any] = None, close_backends: bool = False) -> FastAPI:
    """The FastAPI app serving ``backends`` (one per model id).

    ``api_keys``: overrides ``section.api_key_env`` / ``api_key_file``; ``auth`` (e.g. built from key hashes
    the deploying driver read) overrides both. ``admission_limit``: requests
    in flight beyond which new ones get 429 (``"auto"`` = ``max_ongoing_requests + max_queued_requests``
    of the section, ``None`` = no limit, used inside Ray Serve where the handle enforces it).
    ``prompt_log``: defaults to one built from the section when ``serve.prompt_log_enabled``.
    ``replicas_fn``: optional callable returning the number of model replicas (for ``/metrics``).
    """
    section = section or ServeSection()
    backends = [backends] if not isinstance(backends, (list, tuple)) else list(backends)
    if not backends:
        raise ValueError("create_app needs at least one backend")
    if auth is None:
        keys = api_keys if api_keys is not None else load_api_keys(section.api_key_env, section.api_key_file)
        auth = APIKeyAuth(keys)
    if prompt_log is None and section.prompt_log_uri:
        prompt_log = PromptLog(section.prompt_log_uri, redact=section.prompt_log_redact,
                               flush_rows=section.prompt_log_flush_rows, flush_s=section.prompt_log_flush_s,
                               max_buffer_rows=section.prompt_log_max_buffer_rows)
    if admission_limit == "auto":
        admission_limit = (None if section.max_queued_requests < 0
                           else section.max_ongoing_requests + section.max_queued_requests)
    server = OpenAIServer(backends, section, metrics=metrics or ServerMetrics(), auth=auth, prompt_log=prompt_log,
                          admission_limit=admission_limit, replicas_fn=replicas_fn)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        auth.warn_if_open()
        try:
            yield  # the prompt log flushes from its own thread, never on this event loop
        finally:
            if server.prompt_log is not None:
                await asyncio.to_thread(server.prompt_log.close)
            if close_backends:
                for b in backends:
                    if hasattr(b, "shutdown"):
                        b.shutdown()

    app = FastAPI(title="raydistill", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    def authorize_open(request: Request) -> None:
        """``/health``, ``/metrics``, ``/openapi.json`` need the key unless listed in ``serve.open_paths``."""
        path, root = request.url.path, request.scope.get("root_path") or ""
        if root and path.startswith(root):  # behind a route prefix (Ray Serve's route_prefix)
            path = path[len(root):] or "/"
        if path not in section.open_paths:
            server.authorize(request)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_route(request: Request) -> JSONResponse:
        authorize_open(request)
        return JSONResponse(app.openapi())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail) + f": {request.method} {request.url.path}",
                        code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return APIError(500, "internal error; the details are in the server log", code="internal_error").response()

    @app.get("/health")
    async def health(request: Request) -> Response:
        authorize_open(request)
        down = []
        for name, b in server.backends.items():
            check = getattr(b, "check_health", None)
            if check is None:
                continue
            try:
                check()
            except Exception as exc:  # noqa: BLE001 - any failure: unhealthy (Ray Serve replaces the replica)
                logger.error("health check: model %s is unhealthy: %r", name, exc)
                down.append(name)
        if down:
            return APIError(503, f"unhealthy: the engine of {', '.join(down)} is not running",
                            code="engine_unavailable").response()
        return JSONResponse({"status": "ok", "models": sorted(server.backends)})

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        authorize_open(request)
        for b in backends:
            with contextlib.suppress(Exception):
                stats = await asyncio.wait_for(b.stats(), timeout=2.0)
                replicas = None
                if server.replicas_fn is not None:
                    replicas = await asyncio.to_thread(server.replicas_fn)
                elif "replicas" in stats:
                    replicas = stats["replicas"]
                else:
                    replicas = 1
                server.metrics.engine_state(b.name, running=int(stats.get("running", 0)),
                                            waiting=int(stats.get("waiting", 0)), replicas=replicas)
        server.metrics.in_flight.set(server.in_flight)
        if server.prompt_log is not None:
            server.metrics.prompt_log_state(pending=server.prompt_log.pending(),
                                            dropped=server.prompt_log.dropped_rows,
                                            files=server.prompt_log.files_written)
        data, content_type = server.metrics.render()
        return Response(content=data, media_type=content_type)

    def model_card(name: str, b: Backend) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "raydistill",
                "max_model_len": b.context_length}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        server.authorize(request)
        for b in backends:
            await server.ready(b)
        return {"object": "list", "data": [model_card(name, b) for name, b in server.backends.items()]}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> dict:
        server.authorize(request)
        backend = server.backend(model)
        await server.ready(backend)
        return model_card(model, backend)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _handle(request, "completions")

    async def _handle(request: Request, endpoint: str) -> Response:
        start = time.perf_counter()
        prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
        rid = f"{prefix}-{uuid.uuid4().hex}"
        status = 500
        counted = False
        info: dict[str, Any] = {}
        try:
            server.authorize(request)
            server.admit(1)  # full: 429 before reading or parsing anything (cheap under a burst)
            body = await _read_body(request, section.max_body_bytes)
            req = parse_request(body, ChatCompletionRequest if endpoint == "chat" else CompletionRequest, endpoint)
            backend = server.backend(req.model)
            n_jobs = check_limits(req, section)
            await server.ready(backend)
            info["model"] = backend.name
            server.admit(n_jobs)
            server.in_flight += n_jobs
            counted = True
            if endpoint == "chat":
                response = await _chat(request, rid, req, backend, start, info)
            else:
                response = await _completions(request, rid, req, backend, start, info)
            status = response.status_code
            if isinstance(response, StreamingResponse):
                # The stream's own bookkeeping ends the request (in_flight, log line, metrics).
                counted = False
                info["stream"] = True
            response.headers["x-request-id"] = rid
            return response
        except APIError as exc:
            status = exc.status
            info["error"] = exc.message
            resp = exc.response()
            resp.headers["x-request-id"] = rid
            return resp
        except asyncio.CancelledError:
            status = 499  # client went away; the engine requests were aborted by the cancellation
            raise
        except Exception as exc:  # noqa: BLE001 - engine/backend failures: mapped, never a bare 500 with text
            err = server.map_error(exc, rid)
            if not isinstance(err, APIError):
                raise
            status = err.status
            info["error"] = f"{err.message} ({type(exc).__name__}: {exc})"
            resp = err.response()
            resp.headers["x-request-id"] = rid
            return resp
        finally:
            if counted:
                server.in_flight -= n_jobs
            if not info.get("stream"):
                _finish_log(rid, endpoint, status, start, info)

    def _finish_log(rid: str, endpoint: str, status: int, start: float, info: dict) -> None:
        elapsed = time.perf_counter() - start
        server.metrics.request_done(endpoint, status, elapsed)
        extra = f" error={info['error']!r}" if "error" in info else ""
        logger.info("request %s %s model=%s status=%d prompt_tokens=%s completion_tokens=%s ttft=%s "
                    "latency=%.3fs%s", rid, endpoint, info.get("model", "-"), status, info.get("prompt_tokens", 0),
                    info.get("completion_tokens", 0),
                    f"{info['ttft']:.3f}s" if "ttft" in info else "-", elapsed, extra)

    def _sampling(req: _Req, max_tokens: int, seed_offset: int, *, logprobs: bool, top: int,
                  prompt_logprobs: bool = False) -> SamplingOptions:
        seed = None if req.seed is None else choice_seed(req.seed, seed_offset)
        schema = req.response_format.output_schema() if req.response_format is not None else None
        return SamplingOptions(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                               seed=seed, stop=list(req.stop or []), ignore_eos=req.ignore_eos, logprobs=logprobs,
                               top_logprobs=top, prompt_logprobs=prompt_logprobs, json_schema=schema)

    async def _run_to_end(request: Request, jobs: list[_Job], choices: dict[int, _Choice], model: str,
                          start: float, info: dict) -> None:
        """Collect every job's outputs; a client disconnect cancels the jobs (uvicorn does not cancel us)."""

        async def collect() -> None:
            async for job, out in server.merged(jobs, server.deadline(start)):
                if "ttft" not in info and out.token_ids:
                    info["ttft"] = time.perf_counter() - start
                    server.metrics.first_token(model, info["ttft"])
                choices[job.index].add(out)

        task = asyncio.ensure_future(collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    task.result()
                    return
                if await request.is_disconnected():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                    raise APIError(499, "client disconnected", code="client_closed")
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    # -- chat -----------------------------------------------------------------------------------------
    async def _chat(request: Request, rid: str, req: ChatCompletionRequest, backend: Backend, start: float,
                    info: dict) -> Response:
        prompt_ids, messages = server.chat_prompt(backend, req)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = server.max_tokens(backend, len(prompt_ids), requested, param, "messages")
        top = req.top_logprobs or 0
        jobs = [_Job(i, 0, GenerationRequest(f"{rid}-{i}", list(prompt_ids),
                                             _sampling(req, max_tokens, i, logprobs=req.logprobs, top=top)))
                for i in range(req.n)]
        await server.open_jobs(backend, jobs, server.deadline(start))
        created = int(time.time())
        text_of = server.token_text(backend)
        info["prompt_tokens"] = len(prompt_ids)

        def log_prompt(completion: str, completion_tokens: int) -> None:
            server.log_prompt(request_id=rid, model=backend.name, endpoint="chat", messages=messages,
                              completion=completion, prompt_tokens=len(prompt_ids),
                              completion_tokens=completion_tokens)

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            release = server.releaser(len(jobs))

            async def events() -> AsyncIterator[bytes]:
                status = 200
                choices = {j.index: _Choice(j.index) for j in jobs}
                base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": backend.name}
                outputs = server.merged(jobs, server.deadline(start))
                try:
                    for j in jobs:
                        yield sse({**base, "choices": [{"index": j.index, "delta": {"role": "assistant",
                                                                                   "content": ""},
                                                        "logprobs": None, "finish_reason": None}]})
                    async for job, out in outputs:
                        if "ttft" not in info and out.token_ids:
                            info["ttft"] = time.perf_counter() - start
                            server.metrics.first_token(backend.name, info["ttft"])
                        choice = choices[job.index]
                        choice.add(out)
                        if out.text or out.logprobs:
                            lp = (chat_logprobs(out.logprobs, text_of, top) if req.logprobs and out.logprobs
                                  else None)
                            yield sse({**base, "choices": [{"index": job.index, "delta": {"content": out.text},
                                                            "logprobs": lp, "finish_reason": None}]})
                        if out.finished:
                            yield sse({**base, "choices": [{"index": job.index, "delta": {}, "logprobs": None,
                                                            "finish_reason": choice.finish_reason}]})
                    completion_tokens = sum(c.completion_tokens for c in choices.values())
                    info["completion_tokens"] = completion_tokens
                    if include_usage:
                        yield sse({**base, "choices": [], "usage": {
                            "prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                            "total_tokens": len(prompt_ids) + completion_tokens}})
                    yield b"data: [DONE]\n\n"
                    log_prompt("".join(choices[0].text), choices[0].completion_tokens)
                except (asyncio.CancelledError, GeneratorExit):
                    # Client gone: cancelled inside the generator, or closed at a yield (GeneratorExit must
                    # propagate, never be answered with another yield); finally cancels the engine jobs.
                    status = 499
                    raise
                except Exception as exc:  # noqa: BLE001 - mid-stream failure: report it in-band
                    err = server.map_error(exc, rid)
                    status = getattr(err, "status", 500)
                    info["error"] = str(exc)
                    if isinstance(err, APIError):
                        yield sse(err.body())
                        yield b"data: [DONE]\n\n"
                finally:
                    await _close_quietly(outputs)  # cancels the engine jobs now (an iterator is not closed
                    release()                      # by leaving `async for`, only at garbage collection)
                    info["completion_tokens"] = sum(c.completion_tokens for c in choices.values())
                    server.metrics.tokens(backend.name, len(prompt_ids), info["completion_tokens"])
                    _finish_log(rid, "chat", status, start, info)

            return _streaming(events, release)

        choices = {j.index: _Choice(j.index) for j in jobs}
        await _run_to_end(request, jobs, choices, backend.name, start, info)
        completion_tokens = sum(c.completion_tokens for c in choices.values())
        info["completion_tokens"] = completion_tokens
        server.metrics.tokens(backend.name, len(prompt_ids), completion_tokens)
        log_prompt("".join(choices[0].text), choices[0].completion_tokens)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": backend.name,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                         "logprobs": chat_logprobs(c.logprobs, text_of, top) if req.logprobs else None,
                         "finish_reason": c.finish_reason or "stop"} for c in choices.values()],
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                      "total_tokens": len(prompt_ids) + completion_tokens}})

    # -- completions -------------------------------------------------------------------------------------
    async def _completions(request: Request, rid: str, req: CompletionRequest, backend: Backend, start: float,
                           info: dict) -> Response:
        prompts = server.completion_prompts(backend, req)
        if req.echo and req.stream:
            raise APIError(400, "echo is not supported with stream", param="echo")
        want_lp = req.logprobs is not None
        top = req.logprobs or 0
        score_only = req.max_tokens == 0
        if score_only and not req.echo:
            raise APIError(400, "max_tokens=0 is only allowed with echo=true (prompt scoring)", param="max_tokens")
        jobs: list[_Job] = []
        for p, (ids, _text) in enumerate(prompts):
            # max_tokens=0 (score the prompt only): the engine generates one token that is dropped below.
            max_tokens = 1 if score_only else server.max_tokens(backend, len(ids), req.max_tokens, "max_tokens",
                                                                "prompt")
            if score_only and len(ids) + 1 > backend.context_length:
                raise APIError(400, f"This model's maximum context length is {backend.context_length} tokens. "
                               f"However, your prompt has {len(ids)} tokens; scoring needs one token of room.",
                               param="prompt", code="context_length_exceeded")
            for i in range(req.n):
                jobs.append(_Job(p * req.n + i, p, GenerationRequest(
                    f"{rid}-{p * req.n + i}", list(ids),
                    _sampling(req, max_tokens, i, logprobs=want_lp, top=top,
                              prompt_logprobs=bool(req.echo and want_lp)))))
        await server.open_jobs(backend, jobs, server.deadline(start))
        created = int(time.time())
        text_of = server.token_text(backend)
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        info["prompt_tokens"] = prompt_tokens

        def log_prompts(choices: dict[int, _Choice]) -> None:
            for p, (ids, text) in enumerate(prompts):
                c = choices[p * req.n]
                server.log_prompt(request_id=rid if len(prompts) == 1 else f"{rid}-{p}", model=backend.name,
                                  endpoint="completions", prompt=text, completion="".join(c.text),
                                  prompt_tokens=len(ids), completion_tokens=c.completion_tokens)

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            release = server.releaser(len(jobs))

            async def events() -> AsyncIterator[bytes]:
                status = 200
                choices = {j.index: _Choice(j.index) for j in jobs}
                base = {"id": rid, "object": "text_completion", "created": created, "model": backend.name}
                outputs = server.merged(jobs, server.deadline(start))
                try:
                    async for job, out in outputs:
                        if "ttft" not in info and out.token_ids:
                            info["ttft"] = time.perf_counter() - start
                            server.metrics.first_token(backend.name, info["ttft"])
                        choice = choices[job.index]
                        choice.add(out)
                        if out.text or out.logprobs or out.finished:
                            lp = None
                            if want_lp:
                                lp = completion_logprobs(None, None, out.logprobs or [], text_of, top,
                                                         offset0=choice.text_offset)
                                choice.text_offset += sum(len(t) for t in lp["tokens"])
                            yield sse({**base, "choices": [{"index": job.index, "text": out.text, "logprobs": lp,
                                                            "finish_reason": choice.finish_reason
                                                            if out.finished else None}]})
                    completion_tokens = sum(c.completion_tokens for c in choices.values())
                    if include_usage:
                        yield sse({**base, "choices": [], "usage": {
                            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}})
                    yield b"data: [DONE]\n\n"
                    log_prompts(choices)
                except (asyncio.CancelledError, GeneratorExit):
                    # Client gone: cancelled inside the generator, or closed at a yield (GeneratorExit must
                    # propagate, never be answered with another yield); finally cancels the engine jobs.
                    status = 499
                    raise
                except Exception as exc:  # noqa: BLE001 - mid-stream failure: report it in-band
                    err = server.map_error(exc, rid)
                    status = getattr(err, "status", 500)
                    info["error"] = str(exc)
                    if isinstance(err, APIError):
                        yield sse(err.body())
                        yield b"data: [DONE]\n\n"
                finally:
                    await _close_quietly(outputs)  # cancels the engine jobs now (an iterator is not closed
                    release()                      # by leaving `async for`, only at garbage collection)
                    info["completion_tokens"] = sum(c.completion_tokens for c in choices.values())
                    server.metrics.tokens(backend.name, prompt_tokens, info["completion_tokens"])
                    _finish_log(rid, "completions", status, start, info)

            return _streaming(events, release)

        choices = {j.index: _Choice(j.index) for j in jobs}
        await _run_to_end(request, jobs, choices, backend.name, start, info)
        if score_only:
            for c in choices.values():
                c.text, c.token_ids, c.logprobs, c.completion_tokens = [], [], [], 0
                c.finish_reason = "length"
        completion_tokens = sum(c.completion_tokens for c in choices.values())
        info["completion_tokens"] = completion_tokens
        server.metrics.tokens(backend.name, prompt_tokens, completion_tokens)
        log_prompts(choices)
        out_choices = []
        for job in jobs:
            c = choices[job.index]
            ids, text = prompts[job.prompt_index]
            body_text = "".join(c.text)
            lp = None
            if want_lp:
                lp = completion_logprobs(ids if req.echo else None, c.prompt_logprobs, c.logprobs, text_of, top)
            out_choices.append({"index": c.index, "text": (text + body_text) if req.echo else body_text,
                                "logprobs": lp, "finish_reason": c.finish_reason or "stop"})
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": backend.name,
            "choices": out_choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}})

    return app


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _openapi(app: FastAPI) -> dict:
    """The served OpenAPI document, with what FastAPI cannot see in routes that read the raw body: the
    request bodies of both generation routes (the pydantic models), bearer auth, and the error shape."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version="1", routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    bodies = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
    error = {"description": "OpenAI-style error", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, model in bodies.items():
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        schemas[model.__name__] = js
        op = doc["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        op["responses"] = {"200": {"description": "the completion (JSON, or SSE with stream: true)",
                                   "content": {"application/json": {"schema": {"type": "object"}},
                                               "text/event-stream": {"schema": {"type": "string"}}}},
                           **{code: error for code in ("400", "401", "404", "413", "429", "500", "503", "504")}}
    for path, item in doc["paths"].items():
        for op in item.values():
            if path.startswith("/v1/"):
                op["security"] = [{"bearer": []}]
                op.setdefault("responses", {}).update({"401": error, "404": error})
    app.openapi_schema = doc
    return doc


# ---------------------------------------------------------------------------------------------------
# engines (in-process; the Ray model deployment loads them the same way)
# ---------------------------------------------------------------------------------------------------
def engine_kwargs(section: ServeSection) -> dict[str, Any]:
    return {"dtype": section.dtype, "max_batch_size": section.max_batch_size, "max_model_len": section.max_model_len,
            "prefill_chunk": section.prefill_chunk, "threads": section.threads}


def _import(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def load_engine(model_dir: str, section: ServeSection, engine_factory: Optional[str] = None,
                engine_options: Optional[dict] = None) -> Any:
    """An AsyncEngine-like object for ``model_dir``: ours, vLLM (``serve.backend``), or ``engine_factory``.

    ``engine_factory`` (``'module:callable'``, tests) is called as ``factory(model_dir, **kwargs)``.
    """
    kwargs = {**engine_kwargs(section), **(engine_options or {})}
    if engine_factory:
        return _import(engine_factory)(model_dir, **kwargs)
    if section.backend == "vllm" or (section.backend == "auto" and section.num_gpus > 0):
        from serve.vllm_engine import VLLMAsyncEngine

        return VLLMAsyncEngine.from_pretrained(model_dir, **kwargs)
    from serve.engine import AsyncEngine

    return AsyncEngine.from_pretrained(model_dir, **kwargs)



class ServerThread:
    """Run an ASGI app with uvicorn in a background thread (tests, benchmarks, ``--no-ray`` helpers).

    >>> with ServerThread(app, port=0) as server:   # port 0 picks a free port
    ...     url = server.base_url                    # http://127.0.0.1:PORT
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.host, self.port = host, port
        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                     timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(self.config)
        self.thread: Optional[Any] = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        import threading

        self.thread = threading.Thread(target=self.server.run, name="raydistill-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.base_url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=15)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
