"""The arq job: run one Support Desk turn, then record its outcome and wake the next turn.

The job for turn T runs only while T is the head of its conversation's queue (see
``turnfleet/queue.py``), so turns of one conversation never overlap. Every attempt ends in
exactly one of: a completed result, a recorded failed attempt that arq runs again
(``Retry``), or a terminal failure; the finish script writes the result, the telemetry batch
and the next turn's job atomically.

**Crash recovery within a bound.** ``START`` gives the attempt a number (its fencing token)
and a lease: arq's in-progress key for the turn, set to expire in ``turn_lease_s`` instead of
arq's ``job_timeout`` + 10 s and renewed every ``turn_lease_s / 3`` by ``Lease`` while the
attempt runs. A SIGKILLed worker stops renewing; its turn is claimed again by another worker
at most ``turn_lease_s`` + ``poll_delay_s`` after the kill (10.01 s by default) when one has
a free slot (a saturated fleet adds its wait for a slot, see ``turnfleet/queue.py``), and the
next ``START`` records the lost attempt as ``WorkerLost``. (A worker killed in the
millisecond between arq's claim and ``START`` leaves arq's longer key; the reconciler cuts it
to one lease, so that case waits at most ``reconcile_every_s`` + ``turn_lease_s``.)

**Worker losses are not charged alike** (``workers/isolation.py``). A turn found lost after
running beside other turns is handed to the isolated lane by ``START`` (``run_turn`` returns
``isolate`` and arq's clean-up of the job is skipped: the job lives on in the other queue);
its lost attempt is ``spared``, so ``max_attempts`` counts ``attempt - spared``. A turn lost
while it ran alone comes back from ``START`` as ``poison`` after
``TURNFLEET_ISOLATED_LOSSES`` such losses, and ends ``failed`` with ``WorkerLost``.

**Never twice at once.** Outcome writes carry the attempt number and are refused unless the
attempt is still the turn's running attempt. A worker that stalled past its lease (paused,
partitioned) while another took the turn over learns it at its next renewal — the attempt
is cancelled — or at its outcome write, which is refused; either way it logs
``turn.result_dropped`` and writes nothing, and arq's clean-up for it is skipped
(``Runtime.fenced``, see ``workers.settings.TurnWorker``) so the new attempt's job and lease
are left alone.

**Drain.** When the worker stops (``Runtime.stopping``), attempts still running after the
drain grace are cancelled: each records a ``WorkerStopped`` attempt error (with what it had
spent) and re-raises, and arq puts the job back for another worker.

**Guardrails.** A tripwire is an outcome, not a failure: the turn completes with the reply
the workflow defines for that guardrail (``desk.guardrail_reply``), a ``guardrail`` event is
recorded, and the run's memory is not written (the refused message must not steer later
turns). It feeds no error rate and raises no alert.

**Undecodable jobs and records.** ``record_undecodable`` is what a payload
``deserialize_job`` could not decode runs: it ends the turn ``failed`` (``UndecodableJob``)
and wakes its conversation. A turn whose stored request cannot be decoded ends the same way
(``CorruptTurnRecord``) when its job starts: a retry would read the same bytes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import structlog
from agents import RunConfig, Runner, flush_traces, trace
from agents.exceptions import (
    InputGuardrailTripwireTriggered,
    MaxTurnsExceeded,
    ModelBehaviorError,
    OutputGuardrailTripwireTriggered,
    UserError,
)
from arq import Retry
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from turnfleet import keys
from turnfleet.models import AttemptError, TurnRequest, TurnResult, utcnow
from turnfleet.queue import CORRUPT_TURN_RECORD, CorruptRecord, Lane, Outcome, StartDecision, TurnQueue
from turnfleet.redaction import Redactor
from turnfleet.settings import WorkerProcessSettings
from workers.context import TurnContext
from workers.hooks import TelemetryHooks
from workers.memory import ConversationMemory, MemoryFenced
from workers.trace_store import TraceStore

log = structlog.get_logger(__name__)

# Failures that a second attempt would repeat: fail the turn at once. (A guardrail tripwire
# is no failure: the turn completes with the reply the workflow defines, ``_guardrail_outcome``.)
DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (
    MaxTurnsExceeded,
    ModelBehaviorError,
    UserError,
)

STALE = "stale"  # what run_turn returns when its attempt lost the turn to another one
WORKER_LOST = "WorkerLost"  # error type of a lost attempt, and of a turn that kills its worker

T = TypeVar("T")


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
    # Job ids whose attempt was fenced out: arq must not delete the job or in-progress key
    # they share with the attempt that now owns the turn.
    fenced: set[str] = field(default_factory=set)
    stopping: bool = False  # the worker is draining: a cancelled attempt is "WorkerStopped"


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Lease:
    """Keeps a running attempt's lease (arq's in-progress key for the turn) alive.

    Renewed every ``turn_lease_s / 3`` while the attempt runs. A renewal that finds the
    attempt no longer owns the turn (it stalled past its lease and another worker started a
    newer attempt) sets ``lost`` and cancels the attempt: its outcome would be refused anyway.
    A renewal that fails on a Redis error is logged and tried again at the next tick.
    """

    def __init__(self, rt: Runtime, turn_id: str, attempt: int) -> None:
        self.rt = rt
        self.turn_id = turn_id
        self.attempt = attempt
        self.lost = False
        self._job = asyncio.current_task()
        self._keeper: asyncio.Task[None] | None = None
        if rt.settings.turn_lease_s > 0:
            self._keeper = asyncio.create_task(self._keep(), name=f"lease:{turn_id}")

    async def _keep(self) -> None:
        lease_s = self.rt.settings.turn_lease_s
        while True:
            await asyncio.sleep(lease_s / 3)
            try:
                held = await self.rt.queue.renew_lease(self.turn_id, self.attempt, self.rt.worker_name, lease_s)
            except RedisError as exc:
                log.warning("turn.lease_renew_failed", turn_id=self.turn_id, attempt=self.attempt, error=str(exc))
                continue
            if not held:
                self.lost = True
                log.warning("turn.lease_lost", turn_id=self.turn_id, attempt=self.attempt,
                            action="attempt cancelled; a newer attempt owns the turn")
                if self._job is not None:
                    self._job.cancel()
                return

    async def stop(self) -> None:
        """Stop renewing (before the outcome write, and at the end). Idempotent."""
        keeper, self._keeper = self._keeper, None
        if keeper is not None and not keeper.done():
            keeper.cancel()
            await asyncio.wait([keeper])  # never swallows a cancellation of the caller


async def _durably(rt: Runtime, what: str, write: Callable[[], Awaitable[T]]) -> T:
    """An outcome write, retried on connection errors for up to one lease (Redis restarting).

    Retrying is safe: the writes are fenced, so a write that landed before its reply was lost
    comes back ``DUPLICATE`` (finish) or ``FENCED`` (attempt failure), never twice.
    """
    deadline = time.monotonic() + max(rt.settings.turn_lease_s, 1.0)
    delay = 0.1
    while True:
        try:
            return await write()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("turn.outcome_write_retry", what=what, error=str(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def _dropped(rt: Runtime, turn_id: str, outcome: Outcome, log_ctx: Any, what: str) -> str:
    """A refused outcome write: log it, and keep arq's hands off the newer attempt's job."""
    if outcome is Outcome.FENCED:
        rt.fenced.add(turn_id)
    log_ctx.warning("turn.result_dropped", what=what, outcome=outcome.value,
                    reason="another attempt owns the turn" if outcome is Outcome.FENCED
                    else "the turn had already ended")
    return STALE


async def run_turn(ctx: dict[str, Any], turn_id: str, conversation_id: str) -> str:
    """arq job: one attempt of a turn. Returns how it ended (``completed``, ``failed``,
    ``stale``, or why it did not run); raises ``Retry`` after a transient failure and
    ``CancelledError`` when the worker stops before the attempt ends (arq requeues both).

    Redis going away mid-attempt (beyond what ``_durably`` retries) is a ``Retry`` too, not a
    job failure: arq would delete a failed job, and the turn would wait for the reconciler.
    The attempt, if it had started, is recorded as ``WorkerLost`` by the next ``START``.
    """
    rt: Runtime = ctx["runtime"]
    job_id = ctx.get("job_id")
    if job_id is not None and job_id != turn_id:
        # A payload someone rewrote to name another turn: fail the job's own turn instead.
        return await record_undecodable(ctx, "its arguments name another turn than its job id")
    # The lane the job's arq Worker serves (``workers/isolation.py``); none when arq runs
    # the settings directly: one plain lane.
    lane = Lane(ctx.get("lane", Lane.PLAIN.value))
    try:
        return await _run_turn(rt, turn_id, conversation_id, lane)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        log.warning("turn.redis_unavailable", turn_id=turn_id, error=str(exc),
                    retry_in_s=rt.settings.retry_delay_s)
        raise Retry(defer=rt.settings.retry_delay_s) from exc


async def _run_turn(rt: Runtime, turn_id: str, conversation_id: str, lane: Lane) -> str:
    started_at = utcnow()
    decision = await rt.queue.start(
        turn_id, conversation_id, rt.worker_name, started_at.isoformat(), lease_s=rt.settings.turn_lease_s,
        lane=lane, isolated_losses=rt.settings.isolated_losses,
    )
    if decision.status == "isolate":
        # START moved the job to the isolated lane: arq must not delete it or its new place.
        rt.fenced.add(turn_id)
        log.warning("turn.isolated", turn_id=turn_id, conversation_id=conversation_id,
                    reason="lost with its worker beside other turns; runs alone next")
        return decision.status
    if decision.attempt == 0:
        log.info("turn.skipped", turn_id=turn_id, reason=decision.status)
        return decision.status
    if decision.corrupt:
        message = f"the turn's record in Redis is corrupt: {decision.corrupt}"
        return await _fail_unrunnable(rt, decision, started_at, CORRUPT_TURN_RECORD, message,
                                      log.bind(turn_id=turn_id))
    lease = Lease(rt, turn_id, decision.attempt)
    try:
        return await _run_attempt(rt, turn_id, conversation_id, decision, started_at, lease)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not lease.lost or (task is not None and task.uncancel() > 0):
            raise  # the worker is stopping (or arq timed the job out): arq requeues it
        rt.fenced.add(turn_id)
        log.warning("turn.result_dropped", turn_id=turn_id, attempt=decision.attempt,
                    what="attempt", outcome="fenced", reason="lease lost to a newer attempt")
        return STALE
    finally:
        await lease.stop()


async def _run_attempt(
    rt: Runtime, turn_id: str, conversation_id: str, decision: StartDecision, started_at: datetime,
    lease: Lease,
) -> str:
    attempt = decision.attempt
    req = decision.request
    assert req is not None  # start() checked the record exists and read it
    queue_wait_ms = max(0.0, (started_at - req.enqueued_at).total_seconds() * 1000)
    hooks = _hooks(rt, req, attempt)
    log_ctx = structlog.get_logger(__name__).bind(
        turn_id=turn_id, conversation_id=conversation_id, attempt=attempt
    )

    if decision.status == "poison":
        # Its worker died while it ran alone there: the turn is the likeliest cause.
        message = (f"the turn's worker was lost while it ran alone on it "
                   f"({rt.settings.isolated_losses} time(s)), after a loss beside other turns: "
                   f"it is taken for the cause and not run again")
        hooks.turn_errored(terminal=True, duration_ms=0.0, error_type=WORKER_LOST, message=message)
        await lease.stop()
        outcome = await _finish_failed(rt, req, hooks, attempt - 1, started_at, queue_wait_ms,
                                       WORKER_LOST, message, fence=attempt)
        if not outcome:
            return _dropped(rt, turn_id, outcome, log_ctx, "result")
        log_ctx.error("turn.failed", error_type=WORKER_LOST, attempts=attempt - 1, poison=True)
        return "failed"
    if attempt - decision.spared > rt.settings.max_attempts:
        # Earlier attempts died with their worker or were stopped by a drain: give up cleanly.
        message = f"{attempt - 1} attempts started and none finished (worker lost or stopped each time)"
        hooks.turn_errored(terminal=True, duration_ms=0.0, error_type="AttemptsExhausted", message=message)
        await lease.stop()
        outcome = await _finish_failed(rt, req, hooks, attempt - 1, started_at, queue_wait_ms,
                                       "AttemptsExhausted", message, fence=attempt)
        if not outcome:
            return _dropped(rt, turn_id, outcome, log_ctx, "result")
        log_ctx.warning("turn.failed", error_type="AttemptsExhausted", attempts=attempt - 1)
        return "failed"

    agent = rt.desk.starting_agent(decision.current_agent)
    hooks.turn_started(queue_wait_ms, agent.name)
    session = ConversationMemory(
        rt.redis, conversation_id, turn_id=turn_id, attempt=attempt, ttl_s=rt.settings.session_ttl_s,
        buffered=True,
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
    tripped: InputGuardrailTripwireTriggered | OutputGuardrailTripwireTriggered | None = None
    t0 = time.perf_counter()
    try:
        if decision.memory_length > decision.memory_base:
            # An earlier attempt wrote memory and then died before its result: undo that.
            await session.truncate(decision.memory_base)
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
                try:
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
                except (InputGuardrailTripwireTriggered, OutputGuardrailTripwireTriggered) as exc:
                    tripped = exc
        if tripped is None:
            # The run's memory items, in one fenced write (refused if a newer attempt took over).
            await session.flush()
        # A tripped guardrail's message is not kept in memory: it must not steer later turns.
    except asyncio.CancelledError:
        if lease.lost:
            raise  # run_turn drops it: a newer attempt owns the turn
        # The worker is stopping (drain grace ran out) or arq timed the job out. Record the
        # attempt (what it spent included) so the turn is neither lost nor stuck "running",
        # then let arq requeue the job. Shielded: a second cancel must not cut the record.
        duration_ms = (time.perf_counter() - t0) * 1000
        error_type = "WorkerStopped" if rt.stopping else "Cancelled"
        message = (
            f"worker {rt.worker_name} stopped before the attempt ended (drain grace "
            f"{rt.settings.drain_grace_s:g}s ran out); the turn runs again"
            if rt.stopping else "the attempt was cancelled before it ended; the turn runs again"
        )
        await asyncio.shield(_record_cancelled(
            rt, req, hooks, attempt, started_at, trace_id, duration_ms, error_type, message, lease, log_ctx
        ))
        raise
    except MemoryFenced:
        # A newer attempt owns the turn (this worker stalled past its lease): its memory
        # write was refused, and nothing else of this attempt may be written either.
        return _dropped(rt, turn_id, Outcome.FENCED, log_ctx, "conversation memory")
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, none is lost
        duration_ms = (time.perf_counter() - t0) * 1000
        error_type = "TurnTimeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        message = str(exc) or error_type
        terminal = isinstance(exc, DETERMINISTIC_ERRORS) or attempt - decision.spared >= rt.settings.max_attempts
        await _keep_trace(rt, trace_id, req, hooks, attempt, started_at, "failed", duration_ms)
        hooks.turn_errored(terminal=terminal, duration_ms=duration_ms, error_type=error_type, message=message)
        await lease.stop()
        if terminal:
            outcome = await _finish_failed(rt, req, hooks, attempt, started_at, queue_wait_ms,
                                           error_type, message, fence=attempt)
            if not outcome:
                return _dropped(rt, turn_id, outcome, log_ctx, "result")
            log_ctx.warning("turn.failed", error_type=error_type, error=message)
            return "failed"
        error = AttemptError(attempt=attempt, error_type=error_type, message=message, usage=hooks.usage)
        batch = hooks.batch_json()
        outcome = await _durably(rt, "attempt failure", lambda: rt.queue.record_attempt_failure(
            turn_id, error, batch, events_ttl_s=rt.settings.trace_retention_s, fence=attempt,
        ))
        if not outcome:
            return _dropped(rt, turn_id, outcome, log_ctx, "attempt failure")
        log_ctx.warning("turn.attempt_failed", error_type=error_type, error=message)
        raise Retry(defer=rt.settings.retry_delay_s * attempt) from exc
    finally:
        flush_traces()

    duration_ms = (time.perf_counter() - t0) * 1000
    if tripped is not None:
        final, last_agent = _guardrail_outcome(rt, hooks, tripped, agent.name, log_ctx)
    else:
        final, last_agent = str(result.final_output), result.last_agent.name
    await _keep_trace(rt, trace_id, req, hooks, attempt, started_at, "completed", duration_ms)
    hooks.turn_completed(duration_ms, queue_wait_ms, final)
    turn_result = _turn_result(
        rt, req, hooks, attempt, started_at, queue_wait_ms, "completed",
        errors=await rt.queue.errors(turn_id) if decision.errors else [], final_output=final,
        duration_ms=duration_ms, warnings=session.warnings,
    )
    await lease.stop()
    batch = hooks.batch_json()
    outcome = await _durably(rt, "result", lambda: rt.queue.finish(
        turn_result, batch, current_agent=last_agent,
        events_ttl_s=rt.settings.trace_retention_s, fence=attempt,
    ))
    if not outcome:
        return _dropped(rt, turn_id, outcome, log_ctx, "result")
    log_ctx.info("turn.completed", duration_ms=round(duration_ms, 1), agent=last_agent,
                 tokens=hooks.usage.total_tokens)
    return "completed"


def _guardrail_outcome(
    rt: Runtime,
    hooks: TelemetryHooks,
    tripped: InputGuardrailTripwireTriggered | OutputGuardrailTripwireTriggered,
    starting_agent: str,
    log_ctx: Any,
) -> tuple[str, str]:
    """A tripped guardrail as the turn's outcome: the workflow's safe reply (and the agent the
    next turn starts at), with a ``guardrail`` event recorded for telemetry."""
    found = tripped.guardrail_result
    name = found.guardrail.get_name()
    kind = "input" if isinstance(tripped, InputGuardrailTripwireTriggered) else "output"
    agent = getattr(found, "agent", None)
    agent_name = agent.name if agent is not None else starting_agent
    hooks.guardrail_tripped(name, agent_name, kind)
    log_ctx.info("turn.guardrail_tripped", guardrail=name, kind=kind, agent=agent_name)
    return rt.desk.guardrail_reply(name), agent_name


async def _record_cancelled(
    rt: Runtime,
    req: TurnRequest,
    hooks: TelemetryHooks,
    attempt: int,
    started_at: datetime,
    trace_id: str | None,
    duration_ms: float,
    error_type: str,
    message: str,
    lease: Lease,
    log_ctx: Any,
) -> None:
    await lease.stop()
    try:
        await _keep_trace(rt, trace_id, req, hooks, attempt, started_at, "failed", duration_ms)
    except RedisError as exc:
        log_ctx.warning("turn.trace_not_kept", error=str(exc))
    hooks.turn_errored(terminal=False, duration_ms=duration_ms, error_type=error_type, message=message)
    error = AttemptError(attempt=attempt, error_type=error_type, message=message, usage=hooks.usage)
    try:
        outcome = await rt.queue.record_attempt_failure(
            req.turn_id, error, hooks.batch_json(), events_ttl_s=rt.settings.trace_retention_s, fence=attempt
        )
    except RedisError as exc:
        # Not recorded: the turn stays "running" until its lease lapses, then the next
        # attempt records this one as WorkerLost.
        log_ctx.error("turn.attempt_cancelled", error_type=error_type, recorded=False, error=str(exc))
        return
    if not outcome:
        _dropped(rt, req.turn_id, outcome, log_ctx, "attempt failure")
        return
    log_ctx.warning("turn.attempt_cancelled", error_type=error_type, recorded=True)


async def record_undecodable(ctx: dict[str, Any], reason: str) -> str:
    """arq job for a payload ``deserialize_job`` could not decode (see its docstring).

    The job id is the turn id: the turn ends ``failed`` with ``UndecodableJob`` (counted as
    one attempt, in telemetry and alerts like any failure) and its conversation moves on.
    Not retried: the payload would not decode better next time. A job id that is no turn,
    or a turn that may not run now, is logged and its job dropped.
    """
    rt: Runtime = ctx["runtime"]
    turn_id = str(ctx.get("job_id", ""))
    log_ctx = log.bind(turn_id=turn_id)
    try:
        req = await rt.queue.get_request(turn_id)
        conversation_id = req.conversation_id if req is not None else None
    except CorruptRecord:
        # The turn's request is corrupt too: the record still names its conversation.
        conversation_id = await rt.queue.conversation_of(turn_id)
    if conversation_id is None:
        # No turn (or a record from before it named its conversation, whose job the
        # reconciler writes again; that job then ends the turn CorruptTurnRecord).
        log_ctx.error("job.undecodable", reason=reason, action="dropped", why="no such turn")
        return "unknown"
    started_at = utcnow()
    decision = await rt.queue.start(
        turn_id, conversation_id, rt.worker_name, started_at.isoformat(), lease_s=rt.settings.turn_lease_s
    )
    if decision.attempt == 0:
        log_ctx.warning("job.undecodable", reason=reason, action="dropped", why=decision.status)
        return decision.status
    message = f"the turn's job payload in Redis could not be decoded: {reason}"
    if decision.corrupt:
        message += f"; {decision.corrupt}"
    return await _fail_unrunnable(rt, decision, started_at, "UndecodableJob", message, log_ctx)


async def _fail_unrunnable(
    rt: Runtime, decision: StartDecision, started_at: datetime, error_type: str, message: str, log_ctx: Any,
) -> str:
    """End a started turn ``failed`` at once, without running it: its job or its record
    cannot be decoded, and would not decode better on a retry. The finish script records the
    failure (one attempt, telemetry, alerts like any failure) and wakes the conversation's
    next turn."""
    req = decision.request
    assert req is not None
    queue_wait_ms = max(0.0, (started_at - req.enqueued_at).total_seconds() * 1000) if req.enqueued_at else None
    hooks = _hooks(rt, req, decision.attempt)
    hooks.turn_errored(terminal=True, duration_ms=0.0, error_type=error_type, message=message)
    outcome = await _finish_failed(rt, req, hooks, decision.attempt, started_at, queue_wait_ms,
                                   error_type, message, fence=decision.attempt)
    if not outcome:
        return _dropped(rt, req.turn_id, outcome, log_ctx, "result")
    log_ctx.error("turn.failed", error_type=error_type, error=message, conversation_id=req.conversation_id)
    return "failed"


def _hooks(rt: Runtime, req: TurnRequest, attempt: int) -> TelemetryHooks:
    """The collector of one attempt's telemetry events."""
    return TelemetryHooks(
        turn_id=req.turn_id,
        attempt=attempt,
        conversation_id=req.conversation_id,
        customer_id=req.customer_id,
        model_name=rt.model_name,
        redactor=rt.redactor,
        include_data=rt.settings.trace_include_sensitive_data,
    )


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
    queue_wait_ms: float | None,
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
    queue_wait_ms: float | None,
    error_type: str,
    message: str,
    fence: int | None = None,
) -> Outcome:
    errors = await rt.queue.errors(req.turn_id)
    errors.append(AttemptError(attempt=attempt, error_type=error_type, message=message))
    result = _turn_result(
        rt, req, hooks, attempt, started_at, queue_wait_ms, "failed",
        errors=errors, error_type=error_type, error_message=message,
    )
    batch = hooks.batch_json()
    return await _durably(rt, "result", lambda: rt.queue.finish(
        result, batch, events_ttl_s=rt.settings.trace_retention_s, fence=fence,
    ))
