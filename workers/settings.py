"""What arq starts: ``turnfleet worker`` (or ``arq workers.settings.WorkerSettings``).

Values come from ``WorkerProcessSettings`` (``TURNFLEET_*``). arq's own retry count is set
above ours on purpose: our job counts attempts itself (arq counts a try when a job *starts*,
so crashes use them up) and must get the chance to record the final failure.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from agents import set_trace_processors
from arq.connections import RedisSettings
from redis.exceptions import RedisError

from turnfleet import keys
from turnfleet.connection import connect
from turnfleet.queue import TurnQueue, deserialize_job, now_ms, serialize_job
from turnfleet.redaction import Redactor
from turnfleet.settings import WorkerProcessSettings
from workers.job import Runtime, default_worker_name, run_turn
from workers.llm import make_model
from workers.trace_store import TraceBuffer, TraceSampler, TraceStore

log = structlog.get_logger(__name__)
_settings = WorkerProcessSettings()


async def startup(ctx: dict[str, Any]) -> None:
    settings = WorkerProcessSettings()
    from workers.support_desk import build_support_desk

    url = ctx.get("redis_url") or settings.redis_url
    redis = connect(url)
    model = make_model(settings)
    redactor = Redactor.from_settings(settings)
    # Our buffer replaces the SDK's OpenAI exporter: nothing leaves the process unless kept,
    # redacted, and written by the job (or sent to the configured OTLP endpoint).
    buffer = TraceBuffer(max_spans=settings.trace_buffer_spans)
    set_trace_processors([buffer])
    sink = None
    if settings.otlp_endpoint:
        from workers.otlp import OtlpSink

        sink = OtlpSink.from_settings(settings)
    trace_redis = connect(settings.trace_redis_url) if settings.trace_redis_url else redis
    ctx["runtime"] = Runtime(
        settings=settings,
        redis=redis,
        queue=TurnQueue(redis),
        desk=build_support_desk(model),
        model_name=settings.model_name,
        worker_name=settings.worker_name or default_worker_name(),
        redactor=redactor,
        traces=TraceStore(
            buffer,
            trace_redis,
            TraceSampler(settings.trace_sample_rate, settings.trace_keep_slower_than_ms),
            redactor,
            settings.trace_retention_s,
            sink,
        ),
    )
    ctx["in_flight"] = InFlight()
    ctx["heartbeat"] = asyncio.create_task(
        heartbeat(redis, ctx["runtime"].worker_name, ctx["in_flight"])
    )


HEARTBEAT_S = 2.0


class InFlight:
    """Turns this worker process is running now, counted by arq's job start/end hooks.

    arq copies its ctx for every job (``{**worker ctx, **job ctx}``), so the count lives in
    this shared object rather than in a ctx value.
    """

    def __init__(self) -> None:
        self.count = 0


async def job_started(ctx: dict[str, Any]) -> None:
    """arq ``on_job_start``."""
    in_flight = ctx.get("in_flight")
    if in_flight is not None:
        in_flight.count += 1


async def job_ended(ctx: dict[str, Any]) -> None:
    """arq ``on_job_end``: called whatever the job's outcome (success, error, cancellation)."""
    in_flight = ctx.get("in_flight")
    if in_flight is not None:
        in_flight.count = max(0, in_flight.count - 1)


async def heartbeat(redis: Any, name: str, in_flight: InFlight | None = None) -> None:
    """Record this worker as alive (``keys.WORKERS``: name -> last beat ms) every few seconds,
    with the turns it is running (``keys.WORKER_INFLIGHT``: name -> count).

    arq's health-check key is shared by all workers of a queue; this says which ones live.
    Readers count in-flight turns of live workers only: a killed worker's count stays behind
    until its heartbeat is too old to count.
    """
    while True:
        try:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.zadd(keys.WORKERS, {name: now_ms()})
                pipe.hset(keys.WORKER_INFLIGHT, name, in_flight.count if in_flight else 0)
                await pipe.execute()
        except RedisError as exc:
            log.warning("worker.heartbeat_failed", worker=name, error=str(exc))
        await asyncio.sleep(HEARTBEAT_S)


async def shutdown(ctx: dict[str, Any]) -> None:
    beat = ctx.get("heartbeat")
    if beat is not None:
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat  # no beat may land after the ZREM below
    rt = ctx.get("runtime")
    if rt is not None:
        with contextlib.suppress(RedisError):
            async with rt.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(keys.WORKERS, rt.worker_name)
                pipe.hdel(keys.WORKER_INFLIGHT, rt.worker_name)
                await pipe.execute()
        if rt.traces is not None and rt.traces.sink is not None:
            await asyncio.to_thread(rt.traces.sink.shutdown)  # sends what is queued first
        if rt.traces is not None and rt.traces.redis is not rt.redis:
            await rt.traces.redis.aclose()
        await rt.redis.aclose()


def redis_settings(url: str | None) -> RedisSettings:
    return RedisSettings.from_dsn(url) if url else RedisSettings()


class WorkerSettings:
    functions = [run_turn]
    on_startup = startup
    on_shutdown = shutdown
    on_job_start = job_started
    on_job_end = job_ended
    redis_settings = redis_settings(_settings.redis_url)
    max_jobs = _settings.max_jobs
    poll_delay = _settings.poll_delay_s
    job_timeout = _settings.turn_timeout_s + 30  # our own per-attempt timeout fires first
    max_tries = _settings.max_attempts + 5
    keep_result = 0  # our TurnResult is the record; arq's expires after an hour anyway
    job_serializer = serialize_job
    job_deserializer = deserialize_job
