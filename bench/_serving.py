"""Shared by the serving benches: a listening socket on a port the kernel picks (handed to the server
subprocess), serving an app on it, and waiting for the server subprocess to be healthy."""

from __future__ import annotations

import socket
import subprocess
import time


def listening_socket(port: int = 0) -> socket.socket:
    """A socket listening on 127.0.0.1:``port`` (0: a free port the kernel picks; read it back with
    ``getsockname()``). Pass its ``fileno()`` to the server subprocess (``pass_fds``), which serves on it with
    :func:`serve_on_fd`: the port is held from here on, so no other process can take it in between."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


def serve_on_fd(app, fd: int, **config) -> None:
    """Run ``app`` with uvicorn on the listening socket inherited as file descriptor ``fd``."""
    import uvicorn

    sock = socket.socket(fileno=fd)  # the family (AF_INET) is read from the descriptor
    uvicorn.Server(uvicorn.Config(app, **config)).run(sockets=[sock])


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Poll ``{url}/health`` until it answers 200; SystemExit if the process dies or ``timeout_s`` passes."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.5)
