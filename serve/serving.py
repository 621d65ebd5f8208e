"""Serving logic of the OpenAI-compatible API: chat and completions over one or more backends.

:class:`OpenAIServer` holds what the routes share (backends, auth, metrics, prompt log, admission limit)
and runs a request from start to end: tokenisation (chat template, prompt length checks, token strings
for logprobs) happens here, generation behind the backend. Routes are :mod:`serve.api`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve.auth import APIKeyAuth
from serve.backends import Backend
from serve.engine.types import EngineUnavailable, GenerationOutput, GenerationRequest, SamplingOptions, TokenLogprob
from serve.errors import APIError, Overloaded, invalid_api_key, map_error
from serve.limits import check_limits, choice_seed
from serve.metrics import ServerMetrics
from serve.prompt_log import PromptLog, make_record
from serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    TokenText,
    _Req,
    chat_logprobs,
    completion_logprobs,
    parse_request,
)
from serve.section import ServeSection
from serve.streaming import stream_response

logger = logging.getLogger("raydistill.serve")


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(
            413,
            f"request body is {length} bytes; the limit is {limit} (serve.max_body_bytes)",
            code="request_too_large",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(
                413, f"request body exceeds the limit of {limit} bytes (serve.max_body_bytes)", code="request_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


class Choice:
    """Accumulates one choice's outputs."""

    def __init__(self, index: int):
        self.index = index
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.finish_reason: str | None = None
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


class Job:
    """One engine request of a choice: the prompt, its sampling, and the open output stream."""

    def __init__(self, index: int, prompt_index: int, request: GenerationRequest):
        self.index = index
        self.prompt_index = prompt_index
        self.request = request
        self.stream: AsyncIterator[GenerationOutput] | None = None
        self.first: GenerationOutput | None = None


def with_sampling_defaults(req: _Req, defaults: dict[str, Any]) -> _Req:
    """``req`` with ``serve.sampling_defaults`` filled into the sampling fields it did not set (vLLM's
    ``--override-generation-config``); what a request sets always wins."""
    missing = {k: v for k, v in defaults.items() if k not in req.model_fields_set}
    return req.model_copy(update=missing) if missing else req


class OpenAIServer:
    """State shared by the routes: backends, auth, metrics, prompt log, admission limit."""

    def __init__(
        self,
        backends: Sequence[Backend],
        section: ServeSection,
        *,
        metrics: ServerMetrics,
        auth: APIKeyAuth,
        prompt_log: PromptLog | None,
        admission_limit: int | None,
        replicas_fn: Any | None = None,
    ):
        self.backends = {b.name: b for b in backends}
        self.section = section
        self.metrics = metrics
        self.auth = auth
        self.prompt_log = prompt_log
        self.admission_limit = admission_limit
        self.in_flight = 0
        self.pending = 0  # engine jobs admitted and still without a first token (serve.max_pending_prefills)
        self.replicas_fn = replicas_fn
        self._token_text = {b.name: TokenText(b.tokenizer) for b in backends}

    # -- lookups ------------------------------------------------------------------------------------
    def backend(self, model: str) -> Backend:
        backend = self.backends.get(model)
        if backend is None:
            raise APIError(
                404,
                f"The model `{model}` does not exist; this server serves "
                f"{', '.join(sorted(self.backends))} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        return backend

    def authorize(self, request: Request) -> None:
        if not self.auth.check(request.headers.get("authorization")):
            raise invalid_api_key()

    # -- prompt preparation ---------------------------------------------------------------------------
    def chat_prompt(self, backend: Backend, req: ChatCompletionRequest) -> tuple[list[int], list[dict]]:
        tok = backend.tokenizer
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        if not getattr(tok, "chat_template", None):
            raise APIError(
                400,
                f"model {backend.name} has no chat template; use /v1/completions",
                param="messages",
                code="no_chat_template",
            )
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
            items: list[str | list[int]] = [prompt]
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

    def max_tokens(
        self, backend: Backend, prompt_len: int, requested: int | None, param: str, prompt_param: str
    ) -> int:
        ctx = backend.context_length
        if requested is None:
            room = ctx - prompt_len
            if room < 1:
                raise APIError(
                    400,
                    f"This model's maximum context length is {ctx} tokens. However, your prompt "
                    f"has {prompt_len} tokens, leaving no room for the completion. Please shorten the "
                    "prompt.",
                    param=prompt_param,
                    code="context_length_exceeded",
                )
            return min(self.section.max_tokens_default, room)
        if prompt_len + requested > ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                f"completion). Please reduce the prompt or {param}.",
                param=param,
                code="context_length_exceeded",
            )
        return requested

    # -- running engine requests -------------------------------------------------------------------------
    def deadline(self, start: float) -> float | None:
        """``time.perf_counter()`` by which a request started at ``start`` must be done (serve.request_timeout_s)."""
        timeout = self.section.request_timeout_s
        return None if timeout is None else start + timeout

    def timeout_error(self) -> APIError:
        return APIError(
            504,
            f"the request did not finish within {self.section.request_timeout_s:g}s "
            "(serve.request_timeout_s); it was cancelled",
            code="timeout",
            type="server_error",
        )

    async def open_jobs(self, backend: Backend, jobs: list[Job], deadline: float | None = None) -> None:
        """Start every job and wait for its first output, so bad requests fail before any byte is sent."""

        async def open_one(job: Job) -> None:
            job.stream = backend.generate(job.request).__aiter__()
            try:
                job.first = await job.stream.__anext__()
            except StopAsyncIteration:
                job.first = None

        opening = asyncio.gather(*(open_one(j) for j in jobs), return_exceptions=True)
        try:
            results = await asyncio.wait_for(
                opening, None if deadline is None else max(0.0, deadline - time.perf_counter())
            )
        except asyncio.TimeoutError:
            await self.close_jobs(jobs)
            raise self.timeout_error() from None
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close_jobs(jobs)
            raise map_error(errors[0], jobs[0].request.request_id.rsplit("-", 1)[0])

    @staticmethod
    async def close_jobs(jobs: list[Job]) -> None:
        for job in jobs:
            if job.stream is not None and hasattr(job.stream, "aclose"):
                with contextlib.suppress(BaseException):
                    await job.stream.aclose()

    def admit(self, jobs: int) -> None:
        """429 unless ``jobs`` more engine jobs fit (a request of n choices over p prompts is n x p jobs; one
        request alone on an idle server is always admitted), and unless they fit beside the jobs still waiting
        for their first token (``serve.max_pending_prefills``)."""
        if self.admission_limit is not None and self.in_flight and self.in_flight + jobs > self.admission_limit:
            raise APIError(
                429,
                f"server overloaded: {self.in_flight} engine jobs in flight, this request needs "
                f"{jobs} more (limit {self.admission_limit} = serve.max_ongoing_requests + "
                "serve.max_queued_requests); retry later",
                code="rate_limit_exceeded",
            )
        limit = self.section.max_pending_prefills
        if limit is not None and self.pending and self.pending + jobs > limit:
            raise APIError(
                429,
                f"server busy: {self.pending} engine jobs are still waiting for their first token, this request "
                f"needs {jobs} more (limit {limit} = serve.max_pending_prefills, which bounds the time to first "
                "token); retry later",
                code="rate_limit_exceeded",
            )

    def start_pending(self, info: dict, jobs: int) -> None:
        """Count a request's ``jobs`` as waiting for a first token until :meth:`end_pending`."""
        self.pending += jobs
        info["pending"] = jobs

    def end_pending(self, info: dict) -> None:
        """The request has its first token, or ended without one (idempotent)."""
        self.pending -= info.pop("pending", 0)

    async def merged(
        self, jobs: list[Job], deadline: float | None = None
    ) -> AsyncIterator[tuple[Job, GenerationOutput]]:
        """Outputs of all jobs as they arrive (first outputs first); closing this closes every job.
        Past ``deadline`` (perf_counter) it raises the 504 of :meth:`timeout_error`."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(job: Job) -> None:
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

    def releaser(self, jobs: int, info: dict) -> Any:
        """An idempotent callable giving back a request's in-flight (and still pending) jobs (streams end in
        several ways)."""
        done = [False]

        def release() -> None:
            if not done[0]:
                done[0] = True
                self.give_back(jobs, info)

        return release

    def give_back(self, jobs: int, info: dict) -> None:
        """A request's ``jobs`` leave the in-flight count, and the pending one if no first token came."""
        self.in_flight -= jobs
        self.end_pending(info)

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

    def note_first_token(self, info: dict, start: float, model: str, out: GenerationOutput) -> None:
        """Record the time to first token (``info["ttft"]``, the TTFT histogram) at the first output with tokens."""
        if "ttft" not in info and out.token_ids:
            info["ttft"] = time.perf_counter() - start
            self.metrics.first_token(model, info["ttft"])
            self.end_pending(info)  # a request of n jobs: all leave the count at its first token

    async def handle(self, request: Request, endpoint: str) -> Response:
        """One generation request, start to end: auth, admission, parsing, limits, then chat or completions."""
        start = time.perf_counter()
        prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
        rid = f"{prefix}-{uuid.uuid4().hex}"
        status = 500
        counted = False
        info: dict[str, Any] = {}
        try:
            self.authorize(request)
            self.admit(1)  # full: 429 before reading or parsing anything (cheap under a burst)
            body = await read_body(request, self.section.max_body_bytes)
            req = parse_request(body, ChatCompletionRequest if endpoint == "chat" else CompletionRequest, endpoint)
            req = with_sampling_defaults(req, self.section.sampling_defaults)
            backend = self.backend(req.model)
            n_jobs = check_limits(req, self.section)
            await self.ready(backend)
            info["model"] = backend.name
            self.admit(n_jobs)
            self.in_flight += n_jobs
            self.start_pending(info, n_jobs)
            counted = True
            if endpoint == "chat":
                response = await self.chat(request, rid, req, backend, start, info)
            else:
                response = await self.completions(request, rid, req, backend, start, info)
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
            err = map_error(exc, rid)
            if not isinstance(err, APIError):
                raise
            status = err.status
            info["error"] = f"{err.message} ({type(exc).__name__}: {exc})"
            resp = err.response()
            resp.headers["x-request-id"] = rid
            return resp
        finally:
            if counted:
                self.give_back(n_jobs, info)
            if not info.get("stream"):
                self.finish_log(rid, endpoint, status, start, info)

    def finish_log(self, rid: str, endpoint: str, status: int, start: float, info: dict) -> None:
        elapsed = time.perf_counter() - start
        self.metrics.request_done(endpoint, status, elapsed)
        extra = f" error={info['error']!r}" if "error" in info else ""
        logger.info(
            "request %s %s model=%s status=%d prompt_tokens=%s completion_tokens=%s ttft=%s latency=%.3fs%s",
            rid,
            endpoint,
            info.get("model", "-"),
            status,
            info.get("prompt_tokens", 0),
            info.get("completion_tokens", 0),
            f"{info['ttft']:.3f}s" if "ttft" in info else "-",
            elapsed,
            extra,
        )

    @staticmethod
    def sampling(
        req: _Req, max_tokens: int, seed_offset: int, *, logprobs: bool, top: int, prompt_logprobs: bool = False
    ) -> SamplingOptions:
        seed = None if req.seed is None else choice_seed(req.seed, seed_offset)
        schema = req.response_format.output_schema() if req.response_format is not None else None
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=seed,
            stop=list(req.stop or []),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            top_logprobs=top,
            prompt_logprobs=prompt_logprobs,
            json_schema=schema,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
        )

    async def run_to_end(
        self, request: Request, jobs: list[Job], choices: dict[int, Choice], model: str, start: float, info: dict
    ) -> None:
        """Collect every job's outputs; a client disconnect cancels the jobs (uvicorn does not cancel us)."""

        async def collect() -> None:
            async for job, out in self.merged(jobs, self.deadline(start)):
                self.note_first_token(info, start, model, out)
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
    async def chat(
        self, request: Request, rid: str, req: ChatCompletionRequest, backend: Backend, start: float, info: dict
    ) -> Response:
        prompt_ids, messages = self.chat_prompt(backend, req)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.max_tokens(backend, len(prompt_ids), requested, param, "messages")
        top = req.top_logprobs or 0
        jobs = [
            Job(
                i,
                0,
                GenerationRequest(
                    f"{rid}-{i}", list(prompt_ids), self.sampling(req, max_tokens, i, logprobs=req.logprobs, top=top)
                ),
            )
            for i in range(req.n)
        ]
        await self.open_jobs(backend, jobs, self.deadline(start))
        created = int(time.time())
        text_of = self.token_text(backend)
        info["prompt_tokens"] = len(prompt_ids)

        def log_prompt(completion: str, completion_tokens: int) -> None:
            self.log_prompt(
                request_id=rid,
                model=backend.name,
                endpoint="chat",
                messages=messages,
                completion=completion,
                prompt_tokens=len(prompt_ids),
                completion_tokens=completion_tokens,
            )

        if req.stream:

            def chat_chunks(job: Job, choice: Choice, out: GenerationOutput) -> list[dict]:
                chunks = []
                if out.text or out.logprobs:
                    lp = chat_logprobs(out.logprobs, text_of, top) if req.logprobs and out.logprobs else None
                    chunks.append(
                        {"index": job.index, "delta": {"content": out.text}, "logprobs": lp, "finish_reason": None}
                    )
                if out.finished:
                    chunks.append(
                        {"index": job.index, "delta": {}, "logprobs": None, "finish_reason": choice.finish_reason}
                    )
                return chunks

            return stream_response(
                self,
                rid=rid,
                endpoint="chat",
                obj="chat.completion.chunk",
                created=created,
                backend=backend,
                jobs=jobs,
                start=start,
                info=info,
                prompt_tokens=len(prompt_ids),
                stream_options=req.stream_options,
                first_chunks=[
                    {
                        "index": j.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for j in jobs
                ],
                chunks_of=chat_chunks,
                on_complete=lambda choices: log_prompt("".join(choices[0].text), choices[0].completion_tokens),
            )

        choices = {j.index: Choice(j.index) for j in jobs}
        await self.run_to_end(request, jobs, choices, backend.name, start, info)
        completion_tokens = sum(c.completion_tokens for c in choices.values())
        info["completion_tokens"] = completion_tokens
        self.metrics.tokens(backend.name, len(prompt_ids), completion_tokens)
        log_prompt("".join(choices[0].text), choices[0].completion_tokens)
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": backend.name,
                "choices": [
                    {
                        "index": c.index,
                        "message": {"role": "assistant", "content": "".join(c.text)},
                        "logprobs": chat_logprobs(c.logprobs, text_of, top) if req.logprobs else None,
                        "finish_reason": c.finish_reason or "stop",
                    }
                    for c in choices.values()
                ],
                "usage": {
                    "prompt_tokens": len(prompt_ids),
                    "completion_tokens": completion_tokens,
                    "total_tokens": len(prompt_ids) + completion_tokens,
                },
            }
        )

    # -- completions -------------------------------------------------------------------------------------
    async def completions(
        self, request: Request, rid: str, req: CompletionRequest, backend: Backend, start: float, info: dict
    ) -> Response:
        prompts = self.completion_prompts(backend, req)
        if req.echo and req.stream:
            raise APIError(400, "echo is not supported with stream", param="echo")
        want_lp = req.logprobs is not None
        top = req.logprobs or 0
        score_only = req.max_tokens == 0
        if score_only and not req.echo:
            raise APIError(400, "max_tokens=0 is only allowed with echo=true (prompt scoring)", param="max_tokens")
        jobs: list[Job] = []
        for p, (ids, _text) in enumerate(prompts):
            # max_tokens=0 (score the prompt only): the engine generates one token that is dropped below.
            max_tokens = 1 if score_only else self.max_tokens(backend, len(ids), req.max_tokens, "max_tokens", "prompt")
            if score_only and len(ids) + 1 > backend.context_length:
                raise APIError(
                    400,
                    f"This model's maximum context length is {backend.context_length} tokens. "
                    f"However, your prompt has {len(ids)} tokens; scoring needs one token of room.",
                    param="prompt",
                    code="context_length_exceeded",
                )
            for i in range(req.n):
                jobs.append(
                    Job(
                        p * req.n + i,
                        p,
                        GenerationRequest(
                            f"{rid}-{p * req.n + i}",
                            list(ids),
                            self.sampling(
                                req,
                                max_tokens,
                                i,
                                logprobs=want_lp,
                                top=top,
                                prompt_logprobs=bool(req.echo and want_lp),
                            ),
                        ),
                    )
                )
        await self.open_jobs(backend, jobs, self.deadline(start))
        created = int(time.time())
        text_of = self.token_text(backend)
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        info["prompt_tokens"] = prompt_tokens

        def log_prompts(choices: dict[int, Choice]) -> None:
            for p, (ids, text) in enumerate(prompts):
                c = choices[p * req.n]
                self.log_prompt(
                    request_id=rid if len(prompts) == 1 else f"{rid}-{p}",
                    model=backend.name,
                    endpoint="completions",
                    prompt=text,
                    completion="".join(c.text),
                    prompt_tokens=len(ids),
                    completion_tokens=c.completion_tokens,
                )

        if req.stream:

            def completion_chunks(job: Job, choice: Choice, out: GenerationOutput) -> list[dict]:
                if not (out.text or out.logprobs or out.finished):
                    return []
                lp = None
                if want_lp:
                    lp = completion_logprobs(None, None, out.logprobs or [], text_of, top, offset0=choice.text_offset)
                    choice.text_offset += sum(len(t) for t in lp["tokens"])
                return [
                    {
                        "index": job.index,
                        "text": out.text,
                        "logprobs": lp,
                        "finish_reason": choice.finish_reason if out.finished else None,
                    }
                ]

            return stream_response(
                self,
                rid=rid,
                endpoint="completions",
                obj="text_completion",
                created=created,
                backend=backend,
                jobs=jobs,
                start=start,
                info=info,
                prompt_tokens=prompt_tokens,
                stream_options=req.stream_options,
                first_chunks=[],
                chunks_of=completion_chunks,
                on_complete=log_prompts,
            )

        choices = {j.index: Choice(j.index) for j in jobs}
        await self.run_to_end(request, jobs, choices, backend.name, start, info)
        if score_only:
            for c in choices.values():
                c.text, c.token_ids, c.logprobs, c.completion_tokens = [], [], [], 0
                c.finish_reason = "length"
        completion_tokens = sum(c.completion_tokens for c in choices.values())
        info["completion_tokens"] = completion_tokens
        self.metrics.tokens(backend.name, prompt_tokens, completion_tokens)
        log_prompts(choices)
        out_choices = []
        for job in jobs:
            c = choices[job.index]
            ids, text = prompts[job.prompt_index]
            body_text = "".join(c.text)
            lp = None
            if want_lp:
                lp = completion_logprobs(ids if req.echo else None, c.prompt_logprobs, c.logprobs, text_of, top)
            out_choices.append(
                {
                    "index": c.index,
                    "text": (text + body_text) if req.echo else body_text,
                    "logprobs": lp,
                    "finish_reason": c.finish_reason or "stop",
                }
            )
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": backend.name,
                "choices": out_choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )
