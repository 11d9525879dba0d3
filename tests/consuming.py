"""A real telemetry consumer in the test's own event loop, and what the tests read back.

One place for the helpers the telemetry tests share (they lived in test_telemetry.py and
six other test modules imported them from there).
"""

from __future__ import annotations

from typing import Any

from turnfleet import keys
from turnfleet.settings import TelemetrySettings
from turnfleet.telemetry.consumer import TelemetryConsumer


def settings(**overrides: Any) -> TelemetrySettings:
    """A consumer's settings for tests: short blocking reads, ``overrides`` on top."""
    return TelemetrySettings(**{"block_ms": 50, **overrides})


async def drain(redis: Any, name: str = "test-consumer", **overrides: Any) -> int:
    """Run a consumer in burst mode: everything written so far is handled when it returns."""
    return await TelemetryConsumer(redis, settings(**overrides), name=name).run(burst=True)


async def aggregate_without_ack(redis: Any) -> None:
    """What a consumer that dies after storing the aggregate leaves: an entry still pending."""
    dead = TelemetryConsumer(redis, settings(), name="dead")
    await dead.ensure_group()
    reply = await redis.xreadgroup(keys.TELEMETRY_GROUP, "dead", {keys.TELEMETRY_STREAM: ">"})
    [(entry_id, fields)] = reply[0][1]
    await dead.aggregator.aggregate(entry_id, fields)


def pick(d: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` named by ``fields``' keys (``None`` where missing)."""
    return {k: d.get(k) for k in fields}


async def pending(redis: Any) -> int:
    """Telemetry entries delivered to the group and not yet acknowledged."""
    return (await redis.xpending(keys.TELEMETRY_STREAM, keys.TELEMETRY_GROUP))["pending"]


async def stream_ids(redis: Any) -> list[str]:
    """The ids of the entries the telemetry stream holds, oldest first."""
    return [entry_id for entry_id, _ in await redis.xrange(keys.TELEMETRY_STREAM)]
