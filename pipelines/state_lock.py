"""A lock next to a state file (``serving.json``, ``schedule/state.json``): one writer at a time.

* Local paths: an OS file lock (``filelock``) on ``{file}.lock``; the OS drops it when its process
  dies, so a crash never leaves it stuck.
* Object stores (``s3://``, ``gs://``...): a lease object ``{file}.lock`` holding an owner id and an
  expiry, created with exclusive-create (``mode="xb"``, conditional put) where the filesystem has it,
  else written and read back. An expired lease (its holder died) is taken over; a holder that keeps
  the lock for long (the scheduler) calls :meth:`StateLock.renew`.

Re-entrant within one :class:`StateLock` object. A lock held by someone else for longer than
``timeout`` raises :class:`LockHeld` naming the holder.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from cluster import storage
from cluster.errors import RaydistillError


class LockHeld(RaydistillError):
    """Someone else holds the lock."""


class StateLock:
    def __init__(self, state_uri: str, *, timeout: float = 600.0, lease_s: float = 900.0, what: str = "this state"):
        self.uri = state_uri + ".lock"
        self.timeout = timeout
        self.lease_s = lease_s
        self.what = what
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._depth = 0
        self._mutex = threading.RLock()
        self._file_lock: Any = None
        if storage.is_local(state_uri):
            from filelock import FileLock

            self._path = os.path.abspath(self.uri[len("file://") :] if self.uri.startswith("file://") else self.uri)
            self._file_lock = FileLock(self._path, thread_local=False)

    # -------------------------------------------------------------------------------------- public
    def acquire(self, timeout: float | None = None) -> StateLock:
        timeout = self.timeout if timeout is None else timeout
        self._mutex.acquire()
        try:
            if self._depth == 0:
                if self._file_lock is not None:
                    from filelock import Timeout

                    os.makedirs(os.path.dirname(self._path), exist_ok=True)  # first use of a new state dir
                    try:
                        self._file_lock.acquire(timeout=timeout)
                    except Timeout:
                        raise LockHeld(
                            f"{self.what} is locked by another process ({self.uri}); wait for it to "
                            "finish, or remove the file if no raydistill process runs"
                        ) from None
                else:
                    self._acquire_lease(timeout)
            self._depth += 1
        except BaseException:
            self._mutex.release()
            raise
        return self

    def release(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        try:
            if self._depth == 0:
                if self._file_lock is not None:
                    self._file_lock.release()
                else:
                    self._release_lease()
        finally:
            self._mutex.release()

    def renew(self) -> None:
        """Push a held lease's expiry forward (no-op for file locks)."""
        if self._file_lock is None and self._depth:
            self._write_lease(exclusive=False)

    @property
    def held(self) -> bool:
        return self._depth > 0

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # -------------------------------------------------------------------------------------- leases
    def _lease(self) -> dict | None:
        try:
            return json.loads(storage.read_text(self.uri))
        except Exception:  # noqa: BLE001 - absent or torn: no lease
            return None

    def _write_lease(self, *, exclusive: bool) -> bool:
        body = json.dumps({"owner": self.owner, "expires_at": time.time() + self.lease_s}).encode()
        fs, path = storage.filesystem(self.uri)
        if not exclusive:
            storage.atomic_write_bytes(self.uri, body)
            return True
        try:
            with fs.open(path, "xb") as handle:  # a conditional put where the store has one
                handle.write(body)
            return True
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError, TypeError):  # no exclusive create: write, then read back
            storage.atomic_write_bytes(self.uri, body)
            time.sleep(0.2)
            return (self._lease() or {}).get("owner") == self.owner

    def _acquire_lease(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            lease = self._lease()
            if lease is not None and lease.get("expires_at", 0) < time.time():
                storage.remove(self.uri)  # the holder died without releasing
                lease = None
            if lease is None and self._write_lease(exclusive=True):
                return
            if time.monotonic() >= deadline:
                raise LockHeld(
                    f"{self.what} is locked by {(lease or {}).get('owner', 'another process')} "
                    f"({self.uri}, lease until {(lease or {}).get('expires_at')})"
                )
            time.sleep(0.5)

    def _release_lease(self) -> None:
        if (self._lease() or {}).get("owner") == self.owner:
            storage.remove(self.uri)
