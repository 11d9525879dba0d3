"""Reads of the aggregates and the alert stream, for the CLI, the demo and HTTP.

Reads only, with one exception: :func:`find_conversations` intersects index zsets into a
scratch key that the same Lua script deletes before it returns (nothing is left behind).
Every stats dict has the same counter fields, typed, zero when nothing was counted:

========================  =====  ========================================================
field                     type   meaning
========================  =====  ========================================================
requests                  int    model requests (``llm_end`` usage)
input_tokens              int    input tokens, cached ones included
cached_tokens             int    input tokens served from the provider's cache
output_tokens             int    output tokens, reasoning ones included
reasoning_tokens          int    output tokens spent reasoning
total_tokens              int    input_tokens + output_tokens
llm_calls                 int    ``llm_end`` events
tool_calls / tool_errors  int    ``tool_end`` events / those carrying a tool error (a tool
                                 that raised; business answers are not errors)
handoffs                  int    agent handoffs
guardrails_tripped        int    guardrail tripwires (the turn completed with the safe reply)
turns_completed           int    turns that ended completed
turns_failed              int    turns that ended failed (terminal)
attempts_failed           int    attempts that failed and were retried
failed_attempt_tokens     int    total tokens of failed attempts (also in the token counts)
failed_attempt_cost_usd   float  their known cost (also in cost_usd)
cost_usd                  float  known cost; ``None`` when every call was of unknown price
cost_unknown_calls        int    model calls whose model has no price (not in cost_usd)
cost_complete             bool   cost_unknown_calls == 0
latency_count             int    finished turns with a duration
latency_ms_sum / _avg     float  sum / mean of their attempt durations (avg ``None`` if 0)
latency_ms_max            float  longest (``None`` if none)
llm_ms_sum / tool_ms_sum  float  time in model calls / tool calls
spans_dropped             int    trace spans a worker could not keep (full buffer, Redis down)
========================  =====  ========================================================

Per kind, identity fields come first: ``turn_id`` (and ``status`` — completed, failed or
retrying —, ``conversation_id``, ``customer_id``, ``attempts``, ``agents`` (list, the
path of the last finished attempt), ``model``, ``models`` (list), ``duration_ms``,
``queue_wait_ms``, ``model_ms``, ``tool_ms``, ``other_ms`` (the finishing attempt's time in
model calls, in tool calls, and the rest of ``duration_ms``, at least 0), ``error_type``,
``error_message`` (latest failed attempt; a turn may have completed after it), ``guardrail``
(the guardrail whose tripwire fired, the turn completing with the safe reply),
``finished_at``); ``conversation_id`` and ``customer_id``;
``customer_id`` (and ``day`` for a customer-day); ``model``. ``totals`` adds
``telemetry_malformed`` (stream entries that could not be read). ``stats`` rows add
``subject`` (the id) and ``last_event_at`` (ISO 8601 UTC of the subject's latest event);
``stats(by="model")`` rows also ``errors`` (int: failed attempts, terminal or not, of turns
run on that model) and ``errors_by_type`` (dict error type -> count, e.g.
``{"RateLimitError": 2, "MalformedModelResponse": 1}``).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import structlog
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from telemetry.aggregate import (
    CALL_METRIC,
    CUSTOMER_MODEL_CALLS,
    CUSTOMER_MODEL_COST,
    FLOAT_COUNTERS,
    GLOBAL_KEY,
    GLOBAL_SUBJECT,
    INT_COUNTERS,
    LATENCY_BUCKET,
    MODEL_ERRORS,
    MODEL_ERRORS_BY_TYPE,
    TURN_METRICS,
    latency_bucket_bound,
)
from telemetry.pricing import nusd_to_usd
from telemetry.stream_group import _text
from turnfleet import keys
from turnfleet.models import Alert

log = structlog.get_logger(__name__)

StatsKind = Literal["conversation", "customer", "model"]
_ID_FIELD = {"conversation": "conversation_id", "customer": "customer_id", "model": "model"}


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def _list(value: str | None) -> list[str]:
    try:
        data = json.loads(value) if value else []
    except ValueError:
        return []
    return [str(x) for x in data] if isinstance(data, list) else []


def counters(raw: dict[str, str]) -> dict[str, Any]:
    """The typed counter fields (module docstring) of one aggregate hash."""
    n = {f: int(raw.get(f) or 0) for f in INT_COUNTERS}
    x = {f: float(raw.get(f) or 0.0) for f in FLOAT_COUNTERS}
    priced_calls = n["llm_calls"] - n["cost_unknown_calls"]
    unknown_only = n["cost_unknown_calls"] > 0 and priced_calls <= 0
    out: dict[str, Any] = {
        "requests": n["requests"],
        "input_tokens": n["input_tokens"],
        "cached_tokens": n["cached_tokens"],
        "output_tokens": n["output_tokens"],
        "reasoning_tokens": n["reasoning_tokens"],
        "total_tokens": n["input_tokens"] + n["output_tokens"],
        "llm_calls": n["llm_calls"],
        "tool_calls": n["tool_calls"],
        "tool_errors": n["tool_errors"],
        "handoffs": n["handoffs"],
        "guardrails_tripped": n["guardrails_tripped"],
        "spans_dropped": n["spans_dropped"],
        "turns_completed": n["turns_completed"],
        "turns_failed": n["turns_failed"],
        "attempts_failed": n["attempts_failed"],
        "failed_attempt_tokens": n["failed_attempt_tokens"],
        "failed_attempt_cost_usd": nusd_to_usd(n["failed_attempt_cost_nusd"]),
        "cost_usd": None if unknown_only else nusd_to_usd(n["cost_nusd"]),
        "cost_unknown_calls": n["cost_unknown_calls"],
        "cost_complete": n["cost_unknown_calls"] == 0,
        "latency_count": n["latency_count"],
        "latency_ms_sum": x["latency_ms_sum"],
        "latency_ms_avg": x["latency_ms_sum"] / n["latency_count"] if n["latency_count"] else None,
        "latency_ms_max": x["latency_ms_max"] if n["latency_count"] else None,
        "llm_ms_sum": x["llm_ms_sum"],
        "tool_ms_sum": x["tool_ms_sum"],
    }
    return out


async def turn_stats(redis: Redis, turn_id: str) -> dict[str, Any]:
    """One turn's figures; empty if telemetry has counted nothing for it (yet)."""
    raw = await redis.hgetall(keys.aggregate("turn", turn_id))
    if not raw:
        return {}
    return {
        "turn_id": turn_id,
        "status": raw.get("status"),
        "conversation_id": raw.get("conversation_id"),
        "customer_id": raw.get("customer_id"),
        "attempts": int(raw.get("attempts") or 0),
        "agents": _list(raw.get("agents")),
        "model": raw.get("model"),
        "models": _list(raw.get("models")),
        "duration_ms": _float(raw.get("duration_ms")),
        "queue_wait_ms": _float(raw.get("queue_wait_ms")),
        "model_ms": _float(raw.get("model_ms")),
        "tool_ms": _float(raw.get("tool_ms")),
        "other_ms": _float(raw.get("other_ms")),
        "error_type": raw.get("error_type"),
        "error_message": raw.get("error_message"),
        "guardrail": raw.get("guardrail"),
        "finished_at": raw.get("finished_at"),
        **counters(raw),
    }


async def conversation_stats(redis: Redis, conversation_id: str) -> dict[str, Any]:
    """One conversation's totals; empty if nothing was counted for it."""
    raw = await redis.hgetall(keys.aggregate("conversation", conversation_id))
    if not raw:
        return {}
    return {"conversation_id": conversation_id, "customer_id": raw.get("customer_id"),
            **counters(raw)}


async def customer_day_stats(redis: Redis, customer_id: str, day: str) -> dict[str, Any]:
    """One customer's totals on one UTC day (``YYYY-MM-DD``); empty if none."""
    raw = await redis.hgetall(keys.aggregate_day("customer", customer_id, day))
    if not raw:
        return {}
    return {"customer_id": customer_id, "day": day, **counters(raw)}


async def stats(redis: Redis, by: StatsKind, limit: int = 100) -> list[dict[str, Any]]:
    """Subjects of one kind, most recently active first, at most ``limit``."""
    if by not in _ID_FIELD:
        raise ValueError(f"by must be one of {', '.join(_ID_FIELD)}, not {by!r}")
    index = await redis.zrevrange(keys.aggregate_index(by), 0, max(limit, 1) - 1, withscores=True)
    return await _stats_rows(redis, by, index)


async def _stats_rows(redis: Redis, by: StatsKind, index: Sequence[tuple[str, float]]) -> list[dict[str, Any]]:
    """The :func:`stats` rows of ``(subject, last event ms)`` pairs, in their order."""
    if not index:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for subject, _ in index:
            pipe.hgetall(keys.aggregate(by, subject))
        hashes = await pipe.execute()
    rows = []
    for (subject, score), raw in zip(index, hashes):
        if not raw:
            continue  # indexed but its hash is gone
        row: dict[str, Any] = {
            "subject": subject,
            _ID_FIELD[by]: subject,
            "last_event_at": datetime.fromtimestamp(score / 1000, timezone.utc).isoformat(),
        }
        if by == "conversation":
            row["customer_id"] = raw.get("customer_id")
        row.update(counters(raw))
        if by == "model":
            row.update(model_errors(raw))
        rows.append(row)
    return rows


def model_errors(raw: dict[str, str]) -> dict[str, Any]:
    """``errors`` and ``errors_by_type`` of a model's aggregate hash (zero / empty if none)."""
    by_type = {
        field[len(MODEL_ERRORS_BY_TYPE):]: int(value)
        for field, value in raw.items()
        if field.startswith(MODEL_ERRORS_BY_TYPE)
    }
    return {"errors": int(raw.get(MODEL_ERRORS) or 0), "errors_by_type": dict(sorted(by_type.items()))}


async def totals(redis: Redis) -> dict[str, Any]:
    """Fleet-wide totals, plus ``telemetry_malformed``."""
    raw = await redis.hgetall(GLOBAL_KEY)
    return {
        **counters(raw),
        **{f: int(raw.get(f) or 0) for f in
           ("telemetry_malformed", "telemetry_dead_lettered", "telemetry_backlog_over_limit")},
    }


async def read_alerts(
    redis: Redis, after_id: str = "0-0", count: int = 100, block_ms: int | None = None
) -> list[tuple[str, Alert]]:
    """Alerts written after stream id ``after_id``, oldest first; wait ``block_ms`` if none.

    Entries that do not parse as an ``Alert`` are skipped with a warning.
    """
    entries = await alert_entries(redis, after_id, count, block_ms)
    return [(entry_id, alert) for entry_id, alert in entries if alert is not None]


# -- latency ----------------------------------------------------------------------------------

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
            "duration_ms": _float(raw["duration_ms"]) if raw["duration_ms"] else float(score),
            **{f: _float(raw[f]) for f in ("queue_wait_ms", "model_ms", "tool_ms", "other_ms")},
            "finished_at": raw["finished_at"],
        })
    return out


# -- find -------------------------------------------------------------------------------------

# KEYS: the filter zsets, then the conversation index, then a scratch key.
# ARGV: max ms, min ms, offset, count. The intersection keeps only the index's score (the
# conversation's last event ms: the other sets weigh 0), so the range and the order are by
# last event; the scratch key lives only inside this call.
FIND_LUA = """
local n = #KEYS - 1
local scratch = KEYS[#KEYS]
local args = {'ZINTERSTORE', scratch, n}
for i = 1, n do args[#args + 1] = KEYS[i] end
args[#args + 1] = 'WEIGHTS'
for i = 1, n - 1 do args[#args + 1] = 0 end
args[#args + 1] = 1
redis.call(unpack(args))
local page = redis.call('ZREVRANGEBYSCORE', scratch, ARGV[1], ARGV[2], 'WITHSCORES',
                        'LIMIT', ARGV[3], ARGV[4])
redis.call('DEL', scratch)
return page
"""

FIND_PAGE_MAX = 5000


def _ms_of(ts: datetime) -> int:
    ts = ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts
    return int(ts.timestamp() * 1000)


def _iso(ms: float | str | None) -> str | None:
    if ms in (None, ""):
        return None
    return datetime.fromtimestamp(float(ms) / 1000, timezone.utc).isoformat()


async def find_conversations(
    redis: Redis,
    *,
    customer: str | None = None,
    tool: str | None = None,
    agent: str | None = None,
    error: str | None = None,
    guardrail: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    min_cost_usd: float | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Conversations matching every filter given, most recent last event first.

    - ``customer``: the customer's conversations (the producer's
      ``keys.customer_conversations``); ``tool`` / ``agent`` / ``error``: conversations that
      called that tool, ran that agent, or had that error type (a failed attempt's or
      turn's error type; ``ToolError`` for a tool call that errored); ``guardrail``: that had
      that guardrail's tripwire fire (e.g. ``prompt_injection``);
    - ``since`` / ``until`` (inclusive; naive means UTC): on the conversation's last event;
    - ``min_cost_usd``: known cost at least this (calls of unknown price count as 0).

    Each row is :func:`conversation_stats` plus ``tools``, ``agents``, ``errors``,
    ``guardrails`` (sorted lists), ``first_event_at`` and ``last_event_at`` (ISO 8601 UTC; ``first_event_at`` is
    ``None`` for conversations aggregated before it was recorded).

    How: Redis does the set algebra. The filter zsets and the conversation index (score: last
    event ms) are intersected server side with ``ZINTERSTORE`` (weights 0 for the filters, so
    the score stays the last event ms) and the page is read with ``ZREVRANGEBYSCORE ... LIMIT``
    in the same script; without filters the index is ranged directly. Only a page of ids
    travels; the page's hashes are then read in one pipeline. With ``min_cost_usd``, the
    costs of a page are read first (``HGET``, pipelined) and pages grow until ``limit`` rows
    are found or candidates run out, so a selective cost filter reads only costs, not whole
    hashes. Cost: O(smallest filter set × number of filters) for the intersection, then
    O(limit) reads.
    """
    if limit <= 0:
        return []
    filters = [keys.customer_conversations(customer)] if customer else []
    filters += [keys.facet_conversations(facet, value)
                for facet, value in (("tool", tool), ("agent", agent), ("error", error),
                                     ("guardrail", guardrail))
                if value]
    index = keys.aggregate_index("conversation")
    hi = str(_ms_of(until)) if until else "+inf"
    lo = str(_ms_of(since)) if since else "-inf"
    min_nusd = None if min_cost_usd is None else round(min_cost_usd * 10**9)
    script = redis.register_script(FIND_LUA) if filters else None

    rows: list[dict[str, Any]] = []
    seen: set[str] = set()  # pages are recomputed: a conversation that moved may come twice
    offset, page = 0, limit if min_nusd is None else max(4 * limit, 200)
    while len(rows) < limit:
        if script is not None:
            scratch = keys.find_scratch(uuid.uuid4().hex)
            flat = await script(keys=[*filters, index, scratch], args=[hi, lo, offset, page])
            found = [(flat[i], float(flat[i + 1])) for i in range(0, len(flat), 2)]
        else:
            found = await redis.zrevrangebyscore(index, hi, lo, start=offset, num=page,
                                                 withscores=True)
        if not found:
            break
        matching = [c for c in found if c[0] not in seen]
        seen.update(cid for cid, _ in found)
        if min_nusd is not None and matching:
            async with redis.pipeline(transaction=False) as pipe:
                for cid, _ in matching:
                    pipe.hget(keys.aggregate("conversation", cid), "cost_nusd")
                costs = await pipe.execute()
            matching = [c for c, cost in zip(matching, costs) if int(cost or 0) >= min_nusd]
        while matching and len(rows) < limit:
            chunk, matching = matching[: limit - len(rows)], matching[limit - len(rows):]
            rows += await _find_rows(redis, chunk)
        if len(found) < page:
            break
        offset += page
        page = min(2 * page, FIND_PAGE_MAX)
    return rows[:limit]


async def _find_rows(redis: Redis, found: list[tuple[str, float]]) -> list[dict[str, Any]]:
    if not found:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for cid, _ in found:
            pipe.hgetall(keys.aggregate("conversation", cid))
            pipe.zrange(keys.conversation_facets(cid), 0, -1)
        replies = await pipe.execute()
    rows = []
    for i, (cid, last_ms) in enumerate(found):
        raw, facets = replies[2 * i], replies[2 * i + 1]
        if not raw:
            continue  # indexed but its hash is gone
        by_facet: dict[str, list[str]] = {f: [] for f in keys.FACETS}
        for member in facets:
            facet, _, value = member.partition(":")
            if facet in by_facet:
                by_facet[facet].append(value)
        rows.append({
            "conversation_id": cid,
            "customer_id": raw.get("customer_id"),
            **counters(raw),
            "tools": sorted(by_facet["tool"]),
            "agents": sorted(by_facet["agent"]),
            "errors": sorted(by_facet["error"]),
            "guardrails": sorted(by_facet["guardrail"]),
            "first_event_at": _iso(raw.get("first_event_ms")),
            "last_event_at": _iso(last_ms),
        })
    return rows


# -- scoped reads for the HTTP API; fleet liveness and telemetry lag -------------------------
#
# Added for ``telemetry/http.py`` and ``telemetry/metrics.py``: a key bound to some customers
# sees rows of those customers only, and /readyz and /metrics need the same liveness and lag
# figures.

_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(value: str | None, now: datetime | None = None) -> datetime | None:
    """An ISO 8601 time (naive means UTC), or a time ago: ``30m``, ``2h``, ``7d``, ``90s``.

    ``ValueError`` names what is wrong. ``None`` for ``None`` or an empty string.
    """
    if not value:
        return None
    unit, amount = value[-1:], value[:-1]
    if unit in _TIME_UNITS and amount.replace(".", "", 1).isdigit():
        try:
            return (now or datetime.now(timezone.utc)) - timedelta(
                seconds=float(amount) * _TIME_UNITS[unit])
        except OverflowError:
            raise ValueError(f"too long ago: {value!r}") from None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not a time: {value!r} (use ISO 8601 or 30m / 2h / 7d ago)") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


async def alert_entries(
    redis: Redis, after_id: str = "0-0", count: int = 100, block_ms: int | None = None
) -> list[tuple[str, Alert | None]]:
    """Like :func:`read_alerts`, but every entry read comes back, ``None`` for one that does
    not parse: a reader's cursor must move past unreadable entries too, or it reads them
    again forever."""
    reply = await redis.xread({keys.ALERTS_STREAM: after_id}, count=count, block=block_ms)
    return [parsed for _stream, entries in reply or [] for parsed in _alerts_of(entries)]


def _alerts_of(entries: Sequence[tuple[str, dict[str, str] | None]]) -> list[tuple[str, Alert | None]]:
    out: list[tuple[str, Alert | None]] = []
    for entry_id, fields in entries:
        try:
            out.append((entry_id, Alert.model_validate_json((fields or {}).get("alert", ""))))
        except ValidationError as exc:
            log.warning("alerts.unreadable_entry", entry_id=entry_id, error=str(exc))
            out.append((entry_id, None))
    return out


async def stats_of_customers(
    redis: Redis, by: Literal["conversation", "customer"], customers: Sequence[str], limit: int = 100
) -> list[dict[str, Any]]:
    """:func:`stats` restricted to some customers: the same rows, most recently active first.

    ``by="customer"``: those customers' rows. ``by="conversation"``: the conversations of those
    customers (the producer's ``keys.customer_conversations``), intersected with the
    conversation index server side as :func:`find_conversations` does, one script call per
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
        script = redis.register_script(FIND_LUA)
        found = []
        for customer in wanted:
            scratch = keys.find_scratch(uuid.uuid4().hex)
            flat = await script(keys=[keys.customer_conversations(customer), index, scratch],
                                args=["+inf", "-inf", 0, limit])
            found += [(flat[i], float(flat[i + 1])) for i in range(0, len(flat), 2)]
    return await _stats_rows(redis, by, sorted(found, key=lambda item: item[1], reverse=True)[:limit])


async def totals_of_customers(redis: Redis, customers: Sequence[str]) -> dict[str, Any]:
    """:func:`counters` summed over some customers' hashes (``latency_ms_max``: the largest).

    What :func:`totals` is for the fleet, for a key bound to these customers (without the
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


async def live_workers(redis: Redis, max_age_s: float, now_ms: int | None = None) -> dict[str, int]:
    """Workers whose heartbeat (``keys.WORKERS``) is at most ``max_age_s`` old: name -> ms."""
    now_ms = now_ms if now_ms is not None else int(datetime.now(timezone.utc).timestamp() * 1000)
    beats = await redis.zrangebyscore(keys.WORKERS, now_ms - int(max_age_s * 1000), "+inf",
                                      withscores=True)
    return {name: int(score) for name, score in beats}


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
                  if _text(g["name"]) == keys.TELEMETRY_GROUP), None)
    if group is None:
        start, pending = "-", 0
    else:
        delivered = _text(group["last-delivered-id"])
        if delivered == _text(info["last-generated-id"]):
            return TelemetryLag(0, int(group["pending"]))
        start, pending = f"({delivered}", int(group["pending"])
    count_after = redis.register_script(COUNT_AFTER_LUA)
    undelivered = int(await count_after(keys=[keys.TELEMETRY_STREAM], args=[start, cap]))
    return TelemetryLag(undelivered, pending, capped=undelivered >= cap)



# -- the console's live page: the last hour by minute, spend today, the newest alerts ----------


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
    now_s = _ms_of(now) / 1000
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
        rows.append({"minute": _iso(start * 1000), **_minute_figures(c, f, buckets, seconds)})
    span_s = 60.0 * (len(starts) - 1) + max(1.0, now_s - current)
    total = {"minute": _iso(starts[0] * 1000), **_minute_figures(done, failed, merged, span_s)}
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
    midnight_ms = _ms_of(datetime(day.year, day.month, day.day, tzinfo=timezone.utc))
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


async def alert_entries_before(
    redis: Redis, before_id: str = "+", count: int = 100
) -> list[tuple[str, Alert | None]]:
    """Like :func:`alert_entries`, newest first: up to ``count`` entries before stream id
    ``before_id`` (exclusive; ``"+"``: from the newest)."""
    end = before_id if before_id == "+" else f"({before_id}"
    return _alerts_of(await redis.xrevrange(keys.ALERTS_STREAM, max=end, min="-", count=count) or [])
