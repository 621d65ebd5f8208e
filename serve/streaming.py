"""Server-sent events for streamed completions: one generator serves chat and completions alike.

The stream ends with ``data: [DONE]``; a failure after the first byte is reported in-band (an error chunk
in OpenAI's shape, then ``[DONE]``); a client that goes away cancels the engine jobs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from fastapi.responses import StreamingResponse

from serve.engine.types import GenerationOutput
from serve.errors import APIError, map_error
from serve.protocol import StreamOptions, sse

if TYPE_CHECKING:
    from serve.backends import Backend
    from serve.serving import Choice, Job, OpenAIServer


async def close_quietly(agen: Any) -> None:
    with contextlib.suppress(Exception):
        await agen.aclose()


class SSEResponse(StreamingResponse):
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


def streaming_response(events: Any, release: Any) -> StreamingResponse:
    """SSE response; if the body is never iterated (client gone before the first byte) the slot is still freed."""
    import weakref

    body = events()
    weakref.finalize(body, release)
    return SSEResponse(
        body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def stream_response(
    server: OpenAIServer,
    *,
    rid: str,
    endpoint: str,
    obj: str,
    created: int,
    backend: Backend,
    jobs: list[Job],
    start: float,
    info: dict,
    prompt_tokens: int,
    stream_options: StreamOptions | None,
    first_chunks: Sequence[dict],
    chunks_of: Callable[[Job, Choice, GenerationOutput], list[dict]],
    on_complete: Callable[[dict[int, Choice]], None],
) -> StreamingResponse:
    """The SSE response of a streamed request: ``first_chunks``, then ``chunks_of(job, choice, output)`` for each
    engine output as it arrives, the usage chunk when ``stream_options.include_usage``, ``on_complete(choices)``
    (the prompt log), then ``[DONE]``. The request's bookkeeping (in-flight jobs, metrics, the log
    line) ends with the stream, however it ends."""
    from serve.serving import Choice

    include_usage = bool(stream_options and stream_options.include_usage)
    release = server.releaser(len(jobs), info)

    async def events() -> AsyncIterator[bytes]:
        status = 200
        choices = {j.index: Choice(j.index) for j in jobs}
        base = {"id": rid, "object": obj, "created": created, "model": backend.name}
        outputs = server.merged(jobs, server.deadline(start))
        try:
            for chunk in first_chunks:
                yield sse({**base, "choices": [chunk]})
            async for job, out in outputs:
                server.note_first_token(info, start, backend.name, out)
                choice = choices[job.index]
                choice.add(out)
                for chunk in chunks_of(job, choice, out):
                    yield sse({**base, "choices": [chunk]})
            completion_tokens = sum(c.completion_tokens for c in choices.values())
            if include_usage:
                yield sse(
                    {
                        **base,
                        "choices": [],
                        "usage": {
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens,
                        },
                    }
                )
            on_complete(choices)  # before [DONE]: a client that has it may hang up, cancelling us at the yield
            yield b"data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            # Client gone: cancelled inside the generator, or closed at a yield (GeneratorExit must
            # propagate, never be answered with another yield); finally cancels the engine jobs.
            status = 499
            raise
        except Exception as exc:  # noqa: BLE001 - mid-stream failure: report it in-band
            err = map_error(exc, rid)
            status = getattr(err, "status", 500)
            info["error"] = str(exc)
            if isinstance(err, APIError):
                yield sse(err.body())
                yield b"data: [DONE]\n\n"
        finally:
            await close_quietly(outputs)  # cancels the engine jobs now (an iterator is not closed
            release()  # by leaving `async for`, only at garbage collection)
            info["completion_tokens"] = sum(c.completion_tokens for c in choices.values())
            server.metrics.tokens(backend.name, prompt_tokens, info["completion_tokens"])
            server.finish_log(rid, endpoint, status, start, info)

    return streaming_response(events, release)
