"""asyncio front of :class:`LLMEngine`: one background thread runs ``step()``; requests stream through queues.

Requests and aborts from the event loop (any number of loops) are handed to the thread through a
small locked inbox, applied between steps, so the loop never waits for a step to finish. Each
request's outputs come back on its own ``asyncio.Queue`` via ``call_soon_threadsafe``.

Given a factory instead of an engine, the thread also builds it, so loading and steps run on one
thread. torch's OpenMP thread team belongs to the thread that starts it: measured on 2 cores, small
matmuls issued from a second thread once the main thread had used OpenMP ran ~1.5x slower
(``[16, 576] @ [576, 1536]``: 360 vs 536 us; a whole teacher batch ~1.4x), so an engine loaded on
one thread and stepped on another paid that on every step. The penalty remains wherever the main
thread itself has run parallel torch ops before the engine thread starts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from serve.engine.engine import LLMEngine
from serve.engine.types import EngineError, EngineFailure, EngineUnavailable, GenerationOutput, GenerationRequest

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine]):
        """``engine``: a built engine, or a factory the engine thread calls first (module docstring)."""
        self._lock = threading.Lock()  # guards the inbox and the stream table
        self._wake = threading.Event()
        self._adds: list[GenerationRequest] = []
        self._aborts: list[str] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._error: BaseException | None = None
        self._dead = False  # the loop thread ended (shutdown or an unexpected error); set under _lock
        build = (lambda: engine) if isinstance(engine, LLMEngine) else engine
        built = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(build, built), name="raydistill-engine", daemon=True)
        self._thread.start()
        built.wait()
        if self._error is not None:  # the factory failed: its error, in the caller's thread
            raise self._error
        self.tokenizer = self.engine.tokenizer
        self.model_name = self.engine.model_name
        self.context_length = self.engine.context_length

    @classmethod
    def from_pretrained(cls, model: str, **kwargs: Any) -> AsyncEngine:
        """Load ``model`` on the engine thread itself (module docstring: one thread for all torch work)."""
        return cls(lambda: LLMEngine.from_pretrained(model, **kwargs))

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> AsyncEngine:
        return cls(engine)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream a request's outputs; EngineError before the first yield for a bad request.

        If the consumer stops iterating (break, cancellation, client gone), the request is aborted
        and its batch slot freed.
        """
        self.engine.check_request(request)
        rid = request.request_id
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._stop or self._dead:  # under the lock: the dying loop tells every stream registered before
                raise EngineUnavailable("the engine is shut down" if self._stop else "the engine thread died")
            if rid in self._streams:
                raise EngineError(f"request_id {rid!r} is already running; use a unique id")
            self._streams[rid] = (asyncio.get_running_loop(), queue)
            self._adds.append(request)
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(rid)
            with self._lock:
                self._streams.pop(rid, None)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def stats(self) -> dict:
        return dict(self._stats)

    def check_health(self) -> None:
        """Raise :class:`EngineUnavailable` when the loop thread is not running (health checks, Ray Serve)."""
        if self._dead or not self._thread.is_alive():
            raise EngineUnavailable(
                f"the engine thread is not running ({'shut down' if self._stop else 'died'})"
                + (f": {type(self._error).__name__}" if self._error is not None else "")
            )

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ background thread
    def _deliver(self, rid: str, item: Any) -> None:
        with self._lock:
            target = self._streams.get(rid)
        if target is None:
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed
            pass

    def _main(self, build: Callable[[], LLMEngine], built: threading.Event) -> None:
        try:
            self.engine = build()
            self._stats: dict = self.engine.stats()
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor, which raises it
            self._error, self._dead = exc, True
            return
        finally:
            built.set()
        self._loop()

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._iteration()
            reason: EngineFailure = EngineUnavailable("the engine was shut down")
        except BaseException as exc:  # noqa: BLE001 - the outer guard: never leave streams hanging
            log.exception("the engine loop died; every open and later request fails with 503")
            self._error = exc
            reason = EngineUnavailable(f"the engine thread died: {type(exc).__name__}: {exc}")
        # End every open stream (and refuse later ones: generate() checks _dead under the lock).
        with self._lock:
            self._dead = True
            streams = list(self._streams)
            self._adds.clear()
        for rid in streams:
            self._deliver(rid, reason)

    def _iteration(self) -> None:
        engine = self.engine
        self._wake.clear()  # before reading the inbox: a later set() is then never lost
        with self._lock:
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, []
        for rid in aborts:
            engine.abort(rid)
        for request in adds:
            if request.request_id in aborts:
                continue
            try:
                engine.add_request(request)
            except EngineError as exc:
                self._deliver(request.request_id, exc)
            except Exception as exc:  # noqa: BLE001 - this request alone fails (a 5xx), the loop goes on
                log.exception("engine add_request failed for %s", request.request_id)
                self._deliver(
                    request.request_id, EngineFailure(f"adding the request failed: {type(exc).__name__}: {exc}")
                )
        if not engine.has_unfinished():
            self._stats = engine.stats()
            self._wake.wait(timeout=0.5)
            return
        try:
            outputs = engine.step()
        except Exception as exc:  # noqa: BLE001 - a model error must not leave streams hanging forever
            failure = EngineFailure(f"engine step failed: {type(exc).__name__}: {exc}")
            try:  # roll back, retry the requests one at a time: the request that fails again fails alone
                given_up = engine.recover()
                log.exception(
                    "engine step failed; rolled back %d requests, failing %s",
                    len(engine._requests),
                    given_up or "none yet (isolating the culprit)",
                )
            except Exception:  # noqa: BLE001 - recovery failed too: start clean, fail everything in the engine
                log.exception("engine step failed and recovery failed; failing every request in the engine")
                given_up = engine.reset()
            for rid in given_up:
                self._deliver(rid, failure)
            self._stats = engine.stats()
            return
        self._stats = engine.stats()
        for out in outputs:
            self._deliver(out.request_id, out)
