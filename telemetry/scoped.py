"""Reads scoped to some customers, for the HTTP API: a key bound to some customers sees rows
of those customers only (the same rows :mod:`turnfleet.telemetry.stats` gives the fleet)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from redis.asyncio import Redis

from turnfleet.telemetry.aggregate import FLOAT_COUNTERS, INT_COUNTERS
from turnfleet.telemetry.find import find_page
from turnfleet.telemetry.stats import counters, stats_rows
from turnfleet import keys


async def stats_of_customers(
    redis: Redis, by: Literal["conversation", "customer"], customers: Sequence[str], limit: int = 100
) -> list[dict[str, Any]]:
    """:func:`turnfleet.telemetry.stats.stats` restricted to some customers: the same rows, most recently
    active first.

    ``by="customer"``: those customers' rows. ``by="conversation"``: the conversations of those
    customers (the producer's ``keys.customer_conversations``), intersected with the
    conversation index server side (:func:`turnfleet.telemetry.find.find_page`), one script call per
    customer, then merged. There is no per-customer split of model figures, so no ``model``.
    """
    if by not in ("conversation", "customer"):
        raise ValueError(f"by must be conversation or customer, not {by!r}")
    limit = max(limit, 1)
    wanted = sorted(set(customers))
    if not wanted:
        return []
    index = keys.aggregate_index(by)
    if by == "customer":
        async with redis.pipeline(transaction=False) as pipe:
            for customer in wanted:
                pipe.zscore(index, customer)
            scores = await pipe.execute()
        found = [(c, float(s)) for c, s in zip(wanted, scores) if s is not None]
    else:
        found = []
        for customer in wanted:
            found += await find_page(redis, [keys.customer_conversations(customer)], index,
                                     "+inf", "-inf", 0, limit)
    return await stats_rows(redis, by, sorted(found, key=lambda item: item[1], reverse=True)[:limit])


async def totals_of_customers(redis: Redis, customers: Sequence[str]) -> dict[str, Any]:
    """:func:`counters` summed over some customers' hashes (``latency_ms_max``: the largest).

    What :func:`turnfleet.telemetry.stats.totals` is for the fleet, for a key bound to these customers (without the
    fleet-wide ``telemetry_malformed``).
    """
    wanted = sorted(set(customers))
    async with redis.pipeline(transaction=False) as pipe:
        for customer in wanted:
            pipe.hgetall(keys.aggregate("customer", customer))
        hashes = await pipe.execute() if wanted else []
    merged: dict[str, Any] = {f: 0 for f in INT_COUNTERS}
    merged.update({f: 0.0 for f in FLOAT_COUNTERS})
    for raw in hashes:
        for f in INT_COUNTERS:
            merged[f] += int(raw.get(f) or 0)
        for f in FLOAT_COUNTERS:
            value = float(raw.get(f) or 0.0)
            merged[f] = max(merged[f], value) if f == "latency_ms_max" else merged[f] + value
    return counters(merged)
