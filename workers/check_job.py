"""The check job: run a finished turn's checks once and write their outcomes once (issue 17).

The finish script queues ``run_turn_checks`` (job id ``checks/<turn id>``) with the turn's
result, in one step, when the workflow declares checks; the workflow's own workers serve it in
their checks lane (``workers/checks_lane.py``, ``TURNFLEET_CHECK_JOBS``), so a check never
takes a turn's slot nor delays a turn. The lane takes many jobs per poll and runs them as one
batch (:func:`run_check_jobs`, issue 19: one read, one write, no per-job arq round trips);
each turn of a batch keeps its own outcome, exactly as if it ran alone. For each turn the batch

1. reads the turn's record (``TurnResult``) and its conversation's memory before the turn
   (``memory[0:memory_base]``), every turn's in one script (``workers/lua/read_checks.lua``);
   when either is gone or no longer raw (the raw-text expiry redacted the record, the memory
   expired or was re-created) every check's outcome is ``inputs_expired``: neither a pass nor
   a spurious failure;
2. runs ``run_checks`` with the worker's model endpoint as the judges' (``turnfleet/judge.py``:
   an LLM judge's HTTP call is sync and bounded by ``model_timeout_s``). **Where it runs:** a
   turn whose checks are all declared ``blocking=False`` (cheap pure Python: the Support
   Desk's) runs on the event loop, no thread hop, the loop given back between turns once it
   has run ``INLINE_SLICE_S``; any other turn (a team's check by default, every LLM judge)
   runs in a thread (a pool of ``CHECK_THREADS`` of the checks' own, not the default executor
   a turn's sync tools use), so a slow check never blocks the worker's loop, a turn's tools nor
   the batch's other turns, bounded by the job timeout (then dead-lettered). Each reason is redacted (the fleet's
   redactor, workflow patterns included) and clipped to 500 characters;
3. writes, with one script for the whole batch (``turnfleet/lua/write_checks.lua``), per
   turn ``keys.turn_checks`` (SET NX) and one telemetry entry of batch version
   ``versions.BATCH_CHECK`` holding a ``check`` event per check: both or neither. A second
   run (its worker died after the write, or before it: the checks are pure, so it computes the
   same outcomes) finds the key and writes nothing. A turn whose record is gone (erased,
   purged) gets nothing written: that would bring back keys of a turn that no longer exists.
   A judge's ``model`` and ``usage`` go on its event's envelope, so telemetry counts them as
   ``check_tokens`` / ``check_cost_usd``, not the turn's. The same script does arq's clean-up
   of every job of the batch.

**Crash recovery.** A claimed job's in-progress key lasts one ``turn_lease_s`` and is renewed
while it runs, as a turn's attempt's: a SIGKILLed worker's check jobs are taken by another
worker of the pool within a lease. A batch that fails on Redis errors puts each job back
(``retry_delay_s`` × tries later) up to ``CHECK_JOB_TRIES`` runs, then dead-letters it: logged
``checks.dead_lettered`` with its reason; the turn's outcome is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import structlog
from arq import Retry
from redis.exceptions import RedisError

from turnfleet import events, keys, versions
from turnfleet.checks import Check, CheckOutcome, FinishedTurn, as_checks, run_checks
from turnfleet.connection import RAW, lenient_text
from turnfleet.judge import JudgeEndpoint, run_with_endpoint
from turnfleet.models import TurnResult
from turnfleet.queue import ARQ_ABORT_JOBS, CORRUPT_TURN_RECORD, session_meta
from turnfleet.scripts import load_script
from turnfleet.workers.attempt import Runtime
from turnfleet.workers.memory import decode_item, is_marker

__all__ = ["CHECK_JOB_TRIES", "REASON_CHARS", "CheckJob", "run_check_jobs", "run_turn_checks"]

log = structlog.get_logger(__name__)

WRITE_CHECKS = load_script("write_checks")
READ_CHECKS = load_script("read_checks", "turnfleet.workers")
REASON_CHARS = 500  # a reason is clipped to this many characters (after redaction)
CHECK_JOB_TRIES = 3  # runs of a check job that fail on Redis errors before it is dead-lettered
INLINE_SLICE_S = 0.002  # inline checks give the loop back after running this long (step 2 above)
CHECK_THREADS = 8  # blocking checks (a team's, LLM judges) running at once in a worker process
DEFAULT_TIMEOUT_S = 150.0  # one turn's checks run in a thread, at most (the lane passes arq's job timeout)


class _InputsGone(Exception):
    """The record or memory the checks need is gone or no longer raw (the message says which);
    ``record``: the turn's record as read, when there is one."""

    def __init__(self, why: str, record: TurnResult | None = None) -> None:
        super().__init__(why)
        self.record = record


@dataclass
class CheckJob:
    """One claimed check job: its turn, and how many times it has been taken (``tries``).
    ``dead``: why it must end without running (dead-lettered), else None."""

    turn_id: str
    conversation_id: str
    tries: int = 1
    dead: str | None = None

    @property
    def job_id(self) -> str:
        return keys.checks_job_id(self.turn_id)


@dataclass
class _Turn:
    """One job's way through a batch."""

    job: CheckJob
    verdict: str | None = None  # decided before the write: gone, none, dead-lettered
    record: TurnResult | None = None
    checks: tuple[Check, ...] = ()
    finished: FinishedTurn | None = None
    outcomes: list[dict[str, Any]] = field(default_factory=list)


async def run_turn_checks(ctx: dict[str, Any], turn_id: str, conversation_id: str) -> str:
    """arq job: the turn's checks, run and written once (a batch of one: the checks lane runs
    many at once, ``workers/checks_lane.py``). Returns ``written``, ``already`` (written
    before), ``gone`` (the turn's record no longer exists), ``none`` (its workflow has no checks
    here) or ``dead-lettered``; raises ``Retry`` after a Redis error."""
    rt: Runtime = ctx["runtime"]
    job_id = ctx.get("job_id")
    if job_id is not None and job_id != keys.checks_job_id(turn_id):
        log.error("checks.dead_lettered", turn_id=turn_id, job_id=job_id,
                  reason="its arguments name another turn than its job id")
        return "dead-lettered"
    tries = int(ctx.get("job_try") or 1)
    lease = asyncio.create_task(keep_leases(rt, [keys.checks_job_id(turn_id)]), name=f"checks-lease:{turn_id}")
    try:
        [verdict] = await run_check_jobs(rt, [CheckJob(turn_id, conversation_id, tries)], ctx.get("queue"))
        if ctx.get("queue"):
            rt.cleaned.add(keys.checks_job_id(turn_id))  # the job returns next: arq's clean-up is done
        return verdict
    except RedisError as exc:
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


async def keep_leases(rt: Runtime, job_ids: Sequence[str], claimed: bool = False) -> None:
    """arq's in-progress keys of the jobs cut to one lease and renewed every third of it (one
    pipeline for all), so a killed worker's check jobs run again elsewhere within a lease
    (not arq's job timeout). ``claimed``: the claim set them to one lease already: the first
    renewal is a third of a lease later, not a round trip at once."""
    lease_s = rt.settings.turn_lease_s
    if lease_s <= 0:
        return
    if claimed:
        await asyncio.sleep(lease_s / 3)
    while True:
        try:
            async with rt.redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.pexpire(keys.ARQ_IN_PROGRESS_PREFIX + job_id, int(lease_s * 1000))
                await pipe.execute()
        except RedisError as exc:
            log.warning("checks.lease_renew_failed", jobs=len(job_ids), error=str(exc))
        await asyncio.sleep(lease_s / 3)


async def run_check_jobs(rt: Runtime, jobs: Sequence[CheckJob], job_queue: str | None = None,
                         timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """The checks of many finished turns, run and written once each (module docstring): one
    read, one write for the whole batch. Returns each job's verdict, in order (as
    ``run_turn_checks``). ``job_queue``: the lane's queue the jobs were taken from; the write
    then does arq's clean-up of every job too. Raises ``RedisError`` (nothing of a turn is
    half written: each turn's write is atomic)."""
    turns = [_Turn(job) for job in jobs]
    for turn in turns:
        if turn.job.dead is not None:
            turn.verdict = "dead-lettered"
            log.error("checks.dead_lettered", turn_id=turn.job.turn_id, tries=turn.job.tries,
                      reason=turn.job.dead, turn_outcome="untouched")
    live = [t for t in turns if t.verdict is None]
    await _read(rt, live)
    endpoint = JudgeEndpoint.from_settings(rt.settings, rt.redactor)
    await _run(rt, [t for t in live if t.finished is not None], endpoint, timeout_s)
    return await _write(rt, turns, job_queue)


async def _read(rt: Runtime, turns: list[_Turn]) -> None:
    """Each turn's record, checks and inputs (``finished``, or ``outcomes`` all expired), or
    its verdict (``gone``, ``none``): every turn's in one script call."""
    if not turns:
        return
    script_keys: list[str] = []
    for turn in turns:
        cid = turn.job.conversation_id
        script_keys += [keys.turn(turn.job.turn_id), keys.session_messages(cid), session_meta(cid)]
    replies = await READ_CHECKS.bind(rt.redis).raw(rt.redis, keys={"turns": script_keys})
    for turn, reply in zip(turns, replies, strict=True):
        try:
            record, earlier = _inputs(turn, reply)
            if record is None and reply[0] != 0:
                record, earlier = await _inputs_slowly(rt, turn.job.turn_id)
        except _InputsGone as gone:
            record, earlier = gone.record or turn.record, gone
        if record is None:
            log.info("checks.skipped", turn_id=turn.job.turn_id, reason="the turn's record is gone (erased or purged)")
            turn.verdict = "gone"
            continue
        turn.record = record
        workflow = rt.app.get(record.workflow or "")
        turn.checks = as_checks(workflow.checks) if workflow is not None else ()
        if not turn.checks:
            # Queued by a worker whose workflow declared checks; this one's declares none.
            log.warning("checks.none", turn_id=turn.job.turn_id, workflow=record.workflow,
                        reason="this worker's workflow declares no checks")
            turn.verdict = "none"
        elif isinstance(earlier, _InputsGone):
            turn.outcomes = [_expired(c.name, c.money_path, str(earlier)) for c in turn.checks]
        else:
            turn.finished = FinishedTurn.from_result(record, earlier)


def _inputs(turn: _Turn, reply: list[Any]) -> tuple[TurnResult | None, list[dict[str, Any]]]:
    """The record and the memory before the turn from ``read_checks.lua``'s reply for it; a
    None record when the reply is not the plain case (no record, a record that is not a hash,
    no result or one that does not decode, no workflow named): the caller reads it as
    ``TurnQueue.get`` does. ``_InputsGone`` (``turn.record`` set) when inputs are gone."""
    if reply[0] != 1 or not reply[1]:
        return None, []
    try:
        record = TurnResult.model_validate_json(reply[1])
    except ValueError:
        return None, []
    if record.workflow is None or (record.error_type == CORRUPT_TURN_RECORD and not record.tool_calls):
        return None, []
    turn.record = record
    expired, base, session, created = reply[2], reply[3], reply[4], reply[5]
    return record, _earlier(expired, _memory_base(base), session, created, reply[6:])


def _memory_base(value: Any) -> int:
    """The record's ``memory_base`` (absent: 0); -1 when it is no count (a corrupt record)."""
    try:
        return int(value or 0)
    except ValueError:
        return -1


def _earlier(expired: Any, memory_base: int, session: Any, created: Any, stored: list[bytes]) -> list[dict[str, Any]]:
    """The conversation's memory items before the turn, as the turn ran on them; ``_InputsGone``
    when the record or that memory is no longer what the turn saw."""
    if expired:
        raise _InputsGone("the turn's raw text expired (TURNFLEET_RAW_RETENTION_S)")
    if memory_base < 0:
        raise _InputsGone("the turn's record cannot be read (memory_base)")
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


async def _inputs_slowly(rt: Runtime, turn_id: str) -> tuple[TurnResult | None, list[dict[str, Any]]]:
    """The record as ``TurnQueue.get`` reads it (a corrupt one answered as such, an old one's
    workflow from its request) and the memory before the turn, in round trips of its own: the
    uncommon records ``_inputs`` leaves to it."""
    record = await rt.queue.get(turn_id)
    if record is None:
        return None, []
    if record.error_type == CORRUPT_TURN_RECORD and not record.tool_calls:
        raise _InputsGone("the turn's record cannot be read", record)
    cid = record.conversation_id
    async with rt.redis.pipeline(transaction=True) as pipe:
        pipe.execute_command("HMGET", keys.turn(record.turn_id), "raw_expired_at", "memory_base",
                             "memory_session", **RAW)
        pipe.execute_command("HGET", session_meta(cid), "created_at", **RAW)
        pipe.execute_command("LRANGE", keys.session_messages(cid), 0, -1, **RAW)
        (expired, base, session), created, stored = await pipe.execute()
    try:
        return record, _earlier(expired, _memory_base(base), session, created, stored)
    except _InputsGone as gone:
        raise _InputsGone(str(gone), record) from None


_THREADS: list[ThreadPoolExecutor] = []


def _threads() -> ThreadPoolExecutor:
    """The threads blocking checks run in: a pool of their own (``CHECK_THREADS``), so checks
    waiting on a slow judge never hold the default executor the SDK runs a turn's sync tools in."""
    if not _THREADS:
        _THREADS.append(ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="turnfleet-checks"))
    return _THREADS[0]


async def _run(rt: Runtime, turns: list[_Turn], endpoint: JudgeEndpoint, timeout_s: float) -> None:
    """Each turn's checks (module docstring, step 2): the non-blocking ones on the loop, in
    slices; the others in a thread per turn, concurrently, each bounded by ``timeout_s``."""
    threaded = [t for t in turns if any(c.blocking for c in t.checks)]
    loop = asyncio.get_running_loop()
    waiting = [asyncio.ensure_future(asyncio.wait_for(
        loop.run_in_executor(_threads(), run_with_endpoint, endpoint, run_checks, t.checks, t.finished), timeout_s))
        for t in threaded]
    began = time.perf_counter()
    for turn in turns:
        if any(c.blocking for c in turn.checks):
            continue
        turn.outcomes = [_written(rt, o) for o in run_with_endpoint(endpoint, run_checks, turn.checks, turn.finished)]
        if time.perf_counter() - began > INLINE_SLICE_S:
            await asyncio.sleep(0)  # the turns' I/O first
            began = time.perf_counter()
    for turn, ran in zip(threaded, await asyncio.gather(*waiting, return_exceptions=True), strict=True):
        if isinstance(ran, BaseException):
            if not isinstance(ran, asyncio.TimeoutError):
                raise ran
            turn.verdict = "dead-lettered"
            log.error("checks.dead_lettered", turn_id=turn.job.turn_id, tries=turn.job.tries,
                      reason=f"its checks ran longer than {timeout_s:g} s", turn_outcome="untouched")
        else:
            turn.outcomes = [_written(rt, o) for o in ran]


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


def _telemetry_batch(turn: _Turn, ts: str) -> str:
    """The turn's ``check`` events as the JSON array ``events.batch_json`` writes for them
    (``TelemetryEvent.export``: the same fields, order and values), built as plain dicts: the
    pydantic models cost more than the checks themselves (issue 19). ``ts``: the batch's
    time, one for all its events. ``tests/test_checks_lane.py`` holds it to the models' output."""
    record, turn_id = turn.record, turn.job.turn_id
    assert record is not None
    conversation_id, customer_id = record.conversation_id or turn.job.conversation_id, record.customer_id
    return json.dumps([
        {"event_id": events.check_event_id(turn_id, o["check"]), "kind": "check", "seq": seq, "turn_id": turn_id,
         "attempt": 0, "conversation_id": conversation_id, "customer_id": customer_id, "agent": None,
         "model": o.get("model"), "tool": None, "ts": ts, "usage": o.get("usage"), "duration_ms": None,
         "error": None,
         "detail": {"check": o["check"], "outcome": o["outcome"], "money_path": o["money_path"],
                    "reason": o["reason"] or None, "error": o["error"], "duration_us": float(o["duration_us"])}}
        for seq, o in enumerate(turn.outcomes)
    ], separators=(",", ":"))


def event_time() -> str:
    """Now as a ``TelemetryEvent.ts`` is written (UTC, ISO 8601, ``Z``)."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


async def _write(rt: Runtime, turns: list[_Turn], job_queue: str | None) -> list[str]:
    """Every turn's outcomes with one script call (and, with ``job_queue``, every job's arq
    clean-up, the jobs that end without outcomes included); the verdicts, in order."""
    script_keys: list[str] = []
    script_args: list[Any] = []
    sent: list[_Turn] = []
    ts = event_time()
    for turn in turns:
        write = turn.verdict is None and bool(turn.outcomes)
        if not write and not job_queue:
            continue
        turn_id, job_id, record = turn.job.turn_id, turn.job.job_id, turn.record
        script_keys += [keys.turn(turn_id), keys.turn_checks(turn_id), keys.ARQ_JOB_PREFIX + job_id,
                        keys.ARQ_IN_PROGRESS_PREFIX + job_id, keys.ARQ_RETRY_PREFIX + job_id]
        script_args += [turn_id, job_id, json.dumps(turn.outcomes, separators=(",", ":")) if write else "",
                        _telemetry_batch(turn, ts) if write else "",
                        (record.workflow or "") if record else "", (record.version or "") if record else ""]
        sent.append(turn)
    if sent:
        replies = await WRITE_CHECKS.bind(rt.redis)(
            keys={"telemetry": keys.TELEMETRY_STREAM, "job_queue": job_queue or keys.CHECKS_QUEUE,
                  "arq_abort": ARQ_ABORT_JOBS, "turns": script_keys},
            args={"batch_version": versions.BATCH_CHECK, "arq_cleanup": "1" if job_queue else "", "jobs": script_args},
        )
        for turn, reply in zip(sent, replies, strict=True):
            if turn.verdict is None:
                turn.verdict = lenient_text(reply) if isinstance(reply, bytes) else str(reply)
    verdicts = [t.verdict or "none" for t in turns]
    # One line per batch (a line per turn cost as much as its checks): what was written, and
    # each turn with a failed check, by name.
    failed = {t.job.turn_id: [o["check"] for o in t.outcomes if o["outcome"] == "failed"]
              for t in turns if t.verdict == "written" and any(o["outcome"] == "failed" for o in t.outcomes)}
    one = {"turn_id": turns[0].job.turn_id} if len(turns) == 1 else {}
    log.info("checks.done", jobs=len(turns), **{v: verdicts.count(v) for v in sorted(set(verdicts))}, **one,
             failed=failed)
    return verdicts
