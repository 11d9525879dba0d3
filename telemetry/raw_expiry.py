"""Raw-text expiry: after ``raw_retention_s``, a finished turn keeps only the redacted form.

Every turn that ends enters ``keys.RAW_TEXT`` with its finish time, in the finish script.
With ``TURNFLEET_RAW_RETENTION_S`` > 0 the telemetry consumer runs :meth:`RawExpiry.expire`
every ``PURGE_EVERY_S`` (and after a burst): each turn finished before now minus that long
has its customer text replaced by the redacted form (``turnfleet/raw_text.py``, the same
``Redactor`` as telemetry and the operator views) in

- the turn record's ``request`` and ``result`` (ids kept; they still decode as ``TurnRequest``
  and ``TurnResult``, so replay, ``turnfleet turn``/``conversation``, find and stats work,
  with the same agents, tools, tokens and cost);
- its attempt errors (``keys.turn_errors``);
- the conversation's escalation ticket, if this turn opened it;
- the conversation memory items it wrote (``[memory_base, memory_end)`` on the record;
  rewritten in place, the list keeps its length, and only while the memory is the one the
  turn wrote to: ``memory_session``, its creation time, still matches);

its quarantined record (``keys.turn_quarantine``) is deleted, the record is marked
``raw_expired_at`` and the turn leaves the index. Each turn is one script that writes only
if everything it read is unchanged (compared by SHA-1); a concurrent change leaves the turn
for the next pass. A pass walks the index in batches of ``EXPIRE_BATCH``, reading a batch in
two pipelined round trips and writing it in one. Running it again changes nothing.

Idempotency survives: the producer compares a repeated enqueue of an expired turn with the
stored request in redacted form (``producer/api.py``).

Turns that finished before the finish script filled this index (an upgraded deployment) are
found by :meth:`RawExpiry.backfill`, which each pass runs first: a walk of the keyspace
(``SCAN MATCH tf:turn:* TYPE hash``, at most ``BACKFILL_SCANS`` calls a pass, its cursor in
``keys.RAW_TEXT_BACKFILL``) that indexes every finished record without ``raw_expired_at`` at
its finish time, so the pass redacts it when due. It walks once ("done"): a turn an old
worker finishes after the walk passed its key stays out (``DEL tf:raw-text:backfill`` walks
again). Such legacy records have no ``memory_end`` / ``memory_session``; their memory range
and memory check are derived (:meth:`RawExpiry.legacy_memory`), or the memory is left as is.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import structlog
from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis

from turnfleet import keys, registry
from turnfleet.connection import RAW, lenient_text
from turnfleet.models import AttemptError, TurnRequest, TurnResult, utcnow
from turnfleet.queue import session_meta
from turnfleet.raw_text import (
    redact_error,
    redact_memory_item,
    redact_request,
    redact_result,
    redact_ticket,
    redact_unreadable,
)
from turnfleet.redaction import Redactor
from turnfleet.scripts import load_script
from turnfleet.settings import TelemetrySettings

log = structlog.get_logger(__name__)

EXPIRE_BATCH = 200  # turns read (and written) per round of the pass
BACKFILL_SCANS = 10  # SCAN calls a pass makes at most while the backfill walks the keyspace
BACKFILL_COUNT = 1000  # SCAN's COUNT: keys looked at per call
BACKFILL_DONE = "done"  # keys.RAW_TEXT_BACKFILL once the keyspace was walked
FINISHED = ("completed", "failed")

# The scripts (telemetry/lua/raw_*.lua say what each takes and returns).
EXPIRE = load_script("raw_expire", "turnfleet.telemetry")  # one turn's compare-and-set rewrite
BACKFILL = load_script("raw_backfill", "turnfleet.telemetry")  # index a finished legacy turn
CURSOR = load_script("raw_cursor", "turnfleet.telemetry")  # move the backfill cursor
LEGACY_MEMORY = load_script("raw_legacy_memory", "turnfleet.telemetry")  # a legacy memory snapshot


@dataclass
class RawExpiryResult:
    """What one pass did. ``turns``: turns redacted; ``skipped``: changed while read (left
    for the next pass); the others count what was rewritten in the redacted turns."""

    turns: int = 0
    skipped: int = 0
    gone: int = 0  # in the index without a record (or taken out meanwhile): dropped from it
    backfilled: int = 0  # finished before the index existed: indexed by this pass's backfill
    errors: int = 0
    tickets: int = 0
    memory_items: int = 0
    turn_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TurnPlan:
    """One turn's rewrite, as :meth:`RawExpiry.read` planned it from what it read."""

    turn_id: str
    conversation_id: str
    plan: dict[str, Any]  # the script's plan (see lua/raw_expire.lua)


def _sha(raw: bytes | None) -> str:
    return "" if raw is None else hashlib.sha1(raw).hexdigest()


def _rewrite(model: type[BaseModel], raw: bytes | None, redact: Any, redactor: Redactor) -> dict[str, Any]:
    """``{sha, new}`` for a stored JSON value: its redacted form (``new`` None when absent)."""
    if raw is None:
        return {"sha": "", "new": None}
    try:
        new = redact(model.model_validate_json(raw), redactor).model_dump_json()
    except ValidationError:
        new = redact_unreadable(raw, redactor)
    return {"sha": _sha(raw), "new": new}


def _int(raw: bytes | str | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _ms(iso: Any) -> int | None:
    """An ISO timestamp (naive = UTC) as epoch ms; None when it is none."""
    try:
        at = datetime.fromisoformat(iso if isinstance(iso, str) else (lenient_text(iso) or ""))
    except (TypeError, ValueError):
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return int(at.timestamp() * 1000)


def finished_ms(record: Mapping[bytes, bytes | None]) -> int | None:
    """When a finished turn finished: its result's ``finished_at`` when readable, else its
    (last attempt's) ``started_at``; None when neither is known."""
    try:
        result = json.loads(record.get(b"result") or b"")
    except (ValueError, RecursionError):
        result = None
    at = _ms(result.get("finished_at")) if isinstance(result, dict) else None
    return at if at is not None else _ms(record.get(b"started_at"))


@dataclass(frozen=True)
class MemoryRange:
    """The memory items ``[base, end)`` a turn wrote, and the ``created_at`` of the memory they
    are in (what the script compares before it rewrites them)."""

    base: int
    end: int
    session: str


class RawExpiry:
    """Redacts turns whose raw text is older than ``raw_retention_s`` (module docstring)."""

    def __init__(self, redis: Redis, settings: TelemetrySettings) -> None:
        self.redis = redis
        self.raw_retention_s = settings.raw_retention_s
        self.settings = settings
        self.redactor = Redactor.from_settings(settings)  # plus the fleet's patterns, per batch
        self.backfill_scans = BACKFILL_SCANS
        self.backfill_count = BACKFILL_COUNT
        self._expire = EXPIRE.bind(redis)
        self._backfill = BACKFILL.bind(redis)
        self._cursor = CURSOR.bind(redis)
        self._legacy = LEGACY_MEMORY.bind(redis)

    def plan(self, turn_id: str, record: dict[bytes, bytes], errors: list[bytes], ticket: bytes | None,
             memory: list[bytes], memory_session: bytes | str | None) -> dict[str, Any]:
        """The script's plan for one turn, from what was read of it."""
        r = self.redactor
        error_news = []
        for raw in errors:
            try:
                error_news.append(redact_error(AttemptError.model_validate_json(raw), r).model_dump_json())
            except ValidationError:
                error_news.append(redact_unreadable(raw, r))
        base = _int(record.get(b"memory_base")) or 0
        items = []
        for i, raw in enumerate(memory):
            new = redact_memory_item(raw, r)
            if new.encode() != raw:
                items.append({"i": base + i, "sha": _sha(raw), "new": new})
        return {
            "turn_id": turn_id,
            "at": utcnow().isoformat(),
            "request": _rewrite(TurnRequest, record.get(b"request"), redact_request, r),
            "result": _rewrite(TurnResult, record.get(b"result"), redact_result, r),
            "error_shas": [_sha(e) for e in errors],
            "errors_new": error_news,
            "ticket": self._ticket(turn_id, ticket),
            "memory_session": lenient_text(memory_session) or "",
            "memory": items,
        }

    def _ticket(self, turn_id: str, raw: bytes | None) -> dict[str, str] | None:
        """The ticket's rewrite if this turn opened it; None otherwise (another turn's, or none)."""
        if raw is None:
            return None
        try:
            ticket = json.loads(raw)
        except (ValueError, RecursionError):
            return None  # not a ticket the tools could have written: not this turn's
        if not isinstance(ticket, dict) or ticket.get("turn_id") != turn_id:
            return None
        return {"sha": _sha(raw), "new": json.dumps(redact_ticket(ticket, self.redactor))}

    async def expire_turns(self, turn_ids: list[str]) -> RawExpiryResult:
        """Redact these turns now, whatever their finish time (each only while it is in the
        index): :meth:`read`, then :meth:`write`."""
        # The workflows' own patterns (Workflow.redaction_patterns) are in the registry.
        self.redactor = await registry.redactor(self.redis, self.settings)
        plans, unreadable = await self.read(turn_ids)
        result = await self.write(plans)
        result.skipped += unreadable
        return result

    async def read(self, turn_ids: list[str]) -> tuple[list[TurnPlan], int]:
        """Read the turns (two pipelined round trips for all) and plan their rewrite. Also
        returns how many could not be read (a record that is no hash: left in the index)."""
        if not turn_ids:
            return [], 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for t in turn_ids:
                pipe.execute_command("HGETALL", keys.turn(t), **RAW)
                pipe.execute_command("LRANGE", keys.turn_errors(t), 0, -1, **RAW)
            first = await pipe.execute(raise_on_error=False)
        records: dict[str, tuple[dict[bytes, bytes], list[bytes]]] = {}
        for t, record, errors in zip(turn_ids, first[::2], first[1::2]):
            if isinstance(record, Exception) or isinstance(errors, Exception):
                # Not a hash / not a list (written by hand): nothing this pass can redact safely.
                log.warning("telemetry.raw_text_unreadable", turn_id=t,
                            error=repr(record if isinstance(record, Exception) else errors))
                continue
            records[t] = (record, errors)
        ranges = await self.memory_ranges(records)
        async with self.redis.pipeline(transaction=False) as pipe:
            for t, (record, _) in records.items():
                cid = lenient_text(record.get(b"conversation_id")) or ""
                span = ranges.get(t)
                pipe.execute_command("GET", keys.conversation_escalation(cid), **RAW)
                if span is not None and span.end > span.base:
                    pipe.execute_command("LRANGE", keys.session_messages(cid), span.base, span.end - 1, **RAW)
                else:
                    pipe.execute_command("LRANGE", keys.session_messages(cid), 1, 0, **RAW)  # none
                pipe.execute_command("HGET", session_meta(cid), "created_at", **RAW)
            second = await pipe.execute(raise_on_error=False)
        plans = []
        for n, (t, (record, errors)) in enumerate(records.items()):
            ticket, memory, meta = (None if isinstance(v, Exception) else v for v in second[3 * n:3 * n + 3])
            span = ranges.get(t)
            if span is None or lenient_text(meta) != span.session:
                memory = []  # the memory was dropped and started again since: not this turn's items
            cid = lenient_text(record.get(b"conversation_id")) or ""
            plans.append(TurnPlan(t, cid, self.plan(t, record, errors, ticket, memory or [],
                                                    span.session if span is not None else None)))
        return plans, len(turn_ids) - len(records)

    async def memory_ranges(self, records: dict[str, tuple[dict[bytes, bytes], list[bytes]]]
                            ) -> dict[str, MemoryRange]:
        """The memory range of each turn that has one: ``[memory_base, memory_end)`` and
        ``memory_session`` as the finish script kept them, or for a legacy record (no
        ``memory_end``) what :meth:`legacy_memory` derives, read in one snapshot per
        conversation (one pipelined round trip for all)."""
        ranges: dict[str, MemoryRange] = {}
        legacy: dict[str, list[str]] = {}
        for t, (record, _) in records.items():
            base, end = _int(record.get(b"memory_base")), _int(record.get(b"memory_end"))
            if base is None:
                continue  # never started an attempt (or older still): no items it could have written
            if end is not None:
                ranges[t] = MemoryRange(base, end, lenient_text(record.get(b"memory_session")) or "")
            else:
                legacy.setdefault(lenient_text(record.get(b"conversation_id")) or "", []).append(t)
        if not legacy:
            return ranges
        async with self.redis.pipeline(transaction=False) as pipe:
            for cid in legacy:
                await self._legacy(keys={"turns": keys.conversation_turns(cid),
                                         "memory": keys.session_messages(cid),
                                         "queue": keys.conversation_queue(cid),
                                         "memory_meta": session_meta(cid)},
                                   args={"turn_prefix": keys.turn("")}, client=pipe)
            snapshots = await pipe.execute(raise_on_error=False)
        for (cid, turn_ids), snapshot in zip(legacy.items(), snapshots):
            if isinstance(snapshot, Exception):  # a key of the wrong type (written by hand)
                log.warning("telemetry.raw_text_memory_unreadable", conversation_id=cid, error=repr(snapshot))
                continue
            for t in turn_ids:
                span = self.legacy_memory(t, records[t][0], snapshot)
                if span is not None:
                    ranges[t] = span
        return ranges

    @staticmethod
    def legacy_memory(turn_id: str, record: dict[bytes, bytes], snapshot: list[Any]) -> MemoryRange | None:
        """The items a legacy turn (finished before the finish script kept ``memory_end``)
        wrote, from its conversation's snapshot (``lua/raw_legacy_memory.lua``); None leaves its memory
        as it is.

        Its range ends at the ``memory_base`` of the conversation's next turn that started an
        attempt (turns run one at a time, in enqueue order; a later turn that finished without
        ever starting wrote nothing and is passed over), or, when no later turn started, at the
        memory's length, but only while no turn of the conversation is queued or running. It
        is unknown, and the memory left, when a later turn is queued or running before any
        started, when one ran but has no ``memory_base`` (older still), or the range is empty.

        Its memory check: a legacy record has no ``memory_session``, so the memory counts as
        the one the turn wrote to when it was created (``created_at``, whole seconds) no later
        than the turn finished (:func:`finished_ms`): a memory dropped (expired, purged) and
        started again since was created after. That ``created_at`` is then the script's
        ``memory_session``, compared again when it writes; each item's SHA-1 as well. Without a
        ``created_at`` or a finish time the memory is left. The times come from the workers'
        clocks: a memory dropped and started again within the second the turn finished (or
        within the clocks' skew) would pass.
        """
        base = _int(record.get(b"memory_base"))
        length, queued, created = _int(snapshot[0]), _int(snapshot[1]), lenient_text(snapshot[2]) or ""
        turns = [[lenient_text(v) or "" for v in snapshot[i:i + 4]] for i in range(3, len(snapshot) - 3, 4)]
        ids = [row[0] for row in turns]
        if base is None or length is None or turn_id not in ids:
            return None
        end = None
        for _, later_base, status, attempts in turns[ids.index(turn_id) + 1:]:
            if later_base:
                end = _int(later_base)
                break
            if status not in FINISHED or _int(attempts) != 0:
                return None  # queued or running: where this turn's items end is not known yet
        if end is None:
            if queued or any(row[2] not in FINISHED for row in turns):
                return None
            end = length
        finished, created_s = finished_ms(record), _int(created)
        if end is None or not base < end <= length or finished is None or created_s is None:
            return None
        if created_s * 1000 > finished:
            return None  # created after the turn finished: not the memory it wrote to
        return MemoryRange(base, end, created)

    async def write(self, plans: list[TurnPlan]) -> RawExpiryResult:
        """Run each turn's script (pipelined, each atomic and compare-and-set)."""
        result = RawExpiryResult()
        if not plans:
            return result
        async with self.redis.pipeline(transaction=False) as pipe:
            for tp in plans:
                t, cid = tp.turn_id, tp.conversation_id
                await self._expire(
                    keys={"index": keys.RAW_TEXT, "turn": keys.turn(t), "errors": keys.turn_errors(t),
                          "escalation": keys.conversation_escalation(cid),
                          "memory": keys.session_messages(cid), "memory_meta": session_meta(cid),
                          "quarantine": keys.turn_quarantine(t)},
                    args={"plan": json.dumps(tp.plan, ensure_ascii=False, separators=(",", ":"))},
                    client=pipe)
            verdicts = await pipe.execute()
        for tp, verdict in zip(plans, verdicts):
            verdict = lenient_text(verdict)
            if verdict == "done":
                result.turns += 1
                result.turn_ids.append(tp.turn_id)
                result.errors += len(tp.plan["errors_new"])
                result.tickets += tp.plan["ticket"] is not None
                result.memory_items += len(tp.plan["memory"])
            elif verdict == "gone":
                result.gone += 1
            else:
                result.skipped += 1
        return result

    async def backfill(self, now_ms: int | None = None) -> int:
        """Index the finished turns the finish script did not (they finished before it did):
        at most ``backfill_scans`` SCAN calls, from the cursor the last pass left in
        ``keys.RAW_TEXT_BACKFILL``; nothing but one GET once it is "done". A turn is indexed at
        :func:`finished_ms` (``now_ms`` when unknown). Returns how many turns it indexed."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        read = lenient_text(await self.redis.execute_command("GET", keys.RAW_TEXT_BACKFILL, **RAW)) or ""
        if read == BACKFILL_DONE:
            return 0
        cursor = _int(read) or 0
        cursor = 0 if cursor < 0 else cursor  # not a cursor (written by hand): walk from the start
        added = 0
        for _ in range(self.backfill_scans):
            nxt, found = await self.redis.execute_command(
                "SCAN", cursor, "MATCH", f"{keys.turn('')}*", "COUNT", self.backfill_count, "TYPE", "hash", **RAW)
            added += await self._index(found, now_ms)
            new = BACKFILL_DONE if int(nxt) == 0 else str(int(nxt))
            moved = await self._cursor(keys={"cursor": keys.RAW_TEXT_BACKFILL},
                                       args={"read": read, "new": new})
            if not moved or new == BACKFILL_DONE:
                break  # another pass moved the cursor meanwhile (it goes on from there), or done
            read, cursor = new, int(nxt)
        return added

    async def _index(self, found: list[bytes], now_ms: int) -> int:
        """Index those of ``found`` (turn record keys) that are finished, not redacted and not
        in the index: three pipelined round trips (the result is read only for those)."""
        prefix = keys.turn("")
        turn_ids = [k[len(prefix):] for k in (lenient_text(key) or "" for key in found)
                    if k.startswith(prefix) and len(k) > len(prefix)]
        if not turn_ids:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for t in turn_ids:
                pipe.execute_command("HMGET", keys.turn(t), "status", "raw_expired_at", "started_at", **RAW)
                pipe.execute_command("ZSCORE", keys.RAW_TEXT, t)
            seen = await pipe.execute(raise_on_error=False)
        started: dict[str, bytes | None] = {}
        for t, fields, score in zip(turn_ids, seen[::2], seen[1::2]):
            if isinstance(fields, Exception) or isinstance(score, Exception) or score is not None:
                continue  # no hash any more, or already indexed
            status, expired, started_at = fields
            if lenient_text(status) in FINISHED and expired is None:
                started[t] = started_at
        if not started:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for t in started:
                pipe.execute_command("HGET", keys.turn(t), "result", **RAW)
            results = await pipe.execute(raise_on_error=False)
        async with self.redis.pipeline(transaction=False) as pipe:
            for (t, started_at), result in zip(started.items(), results):
                at = finished_ms({b"result": None if isinstance(result, Exception) else result,
                                  b"started_at": started_at})
                await self._backfill(keys={"index": keys.RAW_TEXT, "turn": keys.turn(t)},
                                     args={"turn_id": t, "finished_ms": now_ms if at is None else at},
                                     client=pipe)
            added = await pipe.execute(raise_on_error=False)
        return sum(1 for a in added if a == 1)

    async def expire(self, now_ms: int | None = None) -> RawExpiryResult:
        """One pass over every turn finished before ``now_ms - raw_retention_s``, after the
        :meth:`backfill` step (which indexes turns finished before the index existed)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        cutoff = now_ms - self.raw_retention_s * 1000
        total = RawExpiryResult(backfilled=await self.backfill(now_ms))
        while True:
            # Redacted turns leave the index; skipped ones stay: read past them.
            batch = await self.redis.zrangebyscore(keys.RAW_TEXT, "-inf", cutoff, start=total.skipped,
                                                   num=EXPIRE_BATCH)
            if not batch:
                break
            done = await self.expire_turns([lenient_text(t) or "" for t in batch])
            for name in ("turns", "skipped", "gone", "errors", "tickets", "memory_items"):
                setattr(total, name, getattr(total, name) + getattr(done, name))
            total.turn_ids += done.turn_ids
        if total.turns or total.gone or total.skipped or total.backfilled:
            log.info("telemetry.raw_text_expired", turns=total.turns, skipped=total.skipped, gone=total.gone,
                     backfilled=total.backfilled,
                     errors=total.errors, tickets=total.tickets, memory_items=total.memory_items,
                     raw_retention_s=self.raw_retention_s)
        return total
