"""The HTTP server: one FastAPI app assembled from the producer's and telemetry's routers.

``turnfleet serve`` runs it with uvicorn. The components stay independent: each exposes an
``APIRouter`` (``producer/http.py`` for writing turns, ``telemetry/http.py`` for reading
what happened, ``telemetry/console.py`` for the web console under ``/console``); this module
only assembles them (imported lazily, like the CLI does) with the Redis clients, the API keys,
JSON errors and the body limit. What the routers share lives in ``turnfleet/http.py``, which
imports none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

from fastapi import FastAPI

from turnfleet.auth import KeyStore
from turnfleet.connection import connect
from turnfleet.http import BodyLimit, install_errors
from turnfleet.settings import ProducerSettings



def create_app(settings: ProducerSettings | None = None, redis_url: str | None = None) -> FastAPI:
    from turnfleet.producer.http import router as producer_router
    from turnfleet.telemetry.console import router as console_router
    from turnfleet.telemetry.http import router as telemetry_router

    settings = settings or ProducerSettings()
    url = redis_url or settings.redis_url
    if not url:
        raise ValueError("no Redis: set REDIS_URL or pass redis_url")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = connect(url)
        app.state.trace_redis = connect(settings.trace_redis_url) if settings.trace_redis_url else None
        reload_task = asyncio.create_task(_reload_keys(app.state.keys, settings.api_keys_reload_s))
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, app.state.keys.reload)
        try:
            yield
        finally:
            reload_task.cancel()
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)
            await app.state.redis.aclose()
            if app.state.trace_redis is not None:
                await app.state.trace_redis.aclose()

    app = FastAPI(
        title="turnfleet",
        version=__import__("turnfleet").__version__,
        description="Hand conversation turns to the fleet and read what happened.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.keys = KeyStore(settings)
    install_errors(app)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process answers (liveness). Readiness, with Redis and the fleet, is /readyz."""
        return {"status": "ok"}

    app.include_router(producer_router)
    app.include_router(telemetry_router)
    app.include_router(console_router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app


async def _reload_keys(store: KeyStore, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        store.reload_if_changed()
