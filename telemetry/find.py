"""Find conversations by customer, tool, agent, error, guardrail, workflow, version, feedback,
a failed check, time and cost.

Reads only, with one exception: :func:`find_conversations` intersects index zsets into a
scratch key that the same Lua script deletes before it returns (nothing is left behind).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from redis.asyncio import Redis

from turnfleet.telemetry.aggregate import CHECK_FAILED_FIELD
from turnfleet.telemetry.stats import counters
from turnfleet.telemetry.times import iso_of_ms, ms_of
from turnfleet import keys
from turnfleet.models import check_id
from turnfleet.scripts import load_script

# Intersects the filters with the index server side; its scratch key lives only inside the call.
FIND = load_script("find", "turnfleet.telemetry")

FIND_PAGE_MAX = 5000
FEEDBACK_VALUES = ("negative", "positive")  # the ``feedback`` facet's values


async def find_page(redis: Redis, filters: list[str], index: str, hi: str, lo: str, offset: int,
                    count: int, any_of: Sequence[str] = ()) -> list[tuple[str, float]]:
    """One page of ``(member, score)`` of ``index`` also in every zset of ``filters`` and in at
    least one of ``any_of`` (at least one filter in all), score in [lo, hi], highest first:
    ``lua/find.lua``, its scratch keys unique."""
    token = uuid.uuid4().hex
    flat = await FIND.bind(redis)(
        keys={"index": index, "scratch": keys.find_scratch(token), "union": keys.find_scratch(f"{token}:any"),
              "filters": [*any_of, *filters]},
        args={"max_ms": hi, "min_ms": lo, "offset": offset, "count": count, "any": len(any_of)})
    return [(flat[i], float(flat[i + 1])) for i in range(0, len(flat), 2)]


async def find_conversations(
    redis: Redis,
    *,
    customer: str | None = None,
    tool: str | None = None,
    agent: str | None = None,
    error: str | None = None,
    guardrail: str | None = None,
    workflow: str | None = None,
    version: str | None = None,
    feedback: str | None = None,
    check_failed: str | None = None,
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
      that guardrail's tripwire fire (e.g. ``prompt_injection``); ``workflow`` / ``version``:
      run by that workflow / that version label (``2.1@3f9a0c1d2e4b5a69``; with ``workflow``,
      that workflow's version). One facet zset per version (``<workflow>/<label>``) is kept,
      the cheapest for the consumer to write: a workflow, or a label alone, is the union of
      its versions' zsets, taken in the same script as the intersection; ``feedback``
      (``negative`` / ``positive``): that had a turn given such feedback (each row then names
      those turns in ``feedback_turns``, in conversation order); ``check_failed`` (a check's
      name): that had a turn on which that check failed (rows name those turns in
      ``check_failed_turns``; a check that was not applicable is never listed). A name that is
      not an id, or that no counted check result ever had, is a ``ValueError`` saying so;
    - ``since`` / ``until`` (inclusive; naive means UTC): on the conversation's last event;
    - ``min_cost_usd``: known cost at least this (calls of unknown price count as 0).

    Each row is :func:`conversation_stats` plus ``tools``, ``agents``, ``errors``,
    ``guardrails``, ``feedback`` (the polarities given), ``checks_failed_names`` (the checks that
    failed on its turns), ``workflows``, ``versions`` (sorted lists), ``first_event_at`` and ``last_event_at`` (ISO 8601 UTC; ``first_event_at`` is
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
    if feedback is not None and feedback not in FEEDBACK_VALUES:
        raise ValueError(f"feedback must be one of {', '.join(FEEDBACK_VALUES)}, not {feedback!r}")
    if check_failed is not None:
        await known_check(redis, check_failed)
    filters = [keys.customer_conversations(customer)] if customer else []
    filters += [keys.facet_conversations(facet, value)
                for facet, value in (("tool", tool), ("agent", agent), ("error", error),
                                     ("guardrail", guardrail), ("feedback", feedback),
                                     ("check_failed", check_failed))
                if value]
    any_of: list[str] = []
    if workflow or version:
        any_of = [keys.facet_conversations("version", s) for s in await _versions(redis, workflow, version)]
        if not any_of:
            return []  # no such workflow or version has telemetry
    index = keys.aggregate_index("conversation")
    hi = str(ms_of(until)) if until else "+inf"
    lo = str(ms_of(since)) if since else "-inf"
    min_nusd = None if min_cost_usd is None else round(min_cost_usd * 10**9)

    rows: list[dict[str, Any]] = []
    seen: set[str] = set()  # pages are recomputed: a conversation that moved may come twice
    offset, page = 0, limit if min_nusd is None else max(4 * limit, 200)
    while len(rows) < limit:
        if filters or any_of:
            found = await find_page(redis, filters, index, hi, lo, offset, page, any_of)
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
            rows += await _find_rows(redis, chunk, feedback, check_failed)
        if len(found) < page:
            break
        offset += page
        page = min(2 * page, FIND_PAGE_MAX)
    return rows[:limit]


async def _versions(redis: Redis, workflow: str | None, version: str | None) -> list[str]:
    """The version subjects (``keys.version_subject``) a ``workflow`` / ``version`` filter
    means: that workflow's versions, the versions of that label (in any workflow), or the one
    version. Read from the version index (bounded by the versions deployed)."""
    if workflow and version:
        return [keys.version_subject(workflow, version)]
    subjects = await redis.zrange(keys.aggregate_index("version"), 0, -1)
    return [s for s in subjects
            if (keys.split_version_subject(s)[0] == workflow if workflow
                else keys.split_version_subject(s)[1] == version)]


async def _turns_counting(redis: Redis, conversation_id: str, field: str) -> list[str]:
    """The conversation's turns whose aggregate counts ``field`` (``feedback_negative``, a
    check's failure marker), in conversation order."""
    turn_ids = await redis.lrange(keys.conversation_turns(conversation_id), 0, -1)
    if not turn_ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for t in turn_ids:
            pipe.hget(keys.aggregate("turn", t), field)
        counts = await pipe.execute()
    return [t for t, n in zip(turn_ids, counts) if int(n or 0) > 0]


async def known_check(redis: Redis, name: str) -> str:
    """``name`` if some workflow's check of that name has counted results; ``ValueError``
    (saying which checks have) for a name that is no id or that no result ever had."""
    try:
        check_id(name)
    except ValueError as exc:
        raise ValueError(f"check_failed: {exc}") from None
    names = sorted({keys.split_version_subject(s)[1]
                    for s in await redis.zrange(keys.aggregate_index("check"), 0, -1)})
    if name not in names:
        raise ValueError(f"check_failed: no check named {name!r} has results"
                         + (f" (checks with results: {', '.join(names)})" if names else " (no check has results yet)"))
    return name


async def _find_rows(redis: Redis, found: list[tuple[str, float]],
                     feedback: str | None = None, check_failed: str | None = None) -> list[dict[str, Any]]:
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
        ran = [keys.split_version_subject(v) for v in by_facet["version"]]
        rows.append({
            "conversation_id": cid,
            "customer_id": raw.get("customer_id"),
            **counters(raw),
            "tools": sorted(by_facet["tool"]),
            "agents": sorted(by_facet["agent"]),
            "errors": sorted(by_facet["error"]),
            "guardrails": sorted(by_facet["guardrail"]),
            "feedback": sorted(by_facet["feedback"]),
            "checks_failed_names": sorted(by_facet["check_failed"]),
            "workflows": sorted({w for w, _ in ran}),
            "versions": sorted({label for _, label in ran}),
            "first_event_at": iso_of_ms(raw.get("first_event_ms")),
            "last_event_at": iso_of_ms(last_ms),
        })
        if feedback:
            rows[-1]["feedback_turns"] = await _turns_counting(redis, cid, f"feedback_{feedback}")
        if check_failed:
            rows[-1]["check_failed_turns"] = await _turns_counting(redis, cid, CHECK_FAILED_FIELD + check_failed)
    return rows
