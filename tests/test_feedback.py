"""Feedback linked to turns (issue 17): validated at the edge, redacted, counted once.

Real Redis, a real worker process for the turns, real consumers (one that dies before it
acknowledges, one of the previous batch version).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.consuming import drain, pending, settings
from tests.processes import run_burst
from turnfleet import keys, versions
from turnfleet.models import TurnRequest
from turnfleet.producer import Producer, TurnValidationError, UnknownTurn
from turnfleet.queue import TurnQueue
from turnfleet.telemetry.consumer import TelemetryConsumer
from turnfleet.telemetry.stats import conversation_stats, customer_day_stats, stats, totals, turn_stats

CUSTOMER = "cust-fb"
FEEDBACK = ("feedback_negative", "feedback_positive")


async def enqueue(redis: Any, turn_id: str, conversation_id: str, customer_id: str = CUSTOMER) -> None:
    req = TurnRequest(turn_id=turn_id, conversation_id=conversation_id, customer_id=customer_id,
                      text="Where is my order ORD-1001?")
    assert await TurnQueue(redis).enqueue(req)


async def ran_turns(redis: Any, fleet_env: dict[str, str], tmp_path: Path) -> None:
    """Four turns run by a real worker and counted: t-1, t-2 (conversation c-a), t-3 (c-b) of
    ``CUSTOMER``, t-4 (c-c) of another customer."""
    for turn_id, conv, cust in (("t-1", "c-a", CUSTOMER), ("t-2", "c-a", CUSTOMER),
                                ("t-3", "c-b", CUSTOMER), ("t-4", "c-c", "cust-other")):
        await enqueue(redis, turn_id, conv, cust)
    run_burst("worker", fleet_env, tmp_path)
    await drain(redis)


def figures(row: dict[str, Any]) -> tuple[int, int]:
    return row["feedback_negative"], row["feedback_positive"]


async def entries(redis: Any) -> list[dict[str, str]]:
    return [fields for _, fields in await redis.xrange(keys.TELEMETRY_STREAM)]


async def test_feedback_is_counted_once_under_redelivery_per_turn_customer_day_version_and_fleet(
        redis: Any, producer: Producer, fleet_env: dict[str, str], tmp_path: Path) -> None:
    await ran_turns(redis, fleet_env, tmp_path)
    first = await producer.feedback("t-1", score=-1, comment="wrong refund", idempotency_key="k-1")
    await producer.feedback("t-2", score=-1, source="operator")
    await producer.feedback("t-3", score=1, source="agent")
    again = await producer.feedback("t-1", score=-1, comment="wrong refund", idempotency_key="k-1")
    assert again.feedback_id == first.feedback_id  # re-sent: the same feedback, a second entry
    written = [f for f in await entries(redis) if f["v"] == str(versions.BATCH_FEEDBACK)]
    assert len(written) == 4
    assert {f["workflow"] for f in written} == {"support-desk"}

    # A consumer takes them all, stores the aggregate and dies before acknowledging.
    dead = TelemetryConsumer(redis, settings(), name="dead")
    await dead.ensure_group()
    [(_, delivered)] = await redis.xreadgroup(keys.TELEMETRY_GROUP, "dead", {keys.TELEMETRY_STREAM: ">"})
    assert len(delivered) == 4
    for entry_id, fields in delivered:
        await dead.aggregator.aggregate(entry_id, fields)
    assert await pending(redis) == 4
    # Another claims them after its death and counts them again: nothing changes.
    await drain(redis, name="alive", claim_idle_ms=0)
    assert await pending(redis) == 0

    assert figures(await turn_stats(redis, "t-1")) == (1, 0)
    assert figures(await turn_stats(redis, "t-2")) == (1, 0)
    assert figures(await turn_stats(redis, "t-3")) == (0, 1)
    assert figures(await turn_stats(redis, "t-4")) == (0, 0)
    assert figures(await conversation_stats(redis, "c-a")) == (2, 0)
    assert figures(await conversation_stats(redis, "c-b")) == (0, 1)
    [customer] = [r for r in await stats(redis, "customer") if r["subject"] == CUSTOMER]
    assert figures(customer) == (2, 1)
    today = datetime.now(timezone.utc).date().isoformat()
    assert figures(await customer_day_stats(redis, CUSTOMER, today)) == (2, 1)
    label = (await producer.result("t-1")).version
    assert label
    [version] = [r for r in await stats(redis, "version") if r["version"] == label]
    assert figures(version) == (2, 1)
    [workflow] = [r for r in await stats(redis, "workflow") if r["workflow"] == "support-desk"]
    assert figures(workflow) == (2, 1)
    fleet = await totals(redis)
    assert figures(fleet) == (2, 1)
    assert fleet["turns_completed"] == 4  # feedback is no turn


async def test_bad_feedback_names_the_field_and_writes_nothing(redis: Any, producer: Producer) -> None:
    await enqueue(redis, "t-1", "c-a")
    before = await redis.xlen(keys.TELEMETRY_STREAM)
    for kwargs, field in (
        ({"score": 0}, "score"), ({"score": 2}, "score"), ({"score": True}, "score"),
        ({"score": "1"}, "score"), ({"score": 1, "source": "robot"}, "source"),
        ({"score": 1, "comment": "x" * 2001}, "comment"), ({"score": 1, "comment": 5}, "comment"),
        ({"score": 1, "comment": "\ud800"}, "comment"), ({"score": 1, "customer_id": "a b"}, "customer_id"),
        ({"score": 1, "idempotency_key": "no spaces"}, "idempotency_key"),
    ):
        with pytest.raises(TurnValidationError) as caught:
            await producer.feedback("t-1", **kwargs)
        assert [e["field"] for e in caught.value.errors] == [field], kwargs
    with pytest.raises(TurnValidationError) as caught:
        await producer.feedback("bad id", score=1)
    assert [e["field"] for e in caught.value.errors] == ["turn_id"]
    with pytest.raises(UnknownTurn):
        await producer.feedback("t-nope", score=1)
    # A customer's call: only its own turns; another's is unknown, as for other reads.
    with pytest.raises(UnknownTurn):
        await producer.feedback("t-1", score=1, customer_id="cust-other")
    assert await redis.xlen(keys.TELEMETRY_STREAM) == before
    mine = await producer.feedback("t-1", score=1, customer_id=CUSTOMER)
    assert mine.customer_id == CUSTOMER and mine.feedback_id.startswith("fb_")
    assert await redis.xlen(keys.TELEMETRY_STREAM) == before + 1


async def test_the_comment_is_redacted_and_clipped_before_it_is_written(redis: Any, producer: Producer) -> None:
    await enqueue(redis, "t-1", "c-a")
    comment = "Refund went to jane.doe@example.com, card 4111 1111 1111 1111. " + "x" * 900
    result = await producer.feedback("t-1", score=-1, comment=comment)
    assert result.comment is not None and len(result.comment) == 500
    assert "jane.doe@example.com" not in result.comment and "4111" not in result.comment
    [entry] = await entries(redis)
    assert "jane.doe" not in entry["batch"] and "4111" not in entry["batch"]
    await drain(redis)
    [kept] = (await redis.hgetall(keys.turn_feedback("t-1"))).values()
    assert json.loads(kept)["comment"] == result.comment


class OlderConsumer(TelemetryConsumer):
    """A consumer of the version before feedback: it reads batch version 1 only."""

    reads_batch_version = 1


async def test_an_older_consumer_leaves_a_feedback_entry_pending_and_a_current_one_counts_it(
        redis: Any, producer: Producer) -> None:
    await enqueue(redis, "t-1", "c-a")
    await producer.feedback("t-1", score=-1)
    old = OlderConsumer(redis, settings(dead_letter_after=2), name="old")
    for _ in range(3):
        old.hold_here()
        await old.run(burst=True)
    assert await pending(redis) == 1
    assert await redis.xlen(keys.TELEMETRY_DEAD_LETTER) == 0
    assert (await totals(redis))["telemetry_malformed"] == 0
    assert await turn_stats(redis, "t-1") == {}  # nothing counted
    await drain(redis, name="current", claim_idle_ms=0)
    assert await pending(redis) == 0
    assert figures(await turn_stats(redis, "t-1")) == (1, 0)
