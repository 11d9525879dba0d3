"""Latency percentiles over the samples telemetry keeps, and the slowest turns.

Percentiles are nearest rank: always one of the samples, never interpolated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from turnfleet.telemetry.aggregate import CALL_METRIC, GLOBAL_SUBJECT, TURN_METRICS
from turnfleet.telemetry.stats import optional_float
from turnfleet import keys

PERCENTILES = (50, 95, 99)
CALL_DIMENSIONS = ("model", "agent", "tool")


def percentile(ordered: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of ascending values: the ``ceil(p/100 · n)``-th smallest.

    Always one of the samples (no interpolation); ``None`` for no samples. For the values
    1..100, p50 is 50, p95 is 95, p99 is 99.
    """
    if not ordered:
        return None
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """``count``, ``p50``, ``p95``, ``p99`` (nearest rank) and ``max`` of some ms samples."""
    ordered = sorted(samples)
    out: dict[str, Any] = {"count": len(ordered)}
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(ordered, p)
    out["max"] = ordered[-1] if ordered else None
    return out


async def latency_report(redis: Redis) -> dict[str, dict[str, dict[str, Any]]]:
    """Latency percentiles over the samples telemetry keeps (the latest ``latency_samples``
    per list, counted from every event, not a sample of turns).

    ``{"turn": {metric: summary}, "model": {name: summary}, "agent": {name: summary},
    "tool": {name: summary}}`` where a summary is :func:`summarize`'s dict (ms, nearest-rank
    percentiles, ``count`` = samples kept) and the turn metrics are ``queue_wait``, ``model``,
    ``tool``, ``other`` and ``total`` of each finished turn (completed or failed; all five are
    present, ``count`` 0 when none). ``model`` and ``agent`` summarize single model calls (by
    model name, by the agent that made them), ``tool`` single tool calls by tool name.
    Two round trips.
    """
    async with redis.pipeline(transaction=False) as pipe:
        for dimension in CALL_DIMENSIONS:
            pipe.smembers(keys.latency_names(dimension))
        names = [sorted(found) for found in await pipe.execute()]
    lists: list[tuple[str, str, str]] = [
        ("turn", metric, keys.latency_samples("turn", GLOBAL_SUBJECT, metric))
        for metric in TURN_METRICS
    ]
    for dimension, found in zip(CALL_DIMENSIONS, names):
        lists += [(dimension, name, keys.latency_samples(dimension, name, CALL_METRIC))
                  for name in found]
    async with redis.pipeline(transaction=False) as pipe:
        for _, _, key in lists:
            pipe.lrange(key, 0, -1)
        values = await pipe.execute()
    report: dict[str, dict[str, dict[str, Any]]] = {d: {} for d in ("turn", *CALL_DIMENSIONS)}
    for (dimension, name, _), raw in zip(lists, values):
        if raw or dimension == "turn":
            report[dimension][name] = summarize([float(v) for v in raw])
    return report


_SLOW_FIELDS = ("conversation_id", "customer_id", "status", "duration_ms", "queue_wait_ms",
                "model_ms", "tool_ms", "other_ms", "finished_at")


async def slowest_turns(redis: Redis, limit: int = 10) -> list[dict[str, Any]]:
    """The slowest finished turns (of the 1000 telemetry keeps), slowest first.

    Each row: ``turn_id``, ``conversation_id``, ``customer_id``, ``status``, ``duration_ms``,
    ``queue_wait_ms``, ``model_ms``, ``tool_ms``, ``other_ms`` (ms floats, ``None`` if
    unknown) and ``finished_at``. Two round trips.
    """
    if limit <= 0:
        return []
    ranked = await redis.zrevrange(keys.SLOWEST_TURNS, 0, limit - 1, withscores=True)
    if not ranked:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for turn_id, _ in ranked:
            pipe.hmget(keys.aggregate("turn", turn_id), _SLOW_FIELDS)
        rows = await pipe.execute()
    out = []
    for (turn_id, score), values in zip(ranked, rows):
        raw = dict(zip(_SLOW_FIELDS, values))
        out.append({
            "turn_id": turn_id,
            "conversation_id": raw["conversation_id"],
            "customer_id": raw["customer_id"],
            "status": raw["status"],
            "duration_ms": optional_float(raw["duration_ms"]) if raw["duration_ms"] else float(score),
            **{f: optional_float(raw[f]) for f in ("queue_wait_ms", "model_ms", "tool_ms", "other_ms")},
            "finished_at": raw["finished_at"],
        })
    return out
