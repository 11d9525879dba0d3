"""Alert rules: each fires once per (rule, subject, window), with the figures that triggered it.

The condition keeps holding over later events, entries are re-sent and redelivered, and
consumers race: the alert stream still gets exactly one entry per rule, subject and window.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from turnfleet.telemetry.aggregate import Touched
from turnfleet.telemetry.alerts import AlertRules, alert_id
from turnfleet.telemetry.consumer import TelemetryConsumer
from turnfleet.telemetry.alert_reads import read_alerts
from tests.batches import T0, AttemptBatch, failed_turn, support_turn
from tests.consuming import aggregate_without_ack, drain, settings
from turnfleet import keys
from turnfleet.models import Alert


async def alerts_of(redis: Any, rule: str) -> list[Alert]:
    return [a for _, a in await read_alerts(redis, count=1000) if a.rule == rule]


def completed_turn(turn_id: str, at_s: int = 0) -> AttemptBatch:
    batch = AttemptBatch(turn_id, "c-ok", "cust-ok", at=T0 + timedelta(seconds=at_s))
    return batch.started().agent("Triage").llm("Triage", 10, 2).completed()


async def test_conversation_cost_alert_fires_once_with_its_figures(redis: Any) -> None:
    s = {"alert_conversation_cost_usd": 0.0005}
    await support_turn("t-1", "c-1", "cust-a").send(redis)
    await drain(redis, **s)
    assert await alerts_of(redis, "conversation_cost") == []  # $0.00043: under

    second = support_turn("t-2", "c-1", "cust-a")
    await second.send(redis)
    await drain(redis, **s)  # $0.00086: over
    await support_turn("t-3", "c-1", "cust-a").send(redis)
    await second.send(redis)  # re-sent
    await drain(redis, **s)  # still over, and redelivered

    [alert] = await alerts_of(redis, "conversation_cost")
    assert alert.message == "Conversation c-1 cost $0.0009 > $0.0005 threshold"
    assert alert.figures == {"cost_usd": 0.00086, "threshold_usd": 0.0005, "llm_calls": 6,
                             "cost_unknown_calls": 0}
    assert (alert.subject_kind, alert.subject, alert.window) == ("conversation", "c-1", "lifetime")
    assert (alert.conversation_id, alert.customer_id, alert.severity) == ("c-1", "cust-a", "warning")
    assert alert.alert_id == alert_id("conversation_cost", "c-1", "lifetime")
    assert await redis.get(keys.alert_fired("conversation_cost", "c-1", "lifetime")) == alert.alert_id


async def test_customer_daily_cost_alert_fires_once_per_utc_day(redis: Any) -> None:
    s = {"alert_customer_daily_cost_usd": 0.0008}
    day2 = T0 + timedelta(days=1)
    for turn_id, conv, at in [("t-1", "c-1", T0), ("t-2", "c-2", T0), ("t-3", "c-3", T0),
                              ("t-4", "c-4", day2), ("t-5", "c-5", day2)]:
        await support_turn(turn_id, conv, "cust-a", at=at).send(redis)
        await drain(redis, **s)

    alerts = await alerts_of(redis, "customer_daily_cost")
    assert [(a.subject, a.window, a.figures["cost_usd"]) for a in alerts] == [
        ("cust-a", "2025-03-04", 0.00086), ("cust-a", "2025-03-05", 0.00086)]
    assert alerts[0].message == (
        "Customer cust-a cost $0.0009 > $0.0008 daily threshold (2025-03-04, UTC)")
    assert alerts[0].figures["threshold_usd"] == 0.0008 and alerts[0].customer_id == "cust-a"
    assert await alerts_of(redis, "conversation_cost") == []


async def test_turn_failed_alert_fires_once_even_when_redelivered(redis: Any) -> None:
    retried = AttemptBatch("t-9", "c-f", "cust-f", attempt=2).started().agent("Triage")
    await retried.failed("APITimeoutError", "timed out", terminal=False).send(redis)
    await drain(redis)
    assert await alerts_of(redis, "turn_failed") == []  # a retried attempt is not a failed turn

    batch = failed_turn("t-9", attempt=3)
    await batch.send(redis)
    await batch.send(redis)
    await drain(redis)
    await batch.send(redis)
    await drain(redis)

    [alert] = await alerts_of(redis, "turn_failed")
    assert alert.message == (
        "Turn t-9 of conversation c-f failed after 3 attempt(s): ModelError: model unavailable")
    assert alert.figures == {"attempts": 3, "error_type": "ModelError",
                             "error_message": "model unavailable", "duration_ms": 500.0}
    assert (alert.turn_id, alert.conversation_id, alert.customer_id) == ("t-9", "c-f", "cust-f")
    assert (alert.subject_kind, alert.window) == ("turn", "once")


async def test_turn_failed_alert_can_be_switched_off(redis: Any) -> None:
    await failed_turn("t-1").send(redis)
    await drain(redis, alert_turn_failed=False)
    assert await alerts_of(redis, "turn_failed") == []


async def test_error_rate_alert_fires_once_per_window_with_enough_turns(redis: Any) -> None:
    s = {"alert_error_rate": 0.5, "alert_error_rate_window_s": 300,
         "alert_error_rate_min_turns": 4, "alert_turn_failed": False}
    await completed_turn("ok-1", 1).send(redis)
    await completed_turn("ok-2", 2).send(redis)
    await failed_turn("bad-1", 3).send(redis)
    await drain(redis, **s)
    assert await alerts_of(redis, "error_rate") == []  # 1 of 3: too few turns to judge

    await failed_turn("bad-2", 4).send(redis)
    await drain(redis, **s)  # 2 of 4 = 50 %: fires
    await failed_turn("bad-3", 5).send(redis)
    await drain(redis, **s)  # 3 of 5: still over, same window
    for i in range(4):  # next window: 1 of 4, under
        await (failed_turn if i == 0 else completed_turn)(f"w2-{i}", 300 + i).send(redis)
    await drain(redis, **s)
    for i in range(2):  # now 3 of 6 in the second window: fires for it
        await failed_turn(f"w2-bad-{i}", 310 + i).send(redis)
    await drain(redis, **s)

    alerts = await alerts_of(redis, "error_rate")
    assert [a.window for a in alerts] == ["2025-03-04T10:00:00+00:00", "2025-03-04T10:05:00+00:00"]
    first = alerts[0]
    assert first.figures == {"error_rate": 0.5, "threshold": 0.5, "turns": 4, "failed": 2,
                             "window_s": 300, "min_turns": 4}
    assert first.message == ("Error rate 50.0% (2 of 4 turns failed) in the 300 s window from "
                             "2025-03-04T10:00:00+00:00 ≥ 50.0% threshold")
    assert (first.subject_kind, first.subject, first.severity) == ("fleet", "fleet", "critical")
    assert (first.turn_id, first.conversation_id) == ("bad-2", "c-f")
    assert alerts[1].figures["turns"] == 6 and alerts[1].figures["failed"] == 3


async def test_alert_missed_by_a_dead_consumer_fires_when_its_entry_is_claimed(redis: Any) -> None:
    await failed_turn("t-1").send(redis)
    await aggregate_without_ack(redis)  # a consumer that died before its alerts and its ack
    assert await alerts_of(redis, "turn_failed") == []

    await drain(redis, name="survivor", claim_idle_ms=0)  # counts nothing new, evaluates rules
    await drain(redis, name="survivor", claim_idle_ms=0)
    assert [a.turn_id for a in await alerts_of(redis, "turn_failed")] == ["t-1"]
    assert (await redis.hget(keys.aggregate("turn", "t-1"), "turns_failed")) == "1"


async def test_racing_evaluations_write_one_alert(redis: Any) -> None:
    consumer = TelemetryConsumer(redis, settings(), name="one")
    plan = await consumer.aggregator.aggregate("1-0", {"batch": failed_turn("t-1").batch_json()})
    rules = [AlertRules(redis, settings()) for _ in range(5)]
    results = await asyncio.gather(*(r.evaluate(plan.touched) for r in rules))
    assert sorted(len(fired) for fired in results) == [0, 0, 0, 0, 1]
    assert len(await alerts_of(redis, "turn_failed")) == 1
    assert await rules[0].evaluate(Touched()) == []


async def test_read_alerts_pages_after_an_id_and_waits_when_asked(redis: Any) -> None:
    for i in range(3):
        await failed_turn(f"t-{i}").send(redis)
    await drain(redis)
    page = await read_alerts(redis, count=2)
    assert [a.turn_id for _, a in page] == ["t-0", "t-1"]
    rest = await read_alerts(redis, after_id=page[-1][0], block_ms=10)
    assert [a.turn_id for _, a in rest] == ["t-2"]
    assert await read_alerts(redis, after_id=rest[-1][0], block_ms=10) == []


async def test_budget_alerts_fire_once_at_80_and_100_percent(redis: Any) -> None:
    # Each support turn costs $0.00043; a $0.001 budget: 43% → 86% (80% alert) → 129% (100%).
    s = {"budgets": {"cust-b": 0.001}}
    await support_turn("t-1", "c-1", "cust-b").send(redis)
    await drain(redis, **s)
    assert await alerts_of(redis, "customer_budget") == []
    await support_turn("t-2", "c-2", "cust-b").send(redis)
    await drain(redis, **s)
    [eighty] = await alerts_of(redis, "customer_budget")
    assert (eighty.window, eighty.severity, eighty.figures["spent_usd"]) == ("2025-03-04:80%", "warning", 0.00086)
    await support_turn("t-3", "c-3", "cust-b").send(redis)
    await support_turn("t-2", "c-2", "cust-b").send(redis)  # re-sent: counts nothing, fires nothing
    await drain(redis, **s)
    await support_turn("t-4", "c-4", "cust-b").send(redis)
    await drain(redis, **s)
    alerts = await alerts_of(redis, "customer_budget")
    assert [(a.window, a.severity) for a in alerts] == [("2025-03-04:80%", "warning"),
                                                        ("2025-03-04:100%", "critical")]
    assert alerts[1].figures["spent_usd"] == 0.00129 and alerts[1].figures["budget_usd"] == 0.001
    assert "refused until midnight UTC" in alerts[1].message
    # Customers without a budget never get one.
    await support_turn("t-5", "c-5", "cust-free").send(redis)
    await drain(redis, **s)
    assert {a.subject for a in await alerts_of(redis, "customer_budget")} == {"cust-b"}


async def test_conversation_cost_alert_fires_when_one_merged_batch_crosses_the_threshold(redis: Any) -> None:
    # The batch script returns each conversation's cost after its writes, and the rule reads a
    # conversation again only when that is over the threshold: read before the writes (0), or
    # compared the wrong way, no alert would fire here.
    s = {"alert_conversation_cost_usd": 0.0005}
    for turn in ("t-1", "t-2"):  # $0.00043 each: over only together
        await support_turn(turn, "c-1", "cust-a").send(redis)
    await support_turn("t-3", "c-3", "cust-a").send(redis)  # $0.00043: under
    consumer = TelemetryConsumer(redis, settings(**s), name="one")
    plans = [consumer.aggregator.plan(f"{1000 + i}-0", {"batch": t.batch_json()})
             for i, t in enumerate((support_turn("t-9", "c-9", "cust-a"),))]
    await consumer.aggregator.apply(plans)
    assert plans[0].touched.conversation_costs == {"c-9": 430_000}
    assert await consumer.run(burst=True) == 3
    [alert] = await alerts_of(redis, "conversation_cost")
    assert (alert.conversation_id, alert.figures["cost_usd"]) == ("c-1", 0.00086)
