"""One member of a Redis Streams consumer group: the reading half both the telemetry
consumer and the alert webhook share.

Each pass reads, in this order: the member's own pending entries (at start, after any
error, and when a retry is due: a restarted member under the same name picks up what it had
in hand), entries other members left pending longer than ``claim_idle_ms`` (``XAUTOCLAIM``,
Redis 6.2+), then new entries. What to do with entries, and when to acknowledge them, is the
subclass's ``process``: it returns how many it acknowledged. Entries it does not
acknowledge stay pending, and it says what should happen to them:

- ``hold_here()``: stop here; the own pending list is read again, from its start, on the
  next pass (the webhook, which delivers in order, and whatever stops on ``stop()``);
- ``retry_pending(after_s)``: these entries failed; go on with the others and read the own
  pending list again once ``after_s`` has passed. Every such read is a delivery: Redis
  counts it in the entry's delivery counter (``XPENDING``'s times delivered), as it counts
  each ``XAUTOCLAIM``, which is what a poison-entry limit can be based on;
- neither: the entries are not ours any more (another member claimed them): go on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from turnfleet.connection import as_text

log = structlog.get_logger(__name__)

Entry = tuple[str | None, dict[str, Any] | None]


_text = as_text  # the name the telemetry modules import


class StreamGroupMember:
    """Reads a stream as ``name`` in ``group``; subclasses implement ``process``."""

    stream: str
    group: str
    event_prefix: str  # log events are "<prefix>.group_created", "<prefix>.claimed", ...

    def __init__(self, redis: Redis, *, name: str, batch_size: int, claim_idle_ms: int) -> None:
        self.redis = redis
        self.name = name
        self.batch_size = batch_size
        self.claim_idle_ms = claim_idle_ms
        self._stop = asyncio.Event()
        self._group_ready = False
        self._own_pending = True  # at start and after an error: our pending list may hold entries
        self._retry_at: float | None = None  # monotonic time to re-read entries that failed
        self._next_claim = 0.0

    def stop(self) -> None:
        self._stop.set()

    def hold_here(self) -> None:
        """From ``process``: stop the pass; read the own pending list again on the next one."""
        self._own_pending = True

    def retry_pending(self, after_s: float) -> None:
        """From ``process``: entries it was given failed and stay pending; read them again
        (the own pending list) once ``after_s`` has passed. The earliest request wins."""
        at = time.monotonic() + max(0.0, after_s)
        self._retry_at = at if self._retry_at is None else min(self._retry_at, at)

    @property
    def retry_in_s(self) -> float | None:
        """Seconds until failed entries are read again; None when none wait."""
        return None if self._retry_at is None else max(0.0, self._retry_at - time.monotonic())

    async def process(self, entries: Sequence[Entry]) -> int:
        raise NotImplementedError

    async def ensure_group(self) -> None:
        """Create the group at the stream's start: entries written before it existed count."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info(f"{self.event_prefix}.group_created", stream=self.stream, group=self.group)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def lost_redis(self, exc: RedisError) -> None:
        """After a Redis error: re-read our pending list; re-create a deleted group."""
        self._own_pending = True
        if isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP"):
            log.warning(f"{self.event_prefix}.group_missing", stream=self.stream, group=self.group)
            self._group_ready = False

    async def step(self, block: int | None, claim_now: bool) -> int:
        """One pass: own pending (if any may exist), claimable entries (when due), new ones."""
        if not self._group_ready:
            await self.ensure_group()
        n = 0
        retry_due = self._retry_at is not None and time.monotonic() >= self._retry_at
        if self._own_pending or retry_due:
            self._own_pending = False
            self._retry_at = None
            n += await self._drain_own_pending()
        if claim_now or time.monotonic() >= self._next_claim:
            n += await self._claim()
            self._next_claim = time.monotonic() + max(1.0, self.claim_idle_ms / 2000)
        if self._stop.is_set():
            return n
        entries = await self._read(">", block=block)
        return n + await self.process(entries)

    async def _read(self, from_id: str, block: int | None = None) -> list[Entry]:
        reply = await self.redis.xreadgroup(
            self.group, self.name, {self.stream: from_id}, count=self.batch_size, block=block
        )
        return list(reply[0][1]) if reply else []

    async def _drain_own_pending(self) -> int:
        """Read the own pending list once through (a cursor past each batch, so entries left
        pending for a later retry are not read again in this pass)."""
        n, cursor = 0, "0"
        while not self._stop.is_set():
            entries = await self._read(cursor)
            ids = [entry_id for entry_id, _ in entries if entry_id is not None]
            if not ids:
                break
            n += await self.process(entries)
            if self._own_pending:  # process said: stop here
                break
            cursor = ids[-1]
        return n

    async def _claim(self) -> int:
        """Take over entries other members left pending longer than ``claim_idle_ms``."""
        n, cursor = 0, "0-0"
        while not self._stop.is_set():
            reply = await self.redis.xautoclaim(
                self.stream, self.group, self.name, min_idle_time=self.claim_idle_ms,
                start_id=cursor, count=self.batch_size,
            )
            cursor, entries = _text(reply[0]), reply[1]
            if any(entry_id is None for entry_id, _ in entries):
                # Redis 6.2 claims entries deleted from the stream as nil, without their id;
                # they are now in our pending list, where reading id 0 shows them to ack.
                self._own_pending = True
            if entries:
                log.info(f"{self.event_prefix}.claimed", consumer=self.name, entries=len(entries),
                         first_id=entries[0][0])
                n += await self.process(entries)
            if cursor == "0-0":
                break
        return n
