"""How far telemetry is behind: stream entries not yet aggregated (/readyz, /metrics)."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from turnfleet import keys
from turnfleet.connection import as_text


@dataclass(frozen=True)
class TelemetryLag:
    """Telemetry stream entries not yet aggregated: never delivered to the group, plus
    delivered and still pending. ``capped``: there were at least ``undelivered`` (counting
    stopped at the cap)."""

    undelivered: int
    pending: int
    capped: bool = False

    @property
    def entries(self) -> int:
        return self.undelivered + self.pending


# KEYS: the stream. ARGV: start id (inclusive form, e.g. '(' .. id for exclusive), cap.
# Counts entries from start, a page at a time, so only a page of entries is ever held.
COUNT_AFTER_LUA = """
local n, start, cap = 0, ARGV[1], tonumber(ARGV[2])
while n < cap do
  local page = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', math.min(500, cap - n))
  if #page == 0 then break end
  n = n + #page
  start = '(' .. page[#page][1]
end
return n
"""


async def telemetry_lag(redis: Redis, cap: int = 100_000) -> TelemetryLag:
    """How far the telemetry group is behind the stream (Redis 6.2 has no ``XINFO`` lag).

    Undelivered entries are those after the group's ``last-delivered-id`` (all of the stream
    if the group does not exist yet), counted server side up to ``cap``; pending ones come
    from ``XINFO GROUPS``. No stream: no lag. Cost: O(undelivered, at most ``cap``) on the
    server, nothing but a number on the wire.
    """
    try:
        info = await redis.xinfo_stream(keys.TELEMETRY_STREAM)
    except ResponseError:
        return TelemetryLag(0, 0)
    group = next((g for g in await redis.xinfo_groups(keys.TELEMETRY_STREAM)
                  if as_text(g["name"]) == keys.TELEMETRY_GROUP), None)
    if group is None:
        start, pending = "-", 0
    else:
        delivered = as_text(group["last-delivered-id"])
        if delivered == as_text(info["last-generated-id"]):
            return TelemetryLag(0, int(group["pending"]))
        start, pending = f"({delivered}", int(group["pending"])
    count_after = redis.register_script(COUNT_AFTER_LUA)
    undelivered = int(await count_after(keys=[keys.TELEMETRY_STREAM], args=[start, cap]))
    return TelemetryLag(undelivered, pending, capped=undelivered >= cap)
