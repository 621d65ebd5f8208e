"""Fixtures for the API tests: the real engine on a tiny random LLaMA (or a timing-controlled fake engine)
behind a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def serve_tokenizer(tiny_teacher_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_teacher_dir)


def start_fake_server(
    tokenizer,
    *,
    name: str = "tiny",
    token_delay: float = 0.0,
    max_batch_size: int = 16,
    context_length: int = 256,
    **section_kw,
):
    """(ServerThread, FakeAsyncEngine) for one app; caller stops the server."""
    from serve.api import create_app
    from serve.backends import EngineBackend
    from serve.section import ServeSection
    from serve.server_thread import ServerThread
    from tests.serve.fake_engine import FakeAsyncEngine

    section_kw.setdefault("api_key_env", None)
    engine = FakeAsyncEngine(
        tokenizer, name=name, token_delay=token_delay, max_batch_size=max_batch_size, context_length=context_length
    )
    app = create_app(EngineBackend(engine), ServeSection(**section_kw))
    return ServerThread(app).start(), engine


def asgi_post_scope(path: str, payload: bytes, spec_version: str) -> dict:
    """The ASGI scope of a JSON POST to ``path`` (tests that drive the app below the HTTP server)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
    }


def asgi_receive(payload: bytes, disconnect=None):
    """An ASGI ``receive``: the request body once, then ``http.disconnect`` once ``disconnect`` (an
    asyncio.Event) is set; with None it never reports one (as an ASGI 2.4 server need not)."""
    import asyncio

    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await (disconnect or asyncio.Event()).wait()
        return {"type": "http.disconnect"}

    return receive


@pytest.fixture(scope="module")
def api_server(tiny_teacher_dir):
    """(ServerThread, AsyncEngine): the real engine on the tiny random LLaMA, served as model 'tiny' (context 256)."""
    from serve.api import create_app
    from serve.backends import EngineBackend
    from serve.engine.async_engine import AsyncEngine
    from serve.section import ServeSection
    from serve.server_thread import ServerThread

    engine = AsyncEngine.from_pretrained(tiny_teacher_dir, max_model_len=256, max_batch_size=8)
    app = create_app(EngineBackend(engine, name="tiny"), ServeSection(api_key_env=None), close_backends=True)
    server = ServerThread(app).start()
    yield server, engine
    server.stop()
