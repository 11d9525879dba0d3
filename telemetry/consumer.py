"""The telemetry consumer: one member of the ``telemetry`` consumer group on the stream.

Delivery is at-least-once and counting exactly-once. Each batch of stream entries is
aggregated (one idempotent script for the batch, or one per entry, pipelined, when the batch
holds an event counted before: :meth:`Aggregator.apply`), then the alert rules run for the
subjects it touched, then the entries are acknowledged. A consumer that dies anywhere in
between leaves its entries pending; it reads them again when it restarts under the same name
(own pending list, id ``0``), or another consumer takes them with ``XAUTOCLAIM`` once they
have been idle ``claim_idle_ms``. Either way the dedupe in the script makes the second pass
count nothing, and the alert rules, being idempotent, run again safely.

Redis errors (connection lost, server restarting, out of memory, read-only replica) are
logged and retried with backoff; the entries in hand stay pending and are handled again.
They never count against an entry.

**Poison entries and the dead-letter stream.** An entry whose handling raises something
else (the planner chokes on it, its aggregate script fails, the alert rules fail on what it
touched) fails alone: the batch is applied again entry by entry, so the others in it are
aggregated and acknowledged, and the failing one stays pending. It is read again after a
backoff (0.2 s doubling, at most ``RETRY_MAX_S``), by this consumer (own pending list) or,
if this one dies, by whichever claims it; every read counts in its delivery counter. When
it fails on a delivery numbered ``dead_letter_after`` or later, one script copies it to
``keys.TELEMETRY_DEAD_LETTER`` and acknowledges it (``XADD`` + ``XACK``, only if it is still
pending, so two consumers racing on it copy it once), and adds one to
``telemetry_dead_lettered`` on the fleet hash; ``telemetry.dead_lettered`` is logged as an
error with the traceback.

**Newer batches are left, never dead-lettered** (:mod:`turnfleet.versions`). An entry whose
format version (field ``v``; none is version 1) is newer than this consumer reads
(``reads_batch_version``) was written by a newer worker during a rolling deploy: it is not
aggregated, not acknowledged and never dead-lettered, however often it is delivered. It stays
pending; once idle ``claim_idle_ms`` any consumer may claim it, and the first that reads its
version aggregates it (exactly once, as any entry). Each leave is counted on the fleet hash
(``newer_format_left_batch``) and logged once per entry by each consumer. A batch of version
1 that holds an event kind this consumer does not know is malformed, as before: a writer that
adds a kind writes a newer batch version, so older consumers leave it instead.

Fields of an entry besides ``v`` and ``batch`` are not part of its format version: a worker
writes ``workflow`` and ``version`` (what ran the attempt, once per entry; see
:class:`~turnfleet.telemetry.aggregate.RanBy`) and a consumer that does not know them ignores
them and counts the batch correctly, only without the per-version split. That is why adding
them kept batch version 1: leaving such entries for a newer consumer would stall telemetry
during a rolling deploy for no gain.

A malformed entry (not a batch of telemetry events) is logged, counted once in the fleet's
``telemetry_malformed`` and acknowledged on its first delivery, as before, and copied to the
dead-letter stream in the same script as its acknowledgement, with reason ``malformed``.

Each dead-letter entry has the fields (all strings)::

    entry_id          the entry's id in tf:telemetry
    reason            "error" (failed dead_letter_after deliveries) or "malformed"
    stage             where it failed: "plan", "aggregate", "alerts"; "parse" if malformed
    error             "<ExceptionType>: <message>" (at most ERROR_CHARS)
    traceback         the last TRACEBACK_CHARS of the traceback ("" for malformed ones)
    deliveries        its delivery count when it was dead-lettered
    consumer          the consumer that held it
    dead_lettered_at  ISO 8601 UTC
    stream, group     where it came from
    fields            the entry's original fields, as one JSON object

``telemetry_dead_lettered`` counts every copy (malformed ones too; ``telemetry_malformed``
says how many of them were malformed). The stream is capped at about
``DEAD_LETTER_MAX_ENTRIES`` (``XADD MAXLEN ~``): a flood of garbage cannot exhaust memory,
the counter keeps the true total. :func:`read_dead_letters` reads it; XADDing an entry's
``fields`` back to ``tf:telemetry`` re-drives it once the cause is fixed (aggregation is
idempotent, so events it had already counted count nothing).

**Trimming.** The consumer process (:func:`run_consumer`) trims the stream to its
unacknowledged tail every ``TRIM_EVERY_S`` and at the end of a burst run; the policy (never
an entry some group has not acknowledged; a backlog longer than ``telemetry_max_entries`` is
counted in ``telemetry_backlog_over_limit`` and logged, never trimmed) is in
:mod:`turnfleet.telemetry.trim`.

**Fault injection (drills only).** ``TURNFLEET_FAULT_CRASH_BEFORE_ACK=N`` (unset by
default; :class:`FaultInjection`) makes the process end with ``os._exit(137)``, as a SIGKILL
would leave it, right after the aggregate of the batch holding the N-th entry this process
aggregated is stored, before alerts run and before ``XACK``. Those entries stay pending with
their counts stored: what a crash between aggregating and acknowledging leaves. Never set
it in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from turnfleet.telemetry.aggregate import Aggregator, EntryPlan, MalformedEntry, RanBy, Touched
from turnfleet.telemetry.alerts import AlertRules
from turnfleet.telemetry.stream_group import Entry, StreamGroupMember, _text
from turnfleet.telemetry.raw_expiry import RawExpiry
from turnfleet.telemetry.retention import PURGE_EVERY_S, Retention
from turnfleet.telemetry.trim import TRIM_EVERY_S, TrimResult, trim_acknowledged
from turnfleet import heartbeat, keys, versions
from turnfleet.startup_heap import freeze_startup_heap
from turnfleet.connection import RedisUnavailable, connect, wait_for_redis
from turnfleet.scripts import load_script
from turnfleet.settings import TelemetrySettings

if TYPE_CHECKING:
    from turnfleet.telemetry.webhook import AlertWebhook

log = structlog.get_logger(__name__)

STREAM = keys.TELEMETRY_STREAM
GROUP = keys.TELEMETRY_GROUP
DEAD_LETTER = keys.TELEMETRY_DEAD_LETTER
DEAD_LETTERED = "telemetry_dead_lettered"  # field on keys.GLOBAL_AGGREGATE
DEAD_LETTER_MAX_ENTRIES = 100_000  # XADD MAXLEN ~ of the dead-letter stream
MAX_BACKOFF_S = 5.0
RETRY_FIRST_S = 0.2  # a failed entry is read again after 0.2 s, 0.4 s, ... (per delivery)
RETRY_MAX_S = 5.0
ERROR_CHARS = 2000
TRACEBACK_CHARS = 8000
READ_AHEAD_MIN = 50  # a full batch of at least this many: the next is read and planned meanwhile
# Loop iterations redis-py takes from a call to its command on the wire (pool, connection
# check, write: ~4 with redis-py 5); a few more cost ~10 µs each, a few less only the overlap.
SEND_YIELDS = 8
# The consumer allocates a few hundred containers an event (pydantic events, plans), nearly all
# freed by reference counting once their batch is done. With CPython's default thresholds
# (700, 10, 10) a full collection, a walk of every live object (two batches' worth with the
# read-ahead), ran every few hundred events: ~2 µs of CPU an event (bench/telemetry_replay.py).
# A young collection every 700 allocations still walked a batch's live objects over and over
# (~400 young and ~40 middle collections a replay of 36k events: ~1.3 µs an event); with
# 100 000 a batch's objects are freed before one comes (one a replay, ~0.3 µs an event). While
# run_consumer runs, collections come that much less often; a cycle left as garbage waits for
# at most 100 000 allocations.
GC_THRESHOLDS = (100_000, 10, 1000)
FAULT_EXIT_CODE = 137  # what a shell reports for a SIGKILLed process (128 + 9)

REASON_ERROR = "error"
REASON_MALFORMED = "malformed"


class FaultInjection(BaseSettings):
    """Faults a drill can switch on in a real consumer process. All off by default; never
    set them in production. Read from ``TURNFLEET_FAULT_*`` when a consumer is built."""

    model_config = SettingsConfigDict(env_prefix="TURNFLEET_FAULT_", extra="ignore")

    crash_before_ack: int | None = Field(
        default=None, ge=1,
        description="FAULT INJECTION: os._exit(137) right after the aggregate of the N-th entry "
        "this process aggregated is stored, before alerts and XACK.",
    )


# Copy a still-pending entry to the dead-letter stream and acknowledge it (lua/dead_letter.lua).
DEAD_LETTER_SCRIPT = load_script("dead_letter", "turnfleet.telemetry")

# Server states that make a script fail whatever the entry: an outage, not a poison entry.
_SERVER_STATE = re.compile(
    r"\b(OOM|READONLY|LOADING|BUSY|MASTERDOWN|NOREPLICAS|CLUSTERDOWN|TRYAGAIN|NOGROUP)\b"
)


def entry_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is this entry's fault (retry it, then dead-letter it), rather than
    Redis being unavailable (keep everything pending and back off; never dead-letter).

    A script error (``Error running script ...``) is the entry's, unless it reports a server
    state (out of memory, read-only, loading, ...). Any other Redis error is an outage; any
    other exception is the entry's.
    """
    if isinstance(exc, ResponseError):
        script_error = _script_error(exc)
        return script_error is not None and not _SERVER_STATE.search(script_error)
    if isinstance(exc, RedisError):
        return False
    return isinstance(exc, Exception)


def _script_error(exc: ResponseError) -> str | None:
    """The script's own error message, without redis-py's pipeline annotation (which quotes
    the command and its arguments: the entry's data); None if it is not a script error."""
    message = str(exc)
    at = message.rfind("Error running script")
    if at < 0:
        return None
    return message[at:].rstrip("',)")


@dataclass
class _Failure:
    fields: Mapping[str, Any]
    error: BaseException
    stage: str  # plan, aggregate, alerts


@dataclass
class _Batch:
    """A batch of entries, planned: what ``TelemetryConsumer._finish`` needs once applied."""

    entries: list[Entry]
    plans: list[EntryPlan] = field(default_factory=list)
    ack: list[str] = field(default_factory=list)  # gone from the stream: acknowledged as they are
    fields_of: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    malformed: dict[str, str] = field(default_factory=dict)  # entry id -> what is wrong with it
    failed: dict[str, _Failure] = field(default_factory=dict)
    left: int = 0  # of a newer format version: left pending


@dataclass(frozen=True)
class DeadLetter:
    """One entry of the dead-letter stream (see the module docstring for the fields)."""

    id: str  # in the dead-letter stream
    entry_id: str  # in the telemetry stream
    reason: str  # "error" or "malformed"
    stage: str
    error: str
    traceback: str
    deliveries: int
    consumer: str
    dead_lettered_at: str
    stream: str
    group: str
    fields: dict[str, Any]  # the original entry's fields

    @classmethod
    def from_entry(cls, entry_id: str, raw: Mapping[str, str]) -> DeadLetter:
        try:
            fields = json.loads(raw.get("fields") or "{}")
        except ValueError:
            fields = {"_unreadable": raw.get("fields")}
        return cls(
            id=entry_id, entry_id=raw.get("entry_id", ""), reason=raw.get("reason", ""),
            stage=raw.get("stage", ""), error=raw.get("error", ""),
            traceback=raw.get("traceback", ""), deliveries=int(raw.get("deliveries") or 0),
            consumer=raw.get("consumer", ""), dead_lettered_at=raw.get("dead_lettered_at", ""),
            stream=raw.get("stream", ""), group=raw.get("group", ""), fields=fields,
        )


async def read_dead_letters(redis: Redis, start: str = "-", end: str = "+",
                            count: int | None = 100) -> list[DeadLetter]:
    """Entries of the telemetry dead-letter stream, oldest first, between ``start`` and
    ``end`` (stream ids; ``(id`` excludes one, as in ``XRANGE``), at most ``count``.

    Needs a client with ``decode_responses=True`` (``turnfleet.connection.connect``).
    """
    page = await redis.xrange(DEAD_LETTER, min=start, max=end, count=count)
    return [DeadLetter.from_entry(entry_id, raw) for entry_id, raw in page]


async def caught_up(redis: Redis) -> bool:
    """True when every entry written to the stream has been aggregated and acknowledged.

    That is: the group has delivered the stream's last entry and has nothing pending
    (Redis 6.2 has no ``lag`` in ``XINFO GROUPS``). No stream yet: nothing to catch up on.
    """
    try:
        info = await redis.xinfo_stream(STREAM)
    except ResponseError:
        return True  # no such key: nothing was ever written
    for group in await redis.xinfo_groups(STREAM):
        if _text(group["name"]) == GROUP:
            return (
                _text(group["last-delivered-id"]) == _text(info["last-generated-id"])
                and int(group["pending"]) == 0
            )
    return int(info["length"]) == 0


class TelemetryConsumer(StreamGroupMember):
    """Reads, aggregates, alerts and acknowledges; ``run`` until ``stop``."""

    stream = STREAM
    group = GROUP
    event_prefix = "telemetry"
    reads_batch_version = versions.BATCH_READ  # newer entries are left pending for a newer consumer

    def __init__(self, redis: Redis, settings: TelemetrySettings, name: str | None = None,
                 faults: FaultInjection | None = None) -> None:
        super().__init__(
            redis,
            name=name or settings.consumer_name or heartbeat.default_name(),
            batch_size=settings.batch_size,
            claim_idle_ms=settings.claim_idle_ms,
        )
        self.settings = settings
        self.aggregator = Aggregator(redis, settings)
        self.alerts = AlertRules(redis, settings)
        self.faults = faults if faults is not None else FaultInjection()
        self._dead_letter = DEAD_LETTER_SCRIPT.bind(redis)
        self._aggregated = 0  # entries whose aggregate this process stored (fault injection)
        self._left_logged = versions.Once()  # newer-version entries this consumer has logged
        self._ahead: _Batch | None = None  # the next batch, read and planned (handle)
        if self.faults.crash_before_ack is not None:
            log.warning("telemetry.fault_injection_armed", consumer=self.name,
                        crash_before_ack=self.faults.crash_before_ack)

    def stop(self) -> None:
        """Ask ``run`` to return after the batch in hand (at most ``block_ms`` later)."""
        super().stop()

    async def run(self, burst: bool = False) -> int:
        """Consume until ``stop()``; with ``burst``, until nothing is left (entries that failed
        are retried until they succeed or are dead-lettered). Entries handled.

        A Redis error is logged and retried with backoff (one line per retry, with the next
        delay). A burst run must end: once Redis has failed for ``connect_timeout_s`` in a
        row it raises ``RedisUnavailable``.
        """
        handled = 0
        failures = 0
        down_since: float | None = None
        while not self._stop.is_set():
            try:
                n = await self.step(block=None if burst else self.settings.block_ms, claim_now=burst)
            except RedisError as exc:
                self.lost_redis(exc)
                if isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP"):
                    continue  # the next step re-creates the group
                failures += 1
                delay = min(MAX_BACKOFF_S, 0.1 * 2**failures)
                if burst:
                    down_since = time.monotonic() if down_since is None else down_since
                    left = self.settings.connect_timeout_s - (time.monotonic() - down_since)
                    if left <= 0:
                        raise RedisUnavailable(
                            f"Redis failed for {self.settings.connect_timeout_s:g} s "
                            f"(TURNFLEET_CONNECT_TIMEOUT_S): {exc}") from exc
                    delay = min(delay, left)
                log.error("telemetry.redis_error", consumer=self.name, error=repr(exc),
                          retry_in_s=round(delay, 2))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)
                continue
            failures = 0
            down_since = None
            handled += n
            if burst and n == 0 and not self._own_pending:
                wait = self.retry_in_s  # failed entries wait for their next delivery
                if wait is None:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=wait)
        if self._ahead is not None:  # stopped with a batch read ahead: handle it, not leave it
            try:
                handled += await self.handle(self._ahead.entries)
            except RedisError as exc:
                log.error("telemetry.redis_error", consumer=self.name, error=repr(exc),
                          hint="the batch read ahead stays pending")
        log.info("telemetry.consumer_stopped", consumer=self.name, handled=handled)
        return handled

    async def trim(self) -> TrimResult:
        """Trim the stream to its unacknowledged tail (policy: :mod:`turnfleet.telemetry.trim`)."""
        result = await trim_acknowledged(self.redis, self.settings.telemetry_max_entries)
        if result.over_limit:
            log.warning("telemetry.backlog_over_limit", consumer=self.name, backlog=result.length,
                        limit=self.settings.telemetry_max_entries, oldest_needed=result.min_id,
                        hint="consumers are behind or entries are stuck pending; "
                             "nothing unacknowledged was trimmed")
        elif result.trimmed:
            log.info("telemetry.trimmed", consumer=self.name, entries=result.trimmed,
                     left=result.length, min_id=result.min_id)
        return result

    async def process(self, entries: Sequence[Entry]) -> int:
        return await self.handle(entries)

    async def _read(self, from_id: str, block: int | None = None) -> list[Entry]:
        if from_id == ">" and self._ahead is not None:
            return self._ahead.entries  # read (and planned) while the last batch was applied
        return await super()._read(from_id, block)

    async def _drain_own_pending(self) -> int:
        self._ahead = None  # entries read ahead are in the pending list this reads
        return await super()._drain_own_pending()

    def lost_redis(self, exc: RedisError) -> None:
        self._ahead = None  # the own pending list, read next, holds them
        super().lost_redis(exc)

    async def handle(self, entries: Sequence[Entry]) -> int:
        """Aggregate, evaluate alerts, acknowledge. Returns the number of entries acknowledged
        (dead-lettered ones included).

        An entry whose fields are gone (trimmed from the stream while pending) cannot be
        counted: it is logged and acknowledged. A malformed one is counted, acknowledged and
        copied to the dead-letter stream. One that fails otherwise stays pending for a retry,
        or is dead-lettered if this was its ``dead_letter_after``-th delivery; the others are
        handled as if it were not there. Redis being unavailable is raised: nothing is
        acknowledged then.

        **Read-ahead.** After a full batch of at least ``READ_AHEAD_MIN`` entries (a backlog),
        the next batch of new entries is read before this one's script is sent, and planned
        while Redis runs it: the consumer's CPU and redis-server's overlap. That batch is then
        what the next read of new entries returns; it is only planned, never applied, until
        then, and applied batches stay in order. Reading the own pending list, or a Redis
        error, drops it (its entries are in that list).
        """
        if not entries:
            return 0
        ahead, self._ahead = self._ahead, None
        if ahead is not None and entries is ahead.entries:
            batch = ahead
        else:
            if ahead is not None:  # claimed entries came first: the own pending list holds it
                self._own_pending = True
            await self.aggregator.refresh_prices(RanBy.of(f).workflow for _, f in entries if f)
            batch = self._prepare(entries)
        if not batch.ack and not batch.fields_of:
            if batch.left:
                await versions.count_left(self.redis, versions.Kind.batch, batch.left)
            return 0
        read_ahead = (len(entries) >= self.batch_size >= READ_AHEAD_MIN
                      and batch.plans and not self._stop.is_set())
        if not read_ahead:
            plans = await self._isolating("aggregate", self.aggregator.apply, batch.plans,
                                          batch.failed, batch.fields_of)
        else:
            following = await super()._read(">")
            if following:
                await self.aggregator.refresh_prices(RanBy.of(f).workflow for _, f in following if f)
            applying = asyncio.ensure_future(self._isolating(
                "aggregate", self.aggregator.apply, batch.plans, batch.failed, batch.fields_of))
            try:
                for _ in range(SEND_YIELDS):  # the script is on its way before planning starts
                    await asyncio.sleep(0)
                self._ahead = self._prepare(following) if following else None
            finally:
                plans = await applying
        return await self._finish(batch, plans)

    def _prepare(self, entries: Sequence[Entry]) -> _Batch:
        """Plan a batch (pure: nothing is written)."""
        batch = _Batch(list(entries))
        into = self.aggregator.sums()  # the batch's entries are planned into one set of sums
        for entry_id, fields in entries:
            if entry_id is None:
                continue
            if not fields:
                log.warning("telemetry.entry_gone", entry_id=entry_id,
                            hint="trimmed from the stream before it was aggregated")
                batch.ack.append(entry_id)
                continue
            version = versions.version_of(fields.get(versions.FIELD))
            if version is not None and version > self.reads_batch_version:
                batch.left += 1
                self._leave(entry_id, fields, version)
                continue
            batch.fields_of[entry_id] = fields
            try:
                if version is None:
                    raise MalformedEntry(f"field {versions.FIELD!r} is not a format version")
                batch.plans.append(self.aggregator.plan(entry_id, fields, into))
            except MalformedEntry as exc:
                log.error("telemetry.malformed", entry_id=entry_id, turn_id=fields.get("turn_id"),
                          fields=sorted(fields), error=str(exc))
                batch.plans.append(self.aggregator.plan_malformed(entry_id, into))
                batch.malformed[entry_id] = str(exc)
            except Exception as exc:  # the planner cannot handle this entry: it alone fails
                batch.failed[entry_id] = _Failure(fields, exc, "plan")
        return batch

    async def _finish(self, batch: _Batch, plans: list[EntryPlan]) -> int:
        """After the aggregate of ``plans`` (those of ``batch`` it stored): alerts, XACK, the
        dead-letter copies and retries."""
        if batch.left:
            await versions.count_left(self.redis, versions.Kind.batch, batch.left)
        self._crash_if_injected(len(plans))
        failed, fields_of, malformed = batch.failed, batch.fields_of, batch.malformed
        plans = await self._isolating("alerts", self._evaluate_alerts, plans, failed, fields_of)
        ack = batch.ack + [p.entry_id for p in plans if p.entry_id not in malformed]
        if ack:
            await self.redis.xack(STREAM, GROUP, *ack)
        n = len(ack)
        for plan in plans:
            if plan.entry_id in malformed:
                await self._to_dead_letter(plan.entry_id, fields_of[plan.entry_id],
                                           REASON_MALFORMED, "parse", malformed[plan.entry_id])
                n += 1
        for entry_id, failure in failed.items():
            n += await self._failed(entry_id, failure)
        log.debug("telemetry.handled", consumer=self.name, entries=n, failed=len(failed))
        return n

    def _leave(self, entry_id: str, fields: Mapping[str, Any], version: int) -> None:
        """An entry of a newer batch version: left pending (see the module doc); logged once."""
        if self._left_logged.first(entry_id):
            log.warning("telemetry.newer_format_left", consumer=self.name, entry_id=entry_id,
                        turn_id=fields.get("turn_id"), version=version,
                        reads=self.reads_batch_version,
                        action="left pending for a consumer that reads it (not acknowledged, "
                               "not dead-lettered)")

    async def _isolating(self, stage: str, step: Callable[[list[EntryPlan]], Awaitable[Any]],
                         plans: list[EntryPlan], failed: dict[str, _Failure],
                         fields_of: Mapping[str, Mapping[str, Any]]) -> list[EntryPlan]:
        """Run ``step`` for all plans at once; if that fails through an entry's fault, for
        each plan alone. Returns the plans it succeeded for; the others go into ``failed``.
        Redis being unavailable is raised."""
        if not plans:
            return []
        try:
            await step(plans)
            return plans
        except Exception as exc:
            if not entry_fault(exc):
                raise
            if len(plans) == 1:
                failed[plans[0].entry_id] = _Failure(fields_of[plans[0].entry_id], exc, stage)
                return []
            log.warning("telemetry.batch_failed", consumer=self.name, entries=len(plans),
                        stage=stage, error=_describe(exc), hint="retrying one by one")
        ok = []
        for plan in plans:
            try:
                await step([plan])
            except Exception as exc:
                if not entry_fault(exc):
                    raise
                failed[plan.entry_id] = _Failure(fields_of[plan.entry_id], exc, stage)
            else:
                ok.append(plan)
        return ok

    async def _evaluate_alerts(self, plans: list[EntryPlan]) -> None:
        """The alert rules, for the subjects the plans touched."""
        touched = Touched()
        for plan in plans:
            if not plan.skipped:  # erased (turnfleet/erasure.py): nothing may fire for it
                touched.merge(plan.touched)
        await self.alerts.evaluate(touched)

    async def _failed(self, entry_id: str, failure: _Failure) -> int:
        """Dead-letter a failed entry if this was its last allowed delivery, else leave it
        pending and schedule its retry. 1 if it was dead-lettered (and acknowledged)."""
        status, deliveries = await self._to_dead_letter(
            entry_id, failure.fields, REASON_ERROR, failure.stage, _describe(failure.error),
            _traceback(failure.error), after=self.settings.dead_letter_after,
        )
        context = {"consumer": self.name, "entry_id": entry_id, "stage": failure.stage,
                   "turn_id": failure.fields.get("turn_id"), "error": _describe(failure.error)}
        if status == 1:
            log.error("telemetry.dead_lettered", deliveries=deliveries,
                      dead_letter_after=self.settings.dead_letter_after,
                      exc_info=failure.error, **context)
            return 1
        if status < 0:
            log.warning("telemetry.entry_failed", hint="no longer pending: another consumer "
                        "settled it", **context)
            return 0
        retry_in = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** max(0, deliveries - 1))
        log.warning("telemetry.entry_failed", deliveries=deliveries,
                    dead_letter_after=self.settings.dead_letter_after, retry_in_s=retry_in,
                    **context)
        self.retry_pending(retry_in)
        return 0

    async def _to_dead_letter(self, entry_id: str, fields: Mapping[str, Any], reason: str,
                              stage: str, error: str, trace: str = "", after: int = 1,
                              ) -> tuple[int, int]:
        """The dead-letter script for one entry: (status, deliveries), see lua/dead_letter.lua."""
        record = {
            "entry_id": entry_id, "reason": reason, "stage": stage, "error": error[:ERROR_CHARS],
            "traceback": trace, "dead_lettered_at": datetime.now(timezone.utc).isoformat(),
            "stream": STREAM, "group": GROUP,
            "fields": json.dumps({_text(k): _text(v) if isinstance(v, (str, bytes)) else v
                                  for k, v in fields.items()}, default=str),
        }
        reply = await self._dead_letter(
            keys={"stream": STREAM, "dead_letter": DEAD_LETTER, "fleet": keys.GLOBAL_AGGREGATE},
            args={"group": GROUP, "entry_id": entry_id, "after": max(1, after),
                  "maxlen": DEAD_LETTER_MAX_ENTRIES, "counter": DEAD_LETTERED,
                  "record": [x for pair in record.items() for x in pair]},
        )
        return int(reply["status"]), int(reply["deliveries"])

    def _crash_if_injected(self, aggregated: int) -> None:
        """Fault injection: die like a SIGKILL once the N-th entry's aggregate is stored."""
        limit = self.faults.crash_before_ack
        if limit is None or not aggregated:
            return
        self._aggregated += aggregated
        if self._aggregated >= limit:
            log.critical("telemetry.fault_injected", fault="crash_before_ack", consumer=self.name,
                         aggregated=self._aggregated, exit_code=FAULT_EXIT_CODE)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(FAULT_EXIT_CODE)


def _describe(exc: BaseException) -> str:
    message = (_script_error(exc) if isinstance(exc, ResponseError) else None) or str(exc)
    return f"{type(exc).__name__}: {message}"[:ERROR_CHARS]


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))[-TRACEBACK_CHARS:]


async def run_consumer(settings: TelemetrySettings, redis_url: str, burst: bool = False,
                       trim_every_s: float = TRIM_EVERY_S) -> int:
    """Run one consumer process until SIGINT/SIGTERM (or, with ``burst``, until drained).

    With ``alert_webhook_url`` set, the alert webhook sink (``telemetry/webhook.py``) runs
    beside the consumer and stops with it; in burst mode it runs after the consumer has
    drained, so the alerts just fired are delivered before this returns. A sink that dies
    of an unexpected error stops the consumer, and the error is raised here.

    While it runs, the consumer beats (:mod:`turnfleet.heartbeat`), and removes its beat on the
    way out: what ``turnfleet health --role
    telemetry`` and ``turnfleet_telemetry_consumers_alive`` read. It trims the stream to its
    unacknowledged tail every ``trim_every_s`` and, in burst mode, once more after draining
    (:mod:`turnfleet.telemetry.trim`). With ``retention_s`` set it purges idle conversations every
    ``PURGE_EVERY_S`` and after a burst (:mod:`turnfleet.telemetry.retention`); with
    ``raw_retention_s`` > 0, the same for turns' expired raw text (:mod:`turnfleet.telemetry.raw_expiry`).
    """
    redis = connect(redis_url)
    if burst:
        try:  # a burst run must end: wait for Redis a bounded time, then give up
            await wait_for_redis(redis, settings.connect_timeout_s, "telemetry", redis_url)
        except RedisUnavailable:
            await redis.aclose()
            raise
    consumer = TelemetryConsumer(redis, settings)
    freeze_startup_heap()  # imports and settings are never garbage (turnfleet/startup_heap.py)
    webhook: AlertWebhook | None = None
    if settings.alert_webhook_url:
        # Imported here: webhook.py imports this module, and its HTTP client (httpx) costs a
        # consumer without a webhook ~0.1 s of CPU at start for nothing.
        from turnfleet.telemetry.webhook import AlertWebhook  # noqa: F811

        webhook = AlertWebhook(redis, settings, consumer_name=consumer.name)

    def stop() -> None:
        consumer.stop()
        if webhook is not None:
            webhook.stop()

    def webhook_ended(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("telemetry.webhook_failed", error=repr(task.exception()))
            consumer.stop()

    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread / not Unix
            pass
    log.info("telemetry.consumer_started", consumer=consumer.name, burst=burst,
             batch_size=settings.batch_size, claim_idle_ms=settings.claim_idle_ms,
             webhook=webhook is not None)
    webhook_task: asyncio.Task[None] | None = None
    beat = asyncio.create_task(heartbeat.beat_forever(redis, "telemetry", consumer.name),
                               name="telemetry-heartbeat")
    trimmer = asyncio.create_task(
        _every(trim_every_s, consumer.trim, "telemetry.trim_failed", consumer=consumer.name),
        name="telemetry-trim")
    retention = Retention(redis, settings.retention_s) if settings.retention_s else None
    purger = (asyncio.create_task(_every(PURGE_EVERY_S, retention.purge, "telemetry.retention_failed"),
                                  name="telemetry-retention")
              if retention is not None and not burst else None)
    raw_expiry = RawExpiry(redis, settings) if settings.raw_retention_s > 0 else None
    expirer = (asyncio.create_task(_every(PURGE_EVERY_S, raw_expiry.expire, "telemetry.raw_expiry_failed"),
                                   name="telemetry-raw-expiry")
               if raw_expiry is not None and not burst else None)
    thresholds = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        if webhook is not None and not burst:
            webhook_task = asyncio.create_task(webhook.run(), name="alert-webhook")
            webhook_task.add_done_callback(webhook_ended)
        handled = await consumer.run(burst=burst)
        if burst:
            await consumer.trim()
            if retention is not None:
                await retention.purge()
            if raw_expiry is not None:
                await raw_expiry.expire()
        if webhook is not None and burst:
            delivered = await webhook.run_once()
            log.info("telemetry.webhook_burst_done", entries=delivered)
        return handled
    finally:
        for task in (trimmer, purger, expirer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat  # no beat may land after the ZREM
        with contextlib.suppress(RedisError, OSError):
            await heartbeat.forget(redis, "telemetry", consumer.name)
        if webhook is not None:
            webhook.stop()
            try:
                if webhook_task is not None:
                    await webhook_task  # raises what killed the sink, if anything did
            finally:
                await webhook.aclose()
        for sig in installed:
            loop.remove_signal_handler(sig)
        gc.set_threshold(*thresholds)
        await redis.aclose()


async def _every(every_s: float, step: Callable[[], Awaitable[Any]], failed_event: str, **context: Any) -> None:
    """Run ``step`` every ``every_s`` (trim, retention purge); a failed pass is logged and the
    next one catches up."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await step()
        except RedisError as exc:
            log.warning(failed_event, error=repr(exc), **context)
