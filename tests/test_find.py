"""``find_conversations``: "three users say the refund was wrong" — which conversations?

Six conversations of three customers are enqueued through the producer (which keeps each
customer's conversation list) and their telemetry is aggregated by a real consumer; the
search must return exactly the matching ones, newest last event first.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from turnfleet.producer import Producer
from turnfleet.telemetry.find import find_conversations
from turnfleet.telemetry.stats import conversation_stats
from tests.batches import T0, AttemptBatch
from tests.consuming import drain
from turnfleet import keys


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def scenario() -> list[AttemptBatch]:
    """Cost per conversation (offline prices: 400 n$ an input token, 1600 an output one):
    c-refund-1 1 120 000 n$, c-refund-2 280 000, c-refund-3 1 120 000, c-lookup 56 000,
    c-failed 1 200 000, c-retry 112 000."""
    def turn(turn_id: str, conv: str, cust: str, minutes: float, attempt: int = 1) -> AttemptBatch:
        return AttemptBatch(turn_id, conv, cust, attempt=attempt, at=at(minutes)).started()

    def billing(b: AttemptBatch) -> AttemptBatch:
        return b.agent("Triage").handoff("Triage", "Billing").agent("Billing")

    return [
        billing(turn("t-r1a", "c-refund-1", "cust-a", 1)).llm("Billing", 1000, 100)
        .tool("Billing", "lookup_order").completed(),
        billing(turn("t-r2", "c-refund-2", "cust-b", 2)).llm("Billing", 500, 50)
        .tool("Billing", "process_refund").completed(),
        billing(turn("t-r3", "c-refund-3", "cust-c", 3)).llm("Billing", 2000, 200)
        .tool("Billing", "process_refund", error="refund service down").completed(),
        billing(turn("t-lk", "c-lookup", "cust-a", 4)).llm("Billing", 100, 10)
        .tool("Billing", "lookup_order").completed(),
        turn("t-f", "c-failed", "cust-b", 5).agent("Triage").llm("Triage", 3000, 0)
        .failed("ModelError", "model unavailable"),
        turn("t-rt", "c-retry", "cust-a", 6).agent("Triage").llm("Triage", 100, 10)
        .failed("APITimeoutError", "timed out", terminal=False),
        turn("t-rt", "c-retry", "cust-a", 6.5, attempt=2).agent("Triage")
        .handoff("Triage", "Shipping").agent("Shipping").llm("Shipping", 100, 10)
        .tool("Shipping", "track_parcel").completed(),
        billing(turn("t-r1b", "c-refund-1", "cust-a", 10)).llm("Billing", 1000, 100)
        .tool("Billing", "process_refund").completed(),
    ]


async def enqueue(redis: Any, batches: list[AttemptBatch]) -> None:
    """Enqueue the turns through the producer: it keeps each customer's conversation list."""
    turns = {b.turn_id: b for b in batches}
    async with Producer(redis=redis) as producer:
        await producer.enqueue_turns([
            {"turn_id": b.turn_id, "conversation_id": b.conversation_id,
             "customer_id": b.customer_id, "text": "my refund was wrong"}
            for b in turns.values()
        ])


@pytest.fixture
async def fleet(redis: Any) -> list[AttemptBatch]:
    batches = scenario()
    await enqueue(redis, batches)
    for batch in batches:
        await batch.send(redis)
    await drain(redis)
    return batches


async def ids(redis: Any, **filters: Any) -> list[str]:
    return [row["conversation_id"] for row in await find_conversations(redis, **filters)]


def iso(ts: datetime) -> str:
    return ts.isoformat()


async def test_no_filter_lists_every_conversation_newest_first(redis: Any, fleet: Any) -> None:
    assert await ids(redis) == ["c-refund-1", "c-retry", "c-failed", "c-lookup", "c-refund-3",
                                "c-refund-2"]


async def test_a_row_is_the_conversation_stats_plus_what_it_did_and_when(
    redis: Any, fleet: list[AttemptBatch]
) -> None:
    [row] = await find_conversations(redis, tool="process_refund", customer="cust-a")
    events = [e for b in fleet if b.conversation_id == "c-refund-1" for e in b.events]
    assert row == {
        **await conversation_stats(redis, "c-refund-1"),
        "tools": ["lookup_order", "process_refund"],
        "agents": ["Billing", "Triage"],
        "errors": [],
        "guardrails": [],
        "feedback": [],
        "checks_failed_names": [],
        "workflows": [],  # these batches do not name what ran them (tests/test_workflow_versions.py)
        "versions": [],
        "first_event_at": iso(min(e.ts for e in events)),
        "last_event_at": iso(max(e.ts for e in events)),
    }
    assert (row["conversation_id"], row["customer_id"]) == ("c-refund-1", "cust-a")
    assert (row["turns_completed"], row["cost_usd"]) == (2, 0.00112)
    assert row["first_event_at"] == "2025-03-04T10:01:00.001000+00:00"

    [retry] = await find_conversations(redis, agent="Shipping")
    assert (retry["tools"], retry["agents"], retry["errors"]) == (
        ["track_parcel"], ["Shipping", "Triage"], ["APITimeoutError"])


async def test_find_by_tool_only_returns_conversations_that_called_it(redis: Any, fleet: Any) -> None:
    assert await ids(redis, tool="process_refund") == ["c-refund-1", "c-refund-3", "c-refund-2"]
    assert await ids(redis, tool="lookup_order") == ["c-refund-1", "c-lookup"]
    assert await ids(redis, tool="cancel_order") == []


async def test_find_by_agent(redis: Any, fleet: Any) -> None:
    assert await ids(redis, agent="Shipping") == ["c-retry"]
    assert await ids(redis, agent="Billing") == ["c-refund-1", "c-lookup", "c-refund-3",
                                                 "c-refund-2"]
    assert len(await ids(redis, agent="Triage")) == 6


async def test_find_by_error_type(redis: Any, fleet: Any) -> None:
    assert await ids(redis, error="ToolError") == ["c-refund-3"]  # the tool call that errored
    assert await ids(redis, error="ModelError") == ["c-failed"]  # terminal failure
    assert await ids(redis, error="APITimeoutError") == ["c-retry"]  # retried attempt
    assert await ids(redis, error="KeyError") == []


async def test_find_by_customer_uses_the_producers_list(redis: Any, fleet: Any) -> None:
    assert await ids(redis, customer="cust-a") == ["c-refund-1", "c-retry", "c-lookup"]
    assert await ids(redis, customer="cust-b") == ["c-failed", "c-refund-2"]
    assert await ids(redis, customer="nobody") == []


async def test_find_by_time_range_of_the_last_event(redis: Any, fleet: Any) -> None:
    # c-refund-1 started at minute 1 but its last event is at minute 10: outside.
    assert await ids(redis, since=at(3), until=at(5.1)) == ["c-failed", "c-lookup", "c-refund-3"]
    assert await ids(redis, since=at(6)) == ["c-refund-1", "c-retry"]
    assert await ids(redis, until=at(2.5)) == ["c-refund-2"]
    assert await ids(redis, until=at(2.5).replace(tzinfo=None)) == ["c-refund-2"]  # naive: UTC
    assert await ids(redis, since=at(11)) == []


async def test_find_by_minimum_known_cost(redis: Any, fleet: Any) -> None:
    assert await ids(redis, min_cost_usd=0.00112) == ["c-refund-1", "c-failed", "c-refund-3"]
    assert await ids(redis, min_cost_usd=0.0002) == ["c-refund-1", "c-failed", "c-refund-3",
                                                     "c-refund-2"]
    assert await ids(redis, min_cost_usd=1.0) == []


async def test_filters_combine(redis: Any, fleet: Any) -> None:
    assert await ids(redis, customer="cust-a", tool="lookup_order") == ["c-refund-1", "c-lookup"]
    assert await ids(redis, customer="cust-a", tool="lookup_order", until=at(5)) == ["c-lookup"]
    assert await ids(redis, tool="process_refund", min_cost_usd=0.001) == ["c-refund-1",
                                                                           "c-refund-3"]
    assert await ids(redis, tool="process_refund", error="ToolError", agent="Billing",
                     customer="cust-c", since=at(3), until=at(4)) == ["c-refund-3"]
    assert await ids(redis, customer="cust-b", agent="Billing", min_cost_usd=0.001) == []


async def test_limit_keeps_the_newest(redis: Any, fleet: Any) -> None:
    assert await ids(redis, limit=2) == ["c-refund-1", "c-retry"]
    assert await ids(redis, agent="Billing", limit=3) == ["c-refund-1", "c-lookup", "c-refund-3"]
    assert await ids(redis, min_cost_usd=0.0002, limit=2) == ["c-refund-1", "c-failed"]
    assert await ids(redis, limit=0) == []


async def test_redelivered_telemetry_changes_no_index(redis: Any, fleet: list[AttemptBatch]) -> None:
    before = await find_conversations(redis)
    for batch in fleet:
        await batch.send(redis)
    await drain(redis)
    assert await find_conversations(redis) == before
    assert await redis.keys(keys.find_scratch("*")) == []  # the scratch key never outlives a call


async def test_cost_filter_reads_past_the_first_page(redis: Any) -> None:
    """Two expensive conversations older than 250 cheap ones: found, by pages of costs."""
    batches = [
        AttemptBatch(f"t-big-{i}", f"c-big-{i}", "cust-x", at=at(i)).started().agent("Billing")
        .llm("Billing", 10_000, 0).tool("Billing", "process_refund").completed()
        for i in range(2)
    ]
    batches += [
        AttemptBatch(f"t-{i}", f"c-{i}", "cust-x", at=at(10 + i)).started().agent("Billing")
        .llm("Billing", 10, 0).tool("Billing", "process_refund").completed()
        for i in range(250)
    ]
    async with redis.pipeline(transaction=False) as pipe:
        for b in batches:
            pipe.xadd(keys.TELEMETRY_STREAM, {"turn_id": b.turn_id, "batch": b.batch_json()})
        await pipe.execute()
    await drain(redis, batch_size=500)
    assert await ids(redis, min_cost_usd=0.004, limit=5) == ["c-big-1", "c-big-0"]
    assert await ids(redis, tool="process_refund", min_cost_usd=0.004, limit=1) == ["c-big-1"]
    assert len(await ids(redis, tool="process_refund", limit=300)) == 252


async def test_a_customer_keys_union_orders_ties_as_the_fleet_wide_search(redis: Any) -> None:
    """Conversations of two customers whose last events share a millisecond: a key bound to
    both lists them in the order the operator's search does (Redis breaks a score tie by the
    member, highest first), not in the order the customers were read."""
    from turnfleet.auth import Principal
    from turnfleet.telemetry.http import find_visible

    batches = [AttemptBatch(f"t-{c}", c, cust, at=at(1)).started().agent("Triage").completed()
               for c, cust in (("c-a", "cust-b"), ("c-b", "cust-a"), ("c-c", "cust-b"))]
    await enqueue(redis, batches)
    for batch in batches:
        await batch.send(redis)
    await drain(redis)
    fleet_wide = await find_conversations(redis)
    assert [r["conversation_id"] for r in fleet_wide] == ["c-c", "c-b", "c-a"]
    both = Principal("pair", frozenset({"cust-a", "cust-b"}))
    assert await find_visible(redis, both) == fleet_wide
