"""Format versions: what this process writes, what it reads, and what it does with a newer one.

During a rolling deploy old and new processes share one Redis, so each stored format says
which version wrote it, and a process that meets a version newer than it knows leaves the
item for a newer process instead of failing it. Three formats carry a version, each in a
field an older reader already ignores (so a process of this version still reads what a newer
one writes in version 1, and a newer one reads what this one writes):

=============  ==========================================  =====================================
kind           where the version is                        what a process meets newer leaves
=============  ==========================================  =====================================
``job``        the arq job's JSON, top-level ``"v"``        ``deserialize_job`` hands it to
                                                           ``leave_newer_job``: the job goes back
                                                           to its queue ``retry_delay_s`` later
                                                           (arq's try counter undone), no attempt
``turn``       the turn record hash, field ``v``           ``START`` returns ``newer`` before it
                                                           counts an attempt; the job is left as
                                                           above
``batch``      the telemetry stream entry, field ``v``     the consumer neither aggregates,
                                                           acknowledges nor dead-letters it: it
                                                           stays pending until a consumer that
                                                           reads it claims it
=============  ==========================================  =====================================

A missing version field is version 1: what processes wrote before versions existed is
version 1, unchanged. Batches come in two versions since feedback (issue 17): a turn
attempt's batch is still version 1 (``BATCH``: nothing in it changed), an entry holding a
``feedback`` event is version 2 (``BATCH_FEEDBACK``: a kind older consumers do not know, so
they leave it pending instead of dead-lettering it), an entry holding a turn's ``check`` events
is version 3 (``BATCH_CHECK``); the consumer reads up to ``BATCH_READ``.
Otherwise this process writes version 1 of each (the Lua scripts write the
literal; ``tests/test_versions.py`` checks it equals the constants here) and reads every
version up to the constants. A version check is one field compare, never a re-parse.

Each leave is counted on the fleet hash (``keys.GLOBAL_AGGREGATE``: ``newer_format_left_<kind>``,
and the time of the last one in ``newer_format_last_ms_<kind>``), logged once per item per
process, shown by ``turnfleet health`` while leaves are recent and by ``/metrics``
(``turnfleet_newer_format_left_total{kind}``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

from redis.asyncio import Redis

from turnfleet import keys

JOB = 1  # the arq job's JSON
TURN_RECORD = 1  # the turn record hash (``keys.turn``)
BATCH = 1  # a telemetry stream entry of a turn attempt: a JSON array of events (``turnfleet.events``)
BATCH_FEEDBACK = 2  # an entry holding ``feedback`` events (a kind version 1 readers do not know)
BATCH_CHECK = 3  # an entry holding a turn's ``check`` events (a kind version 2 readers do not know)
BATCH_READ = 3  # the newest batch version this process's consumer reads

FIELD = "v"  # the version field's name in each of the three formats
WAITING_WINDOW_S = 300.0  # health says items wait while the last leave is at most this old


class Kind(str, Enum):
    """The formats that carry a version (the ``kind`` label of the metric)."""

    job = "job"
    turn = "turn"
    batch = "batch"


def version_of(value: object) -> int | None:
    """The version a stored field says: 1 when absent, None when it is no version at all
    (not a positive integer). Accepts what Redis or JSON hands back (int, str, bytes)."""
    if value is None or value == "1":  # the common cases first: a field compare
        return 1
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        value = int(value) if value.isascii() and value.isdigit() and len(value) < 10 else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None


def left_field(kind: Kind) -> str:
    return f"newer_format_left_{kind.value}"


def last_field(kind: Kind) -> str:
    return f"newer_format_last_ms_{kind.value}"


async def count_left(redis: Redis, kind: Kind, n: int = 1) -> None:
    """Count ``n`` leaves of ``kind`` on the fleet hash (a rare path: one round trip)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hincrby(keys.GLOBAL_AGGREGATE, left_field(kind), n)
        pipe.hset(keys.GLOBAL_AGGREGATE, last_field(kind), int(time.time() * 1000))
        await pipe.execute()


@dataclass(frozen=True)
class Left:
    """How often items of one kind were left for a newer process, and when last."""

    kind: Kind
    count: int
    last_ms: int

    def waiting(self, now_ms: int, window_s: float = WAITING_WINDOW_S) -> bool:
        """Items of this kind are likely still waiting: one was left within ``window_s``
        (a waiting item is met again and again while older processes run)."""
        return self.count > 0 and now_ms - self.last_ms <= window_s * 1000


def left_from(fleet: dict[str, str]) -> dict[Kind, Left]:
    """Every kind's :class:`Left`, from the fleet hash as read (``HGETALL``, decoded)."""
    return {
        kind: Left(kind, int(fleet.get(left_field(kind)) or 0), int(fleet.get(last_field(kind)) or 0))
        for kind in Kind
    }


async def read_left(redis: Redis) -> dict[Kind, Left]:
    """:func:`left_from` of the fleet hash, read now (a client with ``decode_responses``)."""
    async with redis.pipeline(transaction=False) as pipe:
        for kind in Kind:
            pipe.hmget(keys.GLOBAL_AGGREGATE, [left_field(kind), last_field(kind)])
        replies = await pipe.execute()
    return {kind: Left(kind, int(count or 0), int(last or 0)) for kind, (count, last) in zip(Kind, replies)}


def waiting_note(left: dict[Kind, Left], now_ms: int | None = None) -> str | None:
    """One line for ``turnfleet health`` when newer-format items wait; None when none do."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    recent = [x for x in left.values() if x.waiting(now_ms)]
    if not recent:
        return None
    kinds = ", ".join(f"{x.kind.value} (left {x.count} times, last {max(0, now_ms - x.last_ms) / 1000:.0f} s ago)"
                      for x in recent)
    return (f"newer-format items are waiting for a newer process: {kinds}; "
            f"finish the rolling deploy (they run once a newer process takes them)")


class Once:
    """Item ids already logged by this process (bounded: the oldest are forgotten), so a
    newer-format item met again and again is logged once, not at every delivery."""

    def __init__(self, size: int = 10_000) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def first(self, item: str) -> bool:
        """True the first time ``item`` is seen (as far as the bound remembers)."""
        if item in self._seen:
            self._seen.move_to_end(item)
            return False
        self._seen[item] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return True
