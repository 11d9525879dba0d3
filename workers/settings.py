"""What arq starts: ``turnfleet worker`` (or ``arq workers.settings.WorkerSettings``).

Values come from ``WorkerProcessSettings`` (``TURNFLEET_*``). arq's own retry count is set
above ours on purpose: our job counts attempts itself (arq counts a try when a job *starts*,
so crashes use them up) and must get the chance to record the final failure.
"""

from __future__ import annotations

from typing import Any

from agents import set_trace_processors
from arq.connections import RedisSettings

from turnfleet.connection import connect
from turnfleet.queue import TurnQueue, deserialize_job, serialize_job
from turnfleet.settings import WorkerProcessSettings
from workers.job import Runtime, default_worker_name, run_turn
from workers.llm import make_model

_settings = WorkerProcessSettings()


async def startup(ctx: dict[str, Any]) -> None:
    settings = WorkerProcessSettings()
    from workers.support_desk import build_support_desk

    url = ctx.get("redis_url") or settings.redis_url
    redis = connect(url)
    model = make_model(settings)
    # No OpenAI exporter: traces stay in this process until our processor (issue 4) stores them.
    set_trace_processors([])
    ctx["runtime"] = Runtime(
        settings=settings,
        redis=redis,
        queue=TurnQueue(redis),
        desk=build_support_desk(model),
        model_name=settings.model_name,
        worker_name=settings.worker_name or default_worker_name(),
    )


async def shutdown(ctx: dict[str, Any]) -> None:
    rt = ctx.get("runtime")
    if rt is not None:
        await rt.redis.aclose()


def redis_settings(url: str | None) -> RedisSettings:
    return RedisSettings.from_dsn(url) if url else RedisSettings()


class WorkerSettings:
    functions = [run_turn]
    on_startup = startup
    on_shutdown = shutdown
    redis_settings = redis_settings(_settings.redis_url)
    max_jobs = _settings.max_jobs
    poll_delay = _settings.poll_delay_s
    job_timeout = _settings.turn_timeout_s + 30  # our own per-attempt timeout fires first
    max_tries = _settings.max_attempts + 5
    keep_result = 0  # our TurnResult is the record; arq's expires after an hour anyway
    job_serializer = serialize_job
    job_deserializer = deserialize_job
