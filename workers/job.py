"""The arq job: run one Support Desk turn, then record its outcome and wake the next turn.

The job for turn T runs only while T is the head of its conversation's queue (see
``turnfleet/queue.py``), so turns of one conversation never overlap. Every attempt ends in
exactly one of: a completed result, a recorded failed attempt that arq runs again
(``Retry``), or a terminal failure; the finish script writes the result, the telemetry batch
and the next turn's job atomically.
"""

from __future__ import annotations

import asyncio
import socket
import os
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from agents import RunConfig, Runner, flush_traces, trace
from agents.exceptions import (
    InputGuardrailTripwireTriggered,
    MaxTurnsExceeded,
    ModelBehaviorError,
    OutputGuardrailTripwireTriggered,
    UserError,
)
from agents.extensions.memory import RedisSession
from arq import Retry
from redis.asyncio import Redis

from turnfleet import keys
from turnfleet.models import AttemptError, TurnRequest, TurnResult, utcnow
from turnfleet.queue import TurnQueue
from turnfleet.redaction import Redactor
from turnfleet.settings import WorkerProcessSettings
from workers.context import TurnContext
from workers.hooks import TelemetryHooks
from workers.trace_store import TraceStore

log = structlog.get_logger(__name__)

# Failures that a second attempt would repeat: fail the turn at once.
DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (
    MaxTurnsExceeded,
    ModelBehaviorError,
    UserError,
    InputGuardrailTripwireTriggered,
    OutputGuardrailTripwireTriggered,
)


@dataclass
class Runtime:
    """What every job of a worker process shares; built once in ``on_startup``."""

    settings: WorkerProcessSettings
    redis: Redis
    queue: TurnQueue
    desk: Any  # workers.support_desk.SupportDesk
    model_name: str
    worker_name: str
    redactor: Redactor | None = None
    traces: TraceStore | None = None


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def _reset_memory(session: RedisSession, redis: Redis, turn_id: str) -> None:
    """Make conversation memory as it was before this turn's first attempt.

    The SDK writes the user input and new items to the session during the run; a crashed or
    failed attempt may have written part of them. The length before the first attempt is kept
    on the turn record, and a retry pops anything past it, so memory holds each turn once.
    """
    length = len(await session.get_items())
    base = await redis.hget(keys.turn(turn_id), "memory_base")
    if base is None:
        await redis.hset(keys.turn(turn_id), "memory_base", length)
        return
    for _ in range(length - int(base)):
        await session.pop_item()


async def run_turn(ctx: dict[str, Any], turn_id: str, conversation_id: str) -> str:
    rt: Runtime = ctx["runtime"]
    started_at = utcnow()
    decision = await rt.queue.start(turn_id, conversation_id, rt.worker_name, started_at.isoformat())
    if decision.attempt == 0:
        log.info("turn.skipped", turn_id=turn_id, reason=decision.status)
        return decision.status
    req = await rt.queue.get_request(turn_id)
    assert req is not None  # start() checked the record exists
    attempt = decision.attempt
    queue_wait_ms = max(0.0, (started_at - req.enqueued_at).total_seconds() * 1000)
    hooks = TelemetryHooks(
        turn_id=turn_id,
        attempt=attempt,
        conversation_id=conversation_id,
        customer_id=req.customer_id,
        model_name=rt.model_name,
        redactor=rt.redactor,
        include_data=rt.settings.trace_include_sensitive_data,
    )
    log_ctx = structlog.get_logger(__name__).bind(
        turn_id=turn_id, conversation_id=conversation_id, attempt=attempt
    )

    if attempt > rt.settings.max_attempts:
        # Earlier attempts died with their worker (nothing recorded them): give up cleanly.
        message = f"{attempt - 1} attempts started and none finished (worker lost each time)"
        hooks.turn_errored(terminal=True, duration_ms=0.0, error_type="AttemptsExhausted", message=message)
        await _finish_failed(rt, req, hooks, attempt - 1, started_at, queue_wait_ms,
                             "AttemptsExhausted", message)
        log_ctx.warning("turn.failed", error_type="AttemptsExhausted")
        return "failed"

    current_agent = await rt.redis.hget(keys.conversation_state(conversation_id), "current_agent")
    agent = rt.desk.starting_agent(current_agent)
    hooks.turn_started(queue_wait_ms, agent.name)
    session = RedisSession(
        session_id=keys.session_id(conversation_id),
        redis_client=rt.redis,
        key_prefix=keys.SESSION_PREFIX,
        ttl=rt.settings.session_ttl_s,
    )
    context = TurnContext(
        turn_id=turn_id,
        conversation_id=conversation_id,
        customer_id=req.customer_id,
        attempt=attempt,
        redis=rt.redis,
        metadata=dict(req.metadata),
    )
    tracing_off = rt.settings.tracing_disabled or not req.trace
    trace_id: str | None = None
    t0 = time.perf_counter()
    try:
        await _reset_memory(session, rt.redis, turn_id)
        async with asyncio.timeout(rt.settings.turn_timeout_s):
            with trace(
                rt.settings.workflow_name,
                group_id=conversation_id,
                metadata={
                    "customer_id": req.customer_id,
                    "turn_id": turn_id,
                    "attempt": str(attempt),
                    "channel": req.metadata.get("channel", ""),
                },
                disabled=tracing_off,
            ) as current_trace:
                trace_id = None if tracing_off else current_trace.trace_id
                result = await Runner.run(
                    agent,
                    req.text,
                    context=context,
                    hooks=hooks,
                    session=session,
                    max_turns=rt.settings.max_agent_turns,
                    run_config=RunConfig(
                        workflow_name=rt.settings.workflow_name,
                        group_id=conversation_id,
                        tracing_disabled=tracing_off,
                        trace_include_sensitive_data=rt.settings.trace_include_sensitive_data,
                    ),
                )
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, none is lost
        duration_ms = (time.perf_counter() - t0) * 1000
        error_type = "TurnTimeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        message = str(exc) or error_type
        terminal = isinstance(exc, DETERMINISTIC_ERRORS) or attempt >= rt.settings.max_attempts
        await _keep_trace(rt, trace_id, req, hooks, attempt, started_at, "failed", duration_ms)
        hooks.turn_errored(terminal=terminal, duration_ms=duration_ms, error_type=error_type, message=message)
        if terminal:
            await _finish_failed(rt, req, hooks, attempt, started_at, queue_wait_ms,
                                 error_type, message)
            log_ctx.warning("turn.failed", error_type=error_type, error=message)
            return "failed"
        await rt.queue.record_attempt_failure(
            turn_id,
            AttemptError(attempt=attempt, error_type=error_type, message=message, usage=hooks.usage),
            hooks.batch_json(),
            events_ttl_s=rt.settings.trace_retention_s,
        )
        log_ctx.warning("turn.attempt_failed", error_type=error_type, error=message)
        raise Retry(defer=rt.settings.retry_delay_s * attempt) from exc
    finally:
        flush_traces()

    duration_ms = (time.perf_counter() - t0) * 1000
    final = str(result.final_output)
    await _keep_trace(rt, trace_id, req, hooks, attempt, started_at, "completed", duration_ms)
    hooks.turn_completed(duration_ms, queue_wait_ms, final)
    turn_result = _turn_result(
        rt, req, hooks, attempt, started_at, queue_wait_ms, "completed",
        errors=await rt.queue.errors(turn_id), final_output=final, duration_ms=duration_ms,
    )
    await rt.queue.finish(turn_result, hooks.batch_json(), current_agent=result.last_agent.name,
                          events_ttl_s=rt.settings.trace_retention_s)
    log_ctx.info("turn.completed", duration_ms=round(duration_ms, 1), agent=result.last_agent.name,
                 tokens=hooks.usage.total_tokens)
    return "completed"


async def _keep_trace(
    rt: Runtime,
    trace_id: str | None,
    req: TurnRequest,
    hooks: TelemetryHooks,
    attempt: int,
    started_at: datetime,
    status: str,
    duration_ms: float,
) -> None:
    """Hand the attempt's trace to the store (sampling, redaction, one write)."""
    if rt.traces is None:
        return
    _kept, dropped = await rt.traces.finish_attempt(
        trace_id,
        {
            "turn_id": req.turn_id,
            "attempt": attempt,
            "conversation_id": req.conversation_id,
            "customer_id": req.customer_id,
            "status": status,
            "started_at": started_at.isoformat(),
            "ended_at": utcnow().isoformat(),
        },
        failed=status == "failed",
        duration_ms=duration_ms,
    )
    hooks.spans_dropped(dropped)


def _turn_result(
    rt: Runtime,
    req: TurnRequest,
    hooks: TelemetryHooks,
    attempt: int,
    started_at: datetime,
    queue_wait_ms: float,
    status: str,
    **outcome: Any,
) -> TurnResult:
    return TurnResult(
        turn_id=req.turn_id,
        conversation_id=req.conversation_id,
        customer_id=req.customer_id,
        status=status,  # type: ignore[arg-type]
        text=req.text,
        agents=list(hooks.agents),
        tool_calls=hooks.tool_calls,
        handoffs=hooks.handoffs,
        model=rt.model_name,
        usage=hooks.usage,
        attempts=attempt,
        enqueued_at=req.enqueued_at,
        started_at=started_at,
        finished_at=utcnow(),
        queue_wait_ms=queue_wait_ms,
        worker=rt.worker_name,
        **outcome,
    )


async def _finish_failed(
    rt: Runtime,
    req: TurnRequest,
    hooks: TelemetryHooks,
    attempt: int,
    started_at: datetime,
    queue_wait_ms: float,
    error_type: str,
    message: str,
) -> None:
    errors = await rt.queue.errors(req.turn_id)
    errors.append(AttemptError(attempt=attempt, error_type=error_type, message=message))
    result = _turn_result(
        rt, req, hooks, attempt, started_at, queue_wait_ms, "failed",
        errors=errors, error_type=error_type, error_message=message,
    )
    await rt.queue.finish(result, hooks.batch_json(), events_ttl_s=rt.settings.trace_retention_s)
