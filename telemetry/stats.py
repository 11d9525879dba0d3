"""Per-subject figures read from the aggregates: a turn, a conversation, a customer (-day), a
model, the fleet; for the CLI, the demo, HTTP and replay.

Reads only. Every stats dict has the same counter fields, typed, zero when nothing was counted:

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
feedback_positive         int    feedback scored 1 on the subject's turns (``feedback``
                                 events, each counted once; per customer-day: given that day)
feedback_negative         int    feedback scored -1 (also per workflow and version)
checks_passed             int    checks judged on the subject's turns that passed (``check``
                                 events, each counted once; also per workflow and version)
checks_failed             int    checks that failed (a check that raised is a failure)
checks_not_applicable     int    checks with nothing to judge (a pass kept apart)
checks_inputs_expired     int    checks whose inputs retention removed (neither)
check_tokens              int    tokens spent by checks that call a model (an LLM judge), never
                                 in the token fields above (fleet, workflow and version only)
check_cost_usd            float  their known cost, never in cost_usd
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

By workflow and by version (``stats(by="workflow" | "version")``): turns (completed,
failed), failed attempts, tokens (requests, input, cached, output, reasoning, total), model
calls, cost (and unpriced calls), latency (count, sum, mean), feedback (positive,
negative) and checks (per outcome, and the LLM judges' tokens and cost) of the attempts a workflow
(``workflow`` = its name) or one version of it ran (``workflow`` and ``version``, the label
``<declared>@<fingerprint>`` or the fingerprint alone; the subject is ``<workflow>/<label>``:
the same label in two workflows is two versions). The other counter fields (tool calls,
handoffs, time in model and tool calls, longest latency, failed attempts' tokens) are not
split by version and are ``None`` in these rows. A workflow's row is the sum of its
versions' rows (added when read). Telemetry written before entries named
what ran them counts under workflow ``unknown``, version ``unknown``; an attempt that ended
before its workflow was found (not served, given up), under its workflow's version
``unknown``. A turn's figures add ``workflow`` and ``version`` (of its latest counted
attempt; ``None`` before they were recorded).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Literal

from redis.asyncio import Redis

from turnfleet.telemetry.aggregate import (
    FLOAT_COUNTERS,
    GLOBAL_KEY,
    INT_COUNTERS,
    MODEL_ERRORS,
    MODEL_ERRORS_BY_TYPE,
    SPLIT_COUNTERS,
)
from turnfleet.telemetry.pricing import nusd_to_usd
from turnfleet import keys

StatsKind = Literal["conversation", "customer", "model", "workflow", "version"]
_ID_FIELD = {"conversation": "conversation_id", "customer": "customer_id", "model": "model",
             "workflow": "workflow", "version": "version"}
FLEET_WIDE = ("model", "workflow", "version")  # kinds whose rows mix every customer's figures
# Row fields a version (or workflow) row has no figure for: None, not a misleading 0.
NOT_SPLIT = ("tool_calls", "tool_errors", "handoffs", "guardrails_tripped", "spans_dropped",
             "failed_attempt_tokens", "failed_attempt_cost_usd", "latency_ms_max", "llm_ms_sum",
             "tool_ms_sum")


def optional_float(value: str | None) -> float | None:
    """A stored number field; ``None`` when absent or empty (not yet known)."""
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
        "feedback_positive": n["feedback_positive"],
        "feedback_negative": n["feedback_negative"],
        "checks_passed": n["checks_passed"],
        "checks_failed": n["checks_failed"],
        "checks_not_applicable": n["checks_not_applicable"],
        "checks_inputs_expired": n["checks_inputs_expired"],
        "check_tokens": n["check_tokens"],
        "check_cost_usd": nusd_to_usd(n["check_cost_nusd"]),
        "check_cost_unknown_calls": n["check_cost_unknown_calls"],
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
        "duration_ms": optional_float(raw.get("duration_ms")),
        "queue_wait_ms": optional_float(raw.get("queue_wait_ms")),
        "model_ms": optional_float(raw.get("model_ms")),
        "tool_ms": optional_float(raw.get("tool_ms")),
        "other_ms": optional_float(raw.get("other_ms")),
        "error_type": raw.get("error_type"),
        "error_message": raw.get("error_message"),
        "guardrail": raw.get("guardrail"),
        "finished_at": raw.get("finished_at"),
        "workflow": raw.get("workflow"),
        "version": raw.get("version"),
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
    if by == "workflow":
        return (await workflow_rows(redis))[:max(limit, 1)]
    index = await redis.zrevrange(keys.aggregate_index(by), 0, max(limit, 1) - 1, withscores=True)
    return await stats_rows(redis, by, index)


async def workflow_rows(redis: Redis) -> list[dict[str, Any]]:
    """One row per workflow, most recently active first: the sum of its versions' hashes
    (every version, read from the version index: bounded by the versions deployed)."""
    index = await redis.zrevrange(keys.aggregate_index("version"), 0, -1, withscores=True)
    if not index:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for subject, _ in index:
            pipe.hgetall(keys.aggregate("version", subject))
        hashes = await pipe.execute()
    summed: dict[str, dict[str, float]] = {}
    last: dict[str, float] = {}
    for (subject, score), raw in zip(index, hashes):
        workflow, _ = keys.split_version_subject(subject)
        total = summed.setdefault(workflow, {})
        for f in SPLIT_COUNTERS:
            if raw.get(f):
                total[f] = total.get(f, 0) + (float(raw[f]) if f in FLOAT_COUNTERS else int(raw[f]))
        last[workflow] = max(score, last.get(workflow, score))
    return [
        {"subject": w, "workflow": w,
         "last_event_at": datetime.fromtimestamp(last[w] / 1000, timezone.utc).isoformat(),
         **split_counters({f: str(v) for f, v in summed[w].items()})}
        for w in sorted(summed, key=lambda w: last[w], reverse=True)
    ]


def split_counters(raw: dict[str, str]) -> dict[str, Any]:
    """:func:`counters` of a version (or workflow) hash: the counters not split by version
    (``SPLIT_COUNTERS``: tool calls, handoffs, time in calls, longest latency...) are ``None``."""
    out = counters(raw)
    for f in NOT_SPLIT:
        out[f] = None
    return out


async def stats_rows(redis: Redis, by: StatsKind,
                     index: Sequence[tuple[str, float]]) -> list[dict[str, Any]]:
    """The :func:`stats` rows (also :mod:`turnfleet.telemetry.scoped`'s) of ``(subject, last event ms)``
    pairs, in their order."""
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
        elif by == "version":
            row["workflow"], row["version"] = keys.split_version_subject(subject)
        row.update(split_counters(raw) if by == "version" else counters(raw))
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
