"""Conversation memory: the Agents SDK ``Session`` a turn runs with, kept in Redis.

Why not the SDK's ``RedisSession``: it needs redis-py >= 7 (its extra says so) while arq
pins redis-py < 6. On the redis-py arq allows, every ``RedisSession`` write detaches and
closes its pooled connection (its release bookkeeping reaches for an event-dispatcher lock
that redis-py 5 does not have), so each turn opened new TCP connections — a fifth of a
worker's CPU in ``make bench``'s profile. A write is also a WATCH/TYPE/MULTI round-trip
sequence where one Lua call does.

This session keeps the SDK's key layout (``{prefix}:{session_id}`` hash and
``...:messages`` list of JSON items, see ``keys.session_messages``), so history written by
either reads the same. And it is *fenced*: every write names the attempt it belongs to and
is refused once that attempt is no longer the turn's running attempt, so a stalled worker
whose lease a newer attempt took cannot append to the conversation's memory
(``MemoryFenced`` ends that stale attempt).

A stored item that cannot be decoded (written by hand, by a bad migration, not UTF-8, nested
past what the parser takes) would fail every later turn of the conversation. Reading
replaces it in place by a marker item (``CORRUPT_ITEM_TYPE``, same list index, so the memory
length and a turn's ``memory_base`` keep their meaning), skips it and every marker, logs
``memory.corrupt_item`` and keeps a warning the job puts in the turn's result.
"""

from __future__ import annotations

import hashlib
import json
import time
import weakref
from datetime import datetime, timezone
from typing import Any

import structlog
from agents.memory.session import SessionABC
from agents.memory.session_settings import SessionSettings, resolve_session_limit
from redis.asyncio import Redis

from turnfleet import keys
from turnfleet.connection import RAW
from turnfleet.scripts import BoundScript, load_script

# workers/lua/memory_*.lua: every write names the attempt it belongs to (fence_check).
APPEND = load_script("memory_append", "turnfleet.workers")
TRIM = load_script("memory_trim", "turnfleet.workers")
MARK = load_script("memory_mark", "turnfleet.workers")

CORRUPT_ITEM_TYPE = "turnfleet.corrupt_memory_item"
"""``type`` of the marker that takes a corrupt memory item's place; readers skip it."""

_SCRIPTS: weakref.WeakKeyDictionary[Redis, tuple[BoundScript, BoundScript, BoundScript]] = \
    weakref.WeakKeyDictionary()

log = structlog.get_logger(__name__)


def _scripts(redis: Redis) -> tuple[BoundScript, BoundScript, BoundScript]:
    """The append, trim and mark scripts bound to ``redis``: made once per client, not per turn."""
    bound = _SCRIPTS.get(redis)
    if bound is None:
        bound = _SCRIPTS[redis] = (APPEND.bind(redis), TRIM.bind(redis), MARK.bind(redis))
    return bound


def decode_item(raw: bytes | str) -> tuple[Any, str | None]:
    """A stored memory item and ``None``, or ``None`` and why it is no item the SDK can use:
    not UTF-8, not JSON (nesting too deep included), or not an object with a ``type`` or
    ``role``. The reason never quotes the item (it may hold customer data)."""
    try:
        item = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, digits
        return None, f"not JSON ({type(exc).__name__})"
    if not isinstance(item, dict):
        return None, f"a JSON {type(item).__name__}, not an object"
    if not (isinstance(item.get("type"), str) or isinstance(item.get("role"), str)):
        return None, "an object with neither a type nor a role"
    return item, None


def is_marker(item: dict[str, Any]) -> bool:
    return item.get("type") == CORRUPT_ITEM_TYPE


class MemoryFenced(Exception):
    """A memory write by an attempt that no longer owns its turn (nothing was written)."""


class ConversationMemory(SessionABC):
    """The SDK ``Session`` protocol over one conversation's Redis list, fenced by attempt.

    ``turn_id``/``attempt`` name the attempt writing; without them writes are unfenced
    (tests and tools that read or seed history).

    With ``buffered=True`` (what the worker uses) the items a run adds are kept in this
    object and written by ``flush()`` in one fenced call when the run has succeeded (or
    handed over by ``take_pending()``: the worker writes them with the turn's result, in the
    finish script): never one round trip per step, and a failed attempt writes nothing.

    ``preloaded``: the stored items (raw, ``LRANGE 0 -1``) as the caller just read them (the
    worker: ``START`` returns them): the first ``get_items`` reads them instead of Redis. Any
    change this object makes to the stored list first (``truncate``...) drops them.
    """

    def __init__(
        self,
        redis: Redis,
        conversation_id: str,
        *,
        turn_id: str | None = None,
        attempt: int | None = None,
        ttl_s: int | None = None,
        session_settings: SessionSettings | None = None,
        buffered: bool = False,
        preloaded: list[bytes] | None = None,
    ) -> None:
        self.session_id = keys.session_id(conversation_id)
        self.session_settings = session_settings or SessionSettings()
        self._redis = redis
        self._messages = keys.session_messages(conversation_id)
        self._meta = f"{keys.SESSION_PREFIX}:{self.session_id}"
        self._turn = keys.turn(turn_id) if turn_id else keys.turn("-")
        self._fence = str(attempt) if turn_id and attempt else ""
        self._ttl = "" if ttl_s is None else str(int(ttl_s))
        self._buffered = buffered
        self._pending: list[str] = []
        self._preloaded = preloaded
        self._append, self._trim, self._mark = _scripts(redis)
        self._turn_id = turn_id
        self._conversation_id = conversation_id
        self.warnings: list[str] = []  # corrupt items this session found and skipped (for the result)

    @property
    def messages_key(self) -> str:
        return self._messages

    async def get_items(self, limit: int | None = None) -> list[Any]:
        limit = resolve_session_limit(limit, self.session_settings)
        if limit is not None and limit <= 0:
            return []
        if limit is not None and limit <= len(self._pending):
            return [json.loads(r) for r in self._pending[-limit:]]
        stored, self._preloaded = self._preloaded, None
        if stored is None:
            stored = await self._redis.execute_command(  # raw: an item may not even be UTF-8
                "LRANGE", self._messages, 0 if limit is None else -(limit - len(self._pending)), -1, **RAW)
        elif limit is not None:
            stored = stored[-(limit - len(self._pending)):]  # as the LRANGE above
        items = []
        for i, raw in enumerate(stored):
            item, problem = decode_item(raw)
            if problem is not None:
                await self._mark_corrupt(i - len(stored), raw, problem)
            elif not is_marker(item):
                items.append(item)
        return [*items, *(json.loads(r) for r in self._pending)]

    async def _mark_corrupt(self, index: int, raw: bytes, problem: str) -> None:
        """Replace a corrupt item in place by a marker (same index: positions do not shift),
        log it and keep a warning for the turn's result. Skipped, never silently dropped."""
        position = await self._redis.llen(self._messages) + index  # index counts from the end
        marker = json.dumps({
            "type": CORRUPT_ITEM_TYPE, "reason": problem, "bytes": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(), "found_by_turn": self._turn_id,
            "found_at": datetime.now(timezone.utc).isoformat(),
        }, separators=(",", ":"))
        marked = int(await self._mark(keys={"messages": self._messages, "turn": self._turn},
                                      args={"attempt": self._fence, "index": index, "item": raw, "marker": marker}))
        warning = f"conversation memory item {position} is corrupt ({problem}): skipped"
        self.warnings.append(warning + ("" if marked > 0 else " (not marked: "
                                        + ("the item changed meanwhile)" if marked == 0 else "attempt fenced)")))
        log.warning("memory.corrupt_item", conversation_id=self._conversation_id, turn_id=self._turn_id,
                    index=position, reason=problem, bytes=len(raw), marked=marked > 0)

    async def add_items(self, items: list[Any]) -> None:
        if not items:
            return
        encoded = [json.dumps(i, separators=(",", ":")) for i in items]
        if self._buffered:
            self._pending += encoded
        else:
            await self._write(encoded)

    def take_pending(self) -> list[str]:
        """What a buffered run added (JSON, in order), handed to the caller to write, and
        forgotten here: the worker appends them with the turn's result in the finish script
        (``FinishExtras.memory_items``, fenced alike), one round trip fewer than ``flush``."""
        pending, self._pending = self._pending, []
        return pending

    async def flush(self) -> int:
        """Write what a buffered run added (one fenced call); how many items were written."""
        pending, self._pending = self._pending, []
        if pending:
            await self._write(pending)
        return len(pending)

    async def _write(self, encoded: list[str]) -> None:
        self._preloaded = None
        n = await self._append(keys={"messages": self._messages, "meta": self._meta, "turn": self._turn},
                               args={"attempt": self._fence, "ttl_s": self._ttl, "now": int(time.time()),
                                     "session_id": self.session_id, "items": encoded})
        if int(n) < 0:
            raise MemoryFenced(f"{self._turn}: attempt {self._fence} no longer owns the turn")

    async def pop_item(self) -> Any | None:
        self._preloaded = None
        if self._pending:
            return json.loads(self._pending.pop())
        # Unfenced, like the SDK's: the fleet rolls memory back with ``truncate`` instead.
        raw = await self._redis.execute_command("RPOP", self._messages, **RAW)
        return None if raw is None else decode_item(raw)[0]

    async def clear_session(self) -> None:
        self._preloaded = None
        self._pending = []
        await self._redis.delete(self._messages, self._meta)

    async def length(self) -> int:
        return int(await self._redis.llen(self._messages))

    async def truncate(self, keep: int) -> int:
        """Drop items past the first ``keep`` (a failed attempt's partial writes), fenced."""
        self._preloaded = None
        n = await self._trim(keys={"messages": self._messages, "turn": self._turn},
                             args={"attempt": self._fence, "keep": keep})
        if int(n) < 0:
            raise MemoryFenced(f"{self._turn}: attempt {self._fence} no longer owns the turn")
        return int(n)
