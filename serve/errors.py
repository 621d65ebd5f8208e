"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``. Bad input is a 4xx; our own
failures are 5xx of type ``server_error`` whose body never carries backend exception text (that goes to
the log, with the request id)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.engine.types import EngineError, EngineFailure, EngineUnavailable

logger = logging.getLogger("raydistill.serve")


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    TYPES = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "server_error",
        500: "server_error",
    }

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None, type: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or self.TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid_api_key() -> APIError:
    """The 401 for a request without a configured key (every backend answers it the same)."""
    return APIError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'", code="invalid_api_key")


class Overloaded(Exception):
    """Raised by a backend when it cannot queue another request (maps to 429)."""


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def map_error(exc: BaseException, rid: str | None = None) -> BaseException:
    """The HTTP error for ``exc``: 4xx for the client's mistakes, 5xx (type ``server_error``) for ours.
    A 5xx body never carries backend exception text: that goes to the log with the request id."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineError):
        return APIError(400, str(exc), code="invalid_request")
    if isinstance(exc, Overloaded):
        return APIError(429, "server overloaded: too many requests queued; retry later", code="rate_limit_exceeded")
    if isinstance(exc, asyncio.CancelledError):
        return exc
    if isinstance(exc, EngineUnavailable):
        logger.warning("request %s: engine unavailable: %s", rid or "-", exc)
        return APIError(
            503, f"the model engine is not available; retry later (request id {rid})", code="engine_unavailable"
        )
    logger.error("request %s: engine failure: %r", rid or "-", exc, exc_info=exc)
    if isinstance(exc, EngineFailure):
        return APIError(
            500,
            f"the model engine failed while running this request (request id {rid}); the details are in the server log",
            code="engine_error",
        )
    return APIError(
        503, f"the model backend failed (request id {rid}); the details are in the server log", code="backend_error"
    )


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app answers, in OpenAI's shape: ours, Starlette's 404/405, and anything unexpected (500)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(
            exc.status_code, str(exc.detail) + f": {request.method} {request.url.path}", code=code
        ).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return APIError(500, "internal error; the details are in the server log", code="internal_error").response()
