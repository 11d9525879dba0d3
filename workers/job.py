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

**One attempt, one object.** Once ``START`` has counted an attempt, ``workers/attempt.py``
runs it: an ``Attempt`` owns the runtime, request, hooks, lease, trace and timing of that
attempt, and ends it in exactly one recorded outcome (fenced: a stale attempt writes nothing).

**Undecodable jobs and records.** ``record_undecodable`` is what a payload
``deserialize_job`` could not decode runs: it ends the turn ``failed`` (``UndecodableJob``)
and wakes its conversation. A turn whose stored request cannot be decoded ends the same way
(``CorruptTurnRecord``) when its job starts: a retry would read the same bytes.

**Newer formats are left, not failed** (:mod:`turnfleet.versions`). During a rolling deploy a
newer process may write a job or a turn record this one cannot read. A job of a newer version
runs ``leave_newer_job`` instead (``deserialize_job``), a record of a newer version makes
``START`` answer ``newer`` before it counts an attempt; either way the job goes back to its
queue ``retry_delay_s`` later for another worker, arq's try counter for it is undone (so
being left any number of times never exhausts arq's ``max_tries``) and arq's clean-up is
skipped. The turn's attempts do not change; the leave is counted and logged once per turn.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from arq import Retry
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from turnfleet import keys, versions
from turnfleet.models import utcnow
from turnfleet.queue import CORRUPT_TURN_RECORD, NEWER, CorruptRecord, Lane
from turnfleet.workers.attempt import STALE, Attempt, Runtime

__all__ = ["LEFT", "STALE", "Runtime", "leave_newer_job", "record_undecodable", "run_turn"]

log = structlog.get_logger(__name__)

REROUTED = "rerouted"  # START moved a job of a workflow this worker does not serve to its own queue
LEFT = "left"  # what a job returns when it left a newer-format job or record for a newer process
_left_logged = versions.Once()  # turns whose leave this process has logged


async def run_turn(ctx: dict[str, Any], turn_id: str, conversation_id: str) -> str:
    """arq job: one attempt of a turn. Returns how it ended (``completed``, ``failed``,
    ``stale``, or why it did not run); raises ``Retry`` after a transient failure and
    ``CancelledError`` when the worker stops before the attempt ends (arq requeues both).

    Redis going away mid-attempt (beyond what ``durably`` retries) is a ``Retry`` too, not a
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
        return await _run_turn(rt, turn_id, conversation_id, lane, ctx.get("queue", keys.ARQ_QUEUE))
    except (RedisConnectionError, RedisTimeoutError) as exc:
        log.warning("turn.redis_unavailable", turn_id=turn_id, error=str(exc),
                    retry_in_s=rt.settings.retry_delay_s)
        raise Retry(defer=rt.settings.retry_delay_s) from exc


async def _run_turn(rt: Runtime, turn_id: str, conversation_id: str, lane: Lane, source_queue: str) -> str:
    """``START`` the attempt, and run it if ``START`` says it may run."""
    started_at = utcnow()
    decision = await rt.queue.start(
        turn_id, conversation_id, rt.worker_name, started_at.isoformat(), lease_s=rt.settings.turn_lease_s,
        lane=lane, isolated_losses=rt.settings.isolated_losses,
        served=[w.name for w in rt.app.workflows], source_queue=source_queue,
    )
    if decision.status == NEWER:
        return await _leave(rt, turn_id, versions.Kind.turn, "its turn record")
    if decision.status == REROUTED:
        # START moved the job to its workflow's queue (an older process queued it in ours):
        # arq must not delete the job key the new place shares.
        rt.fenced.add(turn_id)
        log.warning("turn.rerouted", turn_id=turn_id, conversation_id=conversation_id, source_queue=source_queue,
                    reason="a turn of a workflow this worker does not serve: moved to its workflow's queue")
        return decision.status
    if decision.status == "isolate":
        # START moved the job to the isolated lane: arq must not delete it or its new place.
        rt.fenced.add(turn_id)
        log.warning("turn.isolated", turn_id=turn_id, conversation_id=conversation_id,
                    reason="lost with its worker beside other turns; runs alone next")
        return decision.status
    if decision.attempt == 0:
        log.info("turn.skipped", turn_id=turn_id, reason=decision.status)
        return decision.status
    # The finish script cleans the job up as arq would (one round trip fewer; arq's is skipped).
    attempt = Attempt(rt, decision, started_at, source_queue=source_queue)
    if decision.corrupt:
        return await attempt.unrunnable(
            CORRUPT_TURN_RECORD, f"the turn's record in Redis is corrupt: {decision.corrupt}")
    return await attempt.run()


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
    if turn_id.startswith(keys.CHECKS_JOB_PREFIX):
        # A turn's check job: its turn has ended already and stays as it is.
        log_ctx.error("checks.dead_lettered", reason=f"undecodable check job: {reason}", turn_outcome="untouched")
        return "dead-lettered"
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
    if decision.status == NEWER:
        return await _leave(rt, turn_id, versions.Kind.turn, "its turn record")
    if decision.attempt == 0:
        log_ctx.warning("job.undecodable", reason=reason, action="dropped", why=decision.status)
        return decision.status
    message = f"the turn's job payload in Redis could not be decoded: {reason}"
    if decision.corrupt:
        message += f"; {decision.corrupt}"
    return await Attempt(rt, decision, started_at).unrunnable("UndecodableJob", message)


async def leave_newer_job(ctx: dict[str, Any], version: int) -> str:
    """arq job for a payload of a newer format version than this worker reads
    (``deserialize_job``): leave it for a newer worker (see "Newer formats" above)."""
    rt: Runtime = ctx["runtime"]
    return await _leave(rt, str(ctx.get("job_id", "")), versions.Kind.job, f"its job (version {version})")


async def _leave(rt: Runtime, turn_id: str, kind: versions.Kind, what: str) -> str:
    """Put the turn's job back in its queue ``retry_delay_s`` from now, untouched, for a newer
    worker: nothing of the turn is written, arq's try count of this claim is undone, and arq's
    clean-up is skipped (it would delete the job)."""
    due = int((time.time() + rt.settings.retry_delay_s) * 1000)
    async with rt.redis.pipeline(transaction=True) as pipe:
        served = {keys.ARQ_QUEUE, keys.ISOLATED_QUEUE, keys.CHECKS_QUEUE}  # whichever lane holds it
        for workflow in rt.app.workflows:
            served |= {keys.workflow_queue(workflow.name), keys.workflow_isolated_queue(workflow.name),
                       keys.workflow_checks_queue(workflow.name)}
        for queue in sorted(served):
            pipe.zadd(queue, {turn_id: due}, xx=True)
        pipe.delete(keys.ARQ_IN_PROGRESS_PREFIX + turn_id)
        pipe.decr(keys.ARQ_RETRY_PREFIX + turn_id)
        await pipe.execute()
    rt.fenced.add(turn_id)
    await versions.count_left(rt.redis, kind)
    if _left_logged.first(turn_id):
        log.warning("turn.newer_format_left", turn_id=turn_id, kind=kind.value,
                    reason=f"{what} is of a newer format version than this worker reads",
                    action=f"left queued for a newer worker (back in {rt.settings.retry_delay_s:g} s)")
    return LEFT
