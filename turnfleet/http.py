"""What the HTTP routers share: errors, the request's Redis and settings, the caller's key.

``producer/http.py``, ``telemetry/http.py`` and ``telemetry/console.py`` import these;
``turnfleet/server.py`` assembles the app from the routers and installs ``install_errors`` and
``BodyLimit``. Nothing here imports a router, so the routers and the assembly form no cycle.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from turnfleet.auth import Principal
from turnfleet.settings import ProducerSettings

log = structlog.get_logger(__name__)


class ApiError(Exception):
    """An error answered as ``{"error": code, "message": ..., **extra}`` with ``status``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": code, "message": message, **extra}


# -- what routers depend on -----------------------------------------------------------


def redis_of(request: Request) -> Redis:
    return request.app.state.redis


def trace_redis_of(request: Request) -> Redis:
    return request.app.state.trace_redis or request.app.state.redis


def settings_of(request: Request) -> ProducerSettings:
    return request.app.state.settings


# What routes depend on: the same, as ``async def``. FastAPI runs a plain ``def`` dependency in
# its thread pool, a thread hand-off per request (measured: ~10% of a `POST /v1/turns`) for
# what is an attribute read.
async def redis_dep(request: Request) -> Redis:
    return redis_of(request)


async def trace_redis_dep(request: Request) -> Redis:
    return trace_redis_of(request)


async def settings_dep(request: Request) -> ProducerSettings:
    return settings_of(request)


_BEARER = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")
_API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="The same key, as a header.")


async def principal(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None = Security(_BEARER),
    api_key: str | None = Security(_API_KEY),
) -> Principal:
    """The caller's key (``Authorization: Bearer <key>`` or ``X-API-Key``), or 401.

    Declared as security schemes so the OpenAPI document (and /docs) shows how to authorise.
    """
    presented = bearer.credentials.strip() if bearer is not None else api_key
    if not presented:
        raise ApiError(401, "unauthorized", "an API key is required (Authorization: Bearer <key>)")
    found = request.app.state.keys.authenticate(presented)
    if found is None:
        raise ApiError(401, "unauthorized", "unknown API key")
    return found


# -- limits and errors ---------------------------------------------------------------


class BodyLimit:
    """413 for request bodies over ``limit`` bytes, by header or as the body streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        response = JSONResponse(
            error_body("too_large", f"request body over {self.limit} bytes"), status_code=413
        )
        await response({"type": "http"}, _empty_receive, send)


class _TooLarge(Exception):
    pass


async def _empty_receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def install_errors(app: FastAPI) -> None:
    """Every error as JSON ``{"error", "message", ...}``, never a traceback."""
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.code, exc.message, **exc.extra), status_code=exc.status, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"][1:] if e["loc"][0] in ("body", "query", "path", "header"))
             or ".".join(str(p) for p in e["loc"]) or "body",
             "message": str(e["msg"]).removeprefix("Value error, ")}
            for e in exc.errors()
        ]
        return JSONResponse(error_body("validation", "the request is not valid", errors=errors),
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("http.unexpected_error", path=request.url.path)
        return JSONResponse(error_body("internal", "internal error; see the server log"), status_code=500)
