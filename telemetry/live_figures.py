"""The console's live page: finished turns of the last hour by minute, and spend today."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from redis.asyncio import Redis

from turnfleet.telemetry.aggregate import (
    CUSTOMER_MODEL_CALLS,
    CUSTOMER_MODEL_COST,
    LATENCY_BUCKET,
    latency_bucket_bound,
)
from turnfleet.telemetry.pricing import nusd_to_usd
from turnfleet.telemetry.stats import counters
from turnfleet.telemetry.times import iso_of_ms, ms_of
from turnfleet import keys


def histogram_percentile(buckets: dict[int, int], p: float) -> float | None:
    """Nearest-rank percentile of a minute histogram (bucket -> count), as the upper bound (ms)
    of the bucket that holds it: at most 19% above the true value (``latency_bucket``).
    ``None`` for no observations."""
    total = sum(buckets.values())
    if total <= 0:
        return None
    rank = max(1, math.ceil(p / 100 * total))
    seen = 0
    for k in sorted(buckets):
        seen += buckets[k]
        if seen >= rank:
            return round(latency_bucket_bound(k), 3)
    return round(latency_bucket_bound(max(buckets)), 3)  # pragma: no cover - rank <= total


def _minute_figures(turns_completed: int, turns_failed: int, buckets: dict[int, int],
                    seconds: float) -> dict[str, Any]:
    turns = turns_completed + turns_failed
    return {
        "turns": turns,
        "turns_completed": turns_completed,
        "turns_failed": turns_failed,
        "turns_per_s": round(turns / seconds, 4) if seconds > 0 else 0.0,
        "error_rate": round(turns_failed / turns, 4) if turns else None,
        "p95_ms": histogram_percentile(buckets, 95),
    }


async def last_hour(redis: Redis, minutes: int = 60, now: datetime | None = None) -> dict[str, Any]:
    """Finished turns of the whole fleet per UTC minute over the last ``minutes`` (the
    aggregate's minute hashes, ``keys.aggregate_minute``; one pipelined round trip).

    ``{"minutes": [...], "total": {...}}``: ``minutes`` oldest first, the current minute last
    (so far: its ``turns_per_s`` divides by the seconds elapsed in it), each ``{"minute"
    (ISO 8601 UTC start), "turns", "turns_completed", "turns_failed", "turns_per_s",
    "error_rate" (failed / finished, ``None`` without turns), "p95_ms"}``, and ``total`` the
    same figures over the whole span (``minute`` is its start). ``p95_ms`` is the upper bound
    of the histogram bucket holding the 95th percentile (:func:`histogram_percentile`).
    """
    now = now or datetime.now(timezone.utc)
    now_s = ms_of(now) / 1000
    current = int(now_s) - int(now_s) % 60
    starts = [current - 60 * i for i in range(max(minutes, 1) - 1, -1, -1)]
    async with redis.pipeline(transaction=False) as pipe:
        for start in starts:
            pipe.hgetall(keys.aggregate_minute(start))
        hashes = await pipe.execute()
    rows: list[dict[str, Any]] = []
    merged: dict[int, int] = {}
    done = failed = 0
    for start, raw in zip(starts, hashes):
        buckets = {int(f[len(LATENCY_BUCKET):]): int(v) for f, v in raw.items()
                   if f.startswith(LATENCY_BUCKET)}
        for k, n in buckets.items():
            merged[k] = merged.get(k, 0) + n
        c, f = int(raw.get("turns_completed") or 0), int(raw.get("turns_failed") or 0)
        done, failed = done + c, failed + f
        seconds = 60.0 if start != current else max(1.0, now_s - current)
        rows.append({"minute": iso_of_ms(start * 1000), **_minute_figures(c, f, buckets, seconds)})
    span_s = 60.0 * (len(starts) - 1) + max(1.0, now_s - current)
    total = {"minute": iso_of_ms(starts[0] * 1000), **_minute_figures(done, failed, merged, span_s)}
    return {"minutes": rows, "total": total}


def _per_model(raw: dict[str, str]) -> dict[str, dict[str, Any]]:
    """A customer-day hash's per-model fields: model -> ``{"llm_calls", "cost_usd"}``."""
    out: dict[str, dict[str, Any]] = {}
    for f, v in raw.items():
        if f.startswith(CUSTOMER_MODEL_CALLS):
            out.setdefault(f[len(CUSTOMER_MODEL_CALLS):], {"llm_calls": 0, "cost_usd": 0.0})[
                "llm_calls"] = int(v)
        elif f.startswith(CUSTOMER_MODEL_COST):
            out.setdefault(f[len(CUSTOMER_MODEL_COST):], {"llm_calls": 0, "cost_usd": 0.0})[
                "cost_usd"] = nusd_to_usd(int(v))
    return dict(sorted(out.items()))


async def spend_today(
    redis: Redis, customers: Sequence[str] | None = None, limit: int = 50,
    now: datetime | None = None,
) -> dict[str, Any]:
    """What was spent on the current UTC day, per customer and per model.

    ``customers=None`` (the fleet): the ``limit`` customers most recently active today, and
    every model used today from its model-day hash. Otherwise those customers only, and the
    models they used (from their customer-day hashes' per-model fields). Returns ``{"day",
    "customers": [...], "models": [...]}``: customer rows are :func:`customer_day_stats`
    plus ``models`` (model -> ``{"llm_calls", "cost_usd"}``), highest cost first; model rows
    ``{"model", "llm_calls", "cost_usd"}``, highest cost first (``cost_usd`` ``None`` when
    no call of the model had a price).
    """
    now = now or datetime.now(timezone.utc)
    day = now.astimezone(timezone.utc).date()
    midnight_ms = ms_of(datetime(day.year, day.month, day.day, tzinfo=timezone.utc))
    fleet = customers is None
    if customers is None:
        wanted = await redis.zrevrangebyscore(keys.aggregate_index("customer"), "+inf",
                                              midnight_ms, start=0, num=max(limit, 1))
    else:
        wanted = sorted(set(customers))
    models = (await redis.zrangebyscore(keys.aggregate_index("model"), midnight_ms, "+inf")
              if fleet else [])
    async with redis.pipeline(transaction=False) as pipe:
        for customer in wanted:
            pipe.hgetall(keys.aggregate_day("customer", customer, day.isoformat()))
        for model in models:
            pipe.hgetall(keys.aggregate_day("model", model, day.isoformat()))
        replies = await pipe.execute() if wanted or models else []
    rows = []
    for customer, raw in zip(wanted, replies):
        if raw:
            rows.append({"customer_id": customer, "day": day.isoformat(), **counters(raw),
                         "models": _per_model(raw)})
    rows.sort(key=lambda r: (-(r["cost_usd"] or 0.0), r["customer_id"]))
    model_rows: list[dict[str, Any]] = []
    if fleet:
        for model, raw in zip(models, replies[len(wanted):]):
            if raw:
                figures = counters(raw)
                model_rows.append({"model": model, "llm_calls": figures["llm_calls"],
                                   "cost_usd": figures["cost_usd"]})
    else:
        merged: dict[str, dict[str, Any]] = {}
        for row in rows:
            for model, figures in row["models"].items():
                into = merged.setdefault(model, {"model": model, "llm_calls": 0, "cost_usd": 0.0})
                into["llm_calls"] += figures["llm_calls"]
                into["cost_usd"] += figures["cost_usd"]
        model_rows = list(merged.values())
    model_rows.sort(key=lambda r: (-(r["cost_usd"] or 0.0), r["model"]))
    return {"day": day.isoformat(), "customers": rows, "models": model_rows}
