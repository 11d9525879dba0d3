"""The figures behind the web console: the last hour per minute, spend today per customer and
model, the newest alerts, how a turn's spans become timeline bars, and which tool call a
refund row is marked on.

Batches are written as workers write them and aggregated by a real consumer (the helpers of
``tests/test_telemetry.py``); each figure is exact, and a batch sent twice counts once.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import pytest

from turnfleet.telemetry.aggregate import latency_bucket, latency_bucket_bound
from turnfleet.telemetry.console import breakdown, place_refunds, sparkline, timeline
from turnfleet.telemetry.alert_reads import alert_entries_before
from turnfleet.telemetry.live_figures import histogram_percentile, last_hour, spend_today
from turnfleet.telemetry.stats import customer_day_stats
from tests.batches import T0, AttemptBatch, support_turn
from tests.consuming import drain
from turnfleet import keys
from turnfleet.models import Alert

OFFLINE_TURN_USD = 0.00043  # support_turn on the offline model (430 000 n$)
MINI_TURN_USD = 0.0001725  # the same calls at gpt-4o-mini's $0.15 / $0.075 / $0.60 per 1M


def test_latency_buckets_are_a_quarter_doubling_wide_and_hold_their_value() -> None:
    assert latency_bucket(0.2) == latency_bucket(1.0) == 0
    for value in (1.01, 1.19, 2.0, 7.3, 100.0, 107.6, 999.9, 1000.0, 86_400_000.0):
        k = latency_bucket(value)
        assert latency_bucket_bound(k - 1) < value <= latency_bucket_bound(k)
        assert latency_bucket_bound(k) < value * 2 ** 0.25
    assert histogram_percentile({}, 95) is None
    # 19 turns in the 100 ms bucket and one in the 1 s bucket: the 95th of 20 is the 19th.
    assert histogram_percentile({latency_bucket(100): 19, latency_bucket(1000): 1}, 95) == \
        round(latency_bucket_bound(latency_bucket(100)), 3)


async def test_last_hour_counts_each_finished_turn_once_per_minute(redis: Any) -> None:
    for i in range(19):
        await support_turn(f"ok-{i}", f"c-{i}", at=T0, duration_ms=100.0).send(redis)
    slow = support_turn("slow", "c-slow", at=T0 + timedelta(seconds=20), duration_ms=1000.0)
    await slow.send(redis)
    await slow.send(redis)  # re-sent: counted once
    failed = (AttemptBatch("bad", "c-bad", at=T0 + timedelta(minutes=1)).started()
              .agent("Triage").llm("Triage", 10, 1).failed(duration_ms=500.0))
    await failed.send(redis)
    await drain(redis)
    await drain(redis)  # nothing left: changes nothing

    hour = await last_hour(redis, now=T0 + timedelta(minutes=1, seconds=30))
    minutes = hour["minutes"]
    assert len(minutes) == 60
    assert minutes[0]["minute"] == (T0 - timedelta(minutes=58)).isoformat()
    assert minutes[-1]["minute"] == (T0 + timedelta(minutes=1)).isoformat()
    assert all(m["turns"] == 0 and m["error_rate"] is None and m["p95_ms"] is None
               for m in minutes[:-2])
    ten = minutes[-2]
    assert (ten["turns"], ten["turns_completed"], ten["turns_failed"]) == (20, 20, 0)
    assert ten["turns_per_s"] == round(20 / 60, 4) and ten["error_rate"] == 0.0
    assert ten["p95_ms"] == round(latency_bucket_bound(latency_bucket(100.0)), 3)
    now = minutes[-1]  # 30 s into the current minute
    assert (now["turns"], now["turns_failed"], now["error_rate"]) == (1, 1, 1.0)
    assert now["turns_per_s"] == round(1 / 30, 4)
    assert now["p95_ms"] == round(latency_bucket_bound(latency_bucket(500.0)), 3)
    total = hour["total"]
    assert (total["turns"], total["turns_failed"]) == (21, 1)
    assert total["error_rate"] == round(1 / 21, 4)
    assert total["turns_per_s"] == round(21 / (59 * 60 + 30), 4)
    # Sorted: 19 × 100 ms, 500 ms, 1000 ms; the 95th of 21 is the 20th: the 500 ms bucket.
    assert total["p95_ms"] == round(latency_bucket_bound(latency_bucket(500.0)), 3)
    assert await redis.ttl(f"tf:agg:minute:{int(T0.timestamp())}") > 3600


async def test_spend_today_per_customer_and_model_counts_each_call_once(redis: Any) -> None:
    day = T0.date().isoformat()
    first = support_turn("t-1", "c-1", "cust-a", at=T0)
    await first.send(redis)
    await first.send(redis)
    await support_turn("t-2", "c-2", "cust-a", at=T0, model="gpt-4o-mini").send(redis)
    await support_turn("t-3", "c-3", "cust-b", at=T0).send(redis)
    await support_turn("t-0", "c-0", "cust-a", at=T0 - timedelta(days=1)).send(redis)  # yesterday
    await drain(redis)

    spend = await spend_today(redis, None, now=T0 + timedelta(hours=1))
    assert spend["day"] == day
    assert [r["customer_id"] for r in spend["customers"]] == ["cust-a", "cust-b"]
    a, b = spend["customers"]
    assert a["cost_usd"] == pytest.approx(OFFLINE_TURN_USD + MINI_TURN_USD)
    assert a["cost_usd"] == (await customer_day_stats(redis, "cust-a", day))["cost_usd"]
    assert a["turns_completed"] == 2 and a["llm_calls"] == 6
    assert a["models"] == {"gpt-4o-mini": {"llm_calls": 3, "cost_usd": pytest.approx(MINI_TURN_USD)},
                           "turnfleet-offline": {"llm_calls": 3, "cost_usd": OFFLINE_TURN_USD}}
    assert b["models"] == {"turnfleet-offline": {"llm_calls": 3, "cost_usd": OFFLINE_TURN_USD}}
    assert spend["models"] == [
        {"model": "turnfleet-offline", "llm_calls": 6, "cost_usd": pytest.approx(2 * OFFLINE_TURN_USD)},
        {"model": "gpt-4o-mini", "llm_calls": 3, "cost_usd": pytest.approx(MINI_TURN_USD)},
    ]
    # A key bound to cust-b: its row, and the models it used from its own figures.
    mine = await spend_today(redis, ["cust-b"], now=T0 + timedelta(hours=1))
    assert [r["customer_id"] for r in mine["customers"]] == ["cust-b"]
    assert mine["models"] == [{"model": "turnfleet-offline", "llm_calls": 3,
                               "cost_usd": OFFLINE_TURN_USD}]
    yesterday = await spend_today(redis, None, now=T0 - timedelta(hours=12))
    assert [r["customer_id"] for r in yesterday["customers"]] == ["cust-a"]
    assert yesterday["models"] == [{"model": "turnfleet-offline", "llm_calls": 3,
                                    "cost_usd": OFFLINE_TURN_USD}]


async def test_alert_entries_before_reads_back_from_the_newest(redis: Any) -> None:
    ids = []
    for n in range(3):
        alert = Alert(alert_id=f"al_{n}", rule="test_rule", subject_kind="fleet", subject="fleet",
                      window="once", message=f"alert {n}")
        ids.append(await redis.xadd(keys.ALERTS_STREAM, {"alert": alert.model_dump_json()}))
    ids.append(await redis.xadd(keys.ALERTS_STREAM, {"alert": "not json"}))
    newest = await alert_entries_before(redis, count=2)
    assert [(i, a is None) for i, a in newest] == [(ids[3], True), (ids[2], False)]
    assert [(i, a.alert_id) for i, a in await alert_entries_before(redis, ids[2])] == [
        (ids[1], "al_1"), (ids[0], "al_0")]


def test_timeline_has_one_bar_per_span_on_the_attempts_time_axis() -> None:
    start = "2026-01-01T10:00:00+00:00"

    def at(ms: float) -> str:
        return f"2026-01-01T10:00:00.{int(ms * 1000):06d}+00:00"

    def node(kind: str, name: str, begin: float | None, duration: float | None,
             *children: dict[str, Any]) -> dict[str, Any]:
        return {"kind": kind, "name": name, "started_at": None if begin is None else at(begin),
                "duration_ms": duration, "detail": {}, "error": None, "children": list(children)}

    attempt = {"started_at": start, "ended_at": at(200), "tree": [
        node("agent", "Billing", 0, 180,
             node("generation", "m", 10, 50),
             node("tool", "process_refund", 60, 100, node("custom", "ledger", 70, 0.0)),
             node("handoff", "A → B", None, None)),
    ]}
    rows = timeline(attempt)["rows"]
    assert [(r["kind"], r["depth"]) for r in rows] == [
        ("agent", 0), ("generation", 1), ("tool", 1), ("custom", 2), ("handoff", 1)]
    assert timeline(attempt)["extent_ms"] == 200
    assert [(r["x"], r["w"]) for r in rows] == [
        (0.0, 90.0), (5.0, 25.0), (30.0, 50.0), (35.0, 0.4), (0.0, 0.4)]
    # A span that ends after the attempt's recorded end widens the axis to fit it.
    late = {"started_at": start, "ended_at": at(100), "tree": [node("tool", "t", 50, 150)]}
    assert timeline(late)["extent_ms"] == 200 and timeline(late)["rows"][0]["w"] == 75.0


def test_breakdown_and_sparkline_scale_to_their_box() -> None:
    parts = breakdown({"queue_wait_ms": 50.0, "model_ms": 30.0, "tool_ms": 15.0, "other_ms": 5.0}, {})
    assert [(p["kind"], p["x"], p["w"]) for p in parts] == [
        ("queue", 0.0, 50.0), ("model", 50.0, 30.0), ("tool", 80.0, 15.0), ("other", 95.0, 5.0)]
    line = sparkline([None, 1.0, 2.0, None, 4.0], width=40, height=24)
    assert line["top"] == 4.0
    # Inset by 6 on every side: x from 6 to 34, y from 18 (zero) up to 6 (the top).
    assert line["segments"] == ["13.0,15.0 20.0,12.0"] + ["34.0,6.0"]
    assert line["dots"] == ["34.0,6.0"] and line["base"] == 18
    # The latest point is a dot even inside a run, so one data point is never only a line end.
    assert sparkline([0.0, 0.0, 3.0], width=40, height=24)["dots"] == ["34.0,6.0"]
    assert not math.isnan(sparkline([None, None])["top"])


def _tool(name: str, arguments: str | None = None, children: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    detail = {} if arguments is None else {"arguments": arguments}
    return {"kind": "tool", "name": name, "detail": detail, "children": children or []}


def test_each_refund_is_marked_on_the_process_refund_call_that_made_it() -> None:
    rows = [{"order_id": "1042", "anomalies": []}, {"order_id": "1049", "anomalies": [{"check": "x"}]},
            {"order_id": "1050", "anomalies": []}]
    # Named by its order_id argument, wherever the call sits in the tree, in each attempt.
    first = [_tool("process_refund", '{"order_id": "1049", "amount": "10.00"}')]
    agent = {"kind": "agent", "name": "Billing", "detail": {}, "children": [
        _tool("check_refund_eligibility", '{"order_id": "1042"}'),
        _tool("process_refund", '{"order_id": "1042", "amount": "89.00"}'),
        _tool("process_refund", '{"order_id": "1049", "amount": "10.00"}')]}
    attempts = [{"tree": first}, {"tree": [agent]}]
    unplaced = place_refunds(attempts, rows)
    assert first[0]["refund"] is rows[1]
    assert [c.get("refund") for c in agent["children"]] == [None, rows[0], rows[1]]
    assert unplaced == [rows[2]]  # no call shows it: the page marks it on the turn
    # Arguments kept out of telemetry: the k-th call is the k-th refund.
    blind = [_tool("process_refund"), _tool("process_refund")]
    assert place_refunds([{"tree": blind}], rows) == [rows[2]]
    assert [n["refund"] for n in blind] == rows[:2]
    # A call for an order no row has is left unmarked.
    stray = [_tool("process_refund", '{"order_id": "9999"}')]
    assert place_refunds([{"tree": stray}], rows[:1]) == rows[:1] and "refund" not in stray[0]
