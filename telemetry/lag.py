"""How far telemetry is behind: stream entries not yet aggregated (/readyz, /metrics)."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from turnfleet import keys
from turnfleet.connection import as_text
from turnfleet.scripts import load_script


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


# Counts a stream's entries after an id server side, a page at a time (lua/count_after.lua).
COUNT_AFTER = load_script("count_after", "turnfleet.telemetry")


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
    count_after = COUNT_AFTER.bind(redis)
    undelivered = int(await count_after(keys={"stream": keys.TELEMETRY_STREAM},
                                        args={"start": start, "cap": cap}))
    return TelemetryLag(undelivered, pending, capped=undelivered >= cap)
