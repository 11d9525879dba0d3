"""The check job: run a finished turn's checks once and write their outcomes once (issue 17).

The finish script queues ``run_turn_checks`` (job id ``checks/<turn id>``) with the turn's
result, in one step, when the workflow declares checks; the workflow's own workers serve it in
their checks lane (``workers/isolation.py``, ``TURNFLEET_CHECK_JOBS``), so a check never takes
a turn's slot nor delays a turn. The job

1. reads the turn's record (``TurnResult``) and its conversation's memory before the turn
   (``memory[0:memory_base]``); when either is gone or no longer raw (the raw-text expiry
   redacted the record, the memory expired or was re-created) every check's outcome is
   ``inputs_expired``: neither a pass nor a spurious failure;
2. runs ``run_checks`` in a thread (checks are the team's sync code: a slow one never blocks
   the worker's loop), with the worker's model endpoint as the judges' (``turnfleet/judge.py``:
   an LLM judge's HTTP call is sync and bounded by ``model_timeout_s``), redacts each reason (the
   fleet's redactor, workflow patterns included) and clips it to 500 characters;
3. writes, with one script (``turnfleet/lua/write_checks.lua``), ``keys.turn_checks`` (SET NX)
   and one telemetry entry of batch version ``versions.BATCH_CHECK`` holding a ``check`` event
   per check: both or neither. A second run (its worker died after the write, or before it:
   the checks are pure, so it computes the same outcomes) finds the key and writes nothing.
   A turn whose record is gone (erased, purged) gets nothing written: that would bring back
   keys of a turn that no longer exists. A judge's ``model`` and ``usage`` go on its event's
   envelope, so telemetry counts them as ``check_tokens`` / ``check_cost_usd``, not the turn's.

**Crash recovery.** The job keeps arq's in-progress key to one ``turn_lease_s`` and renews it
while it runs, as a turn's attempt does: a SIGKILLed worker's check job is taken by another
worker of the pool within a lease. A job that fails on Redis errors is retried by arq
(``Retry``) up to ``CHECK_JOB_TRIES`` times, then dead-lettered: logged
``checks.dead_lettered`` with its reason; the turn's outcome is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import structlog
from arq import Retry
from redis.exceptions import RedisError

from turnfleet import events, keys, versions
from turnfleet.checks import CheckOutcome, FinishedTurn, as_checks, run_checks
from turnfleet.connection import RAW, lenient_text
from turnfleet.judge import JudgeEndpoint, run_with_endpoint
from turnfleet.models import TokenUsage, TurnResult
from turnfleet.queue import ARQ_ABORT_JOBS, CORRUPT_TURN_RECORD, session_meta
from turnfleet.scripts import load_script
from turnfleet.workers.attempt import Runtime
from turnfleet.workers.isolation import CLAIM_LEASES
from turnfleet.workers.memory import decode_item, is_marker

__all__ = ["CHECK_JOB_TRIES", "REASON_CHARS", "run_turn_checks"]

log = structlog.get_logger(__name__)

WRITE_CHECKS = load_script("write_checks")
REASON_CHARS = 500  # a reason is clipped to this many characters (after redaction)
CHECK_JOB_TRIES = 3  # runs of a check job that fail on Redis errors before it is dead-lettered


class _InputsGone(Exception):
    """The record or memory the checks need is gone or no longer raw (the message says which)."""


async def run_turn_checks(ctx: dict[str, Any], turn_id: str, conversation_id: str) -> str:
    """arq job: the turn's checks, run and written once. Returns ``written``, ``already``
    (written before), ``gone`` (the turn's record no longer exists), ``none`` (its workflow
    has no checks here) or ``dead-lettered``; raises ``Retry`` after a Redis error."""
    rt: Runtime = ctx["runtime"]
    job_id = ctx.get("job_id")
    if job_id is not None and job_id != keys.checks_job_id(turn_id):
        log.error("checks.dead_lettered", turn_id=turn_id, job_id=job_id,
                  reason="its arguments name another turn than its job id")
        return "dead-lettered"
    lease = asyncio.create_task(_keep_lease(rt, keys.checks_job_id(turn_id), claimed=bool(ctx.get(CLAIM_LEASES))),
                                name=f"checks-lease:{turn_id}")
    try:
        return await _run(rt, turn_id, conversation_id, ctx.get("queue"))
    except RedisError as exc:
        tries = int(ctx.get("job_try") or 1)
        if tries >= CHECK_JOB_TRIES:
            log.error("checks.dead_lettered", turn_id=turn_id, tries=tries,
                      reason=f"{type(exc).__name__}: {exc}", turn_outcome="untouched")
            return "dead-lettered"
        log.warning("checks.redis_unavailable", turn_id=turn_id, error=str(exc), try_=tries,
                    retry_in_s=rt.settings.retry_delay_s)
        raise Retry(defer=rt.settings.retry_delay_s * tries) from exc
    finally:
        lease.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lease


async def _keep_lease(rt: Runtime, job_id: str, claimed: bool = False) -> None:
    """arq's in-progress key of the job cut to one lease and renewed every third of it, so a
    killed worker's check job runs again elsewhere within a lease (not arq's job timeout).
    ``claimed``: the lane's claim set it to one lease already (``CLAIM_LEASES``): the first
    renewal is a third of a lease later, not a round trip at once."""
    lease_s = rt.settings.turn_lease_s
    if lease_s <= 0:
        return
    if claimed:
        await asyncio.sleep(lease_s / 3)
    while True:
        try:
            await rt.redis.pexpire(keys.ARQ_IN_PROGRESS_PREFIX + job_id, int(lease_s * 1000))
        except RedisError as exc:
            log.warning("checks.lease_renew_failed", job_id=job_id, error=str(exc))
        await asyncio.sleep(lease_s / 3)


async def _run(rt: Runtime, turn_id: str, conversation_id: str, job_queue: str | None = None) -> str:
    """``job_queue``: the lane's queue the job was taken from; the write then does arq's
    clean-up of the job too (``Runtime.cleaned``: arq's own is skipped)."""
    record = await rt.queue.get(turn_id)
    if record is None:
        log.info("checks.skipped", turn_id=turn_id, reason="the turn's record is gone (erased or purged)")
        return "gone"
    workflow = rt.app.get(record.workflow or "")
    checks = as_checks(workflow.checks) if workflow is not None else ()
    if not checks:
        # Queued by a worker whose workflow declared checks; this one's declares none.
        log.warning("checks.none", turn_id=turn_id, workflow=record.workflow,
                    reason="this worker's workflow declares no checks")
        return "none"
    try:
        earlier = await _earlier_memory(rt, record)
    except _InputsGone as gone:
        outcomes = [_expired(c.name, c.money_path, str(gone)) for c in checks]
    else:
        finished = FinishedTurn.from_result(record, earlier)
        endpoint = JudgeEndpoint.from_settings(rt.settings, rt.redactor)
        ran = await asyncio.to_thread(run_with_endpoint, endpoint, run_checks, checks, finished)
        outcomes = [_written(rt, o) for o in ran]
    return await _write(rt, record, conversation_id, outcomes, job_queue)


async def _earlier_memory(rt: Runtime, record: TurnResult) -> list[dict[str, Any]]:
    """The conversation's memory items before the turn, as the turn ran on them; ``_InputsGone``
    when the record or that memory is no longer what the turn saw."""
    if record.error_type == CORRUPT_TURN_RECORD and not record.tool_calls:
        raise _InputsGone("the turn's record cannot be read")
    cid = record.conversation_id
    async with rt.redis.pipeline(transaction=True) as pipe:
        pipe.execute_command("HMGET", keys.turn(record.turn_id), "raw_expired_at", "memory_base",
                             "memory_session", **RAW)
        pipe.execute_command("HGET", session_meta(cid), "created_at", **RAW)
        pipe.execute_command("LRANGE", keys.session_messages(cid), 0, -1, **RAW)
        (expired, base, session), created, stored = await pipe.execute()
    if expired:
        raise _InputsGone("the turn's raw text expired (TURNFLEET_RAW_RETENTION_S)")
    memory_base = int(base or 0)
    if memory_base == 0:
        return []
    if len(stored) < memory_base or (session and lenient_text(created) != lenient_text(session)):
        raise _InputsGone("the conversation's memory before the turn is gone (expired or erased)")
    items = []
    for raw in stored[:memory_base]:
        item, problem = decode_item(raw)
        if problem is None and not is_marker(item):
            items.append(item)
    return items


def _outcome_of(o: CheckOutcome) -> str:
    if not o.passed:
        return "failed"
    return "passed" if o.applicable else "not_applicable"


def _written(rt: Runtime, o: CheckOutcome) -> dict[str, Any]:
    """An outcome as stored: its reason redacted, then clipped."""
    reason = rt.redactor.text(o.reason) if rt.redactor is not None else o.reason
    return {**o.as_dict(), "reason": reason[:REASON_CHARS], "outcome": _outcome_of(o)}


def _expired(name: str, money_path: bool, why: str) -> dict[str, Any]:
    return {"check": name, "money_path": money_path, "passed": False, "reason": why[:REASON_CHARS],
            "applicable": False, "duration_us": 0.0, "error": None, "outcome": "inputs_expired"}


async def _write(rt: Runtime, record: TurnResult, conversation_id: str, outcomes: list[dict[str, Any]],
                 job_queue: str | None = None) -> str:
    turn_id = record.turn_id
    job_id = keys.checks_job_id(turn_id)
    batch = events.batch_json([
        events.event(
            events.CheckDetail(check=o["check"], outcome=o["outcome"], money_path=o["money_path"],
                               reason=o["reason"] or None, error=o["error"], duration_us=o["duration_us"]),
            turn_id=turn_id, attempt=0, seq=seq, conversation_id=record.conversation_id or conversation_id,
            customer_id=record.customer_id, event_id=events.check_event_id(turn_id, o["check"]),
            model=o.get("model"), usage=TokenUsage(**o["usage"]) if o.get("usage") else None,
        )
        for seq, o in enumerate(outcomes)
    ])
    verdict = await WRITE_CHECKS.bind(rt.redis)(
        keys={"turn": keys.turn(turn_id), "checks": keys.turn_checks(turn_id), "telemetry": keys.TELEMETRY_STREAM,
              "job_queue": job_queue or keys.CHECKS_QUEUE, "arq_job": keys.ARQ_JOB_PREFIX + job_id,
              "arq_in_progress": keys.ARQ_IN_PROGRESS_PREFIX + job_id, "arq_retry": keys.ARQ_RETRY_PREFIX + job_id,
              "arq_abort": ARQ_ABORT_JOBS},
        args={"turn_id": turn_id, "outcomes_json": json.dumps(outcomes, separators=(",", ":")),
              "telemetry_batch": batch,
              "workflow": record.workflow or "", "version": record.version or "",
              "batch_version": versions.BATCH_CHECK, "job_id": job_id, "arq_cleanup": "1" if job_queue else ""},
    )
    if job_queue:
        rt.cleaned.add(job_id)  # the job returns next: arq's clean-up is done
    verdict = lenient_text(verdict) if isinstance(verdict, bytes) else str(verdict)
    failed = [o["check"] for o in outcomes if o["outcome"] == "failed"]
    log.info("checks.done", turn_id=turn_id, written=verdict, checks=len(outcomes), failed=failed)
    return verdict
