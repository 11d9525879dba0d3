"""The conversation queue: how turns become arq jobs, one conversation at a time.

Each conversation has a list of unfinished turn ids (``conversation_queue``). Only the head
has an arq job; when it ends (completed or failed) the finish script pops it and, in the same
atomic step, writes the arq job of the next turn. So turns of one conversation run one at a
time and in enqueue order whatever worker takes them, different conversations run in
parallel, and no wake-up can be lost between "queue empty?" and "enqueue": both happen inside
one Lua script (DESIGN.md, ordering shape (a)).

arq jobs are written by the scripts in arq's own layout (``arq:job:<id>`` holding the JSON
job, ``arq:queue`` scored by time), with ``job id = turn id``. Jobs are JSON, never pickle.

**Attempts, leases and fencing.** ``START`` counts an attempt (``attempts`` on the turn
record) and returns its number; that number is the attempt's *fencing token*. It also takes
a lease: arq's ``arq:in-progress:<turn id>`` key (which arq sets for its largest
``job_timeout`` + 10 s when it claims a job) is set to expire in ``turn_lease_s``, and the
running attempt renews it (``renew_lease``) every third of that. A worker that dies stops
renewing, the key lapses (⅔ to 1 lease after the kill), and the job — still in
``arq:queue``, first in line by its old score — is claimed at the next read of a worker with a
free slot: ``turn_lease_s`` + ``poll_delay_s`` (10.01 s by default) while one has a free slot;
a saturated worker reads again only after working through the jobs it read last, which
adds up to a few seconds (``make bench``, section 8). The next ``START`` sees the turn still ``running``,
records the lost attempt (``WorkerLost``, no usage: nothing of it was recorded) and counts a
new one. ``FINISH`` and the attempt-failure record are fenced: they write only while the
turn is ``running`` *with the same attempt*. A stale worker — paused or cut off past its
lease while another took the turn over — gets ``Outcome.FENCED`` and writes nothing: no
second result, no second telemetry batch, no advance of the conversation. Side effects
inside a run are idempotent per turn (refund and escalation keys), so the overlap of a
stale and a current attempt does no harm. Conversation memory writes are fenced the same
way (``workers/memory.py``), and the next attempt rolls back what a failed one wrote.

**Worker losses.** A worker process that dies (SIGKILL, OOM, ``os._exit`` in a tool) takes
every attempt it was running with it, and usually one of them killed it. So a loss is not
charged to the turns alike. ``START`` learns of a loss when it finds the turn still
``running``, and the attempt's ``lane`` (kept on the turn record) says how it ran:

- *shared* (beside other turns): the turn becomes a **suspect** and its job is moved to the
  isolated lane (``keys.ISOLATED_QUEUE``) without starting an attempt; the lost attempt is
  ``spared`` (not charged to ``max_attempts``);
- *isolated* (alone on its worker, ``workers/isolation.py``): the loss is the turn's own.
  After ``isolated_losses`` of them (``TURNFLEET_ISOLATED_LOSSES``, default 1) ``START``
  answers ``poison`` and the job ends the turn ``failed`` with ``WorkerLost``; before that
  it is spared too and the turn runs isolated again;
- *plain* (a worker run by arq directly, with no isolated lane): as before, an ordinary
  attempt.

So an innocent neighbour of a poison turn is lost at most once (then runs alone) and spends
none of its attempts on it, and a poison turn takes down at most ``1 + isolated_losses``
worker processes: the one it shared, and those it ran alone on.

**Reconciling.** ``reconcile_conversation`` repairs one conversation atomically: finished
turns left at the head are dropped, a missing ``active`` marker is set to the head, a head
without its arq job (enqueue interrupted, job expired, job failed by arq) gets it back unless
a worker still holds it, and an in-progress key that would outlive a lease (a worker killed
between arq's claim and ``START``) is cut down to one. Running it anywhere, any number of
times, changes nothing in a healthy conversation (``workers/reconcile.py`` runs it).
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from turnfleet import keys, versions
from turnfleet.connection import RAW, as_text, lenient_text
from turnfleet.models import DEFAULT_WORKFLOW, AttemptError, TurnRequest, TurnResult, TurnStatus, check_id, utcnow
from turnfleet.scripts import load_script

M = TypeVar("M", bound=BaseModel)

JOB_FUNCTION = "run_turn"
CHECKS_FUNCTION = "run_turn_checks"  # a finished turn's check job (workers/check_job.py)
UNDECODABLE_FUNCTION = "record_undecodable"  # what an undecodable job payload runs instead
NEWER_FUNCTION = "leave_newer_job"  # what a job of a newer format version runs instead
JOB_TTL_MS = 86_400_000  # arq's expires_extra_ms: a job not started within a day expires
EVENTS_TTL_S = 7 * 86400  # default retention of per-turn event timelines

# The scripts (turnfleet/lua/, each file's header names its keys, arguments and reply). The
# arq job layout is written in one place, the ``arq_job`` fragment (FINISH's and ENQUEUE's
# ``wake``, RECONCILE's rewrite); ``deserialize_job`` is what reads it.
ENQUEUE = load_script("enqueue")
ENQUEUE_MANY_CHUNK = 200  # turns per script call: bounds how long Redis is busy with one
START = load_script("start")
RENEW = load_script("renew")
FAIL_ATTEMPT = load_script("fail_attempt")
FINISH = load_script("finish")
RECONCILE = load_script("reconcile")
ISOLATED_WAITING = load_script("isolated_waiting")


# The routing rule the scripts apply (fragments/route.lua, ``keys.workflow_queue``): the
# built-in workflow keeps arq's queues, another workflow gets these prefixes + its name.
ROUTING = {"default_workflow": DEFAULT_WORKFLOW, "queue_prefix": keys.WORKFLOW_QUEUE_PREFIX,
           "isolated_prefix": keys.WORKFLOW_ISOLATED_PREFIX}


class Outcome(enum.Enum):
    """What a fenced write did. Truthy only when it wrote."""

    WRITTEN = "written"
    DUPLICATE = "duplicate"  # the turn had already ended: nothing written
    FENCED = "fenced"  # another attempt owns the turn (this one is stale): nothing written

    def __bool__(self) -> bool:
        return self is Outcome.WRITTEN


@dataclass(frozen=True)
class Reconciled:
    """What ``reconcile_conversation`` found (and did) for one conversation."""

    conversation_id: str
    action: str  # one of reconcile.lua's actions, or "error" (the script failed: ``error``)
    turn_id: str
    dropped: int = 0
    error: str | None = None

    @property
    def changed(self) -> bool:
        """A repair of a conversation that could not have moved on by itself. (A ``clamped``
        lease is not counted: it is also what a healthy claim looks like in the instant
        between arq's claim and ``START``.)"""
        return self.action not in ("idle", "ok", "running", "clamped", "error") or self.dropped > 0


def _reconciled(conversation_id: str, reply: dict[str, Any]) -> Reconciled:
    return Reconciled(conversation_id, str(reply["action"]), str(reply["turn_id"]), int(reply["dropped"]))


class ConversationOwnershipError(ValueError):
    """The conversation id is already used by another customer."""


class ConversationWorkflowError(ValueError):
    """The conversation belongs to another workflow (its first turn's); ``workflow`` is it."""

    def __init__(self, conversation_id: str, workflow: str) -> None:
        self.conversation_id, self.workflow = conversation_id, workflow
        super().__init__(f"conversation {conversation_id!r} belongs to workflow {workflow!r} "
                         f"(a conversation keeps the workflow of its first turn)")


WRONG_WORKFLOW = -2  # ENQUEUE's answer for a turn of another workflow than its conversation's


@dataclass(frozen=True)
class StartDecision:
    attempt: int  # 0: do not run this job
    status: str
    # Read by START for a running attempt (what it needs to begin, in the same round trip):
    request: TurnRequest | None = None
    current_agent: str | None = None  # where the conversation's next turn starts
    memory_length: int = 0  # conversation memory items now
    memory_base: int = 0  # ... and before this turn's first attempt (a retry trims back to it)
    # Set when the stored request could not be decoded (why): ``request`` is then a
    # stand-in (``stand_in_request``) and the attempt must end the turn failed at once.
    corrupt: str | None = None
    # Attempts lost with a worker and not charged to the turn's ordinary attempts.
    spared: int = 0
    # The conversation memory's items as stored when START ran (raw): the run's first read of
    # its session, without a round trip of its own (``ConversationMemory(preloaded=...)``).
    memory: list[bytes] | None = None


@dataclass(frozen=True)
class FinishExtras:
    """What ``TurnQueue.finish`` writes besides the result, its telemetry and its fence."""

    current_agent: str | None = None  # where the conversation's next turn starts (None: keep)
    events_ttl_s: int = EVENTS_TTL_S  # how long the batch is kept per attempt (keys.turn_events)
    final_error: AttemptError | None = None  # what a failed turn fails with (in the result only)
    checks: bool = False  # the workflow declares checks: queue the turn's check job with the result
    trace_json: str | None = None  # the attempt's kept trace record (keys.trace), written with the result
    trace_ttl_s: int = 0  # ... kept this long
    # The arq queue the turn's job was taken from: the script does arq's clean-up of the job
    # (the caller then skips arq's own). None: arq does it.
    job_queue: str | None = None
    # Conversation memory items the run added (JSON), appended with the result (fenced alike),
    # kept ``memory_ttl_s`` (None: no expiry), as ``workers/memory.py`` writes them.
    memory_items: Sequence[str] = ()
    memory_ttl_s: int | None = None


ARQ_ABORT_JOBS = "arq:abort"  # arq.constants.abort_jobs_ss: job ids asked to abort

NEWER = "newer"  # START's status for a record of a newer format version (nothing changed)


class Lane(enum.Enum):
    """Where a job runs (``START``'s ``lane``): see "Worker losses" in the module doc."""

    SHARED = "shared"  # beside other turns, on a worker that has an isolated lane
    ISOLATED = "isolated"  # alone on its worker (the isolated lane)
    PLAIN = "plain"  # a worker without an isolated lane: a loss is an ordinary attempt


def now_ms() -> int:
    return int(time.time() * 1000)


def session_meta(conversation_id: str) -> str:
    """The hash beside the conversation memory (the SDK's ``{prefix}:{session_id}``: session_id,
    created_at, updated_at), as ``workers/memory.py`` writes it."""
    return f"{keys.SESSION_PREFIX}:{keys.session_id(conversation_id)}"


class TurnQueue:
    """Enqueue, start, finish and read turns. Shared by producer, workers and the CLI."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._enqueue = ENQUEUE.bind(redis)
        self._start = START.bind(redis)
        self._renew = RENEW.bind(redis)
        self._fail_attempt = FAIL_ATTEMPT.bind(redis)
        self._finish = FINISH.bind(redis)
        self._reconcile = RECONCILE.bind(redis)
        self._isolated_waiting = ISOLATED_WAITING.bind(redis)

    # -- producer side ---------------------------------------------------------------

    def _enqueue_call(self, reqs: list[TurnRequest], client: Any = None) -> Any:
        """ENQUEUE for these turns: 6 keys and 5 arguments each, in the order enqueue.lua reads."""
        turn_keys: list[str] = []
        turn_args: list[str] = []
        for req in reqs:
            cid = req.conversation_id
            turn_keys += [keys.turn(req.turn_id), keys.conversation_queue(cid), keys.conversation_active(cid),
                          keys.conversation_turns(cid), keys.conversation_state(cid),
                          keys.customer_conversations(req.customer_id)]
            turn_args += [req.turn_id, cid, req.customer_id, req.model_dump_json(), req.agent]
        return self._enqueue(
            keys={"conversations": keys.CONVERSATIONS, "arq_queue": keys.ARQ_QUEUE, "counters": keys.COUNTERS,
                  "turns": turn_keys},
            args={"now_ms": now_ms(), "job_prefix": keys.ARQ_JOB_PREFIX, "job_ttl": JOB_TTL_MS,
                  "fname": JOB_FUNCTION, "default_workflow": DEFAULT_WORKFLOW,
                  "queue_prefix": keys.WORKFLOW_QUEUE_PREFIX, "turns": turn_args},
            client=client,
        )

    async def enqueue(self, req: TurnRequest) -> bool:
        """Record the turn and wake its conversation if idle. False: turn id already known."""
        outcome = int((await self._enqueue_call([req]))[0])
        if outcome == WRONG_WORKFLOW:
            raise ConversationWorkflowError(req.conversation_id, await self.conversation_workflow(req.conversation_id))
        if outcome < 0:
            raise ConversationOwnershipError(
                f"conversation_id {req.conversation_id!r} belongs to another customer"
            )
        return outcome == 1

    async def enqueue_many(self, reqs: list[TurnRequest]) -> list[int]:
        """One pipelined round trip for many turns (one script call per 200); per request 1,
        0, -1 or -2 (``WRONG_WORKFLOW``) as the script says."""
        if not reqs:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for i in range(0, len(reqs), ENQUEUE_MANY_CHUNK):
                await self._enqueue_call(reqs[i:i + ENQUEUE_MANY_CHUNK], client=pipe)
            return [int(x) for chunk in await pipe.execute() for x in chunk]

    async def conversation_workflow(self, conversation_id: str) -> str:
        """The workflow a conversation belongs to (its first turn's; the built-in one for a
        conversation recorded before workflows existed, or one not known yet)."""
        found = await self.redis.hget(keys.conversation_state(conversation_id), "workflow")
        return as_text(found) if found is not None else DEFAULT_WORKFLOW

    # -- worker side -----------------------------------------------------------------

    async def start(
        self,
        turn_id: str,
        conversation_id: str,
        worker: str,
        started_at: str,
        lease_s: float = 0.0,
        lane: Lane = Lane.PLAIN,
        isolated_losses: int = 1,
        served: Sequence[str] = (),
        source_queue: str = keys.ARQ_QUEUE,
    ) -> StartDecision:
        """Count an attempt and mark the turn running, if it may run now (it is its
        conversation's head and has not ended). ``attempt`` is the attempt's fencing token.

        With ``lease_s`` the turn's arq in-progress key is set to expire in that long: the
        caller renews it with ``renew_lease`` while the attempt runs. ``lane`` says where
        the job runs (see "Worker losses" in the module doc): a suspect met in the shared
        lane is handed to the isolated lane (``status`` ``isolate``, attempt 0), and a turn
        lost ``isolated_losses`` times while isolated comes back with ``status`` ``poison``.

        ``served``: the workflows the calling worker serves. A turn of another workflow met in
        ``source_queue`` (the queue the job was taken from: an older process queued it in
        ``arq:queue``) is moved to its own workflow's queue, arq's claim undone, nothing
        counted (``status`` ``rerouted``, attempt 0). Empty: no check.
        """
        out = await self._start.raw(  # raw: the stored request may be anything, UTF-8 or not
            self.redis,
            keys={
                "turn": keys.turn(turn_id),
                "conv_queue": keys.conversation_queue(conversation_id),
                "turn_errors": keys.turn_errors(turn_id),
                "in_progress": keys.ARQ_IN_PROGRESS_PREFIX + turn_id,
                "conv_state": keys.conversation_state(conversation_id),
                "session_messages": keys.session_messages(conversation_id),
                "quarantine": keys.turn_quarantine(turn_id),
                "arq_queue": keys.ARQ_QUEUE,
                "isolated_queue": keys.ISOLATED_QUEUE,
                "source_queue": source_queue,
                "arq_retry": keys.ARQ_RETRY_PREFIX + turn_id,
            },
            args={"turn_id": turn_id, "worker": worker, "started_at": started_at,
                  "lease_ms": int(lease_s * 1000), "now_iso": utcnow().isoformat(), "lane": lane.value,
                  "isolated_losses": isolated_losses, "now_ms": now_ms(),
                  "record_version": versions.TURN_RECORD, **ROUTING,
                  "served": json.dumps(list(served)) if served else ""},
        )
        attempt, status = int(out["attempt"]), as_text(out["status"])
        if attempt == 0:
            return StartDecision(0, status)
        corrupt = None
        try:
            request = decode_request(out["request"])
        except CorruptRecord as exc:
            corrupt = lenient_text(out["corrupt"]) or str(exc)
            request = stand_in_request(turn_id, conversation_id, lenient_text(out["customer_id"]) or "")
        return StartDecision(
            attempt, status, request=request,
            current_agent=lenient_text(out["current_agent"]) or None, memory_length=int(out["memory_length"]),
            memory_base=int(out["memory_base"]), corrupt=corrupt, spared=int(out["spared"]),
            memory=list(out["memory"]),
        )

    async def isolated_turn(self, worker: str, serving: bool, stale_ms: int = 2000) -> tuple[int, bool]:
        """``isolated_lanes`` for the built-in workflow alone: (waiting, serve)."""
        waiting, serve, _lane = await self.isolated_lanes(worker, serving, stale_ms)
        return waiting, serve

    async def isolated_lanes(self, worker: str, serving: bool, stale_ms: int = 2000,
                             workflows: tuple[str, ...] = (DEFAULT_WORKFLOW,)) -> tuple[int, bool, int]:
        """How many jobs of the isolated lanes of ``workflows`` wait (due, held by no worker; up
        to 100 each), whether ``worker`` is to serve the lane now, and which workflow's lane to
        open (index into ``workflows``, -1: none waits; see ``isolated_waiting.lua``). A worker
        that serves it is listed in ``keys.WORKERS_ISOLATING`` while it looks at least every
        ``stale_ms``; one that stops looking (dead) drops out after that long."""
        out = await self._isolated_waiting(
            keys={"isolating_workers": keys.WORKERS_ISOLATING,
                  "isolated_queues": [keys.workflow_isolated_queue(w) for w in workflows]},
            args={"now_ms": now_ms(), "in_progress_prefix": keys.ARQ_IN_PROGRESS_PREFIX, "worker": worker,
                  "stale_ms": stale_ms, "serving": int(serving)})
        return int(out["waiting"]), bool(out["serve"]), int(out["queue"]) - 1

    async def leave_isolated_lane(self, worker: str) -> None:
        await self.redis.zrem(keys.WORKERS_ISOLATING, worker)

    async def renew_lease(self, turn_id: str, attempt: int, worker: str, lease_s: float) -> bool:
        """Extend the attempt's lease; False once the attempt no longer owns the turn."""
        held = await self._renew(
            keys={"turn": keys.turn(turn_id), "in_progress": keys.ARQ_IN_PROGRESS_PREFIX + turn_id},
            args={"attempt": attempt, "lease_ms": int(lease_s * 1000), "token": f"{worker}#{attempt}"},
        )
        return int(held) == 1

    async def record_attempt_failure(
        self,
        turn_id: str,
        error: AttemptError,
        telemetry_batch: str | None,
        events_ttl_s: int = EVENTS_TTL_S,
        fence: int | None = None,
        ran_by: tuple[str | None, str | None] = (None, None),
    ) -> Outcome:
        """Keep a failed attempt's error (and its telemetry) before the turn is tried again.

        With ``fence`` (the attempt number ``start`` returned) nothing is written unless that
        attempt is still the turn's running attempt. ``ran_by``: the (workflow, version) that
        ran the attempt, written on the telemetry entry beside its format version.
        """
        verdict = await self._fail_attempt(
            keys={"turn": keys.turn(turn_id), "turn_errors": keys.turn_errors(turn_id),
                  "telemetry": keys.TELEMETRY_STREAM, "turn_events": keys.turn_events(turn_id)},
            args={"fence": "" if fence is None else fence, "error_json": error.model_dump_json(),
                  "telemetry_batch": telemetry_batch or "", "attempt": error.attempt,
                  "events_ttl_s": events_ttl_s, "turn_id": turn_id,
                  "workflow": ran_by[0] or "", "version": ran_by[1] or ""},
        )
        return Outcome(verdict)

    async def finish(
        self,
        result: TurnResult,
        telemetry_batch: str | None,
        fence: int | None = None,
        extras: FinishExtras = FinishExtras(),
    ) -> Outcome:
        """Write the terminal result and telemetry, then wake the conversation's next turn.

        The result's ``errors`` are not the caller's (``result.errors`` is ignored): the script
        writes the attempt errors stored for the turn, then ``extras.final_error`` (what a
        failed turn fails with; kept in the result only), in the same atomic step as the result.

        With ``extras.trace_json`` the attempt's kept trace record is appended to
        ``keys.trace`` (for ``extras.trace_ttl_s``) in the same step: one round trip fewer.

        With ``extras.memory_items`` the run's conversation memory items are appended first,
        in the same step (the worker's memory write without a round trip of its own): the
        memory and the result are written together, or (fenced, duplicate) neither.

        With ``extras.job_queue`` the turn's arq job (taken from that queue) is cleaned up as
        arq would once the job returns (``keep_result`` 0), in the same step.

        With ``extras.checks`` the turn's check job (``keys.checks_job_id``, ``CHECKS_FUNCTION``)
        is queued in its workflow's checks queue in the same step, once.

        The telemetry batch is also kept per attempt (``keys.turn_events``) for
        ``extras.events_ttl_s``: the timeline replay shows for turns whose spans were not
        sampled. The turn enters ``keys.RAW_TEXT`` (its finish time) in the same step: what the
        raw-text expiry (``telemetry/raw_expiry.py``) walks.
        With ``fence`` (the attempt number ``start`` returned) nothing is written unless that
        attempt is still the turn's running attempt. Truthy only if this call wrote.
        """
        cid, final_error = result.conversation_id, extras.final_error
        verdict = await self._finish(
            keys={
                "turn": keys.turn(result.turn_id),
                "conv_queue": keys.conversation_queue(cid),
                "conv_active": keys.conversation_active(cid),
                "conv_state": keys.conversation_state(cid),
                "arq_queue": keys.ARQ_QUEUE,
                "results": keys.RESULTS_STREAM,
                "telemetry": keys.TELEMETRY_STREAM,
                "turn_events": keys.turn_events(result.turn_id),
                "raw_text": keys.RAW_TEXT,
                "session_messages": keys.session_messages(cid),
                "session_meta": session_meta(cid),
                "turn_errors": keys.turn_errors(result.turn_id),
                "checks_queue": keys.CHECKS_QUEUE,
                "trace": keys.trace(result.turn_id),
                "job_queue": extras.job_queue or keys.ARQ_QUEUE,
                "arq_job": keys.ARQ_JOB_PREFIX + result.turn_id,
                "arq_in_progress": keys.ARQ_IN_PROGRESS_PREFIX + result.turn_id,
                "arq_retry": keys.ARQ_RETRY_PREFIX + result.turn_id,
                "arq_abort": ARQ_ABORT_JOBS,
            },
            args={
                "turn_id": result.turn_id,
                "conversation_id": cid,
                "status": result.status,
                "result_json": result.model_dump_json(exclude={"errors"}),
                "telemetry_batch": telemetry_batch or "",
                "now_ms": now_ms(),
                "job_prefix": keys.ARQ_JOB_PREFIX,
                "job_ttl": JOB_TTL_MS,
                "fname": JOB_FUNCTION,
                "current_agent": extras.current_agent or "",
                "attempt": max(result.attempts, 1),
                "events_ttl_s": extras.events_ttl_s,
                "fence": "" if fence is None else fence,
                "final_error_json": "" if final_error is None else final_error.model_dump_json(),
                "default_workflow": DEFAULT_WORKFLOW,
                "queue_prefix": keys.WORKFLOW_QUEUE_PREFIX,
                "workflow": result.workflow or "",
                "version": result.version or "",
                "checks": "1" if extras.checks else "",
                "checks_job": keys.checks_job_id(result.turn_id),
                "checks_fname": CHECKS_FUNCTION,
                "checks_prefix": keys.WORKFLOW_CHECKS_PREFIX,
                "trace_json": extras.trace_json or "",
                "trace_ttl_s": extras.trace_ttl_s,
                "arq_cleanup": "1" if extras.job_queue else "",
                "memory_session_id": keys.session_id(cid),
                "memory_ttl_s": "" if extras.memory_ttl_s is None else int(extras.memory_ttl_s),
                "memory_items": list(extras.memory_items),
            },
        )
        return Outcome(verdict)

    def _reconcile_call(self, conversation_id: str, lease_s: float, client: Any = None) -> Any:
        return self._reconcile(
            keys={"conv_queue": keys.conversation_queue(conversation_id),
                  "conv_active": keys.conversation_active(conversation_id),
                  "conv_state": keys.conversation_state(conversation_id),
                  "arq_queue": keys.ARQ_QUEUE, "isolated_queue": keys.ISOLATED_QUEUE},
            args={"conversation_id": conversation_id, "now_ms": now_ms(), "job_prefix": keys.ARQ_JOB_PREFIX,
                  "job_ttl": JOB_TTL_MS, "fname": JOB_FUNCTION, "turn_key_prefix": keys.turn(""),
                  "in_progress_prefix": keys.ARQ_IN_PROGRESS_PREFIX, "lease_ms": int(lease_s * 1000),
                  **ROUTING},
            client=client,
        )

    async def reconcile_conversation(self, conversation_id: str, lease_s: float = 0.0) -> Reconciled:
        """Repair one conversation's queue, active marker and head job (see the module doc)."""
        return _reconciled(conversation_id, await self._reconcile_call(conversation_id, lease_s))

    async def reconcile_many(self, conversation_ids: list[str], lease_s: float = 0.0) -> list[Reconciled]:
        """``reconcile_conversation`` for many, in one pipelined round trip (each atomic)."""
        if not conversation_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for cid in conversation_ids:
                await self._reconcile_call(cid, lease_s, client=pipe)
            # One conversation's script error (a key of the wrong type, written by hand) must
            # not hide the others' answers: it is reported as that conversation's ``error``.
            replies = await pipe.execute(raise_on_error=False)
        return [
            Reconciled(cid, "error", "", 0, error=f"{type(reply).__name__}: {reply}")
            if isinstance(reply, Exception) else _reconciled(cid, RECONCILE.named(reply))
            for cid, reply in zip(conversation_ids, replies)
        ]

    # -- read side -------------------------------------------------------------------

    async def get(self, turn_id: str) -> TurnResult | None:
        """The turn's result if it ended, else its request with the current status.

        Never raises on what is stored: a record that cannot be decoded is answered as a
        ``CorruptTurnRecord`` failure (with the ids the record still holds), so every
        reader (CLI, HTTP, replay) shows it instead of failing.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.execute_command("HGETALL", keys.turn(turn_id), **RAW)
            pipe.execute_command("LRANGE", keys.turn_errors(turn_id), 0, -1, **RAW)
            raw_record, errors = await pipe.execute(raise_on_error=False)
        if isinstance(errors, ResponseError):  # WRONGTYPE: not a list
            errors = [b"unreadable"]
        if isinstance(raw_record, ResponseError):  # WRONGTYPE: not a hash (START quarantines it)
            return corrupt_result(turn_id, {}, f"the turn record is not a hash ({raw_record})",
                                  _decode_errors(errors))
        if isinstance(raw_record, Exception):
            raise raw_record
        if not raw_record:
            return None
        # JSON fields stay bytes (pydantic checks their UTF-8); the others are plain text.
        record: dict[str, Any] = {
            lenient_text(k): v if k in (b"request", b"result") else lenient_text(v) for k, v in raw_record.items()
        }
        try:
            if record.get("result"):
                result = _decode(TurnResult, record["result"], "stored result")
                if result.workflow is None:  # written before results named their workflow
                    result.workflow = _request_workflow(record.get("request"))
                return result
            req = decode_request(record.get("request"))
        except CorruptRecord as exc:
            reason = str(exc)
            version = versions.version_of(record.get(versions.FIELD))
            if version is not None and version > versions.TURN_RECORD:  # not corrupt: newer
                reason = (f"it was written by a newer turnfleet (turn record format {version}; this "
                          f"process reads up to {versions.TURN_RECORD}) and a newer process reads it: {reason}")
            return corrupt_result(turn_id, record, reason, _decode_errors(errors))
        return TurnResult(
            turn_id=req.turn_id,
            conversation_id=req.conversation_id,
            customer_id=req.customer_id,
            status=_status(record.get("status")),
            text=req.text,
            attempts=_int(record.get("attempts")),
            errors=_decode_errors(errors),
            enqueued_at=req.enqueued_at,
            worker=record.get("worker"),
            workflow=req.agent,
        )

    async def get_request(self, turn_id: str) -> TurnRequest | None:
        """The stored request, None if the turn is unknown; ``CorruptRecord`` if unreadable."""
        raw = await self.redis.execute_command("HGET", keys.turn(turn_id), "request", **RAW)
        return decode_request(raw) if raw else None

    async def conversation_of(self, turn_id: str) -> str | None:
        """The conversation the turn record names (kept beside the request since enqueue);
        None if it names none or is no record at all."""
        try:
            return lenient_text(await self.redis.execute_command(
                "HGET", keys.turn(turn_id), "conversation_id", **RAW))
        except ResponseError:  # WRONGTYPE
            return None

    async def errors(self, turn_id: str) -> list[AttemptError]:
        try:
            raw = await self.redis.execute_command("LRANGE", keys.turn_errors(turn_id), 0, -1, **RAW)
        except ResponseError:  # WRONGTYPE: shown as one unreadable error, not raised
            raw = [b"unreadable"]
        return _decode_errors(raw)

    async def wait(self, turn_id: str, timeout_s: float) -> TurnResult | None:
        """Wait for the turn to end, on the results stream (no polling); None if unknown."""
        tail = await self.redis.xrevrange(keys.RESULTS_STREAM, count=1)
        last_id = tail[0][0] if tail else "0-0"
        result = await self.get(turn_id)
        deadline = time.monotonic() + timeout_s
        while result is not None and not result.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return result
            entries = await self.redis.xread(
                {keys.RESULTS_STREAM: last_id}, block=max(1, int(remaining * 1000)), count=1000
            )
            for _stream, items in entries or []:
                for entry_id, fields in items:
                    last_id = entry_id
                    if fields.get("turn_id") == turn_id:
                        return await self.get(turn_id)
            if not entries:
                result = await self.get(turn_id)
        return result

    async def conversation_turn_ids(self, conversation_id: str) -> list[str]:
        return list(await self.redis.lrange(keys.conversation_turns(conversation_id), 0, -1))


def serialize_job(data: dict[str, object]) -> bytes:
    """arq ``job_serializer``: JSON, never pickle (writing to Redis must not run code here).

    Anything JSON cannot represent (an exception in a failure record) is stored as text.
    """
    return json.dumps(data, default=repr, separators=(",", ":")).encode()


def deserialize_job(raw: bytes) -> dict[str, object]:
    """arq ``job_deserializer``. Never raises: a payload that is not a well-formed turn job
    becomes a job for ``record_undecodable`` (``UNDECODABLE_FUNCTION``) with the reason.

    arq's own handling of a payload it cannot decode fails the *arq job* (deletes it) and
    leaves the turn ``queued`` with no job, its conversation stalled. Decoding it into a job
    that records the failure instead lets the worker end the turn ``failed``
    (``UndecodableJob``) for the job id (= the turn id) and wake the conversation's next turn.

    Anything may be in Redis: bytes that are not UTF-8, nesting deep enough that the JSON
    parser gives up with ``RecursionError`` (not a ``ValueError``), numbers too long to
    convert, ids no producer would accept, counters arq would choke on. Each is a reason.

    A job whose format version (``"v"``, :mod:`turnfleet.versions`) is newer than this
    process reads becomes a job for ``leave_newer_job`` (``NEWER_FUNCTION``): it is put
    back for a newer worker, never failed.
    """
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError, digits
        return undecodable_job(f"not JSON ({type(exc).__name__}: {str(exc)[:200]})")
    version = versions.version_of(data.get(versions.FIELD)) if isinstance(data, dict) else 1
    if version is None:
        return undecodable_job(f"field {versions.FIELD!r} is not a format version")
    if version > versions.JOB:
        # Written by a newer process: its shape is not ours to judge. Leave it for one.
        return {"t": 1, "f": NEWER_FUNCTION, "a": [version], "k": {}, "et": now_ms()}
    try:
        problem = _job_problem(data)
    except RecursionError:  # a str()/repr() of something absurd; never propagate
        problem = "not a turn job (unprintable)"
    if problem is not None:
        return undecodable_job(problem)
    return data  # type: ignore[no-any-return]


def undecodable_job(reason: str) -> dict[str, object]:
    """The job ``deserialize_job`` hands arq for a payload it could not decode."""
    return {"t": 1, "f": UNDECODABLE_FUNCTION, "a": [reason[:500]], "k": {}, "et": now_ms()}


MAX_JOB_TRY = 1000  # arq copies a payload's try count above its own into its retry key
MAX_JOB_TIME_MS = 2**53  # enqueue times are milliseconds; arq turns them into datetimes


def _job_problem(data: object) -> str | None:
    """Why a decoded payload is not a turn job (or a turn's check job) as the scripts write it
    (None: it is)."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    if data.get("f") not in (JOB_FUNCTION, CHECKS_FUNCTION):
        f = data.get("f")
        return f"function {f[:80]!r} is not {JOB_FUNCTION!r}" if isinstance(f, str) else \
            f"function is a JSON {type(f).__name__}, not {JOB_FUNCTION!r}"
    args = data.get("a")
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(x, str) for x in args)):
        return "arguments are not [turn_id, conversation_id]"
    for name, value in zip(("turn_id", "conversation_id"), args):
        try:
            check_id(value)
        except ValueError:
            return f"argument {name} is not a valid id"
    if not isinstance(data.get("k"), dict) or data["k"]:
        return "keyword arguments are not an empty object"
    for field, top in (("t", MAX_JOB_TRY), ("et", MAX_JOB_TIME_MS)):
        value = data.get(field)
        if not isinstance(value, int) or isinstance(value, bool):
            return f"field {field!r} is not an integer"
        if not 0 <= value <= top:
            return f"field {field!r} is out of range"
    return None


# -- decoding what is stored -------------------------------------------------------------

CORRUPT_TURN_RECORD = "CorruptTurnRecord"  # error type of a turn whose stored record is unreadable


class CorruptRecord(ValueError):
    """A stored value (turn request, result, attempt error) that cannot be decoded. The
    message says which and why, without the stored text (it may hold customer data)."""


def _decode(model: type[M], raw: str | bytes | None, what: str) -> M:
    """``model`` from stored JSON, or ``CorruptRecord``. pydantic parses nesting of any depth
    without recursing in Python, so deep JSON is a ``ValidationError`` here too."""
    if not raw:
        raise CorruptRecord(f"{what} is missing")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "document"
        raise CorruptRecord(f"{what} cannot be decoded ({exc.error_count()} errors; "
                            f"{where}: {first.get('msg', '?')})") from None


def decode_request(raw: str | bytes | None) -> TurnRequest:
    """The stored ``TurnRequest``, or ``CorruptRecord`` saying why not."""
    return _decode(TurnRequest, raw, "stored request")


def stand_in_request(turn_id: str, conversation_id: str, customer_id: str) -> TurnRequest:
    """What is still known of a turn whose request is unreadable: enough to record its
    failure (ids; no text), built without validation since nothing here came from a client."""
    return TurnRequest.model_construct(
        turn_id=turn_id, conversation_id=conversation_id, customer_id=customer_id, text="",
        metadata={}, agent=DEFAULT_WORKFLOW, trace=False, enqueued_at=None,
    )


def _request_workflow(raw: Any) -> str | None:
    """The workflow a stored request names (``None`` if it cannot be read: the result stands)."""
    try:
        return decode_request(raw).agent if raw else None
    except CorruptRecord:
        return None


def corrupt_result(turn_id: str, record: dict[str, Any], reason: str,
                   errors: list[AttemptError]) -> TurnResult:
    """How ``get`` answers for a record it cannot decode: the failure, with the ids the
    record still holds (``""`` for a record written before it held them)."""
    return TurnResult(
        turn_id=turn_id,
        conversation_id=record.get("conversation_id") or "",
        customer_id=record.get("customer_id") or "",
        status=_status(record.get("status")),
        attempts=_int(record.get("attempts")),
        errors=errors,
        error_type=CORRUPT_TURN_RECORD,
        error_message=f"the turn's record in Redis is corrupt: {reason}",
        worker=record.get("worker"),
    )


def _decode_errors(raw: list[bytes]) -> list[AttemptError]:
    """Attempt errors as stored; one that cannot be decoded is shown as such, not raised."""
    out = []
    for i, item in enumerate(raw):
        try:
            out.append(_decode(AttemptError, item, f"attempt error {i + 1}"))
        except CorruptRecord as exc:
            out.append(AttemptError(attempt=0, error_type=CORRUPT_TURN_RECORD, message=str(exc)))
    return out


def _status(value: str | None) -> TurnStatus:
    return value if value in ("queued", "running", "completed", "failed") else "queued"  # type: ignore[return-value]


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0
