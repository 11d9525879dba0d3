"""Retention: forget finished conversations that have been idle longer than ``retention_s``.

Without it Redis keeps every turn forever: the turn record (which also makes a turn id
idempotent), the conversation's records, memory, aggregates and search-index entries — about
6 kB a turn in ``make bench`` — while traces and event timelines already expire by
``trace_retention_s``. With ``TURNFLEET_RETENTION_S`` set, the telemetry consumer purges, every
``PURGE_EVERY_S``, each conversation whose last telemetry is older than that and which has no
turn queued or running: one Lua call per conversation deletes its turns (record, errors,
trace, events, dedupe set, per-turn aggregate) and its own keys (escalation ticket included),
and takes it out of every index. Steady-state memory is then about turns/s × retention ×
bytes/turn.

What stays: fleet, customer, model, workflow, version and per-day aggregates (bounded by
subjects, not by turns; the workflow and version hashes hold figures only, no customer data,
and their index sets grow by the versions deployed, not by turns), and the financial ledger (``keys.LEDGER_PREFIX``): the refund ledger stream and the
per-order refund records (``keys.order_refund``). Those are never purged — ``purge_plan``
refuses to name one — so an order refunded in a forgotten conversation stays refunded and
can never be refunded again through forgetting. Once a conversation is purged, its turn ids are
unknown again: an enqueue with an old turn id creates a new turn. ``retention_s`` must be at
least ``seen_ttl_s``, so that no telemetry entry can be redelivered after its turn's dedupe
set is gone (it would be counted twice in the fleet totals).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
from redis.asyncio import Redis

from turnfleet import keys
from turnfleet.connection import as_text as _text
from turnfleet.erasure import purge_plan
from turnfleet.scripts import load_script

log = structlog.get_logger(__name__)

PURGE_EVERY_S = 60.0
PURGE_BATCH = 200  # conversations looked at per index read

# One conversation's purge, left if it changed since it was read (lua/purge.lua).
PURGE = load_script("purge", "turnfleet.telemetry")


@dataclass
class PurgeResult:
    conversations: int = 0
    turns: int = 0
    skipped: int = 0  # busy (a turn queued or running) or changed since it was read


class Retention:
    """Purges conversations idle for longer than ``retention_s`` (module docstring)."""

    def __init__(self, redis: Redis, retention_s: int) -> None:
        self.redis = redis
        self.retention_s = retention_s
        self._purge = PURGE.bind(redis)

    async def purge_conversation(self, conversation_id: str, cutoff_ms: int) -> int | None:
        """Purge one conversation if it is still idle past ``cutoff_ms``; its turn count, or
        None when it was left."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lrange(keys.conversation_turns(conversation_id), 0, -1)
            pipe.hget(keys.conversation_state(conversation_id), "customer_id")
            pipe.zrange(keys.conversation_facets(conversation_id), 0, -1)
            turns, customer, facets = await pipe.execute()
        turns = [_text(t) for t in turns]
        doomed, zrem = purge_plan(conversation_id, turns, _text(customer) if customer else None,
                                  [_text(f) for f in facets])
        index = keys.aggregate_index("conversation")
        done = await self._purge(
            keys={"index": index, "queue": keys.conversation_queue(conversation_id),
                  "turns": keys.conversation_turns(conversation_id), "doomed": doomed},
            args={"conversation_id": conversation_id, "cutoff_ms": cutoff_ms,
                  "turns_read": len(turns), "unindex": zrem},
        )
        return len(turns) if int(done) == 1 else None

    async def purge(self, now_ms: int | None = None) -> PurgeResult:
        """One pass over every conversation idle past the cutoff."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        cutoff = now_ms - self.retention_s * 1000
        index = keys.aggregate_index("conversation")
        result = PurgeResult()
        while True:
            # Purged conversations leave the index; skipped ones stay: read past them.
            batch = await self.redis.zrangebyscore(index, "-inf", cutoff, start=result.skipped,
                                                   num=PURGE_BATCH)
            if not batch:
                break
            for member in batch:
                n = await self.purge_conversation(_text(member), cutoff)
                if n is None:
                    result.skipped += 1
                else:
                    result.conversations += 1
                    result.turns += n
        if result.conversations:
            log.info("telemetry.retention_purged", conversations=result.conversations,
                     turns=result.turns, skipped=result.skipped, retention_s=self.retention_s)
        return result
