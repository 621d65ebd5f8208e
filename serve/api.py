"""OpenAI-compatible HTTP API (FastAPI): the routes and the app factory.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models[/{id}]``, ``GET /health``,
``GET /metrics`` (Prometheus text), ``GET /openapi.json``. Streaming is SSE ending with ``data: [DONE]``
(:mod:`serve.streaming`). Every error has OpenAI's shape (:mod:`serve.errors`); bad input is always a 4xx.
Request models are :mod:`serve.protocol`, the serving logic :mod:`serve.serving`, the backends it talks to
:mod:`serve.backends`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from serve.auth import APIKeyAuth, load_api_keys
from serve.backends import Backend
from serve.errors import ERROR_SCHEMA, APIError, install_error_handlers
from serve.metrics import ServerMetrics
from serve.prompt_log import PromptLog
from serve.protocol import ChatCompletionRequest, CompletionRequest
from serve.section import ServeSection
from serve.serving import OpenAIServer

logger = logging.getLogger("raydistill.serve")


def create_app(
    backends: Backend | Sequence[Backend],
    section: ServeSection | None = None,
    *,
    api_keys: list[str] | None = None,
    auth: APIKeyAuth | None = None,
    metrics: ServerMetrics | None = None,
    prompt_log: PromptLog | None = None,
    admission_limit: int | None | str = "auto",
    replicas_fn: Any | None = None,
    close_backends: bool = False,
) -> FastAPI:
    """The FastAPI app serving ``backends`` (one per model id).

    ``api_keys``: overrides ``section.api_key_env`` / ``api_key_file``; ``auth`` (e.g. built from key hashes
    the deploying driver read) overrides both. ``admission_limit``: requests
    in flight beyond which new ones get 429 (``"auto"`` = ``max_ongoing_requests + max_queued_requests``
    of the section, ``None`` = no limit, used inside Ray Serve where the handle enforces it).
    ``prompt_log``: defaults to one built from the section when ``serve.prompt_log_enabled``.
    ``replicas_fn``: optional callable returning the number of model replicas (for ``/metrics``).
    """
    section = section or ServeSection()
    backends = [backends] if not isinstance(backends, (list, tuple)) else list(backends)
    if not backends:
        raise ValueError("create_app needs at least one backend")
    if auth is None:
        keys = api_keys if api_keys is not None else load_api_keys(section.api_key_env, section.api_key_file)
        auth = APIKeyAuth(keys)
    if prompt_log is None:
        prompt_log = PromptLog.from_section(section)
    if admission_limit == "auto":
        admission_limit = (
            None if section.max_queued_requests < 0 else section.max_ongoing_requests + section.max_queued_requests
        )
    server = OpenAIServer(
        backends,
        section,
        metrics=metrics or ServerMetrics(),
        auth=auth,
        prompt_log=prompt_log,
        admission_limit=admission_limit,
        replicas_fn=replicas_fn,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        auth.warn_if_open()
        try:
            yield  # the prompt log flushes from its own thread, never on this event loop
        finally:
            if server.prompt_log is not None:
                await asyncio.to_thread(server.prompt_log.close)
            if close_backends:
                for b in backends:
                    if hasattr(b, "shutdown"):
                        b.shutdown()

    app = FastAPI(title="raydistill", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    def authorize_open(request: Request) -> None:
        """``/health``, ``/metrics``, ``/openapi.json`` need the key unless listed in ``serve.open_paths``."""
        path, root = request.url.path, request.scope.get("root_path") or ""
        if root and path.startswith(root):  # behind a route prefix (Ray Serve's route_prefix)
            path = path[len(root) :] or "/"
        if path not in section.open_paths:
            server.authorize(request)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_route(request: Request) -> JSONResponse:
        authorize_open(request)
        return JSONResponse(app.openapi())

    install_error_handlers(app)

    @app.get("/health")
    async def health(request: Request) -> Response:
        authorize_open(request)
        down = []
        for name, b in server.backends.items():
            check = getattr(b, "check_health", None)
            if check is None:
                continue
            try:
                check()
            except Exception as exc:  # noqa: BLE001 - any failure: unhealthy (Ray Serve replaces the replica)
                logger.error("health check: model %s is unhealthy: %r", name, exc)
                down.append(name)
        if down:
            return APIError(
                503, f"unhealthy: the engine of {', '.join(down)} is not running", code="engine_unavailable"
            ).response()
        return JSONResponse({"status": "ok", "models": sorted(server.backends)})

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        authorize_open(request)
        for b in backends:
            with contextlib.suppress(Exception):
                stats = await asyncio.wait_for(b.stats(), timeout=2.0)
                replicas = None
                if server.replicas_fn is not None:
                    replicas = await asyncio.to_thread(server.replicas_fn)
                elif "replicas" in stats:
                    replicas = stats["replicas"]
                else:
                    replicas = 1
                server.metrics.engine_state(
                    b.name,
                    running=int(stats.get("running", 0)),
                    waiting=int(stats.get("waiting", 0)),
                    replicas=replicas,
                )
        server.metrics.in_flight.set(server.in_flight)
        if server.prompt_log is not None:
            server.metrics.prompt_log_state(
                pending=server.prompt_log.pending(),
                dropped=server.prompt_log.dropped_rows,
                files=server.prompt_log.files_written,
            )
        data, content_type = server.metrics.render()
        return Response(content=data, media_type=content_type)

    def model_card(name: str, b: Backend) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "raydistill",
            "max_model_len": b.context_length,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        server.authorize(request)
        for b in backends:
            await server.ready(b)
        return {"object": "list", "data": [model_card(name, b) for name, b in server.backends.items()]}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> dict:
        server.authorize(request)
        backend = server.backend(model)
        await server.ready(backend)
        return model_card(model, backend)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await server.handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.handle(request, "completions")

    return app


def _openapi(app: FastAPI) -> dict:
    """The served OpenAPI document, with what FastAPI cannot see in routes that read the raw body: the
    request bodies of both generation routes (the pydantic models), bearer auth, and the error shape."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version="1", routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    bodies = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
    error = {
        "description": "OpenAI-style error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    for path, model in bodies.items():
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        schemas[model.__name__] = js
        op = doc["paths"][path]["post"]
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
        op["responses"] = {
            "200": {
                "description": "the completion (JSON, or SSE with stream: true)",
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            },
            **{code: error for code in ("400", "401", "404", "413", "429", "500", "503", "504")},
        }
    for path, item in doc["paths"].items():
        for op in item.values():
            if path.startswith("/v1/"):
                op["security"] = [{"bearer": []}]
                op.setdefault("responses", {}).update({"401": error, "404": error})
    app.openapi_schema = doc
    return doc


# ---------------------------------------------------------------------------------------------------
# engines (in-process; the Ray model deployment loads them the same way)
