"""Run an ASGI app with uvicorn in a background thread (tests, benchmarks)."""

from __future__ import annotations

import time
from typing import Any


class ServerThread:
    """Run an ASGI app with uvicorn in a background thread (tests, benchmarks, ``--no-ray`` helpers).

    >>> with ServerThread(app, port=0) as server:   # port 0 picks a free port
    ...     url = server.base_url                    # http://127.0.0.1:PORT
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        # Port 0: bind the listening socket here and hand it to uvicorn, so the port is ours from now on
        # (a probe that closes and lets uvicorn bind later can lose the port to another process meanwhile).
        self._socket: socket.socket | None = None
        if port == 0:
            self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((host, 0))
            self._socket.listen()  # listening: no other socket can bind the port, SO_REUSEADDR or not
            port = self._socket.getsockname()[1]
        self.host, self.port = host, port
        self.config = uvicorn.Config(
            app, host=host, port=port, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(self.config)
        self.thread: Any | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        import threading

        sockets = [self._socket] if self._socket is not None else None
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": sockets}, name="raydistill-uvicorn", daemon=True
        )
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
        if self._socket is not None:
            self._socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
