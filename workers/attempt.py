"""One attempt of a turn, from the moment ``START`` counted it to its one recorded outcome.

``workers/job.py`` decides whether a job may run at all (``START``); what happens after that
is this module's: an :class:`Attempt` owns everything one attempt needs (the worker's
:class:`Runtime`, the stored request, its telemetry hooks, lease, trace, timing and logger),
so the steps below are methods with few arguments instead of functions passing those
around.

**Lifecycle.** ``Attempt(rt, decision, started_at)`` is built from ``START``'s decision;
then exactly one of

- :meth:`Attempt.run`: take the lease, and either give the turn up at once
  (:meth:`~Attempt.exhausted`: poison, or ``max_attempts`` used up by lost attempts) or run
  the agent, ending in :meth:`~Attempt.complete` (result written, next turn woken),
  :meth:`~Attempt.fail` (attempt error recorded and ``Retry`` raised, or the turn failed
  for good) or :meth:`~Attempt.cancelled` (worker stopping: attempt error recorded, the
  cancellation re-raised so arq requeues the job);
- :meth:`Attempt.unrunnable`: the turn's job or record cannot be decoded; it ends ``failed``
  without running (a retry would read the same bytes).

Each outcome is one fenced write (``turnfleet/queue.py``): refused unless this attempt is
still the turn's running attempt, and retried on connection errors for up to one lease
(:func:`durably`).

**Never twice at once.** A worker that stalled past its lease (paused, partitioned) while
another took the turn over learns it at its next renewal — the attempt is cancelled — or at
its outcome write, which is refused; either way it logs ``turn.result_dropped`` and writes
nothing, and arq's clean-up for it is skipped (``Runtime.fenced``, see
``turnfleet.workers.supervisor.TurnWorker``) so the new attempt's job and lease are left alone.

**Drain.** When the worker stops (``Runtime.stopping``), attempts still running after the
drain grace are cancelled: each records a ``WorkerStopped`` attempt error (with what it had
spent) and re-raises, and arq puts the job back for another worker.

**Guardrails.** A tripwire is an outcome, not a failure: the turn completes with the reply
the workflow defines for that guardrail (``desk.guardrail_reply``), a ``guardrail`` event is
recorded, and the run's memory is not written (the refused message must not steer later
turns). It feeds no error rate and raises no alert.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import structlog
from agents import Agent, RunConfig, Runner, RunResult, flush_traces, trace
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

from turnfleet.models import AttemptError, TurnResult, utcnow
from turnfleet.queue import FinishExtras, Outcome, StartDecision, TurnQueue
from turnfleet.redaction import Redactor
from turnfleet.settings import WorkerProcessSettings
from turnfleet.workflow import App, Workflow
from turnfleet.context import TurnContext
from turnfleet.workers.hooks import ChainedHooks, TelemetryHooks
from turnfleet.workers.llm import WorkerModels
from turnfleet.workers.memory import ConversationMemory, MemoryFenced
from turnfleet.workers.trace_store import Kept, TraceStore

log = structlog.get_logger(__name__)

# Failures that a second attempt would repeat: fail the turn at once. (A guardrail tripwire
# is no failure: the turn completes with the reply the workflow defines, ``Attempt._guardrail``.)
DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (
    MaxTurnsExceeded,
    ModelBehaviorError,
    UserError,
)

STALE = "stale"  # what an attempt returns when it lost the turn to another one
WORKER_LOST = "WorkerLost"  # error type of a lost attempt, and of a turn that kills its worker
UNKNOWN_WORKFLOW = "UnknownWorkflow"  # a turn for a workflow this worker does not serve (safety net)

Tripwire = InputGuardrailTripwireTriggered | OutputGuardrailTripwireTriggered
T = TypeVar("T")


@dataclass
class Runtime:
    """What every job of a worker process shares; built once in ``on_startup``."""

    settings: WorkerProcessSettings
    redis: Redis
    queue: TurnQueue
    app: App  # the workflows this worker serves (turnfleet.App; the Support Desk by default)
    model_name: str
    worker_name: str
    redactor: Redactor | None = None
    traces: TraceStore | None = None
    # Job ids whose attempt was fenced out: arq must not delete the job or in-progress key
    # they share with the attempt that now owns the turn.
    fenced: set[str] = field(default_factory=set)
    # Job ids whose finish script did arq's clean-up of the job: arq's own is skipped.
    cleaned: set[str] = field(default_factory=set)
    stopping: bool = False  # the worker is draining: a cancelled attempt is "WorkerStopped"
    # Per workflow name: models for agents that name one (or none) instead of holding a Model
    # object (workers/llm.py WorkerModels).
    models: Mapping[str, WorkerModels] | None = None
    # Each served workflow's version_label(), computed once (hashing every agent's
    # instructions and tool schemas is not work to repeat per turn).
    version_labels: dict[str, str] = field(default_factory=dict)

    def version_of(self, workflow: Workflow) -> str:
        """The version label every turn this process runs of ``workflow`` records."""
        label = self.version_labels.get(workflow.name)
        if label is None:
            label = self.version_labels[workflow.name] = workflow.version_label()
        return label


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


async def durably(rt: Runtime, what: str, write: Callable[[], Awaitable[T]]) -> T:
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


class Attempt:
    """One started attempt of a turn (see the module doc for its lifecycle).

    ``number`` is the attempt's fencing token: every outcome write carries it and is refused
    once a newer attempt owns the turn.
    """

    def __init__(self, rt: Runtime, decision: StartDecision, started_at: datetime,
                 source_queue: str | None = None) -> None:
        """``source_queue``: the arq queue the turn's job was taken from, when the worker lets
        the finish script clean the job up as arq would (``Runtime.cleaned``)."""
        req = decision.request
        assert req is not None  # start() checked the record exists and read it (or stood in)
        self.rt = rt
        self.decision = decision
        self.req = req
        self.number = decision.attempt
        self.started_at = started_at
        self.source_queue = source_queue
        # None for a stand-in request (its record was unreadable: no enqueue time known).
        self.queue_wait_ms = (None if req.enqueued_at is None
                              else max(0.0, (started_at - req.enqueued_at).total_seconds() * 1000))
        self.hooks = TelemetryHooks(
            turn_id=req.turn_id,
            attempt=self.number,
            conversation_id=req.conversation_id,
            customer_id=req.customer_id,
            model_name=rt.model_name,
            redactor=rt.redactor,
            include_data=rt.settings.trace_include_sensitive_data,
        )
        self.log = log.bind(turn_id=req.turn_id, conversation_id=req.conversation_id, attempt=self.number)
        self.lease: Lease | None = None  # taken by run(); an unrunnable turn has none
        self.trace_id: str | None = None  # the run's trace, if traced
        self._t0 = 0.0  # perf_counter() when the run began
        self.workflow: Workflow | None = None  # the turn's workflow, found by run()
        self.version: str | None = None  # its version_label(), once found

    # -- running ---------------------------------------------------------------------

    async def run(self) -> str:
        """Run the attempt to its outcome under a lease. Returns ``completed``, ``failed`` or
        ``stale``; raises ``Retry`` after a transient failure and ``CancelledError`` when the
        worker stops (or arq times the job out) before the attempt ends.

        A cancellation that comes from the lease (a newer attempt owns the turn) is the
        attempt's own, not the worker's: it is taken back (``uncancel``) and the attempt
        ends ``stale`` with nothing written. Any other cancellation is re-raised.
        """
        self.lease = Lease(self.rt, self.req.turn_id, self.number)
        try:
            return await self._run()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self.lease.lost or (task is not None and task.uncancel() > 0):
                raise  # the worker is stopping (or arq timed the job out): arq requeues it
            self.rt.fenced.add(self.req.turn_id)
            log.warning("turn.result_dropped", turn_id=self.req.turn_id, attempt=self.number,
                        what="attempt", outcome="fenced", reason="lease lost to a newer attempt")
            return STALE
        finally:
            await self.lease.stop()

    async def _run(self) -> str:
        rt, decision = self.rt, self.decision
        if decision.status == "poison":
            # Its worker died while it ran alone there: the turn is the likeliest cause.
            return await self.exhausted(WORKER_LOST, (
                f"the turn's worker was lost while it ran alone on it "
                f"({rt.settings.isolated_losses} time(s)), after a loss beside other turns: "
                f"it is taken for the cause and not run again"))
        if self.number - decision.spared > rt.settings.max_attempts:
            # Earlier attempts died with their worker or were stopped by a drain: give up cleanly.
            return await self.exhausted("AttemptsExhausted", (
                f"{self.number - 1} attempts started and none finished "
                f"(worker lost or stopped each time)"))
        self.workflow = rt.app.get(self.req.agent)
        if self.workflow is None:
            # A safety net: each workflow's turns are queued only in its own queues, which only
            # workers serving it read (routing); an older process may still have queued one in
            # arq:queue. Never run it on another workflow's agents.
            served = ", ".join(w.name for w in rt.app.workflows)
            return await self.exhausted(UNKNOWN_WORKFLOW, (
                f"workflow {self.req.agent!r} is not served by this worker (it serves {served})"))
        self.version = rt.version_of(self.workflow)
        agent = self.workflow.starting_agent(decision.current_agent)
        if rt.models:  # an agent naming no model runs on (and is counted under) its workflow's
            self.hooks.model_name = rt.models[self.workflow.name].default_name
        self.hooks.turn_started(self.queue_wait_ms, agent.name, model=self.hooks.model_of(agent))
        session = ConversationMemory(
            rt.redis, self.req.conversation_id, turn_id=self.req.turn_id, attempt=self.number,
            ttl_s=rt.settings.session_ttl_s, buffered=True, preloaded=decision.memory,
        )
        self._t0 = time.perf_counter()
        try:
            ran = await self._run_agent(agent, session)
        except asyncio.CancelledError:
            assert self.lease is not None
            if self.lease.lost:
                raise  # run() drops it: a newer attempt owns the turn
            # Shielded: a second cancel must not cut the record short.
            await asyncio.shield(self.cancelled())
            raise
        except MemoryFenced:
            # A newer attempt owns the turn (this worker stalled past its lease): its memory
            # write was refused, and nothing else of this attempt may be written either.
            return self._dropped(Outcome.FENCED, "conversation memory")
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, none is lost
            return await self.fail(exc)
        finally:
            flush_traces()
        return await self.complete(ran, agent.name, session)

    async def _run_agent(self, agent: Agent[Any], session: ConversationMemory) -> RunResult | Tripwire:
        """The agent run under the turn timeout and a trace (a tripped guardrail's tripwire is
        returned, not raised); the memory items it added stay buffered in ``session``."""
        rt, req = self.rt, self.req
        if self.decision.memory_length > self.decision.memory_base:
            # An earlier attempt wrote memory and then died before its result: undo that.
            await session.truncate(self.decision.memory_base)
        tracing_off = rt.settings.tracing_disabled or not req.trace
        ran: RunResult | Tripwire
        async with asyncio.timeout(rt.settings.turn_timeout_s):
            with trace(
                self._trace_name(),
                group_id=req.conversation_id,
                metadata={
                    "customer_id": req.customer_id,
                    "turn_id": req.turn_id,
                    "attempt": str(self.number),
                    "channel": req.metadata.get("channel", ""),
                },
                disabled=tracing_off,
            ) as current_trace:
                self.trace_id = None if tracing_off else current_trace.trace_id
                try:
                    ran = await Runner.run(
                        agent,
                        req.text,
                        context=TurnContext(
                            turn_id=req.turn_id,
                            conversation_id=req.conversation_id,
                            customer_id=req.customer_id,
                            attempt=self.number,
                            redis=rt.redis,
                            metadata=dict(req.metadata),
                            workflow=self.workflow.name if self.workflow else req.agent,
                        ),
                        hooks=ChainedHooks(self.hooks, self.workflow.hooks) if self.workflow.hooks else self.hooks,
                        session=session,
                        max_turns=rt.settings.max_agent_turns,
                        run_config=RunConfig(
                            workflow_name=self._trace_name(),
                            model_provider=rt.models[self.workflow.name] if rt.models else RunConfig().model_provider,
                            group_id=req.conversation_id,
                            tracing_disabled=tracing_off,
                            trace_include_sensitive_data=rt.settings.trace_include_sensitive_data,
                        ),
                    )
                except (InputGuardrailTripwireTriggered, OutputGuardrailTripwireTriggered) as exc:
                    ran = exc
        # The run's memory items stay buffered in ``session``: ``complete`` writes them with
        # the result, in the finish script (fenced alike), unless a guardrail tripped.
        return ran

    def _trace_name(self) -> str:
        assert self.workflow is not None
        return self.workflow.trace_name or self.workflow.name

    def _elapsed_ms(self) -> float:
        return (time.perf_counter() - self._t0) * 1000

    # -- outcomes --------------------------------------------------------------------

    async def complete(self, ran: RunResult | Tripwire, starting_agent: str, session: ConversationMemory) -> str:
        """The run ended (or a guardrail tripped): write the result and wake the next turn.
        The result's ``errors`` (earlier attempts') are filled in by the finish script."""
        rt, hooks = self.rt, self.hooks
        duration_ms = self._elapsed_ms()
        if isinstance(ran, Tripwire):
            final, last_agent = self._guardrail(ran, starting_agent)
        else:
            final, last_agent = str(ran.final_output), ran.last_agent.name
        # The kept trace is written by the finish script with the result (no write of its
        # own) when traces are kept in the queue's Redis; else by the store, as before.
        traces, kept = rt.traces, None
        if traces is not None and traces.redis is rt.redis:
            kept = self._prepare_trace(traces, duration_ms, answer=final)
        else:
            await self._keep_trace(duration_ms, answer=final)
        hooks.turn_completed(duration_ms, self.queue_wait_ms, final)
        result = self._result("completed", attempts=self.number, final_output=final,
                              duration_ms=duration_ms, warnings=session.warnings)
        await self._stop_lease()
        batch = hooks.batch_json()
        # The run's memory items go with the result (one fenced write, refused as a whole if a
        # newer attempt took over). A tripped guardrail's message is not kept in memory: it
        # must not steer later turns.
        memory = () if isinstance(ran, Tripwire) else session.take_pending()
        extras = FinishExtras(current_agent=last_agent, events_ttl_s=rt.settings.trace_retention_s,
                              checks=self.has_checks, job_queue=self.source_queue, memory_items=memory,
                              memory_ttl_s=rt.settings.session_ttl_s)
        if kept is not None and traces is not None:
            extras = dataclasses.replace(extras, trace_json=kept.json, trace_ttl_s=traces.retention_s)
        outcome = await durably(rt, "result", lambda: rt.queue.finish(result, batch, fence=self.number,
                                                                       extras=extras))
        if outcome and kept is not None and traces is not None:
            traces.written(kept)  # stored: to the OTLP sink and the team's processors
        if outcome:
            self._cleaned()
        if not outcome:
            return self._dropped(outcome, "result")
        self.log.info("turn.completed", duration_ms=round(duration_ms, 1), agent=last_agent,
                      tokens=hooks.usage.total_tokens)
        return "completed"

    async def fail(self, exc: Exception) -> str:
        """The run raised: fail the turn for good (a deterministic error, or the last attempt),
        else record the attempt's error and raise ``Retry`` so arq runs it again later."""
        rt, hooks = self.rt, self.hooks
        duration_ms = self._elapsed_ms()
        error_type = "TurnTimeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        message = str(exc) or error_type
        terminal = (isinstance(exc, DETERMINISTIC_ERRORS)
                    or self.number - self.decision.spared >= rt.settings.max_attempts)
        await self._keep_trace(duration_ms, error=(error_type, message), final=terminal)
        hooks.turn_errored(terminal=terminal, duration_ms=duration_ms, error_type=error_type, message=message)
        await self._stop_lease()
        if terminal:
            outcome = await self._finish_failed(error_type, message, attempts=self.number)
            if not outcome:
                return self._dropped(outcome, "result")
            self.log.warning("turn.failed", error_type=error_type, error=message)
            return "failed"
        error = AttemptError(attempt=self.number, error_type=error_type, message=message, usage=hooks.usage)
        batch = hooks.batch_json()
        outcome = await durably(rt, "attempt failure", lambda: rt.queue.record_attempt_failure(
            self.req.turn_id, error, batch, events_ttl_s=rt.settings.trace_retention_s, fence=self.number,
            ran_by=self.ran_by,
        ))
        if not outcome:
            return self._dropped(outcome, "attempt failure")
        self.log.warning("turn.attempt_failed", error_type=error_type, error=message)
        raise Retry(defer=rt.settings.retry_delay_s * self.number) from exc

    async def cancelled(self) -> None:
        """The attempt was cancelled: the worker is stopping (drain grace ran out) or arq timed
        the job out. Record the attempt (what it spent included) so the turn is neither lost
        nor stuck "running"; the caller re-raises and arq requeues the job. A record that
        cannot be written is logged: the next ``START`` then records the attempt as lost."""
        rt, hooks = self.rt, self.hooks
        duration_ms = self._elapsed_ms()
        error_type = "WorkerStopped" if rt.stopping else "Cancelled"
        message = (
            f"worker {rt.worker_name} stopped before the attempt ended (drain grace "
            f"{rt.settings.drain_grace_s:g}s ran out); the turn runs again"
            if rt.stopping else "the attempt was cancelled before it ended; the turn runs again"
        )
        await self._stop_lease()
        try:
            await self._keep_trace(duration_ms, error=(error_type, message), final=False)
        except RedisError as exc:
            self.log.warning("turn.trace_not_kept", error=str(exc))
        hooks.turn_errored(terminal=False, duration_ms=duration_ms, error_type=error_type, message=message)
        error = AttemptError(attempt=self.number, error_type=error_type, message=message, usage=hooks.usage)
        try:
            outcome = await rt.queue.record_attempt_failure(
                self.req.turn_id, error, hooks.batch_json(), events_ttl_s=rt.settings.trace_retention_s,
                fence=self.number, ran_by=self.ran_by,
            )
        except RedisError as exc:
            # Not recorded: the turn stays "running" until its lease lapses, then the next
            # attempt records this one as WorkerLost.
            self.log.error("turn.attempt_cancelled", error_type=error_type, recorded=False, error=str(exc))
            return
        if not outcome:
            self._dropped(outcome, "attempt failure")
            return
        self.log.warning("turn.attempt_cancelled", error_type=error_type, recorded=True)

    async def exhausted(self, error_type: str, message: str) -> str:
        """End the turn ``failed`` without running this attempt, which is not counted: the
        turn is poison (``WorkerLost``) or its earlier attempts all died unfinished."""
        self.hooks.turn_errored(terminal=True, duration_ms=0.0, error_type=error_type, message=message)
        await self._stop_lease()
        outcome = await self._finish_failed(error_type, message, attempts=self.number - 1)
        if not outcome:
            return self._dropped(outcome, "result")
        if error_type == WORKER_LOST:
            self.log.error("turn.failed", error_type=error_type, attempts=self.number - 1, poison=True)
        else:
            self.log.warning("turn.failed", error_type=error_type, attempts=self.number - 1)
        return "failed"

    async def unrunnable(self, error_type: str, message: str) -> str:
        """End the turn ``failed`` at once, without running it: its job or its record cannot
        be decoded, and would not decode better on a retry. Counted as one attempt, with
        telemetry and alerts like any failure; the conversation's next turn is woken."""
        self.hooks.turn_errored(terminal=True, duration_ms=0.0, error_type=error_type, message=message)
        outcome = await self._finish_failed(error_type, message, attempts=self.number)
        if not outcome:
            return self._dropped(outcome, "result")
        self.log.error("turn.failed", error_type=error_type, error=message)
        return "failed"

    # -- pieces of the outcomes ------------------------------------------------------

    async def _stop_lease(self) -> None:
        if self.lease is not None:
            await self.lease.stop()

    def _dropped(self, outcome: Outcome, what: str) -> str:
        """A refused outcome write: log it, and keep arq's hands off the newer attempt's job."""
        if outcome is Outcome.FENCED:
            self.rt.fenced.add(self.req.turn_id)
        self.log.warning("turn.result_dropped", what=what, outcome=outcome.value,
                         reason="another attempt owns the turn" if outcome is Outcome.FENCED
                         else "the turn had already ended")
        return STALE

    def _guardrail(self, tripped: Tripwire, starting_agent: str) -> tuple[str, str]:
        """A tripped guardrail as the turn's outcome: the workflow's safe reply (and the agent
        the next turn starts at), with a ``guardrail`` event recorded for telemetry."""
        found = tripped.guardrail_result
        name = found.guardrail.get_name()
        kind = "input" if isinstance(tripped, InputGuardrailTripwireTriggered) else "output"
        agent = getattr(found, "agent", None)
        agent_name = agent.name if agent is not None else starting_agent
        self.hooks.guardrail_tripped(name, agent_name, kind)
        self.log.info("turn.guardrail_tripped", guardrail=name, kind=kind, agent=agent_name)
        assert self.workflow is not None  # a guardrail tripped in a run of it
        return self.workflow.guardrail_reply(name), agent_name

    async def _keep_trace(self, duration_ms: float, *, answer: str | None = None,
                          error: tuple[str, str] | None = None, final: bool = True) -> None:
        """Hand the attempt's trace to the store (sampling, redaction, one write): failed when
        it has an ``error`` (type, message: the cause), with the turn's text and ``answer``
        when traces include sensitive data, and whether it was the turn's last (``final``)."""
        if self.rt.traces is None:
            return
        _kept, dropped = await self.rt.traces.finish_attempt(
            self.trace_id,
            self._trace_turn(answer=answer, error=error, final=final),
            failed=error is not None,
            duration_ms=duration_ms,
            workflow=self.workflow.name if self.workflow else None,
        )
        self.hooks.spans_dropped(dropped)

    def _prepare_trace(self, traces: TraceStore, duration_ms: float, *, answer: str) -> Kept | None:
        """A completed attempt's trace as the store keeps it (sampled, redacted, serialised),
        for the finish script to write with the result; None when not kept."""
        kept, dropped = traces.prepare(
            self.trace_id,
            self._trace_turn(answer=answer, error=None, final=True),
            failed=False,
            duration_ms=duration_ms,
            workflow=self.workflow.name if self.workflow else None,
        )
        self.hooks.spans_dropped(dropped)
        return kept

    def _trace_turn(self, *, answer: str | None, error: tuple[str, str] | None, final: bool) -> dict[str, Any]:
        """The turnfleet fields of the attempt's trace record."""
        req = self.req
        turn: dict[str, Any] = {
            "turn_id": req.turn_id,
            "attempt": self.number,
            "final": final,
            "conversation_id": req.conversation_id,
            "customer_id": req.customer_id,
            "status": "failed" if error is not None else "completed",
            "started_at": self.started_at.isoformat(),
            "ended_at": utcnow().isoformat(),
        }
        if self.rt.settings.trace_include_sensitive_data:
            turn["input"] = req.text
            if answer is not None:
                turn["output"] = answer
        if error is not None:
            turn["error"] = {"type": error[0], "message": error[1]}
        return turn

    def _result(self, status: str, **outcome: Any) -> TurnResult:
        req, hooks = self.req, self.hooks
        return TurnResult(
            turn_id=req.turn_id,
            conversation_id=req.conversation_id,
            customer_id=req.customer_id,
            status=status,  # type: ignore[arg-type]
            text=req.text,
            agents=list(hooks.agents),
            tool_calls=hooks.tool_calls,
            handoffs=hooks.handoffs,
            model=hooks.model_name,  # the workflow's default model (each call names its own in telemetry)
            usage=hooks.usage,
            enqueued_at=req.enqueued_at,
            started_at=self.started_at,
            finished_at=utcnow(),
            queue_wait_ms=self.queue_wait_ms,
            worker=self.rt.worker_name,
            workflow=self.ran_by[0],
            version=self.ran_by[1],
            **outcome,
        )

    @property
    def has_checks(self) -> bool:
        """The turn ran on a workflow that declares checks: its finish queues the check job
        (``workers/check_job.py``). A turn that never found its workflow gets none."""
        return self.workflow is not None and bool(self.workflow.checks)

    @property
    def ran_by(self) -> tuple[str, str | None]:
        """The (workflow, version) the attempt ran: what its result and telemetry entry say.
        An attempt that never found its workflow (not served here, exhausted, undecodable)
        names the request's and no version."""
        if self.workflow is None:
            return self.req.agent, None
        return self.workflow.name, self.version

    async def _finish_failed(self, error_type: str, message: str, attempts: int) -> Outcome:
        """Write the turn's terminal failure (fenced). The finish script puts the final error
        after the attempt errors it finds stored, in the same step: nothing is read first."""
        rt = self.rt
        final = AttemptError(attempt=attempts, error_type=error_type, message=message)
        result = self._result("failed", attempts=attempts, error_type=error_type, error_message=message)
        batch = self.hooks.batch_json()
        outcome = await durably(rt, "result", lambda: rt.queue.finish(
            result, batch, fence=self.number,
            extras=FinishExtras(events_ttl_s=rt.settings.trace_retention_s, final_error=final,
                                checks=self.has_checks, job_queue=self.source_queue),
        ))
        if outcome:
            self._cleaned()
        return outcome

    def _cleaned(self) -> None:
        """The finish script did arq's clean-up of the turn's job: arq's own is skipped."""
        if self.source_queue is not None:
            self.rt.cleaned.add(self.req.turn_id)
