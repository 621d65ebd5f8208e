"""ServerThread with port 0 (what every API test uses): the port is bound when the server is made, not probed
and bound again later, so no other process can take it in between."""

from __future__ import annotations

import errno
import socket

import httpx
import pytest

from serve.server_thread import ServerThread


async def _app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _bind(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server would: only a listener blocks it
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_port_zero_is_held_from_construction_and_served_after_start():
    server = ServerThread(_app, port=0)
    try:
        # Before start: another process trying the same port (as a find-then-bind neighbour would) fails.
        with pytest.raises(OSError) as taken:
            _bind(server.port).close()
        assert taken.value.errno == errno.EADDRINUSE
        server.start()
        assert httpx.get(server.base_url + "/", timeout=10).text == "ok"
    finally:
        server.stop()
    _bind(server.port).close()  # released after stop
