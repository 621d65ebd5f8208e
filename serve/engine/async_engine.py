"""asyncio front of :class:`LLMEngine`: one background thread runs ``step()``; requests stream through queues.

Requests and aborts from the event loop (any number of loops) are handed to the thread through a
small locked inbox, applied between steps, so the loop never waits for a step to finish. Each
request's outputs come back on its own ``asyncio.Queue`` via ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, AsyncIterator, Optional

from serve.engine.engine import LLMEngine
from serve.engine.types import EngineError, GenerationOutput, GenerationRequest

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.context_length = engine.context_length
        self._lock = threading.Lock()  # guards the inbox and the stream table
        self._wake = threading.Event()
        self._adds: list[GenerationRequest] = []
        self._aborts: list[str] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._error: Optional[BaseException] = None
        self._stats: dict = engine.stats()
        self._thread = threading.Thread(target=self._loop, name="raydistill-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, model: str, **kwargs: Any) -> "AsyncEngine":
        return cls(LLMEngine.from_pretrained(model, **kwargs))

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "AsyncEngine":
        return cls(engine)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream a request's outputs; EngineError before the first yield for a bad request.

        If the consumer stops iterating (break, cancellation, client gone), the request is aborted
        and its batch slot freed.
        """
        if self._stop:
            raise EngineError("the engine is shut down")
        self.engine.check_request(request)
        rid = request.request_id
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
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

    def _loop(self) -> None:
        engine = self.engine
        while not self._stop:
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
            if not engine.has_unfinished():
                self._stats = engine.stats()
                self._wake.wait(timeout=0.5)
                continue
            try:
                outputs = engine.step()
            except BaseException as exc:  # a model error must not leave streams hanging forever
                log.exception("engine step failed")
                with self._lock:
                    streams = list(self._streams)
                for rid in streams:
                    engine.abort(rid)
                    self._deliver(rid, EngineError(f"engine step failed: {type(exc).__name__}: {exc}"))
                engine._pending.clear()  # their streams were told above
                continue
            self._stats = engine.stats()
            for out in outputs:
                self._deliver(out.request_id, out)
        # Shutdown: end every open stream.
        with self._lock:
            streams = list(self._streams)
        for rid in streams:
            self._deliver(rid, EngineError("the engine was shut down"))
