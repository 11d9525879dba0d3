"""Trimming a consumed stream without ever dropping an entry some group still needs.

Workers ``XADD`` to the telemetry stream without ``MAXLEN`` (``MAXLEN`` trims entries even
while they are pending, and the loss would be silent). Instead the telemetry consumer
process trims the stream itself, every ``TRIM_EVERY_S`` while it runs and once at the end of
a burst run, with :func:`trim_acknowledged`. The policy, in one Lua script (so no group can
move between the look and the cut):

- **What may go.** An entry may be dropped only when *every* consumer group on the stream
  has acknowledged it. For each group the first entry it still needs is the smaller of its
  oldest pending entry (``XPENDING``: delivered, not acknowledged, whichever consumer holds
  it, alive or dead) and the entry after its ``last-delivered-id`` (not delivered yet). The
  stream is cut with ``XTRIM MINID`` at the smallest of these over all groups: what remains
  is the unacknowledged tail, from the oldest entry some group still needs.
- **No group, no trim.** A stream without any group has had nothing acknowledged; it is
  left whole.
- **Backlog over the limit.** ``telemetry_max_entries`` bounds the tail, not what may be
  dropped. If what remains after the cut is still longer than the limit, the consumers are
  behind (or an entry is stuck pending): nothing more is trimmed, because that would drop
  unaggregated telemetry. The pass instead adds one to ``telemetry_backlog_over_limit`` on
  the fleet hash (``keys.GLOBAL_AGGREGATE``, beside ``telemetry_malformed``) and the
  consumer logs ``telemetry.backlog_over_limit`` (a warning) with the backlog, the limit and
  the oldest entry still needed. The counter grows by one per trim pass (per consumer) while
  the condition holds: a rising counter means "behind now".

Acknowledged entries are not kept as history: what they carried is in the aggregates, and
each attempt's batch is also kept per turn (``keys.turn_events``) for the timeline replay.
One pass costs O(entries removed) on the server: what was acknowledged since the last pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from turnfleet import keys
from turnfleet.scripts import load_script

TRIM_EVERY_S = 30.0
BACKLOG_OVER_LIMIT = "telemetry_backlog_over_limit"  # field on keys.GLOBAL_AGGREGATE

# The policy above, in one script (lua/trim.lua).
TRIM = load_script("trim", "turnfleet.telemetry")


@dataclass(frozen=True)
class TrimResult:
    """What one trim pass did."""

    trimmed: int  # entries removed
    length: int  # entries left: the unacknowledged tail
    min_id: str | None  # the MINID cut at (the oldest entry some group needs), None: no cut
    over_limit: bool  # the tail alone is longer than max_entries (and was counted)


async def trim_acknowledged(
    redis: Redis,
    max_entries: int,
    stream: str = keys.TELEMETRY_STREAM,
    counter_key: str = keys.GLOBAL_AGGREGATE,
    counter_field: str = BACKLOG_OVER_LIMIT,
) -> TrimResult:
    """Drop the entries every group on ``stream`` has acknowledged; see the module docstring.

    Safe to run from any number of processes at once. Raises Redis errors to the caller.
    """
    reply = await TRIM.bind(redis)(keys={"stream": stream, "counter_hash": counter_key},
                                   args={"max_entries": max_entries, "counter": counter_field})
    min_id = reply["min_id"]
    min_id = min_id.decode() if isinstance(min_id, bytes) else min_id
    return TrimResult(int(reply["trimmed"]), int(reply["length"]), min_id or None,
                      bool(reply["over_limit"]))
