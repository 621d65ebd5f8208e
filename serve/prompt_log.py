"""Opt-in prompt log: served requests + responses appended as small Parquet files for the next distillation round.

Each flush writes one file ``{uri}/part-{utc time}-{uuid}.parquet`` atomically (temp + rename through
``cluster.storage``), so readers (the pipeline's ``served_prompts`` source) never see a torn file and
several replicas can write to the same folder. The schema is fixed (:data:`PROMPT_LOG_SCHEMA`).

A redaction hook (``serve.prompt_log_redact: 'module:function'``) receives each record dict and returns
the dict to store, or None to drop the record.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import pkgutil
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cluster import storage
from cluster.errors import ConfigError

logger = logging.getLogger(__name__)

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
PROMPT_LOG_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("model", pa.string()),
        ("endpoint", pa.string()),
        ("prompt", pa.string()),  # /v1/completions; null for chat
        ("messages", pa.list_(MESSAGE_TYPE)),  # /v1/chat/completions; null for completions
        ("completion", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
    ]
)

Redactor = Callable[[dict], dict | None]


def load_redactor(spec: str | None) -> Redactor | None:
    """``'package.module:function'`` -> the function (ConfigError naming the field when it cannot be imported)."""
    if not spec:
        return None
    try:
        fn = pkgutil.resolve_name(spec)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(
            f"serve.prompt_log_redact: cannot import {spec!r} ({exc}); give 'module:function' of an "
            "importable function taking and returning a record dict"
        ) from exc
    if not callable(fn):
        raise ConfigError(f"serve.prompt_log_redact: {spec!r} is not callable")
    return fn


def make_record(
    *,
    request_id: str,
    model: str,
    endpoint: str,
    completion: str,
    prompt_tokens: int,
    completion_tokens: int,
    prompt: str | None = None,
    messages: list[dict] | None = None,
    ts: dt.datetime | None = None,
) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "ts": ts or dt.datetime.now(dt.timezone.utc),
        "model": model,
        "endpoint": endpoint,
        "prompt": prompt,
        "messages": [{"role": str(m.get("role", "")), "content": str(m.get("content") or "")} for m in messages]
        if messages is not None
        else None,
        "completion": completion,
        "prompt_tokens": int(prompt_tokens),
        "completion_tokens": int(completion_tokens),
    }


class PromptLog:
    """Buffers records in memory and flushes them to ``uri`` as Parquet from a background thread.

    :meth:`append` never does I/O (it runs on the server's event loop): it adds the record and wakes the
    flusher when ``flush_rows`` records are buffered. The flusher thread (started with the log,
    ``start=False`` for a log flushed by hand) also flushes when the oldest record is older than
    ``flush_s``, and :meth:`close` flushes what is left. A failed write puts its rows back and is
    retried with exponential backoff (1 s doubling to 60 s); the buffer never holds more than
    ``max_buffer_rows`` records: beyond that the oldest are dropped, counted in :attr:`dropped_rows`
    (and ``raydistill_prompt_log_dropped_rows`` on ``/metrics``) and logged.
    """

    def __init__(
        self,
        uri: str,
        *,
        redact: Redactor | str | None = None,
        flush_rows: int = 64,
        flush_s: float = 10.0,
        max_buffer_rows: int = 10_000,
        start: bool = True,
    ):
        self.uri = storage.absolute(uri)
        self.redact = load_redactor(redact) if isinstance(redact, str) or redact is None else redact
        self.flush_rows = flush_rows
        self.flush_s = flush_s
        self.max_buffer_rows = max(max_buffer_rows, flush_rows)
        self._rows: list[dict] = []
        self._first_at: float | None = None
        self._lock = threading.Lock()  # guards the buffer and the counters
        self._write_lock = threading.Lock()  # one write at a time
        self.files_written = 0
        self.dropped_rows = 0
        self.failed_writes = 0
        self._retry_at = 0.0
        self._wake = threading.Event()
        self._closed = False
        storage.makedirs(self.uri)
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name="raydistill-prompt-log", daemon=True)
            self._thread.start()

    @classmethod
    def from_section(cls, section: Any) -> PromptLog | None:
        """The log the ``serve:`` section asks for (``serve.prompt_log_*``), or None when logging is off."""
        if not section.prompt_log_uri:
            return None
        return cls(
            section.prompt_log_uri,
            redact=section.prompt_log_redact,
            flush_rows=section.prompt_log_flush_rows,
            flush_s=section.prompt_log_flush_s,
            max_buffer_rows=section.prompt_log_max_buffer_rows,
        )

    def append(self, record: dict) -> None:
        """Buffer one record (no I/O). Drops the oldest buffered record when the buffer is full."""
        if self.redact is not None:
            try:
                record = self.redact(dict(record))
            except Exception:  # noqa: BLE001 - a broken hook must not fail requests; the record is dropped
                logger.exception("prompt log redaction hook failed; record %s dropped", record.get("request_id"))
                return
            if record is None:
                return
        with self._lock:
            self._rows.append(record)
            if self._first_at is None:
                self._first_at = time.monotonic()
            self._trim()
            full = len(self._rows) >= self.flush_rows
        if full:
            self._wake.set()

    def _trim(self) -> None:
        # under self._lock
        over = len(self._rows) - self.max_buffer_rows
        if over > 0:
            del self._rows[:over]
            self.dropped_rows += over
            logger.warning(
                "prompt log: buffer full (%d rows, writes to %s failing); dropped the %d oldest rows "
                "(%d dropped so far)",
                self.max_buffer_rows,
                self.uri,
                over,
                self.dropped_rows,
            )

    def pending(self) -> int:
        with self._lock:
            return len(self._rows)

    def _due(self) -> bool:
        with self._lock:
            if not self._rows or time.monotonic() < self._retry_at:
                return False
            return len(self._rows) >= self.flush_rows or time.monotonic() - self._first_at >= self.flush_s

    def maybe_flush(self) -> None:
        """Flush when a flush is due (enough rows, or the oldest is older than ``flush_s``) and no failed
        write is waiting out its backoff."""
        if self._due():
            self.flush()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(timeout=min(1.0, self.flush_s))
            self._wake.clear()
            if self._closed:
                break
            try:
                self.maybe_flush()
            except Exception:  # noqa: BLE001 - the flusher never dies
                logger.exception("prompt log flusher failed")

    def flush(self) -> str | None:
        """Write buffered records as one Parquet file; returns its URI (None when nothing was written)."""
        with self._write_lock:
            with self._lock:
                rows, self._rows, self._first_at = self._rows, [], None
            if not rows:
                return None
            stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
            uri = storage.join(self.uri, f"part-{stamp}-{uuid.uuid4().hex[:8]}.parquet")
            try:
                table = pa.Table.from_pylist(
                    [{name: row.get(name) for name in PROMPT_LOG_SCHEMA.names} for row in rows],
                    schema=PROMPT_LOG_SCHEMA,
                )
                buf = io.BytesIO()
                pq.write_table(table, buf, compression="zstd")
                storage.atomic_write_bytes(uri, buf.getvalue())
            except Exception:  # noqa: BLE001 - keep serving; put the rows back, retry after a backoff
                with self._lock:
                    self.failed_writes += 1
                    delay = min(60.0, 2.0 ** min(self.failed_writes - 1, 6))
                    self._retry_at = time.monotonic() + delay
                    self._rows = rows + self._rows
                    self._first_at = time.monotonic()
                    self._trim()
                logger.exception(
                    "prompt log: writing %s failed (%d failures); retrying in %.0fs", uri, self.failed_writes, delay
                )
                return None
            with self._lock:
                self.failed_writes = 0
                self._retry_at = 0.0
            self.files_written += 1
            return uri

    def close(self) -> None:
        """Stop the flusher and write what is buffered (one try; rows that cannot be written are counted
        as dropped)."""
        self._closed = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        with self._lock:
            self._retry_at = 0.0
        self.flush()
        with self._lock:
            lost, self._rows = len(self._rows), []
            self.dropped_rows += lost
        if lost:
            logger.error("prompt log: %d rows could not be written to %s at close and are lost", lost, self.uri)


def read_prompt_log(uri: str, since: dt.datetime | None = None) -> pa.Table:
    """All logged rows under ``uri`` (rows with ``ts >= since`` when given), sorted by ``ts``.

    A missing or empty folder gives an empty table with :data:`PROMPT_LOG_SCHEMA`. A naive ``since``
    is taken as UTC.
    """
    files = storage.listdir(uri, suffix=".parquet")
    tables = []
    for f in files:
        table = pq.read_table(io.BytesIO(storage.read_bytes(f)))
        tables.append(table.select(PROMPT_LOG_SCHEMA.names).cast(PROMPT_LOG_SCHEMA))
    if not tables:
        return PROMPT_LOG_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    if since is not None:
        import pyarrow.compute as pc

        if since.tzinfo is None:
            since = since.replace(tzinfo=dt.timezone.utc)
        table = table.filter(pc.greater_equal(table["ts"], pa.scalar(since, type=PROMPT_LOG_SCHEMA.field("ts").type)))
    return table.sort_by("ts")
