"""What arq starts: ``arq workers.settings.WorkerSettings``, and ``turnfleet worker`` through
``workers/supervisor.py``.

Values come from ``WorkerProcessSettings`` (``TURNFLEET_*``). arq's own retry count is set
above ours on purpose: our job counts attempts itself (arq counts a try when a job *starts*,
so crashes use them up) and must get the chance to record the final failure.

``startup`` builds the worker's ``Runtime`` and starts its heartbeat
(:mod:`turnfleet.heartbeat`, carrying the turns in flight) and reconciler; ``shutdown`` stops
them, removes the heartbeat and closes connections.

Run directly by arq (``arq workers.settings.WorkerSettings``) leases, fencing, the
reconciler and undecodable-job handling still apply; supervision and our drain do not (arq's
``job_completion_wait`` gives the drain), nor does ``TurnWorker``'s fenced clean-up, nor the
isolated lane (a turn lost with its worker is charged an ordinary attempt there); it reads
arq's own queue, the built-in workflow's, only: other workflows' turns are routed to their own
queues (``keys.workflow_queue``), which only ``turnfleet worker`` serves.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from agents import set_trace_processors
from arq.connections import RedisSettings
from redis.exceptions import RedisError

from turnfleet import heartbeat, registry
from turnfleet.connection import connect
from turnfleet.workflow import load_app
from turnfleet.queue import TurnQueue, deserialize_job, serialize_job
from turnfleet.redaction import Redactor
from turnfleet.settings import WorkerProcessSettings
from turnfleet.workers.check_job import run_turn_checks
from turnfleet.workers.job import Runtime, leave_newer_job, record_undecodable, run_turn
from turnfleet.workers.llm import app_models, close_models, make_model
from turnfleet.startup_heap import freeze_startup_heap
from turnfleet.workers.reconcile import reconcile_forever
from turnfleet.workers.trace_store import TraceBuffer, TraceSampler, TraceStore

_settings = WorkerProcessSettings()


async def startup(ctx: dict[str, Any]) -> None:
    settings = WorkerProcessSettings()
    from turnfleet.workers.support_desk import builtin_app

    from turnfleet.workers.orderbook import use_order_book

    use_order_book(settings.order_book)
    url = ctx.get("redis_url") or settings.redis_url
    redis = connect(url)
    model = make_model(settings)
    app = load_app(settings.app) if settings.app else builtin_app(model, settings.workflow_name)
    models = app_models(app, settings, model)  # per workflow; refuses one offline without a script
    # What it registers below, refused here if a workflow's redaction pattern does not compile.
    served = registry.registrations(app.workflows)
    # Its redactor: TURNFLEET_REDACT_PATTERNS, the fleet's workflows' patterns (the registry's
    # union: fleet-wide, see turnfleet/registry.py) and its own app's; for logs too.
    redactor = await registry.redactor(redis, settings, [p for r in served for p in r.redaction_patterns])
    _redact_logs(redactor)
    # Our buffer replaces the SDK's OpenAI exporter: nothing leaves the process unless kept,
    # redacted, and written by the job (or sent to the configured OTLP endpoint).
    buffer = TraceBuffer(max_spans=settings.trace_buffer_spans)
    processors: list[Any] = [buffer]
    if settings.openai_trace_export:
        from agents.tracing.processors import default_processor

        # Opt-in only: the SDK's exporter sends every span, unsampled and unredacted, to OpenAI.
        processors.append(default_processor())
    set_trace_processors(processors)
    sink = None
    if settings.otlp_endpoint:
        from turnfleet.workers.otlp import OtlpSink

        sink = OtlpSink.from_settings(settings)
    trace_redis = connect(settings.trace_redis_url) if settings.trace_redis_url else redis
    app = load_app(settings.app) if settings.app else builtin_app(model, settings.workflow_name)
    ctx["runtime"] = Runtime(
        settings=settings,
        redis=redis,
        queue=TurnQueue(redis),
        app=app,
        models=models,
        model_name=settings.model_name,
        worker_name=settings.worker_name or heartbeat.default_name(),
        redactor=redactor,
        traces=TraceStore(
            buffer,
            trace_redis,
            TraceSampler(settings.trace_sample_rate, settings.trace_keep_slower_than_ms),
            redactor,
            settings.trace_retention_s,
            sink,
            # A team's own processors get their workflow's kept, redacted traces from the store,
            # never from the SDK (which would hand them every span, unsampled and unredacted).
            {w.name: w.trace_processors for w in app.workflows},
        ),
    )
    rt = ctx["runtime"]
    # Workers say what they serve: the registry outlives them, and the edges refuse a
    # workflow no worker ever served (turnfleet/registry.py). Redaction patterns ride along.
    await registry.register(redis, served, rt.worker_name)
    ctx["in_flight"] = InFlight()
    ctx["heartbeat"] = asyncio.create_task(heartbeat.beat_forever(
        redis, "worker", ctx["runtime"].worker_name, lambda: ctx["in_flight"].count,
        [w.name for w in rt.app.workflows]))
    ctx["reconciler"] = asyncio.create_task(
        reconcile_forever(redis, settings.reconcile_every_s, settings.turn_lease_s)
    )
    freeze_startup_heap()  # the SDK, the agents and the runtime are never garbage


_LOG_REDACTION = f"{Redactor.structlog_processor.__qualname__}.<locals>.redact_event"


def _redact_logs(redactor: Redactor) -> None:
    """Log lines too: swap the redaction processor the CLI installed before the app was loaded
    (``turnfleet/logging.py``: the settings' patterns only) for ``redactor``'s, leaving level
    and output as they are. Where none is installed (arq run directly) logging is left alone."""
    processors = list(structlog.get_config()["processors"])
    for i, processor in enumerate(processors):
        if getattr(processor, "__qualname__", None) == _LOG_REDACTION:
            processors[i] = redactor.structlog_processor()
            structlog.configure(processors=processors)
            return


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


async def shutdown(ctx: dict[str, Any]) -> None:
    """arq ``on_shutdown``: stop the background tasks, unregister, close connections."""
    for name in ("reconciler", "heartbeat"):
        task = ctx.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # no beat may land after the ZREM below
    rt = ctx.pop("runtime", None)
    if rt is not None:
        with contextlib.suppress(RedisError, OSError):
            await heartbeat.forget(rt.redis, "worker", rt.worker_name)
        if rt.traces is not None and rt.traces.sink is not None:
            await asyncio.to_thread(rt.traces.sink.shutdown)  # sends what is queued first
        if rt.traces is not None:
            await asyncio.to_thread(rt.traces.shutdown_processors)  # a team's: flush, shut down
        if rt.traces is not None and rt.traces.redis is not rt.redis:
            await rt.traces.redis.aclose()
        await rt.redis.aclose()
    await close_models()  # the model endpoint's HTTP clients


def redis_settings(url: str | None) -> RedisSettings:
    return RedisSettings.from_dsn(url) if url else RedisSettings()


class WorkerSettings:
    functions = [run_turn, record_undecodable, leave_newer_job, run_turn_checks]
    on_startup = startup
    on_shutdown = shutdown
    on_job_start = job_started
    on_job_end = job_ended
    redis_settings = redis_settings(_settings.redis_url)
    max_jobs = _settings.max_jobs
    poll_delay = _settings.poll_delay_s
    job_timeout = _settings.turn_timeout_s + 30  # our own per-attempt timeout fires first
    # Spared attempts (worker losses) and hand-offs to the isolated lane are tries for arq too.
    max_tries = _settings.max_attempts + 2 * _settings.isolated_losses + 10
    keep_result = 0  # our TurnResult is the record; arq's expires after an hour anyway
    job_serializer = serialize_job
    job_deserializer = deserialize_job  # never raises: undecodable payloads fail their turn
    retry_jobs = True  # Retry and cancelled (drained) jobs go back to the queue
    job_completion_wait = _settings.drain_grace_s  # the drain when arq runs this directly
