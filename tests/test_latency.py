"""Latency breakdown: per-turn figures, exact nearest-rank percentiles, capped samples, slowest.

Everything is counted from every event under the same dedupe as the other aggregates, so a
re-sent or redelivered batch adds no sample. Batches are written by the
worker's own hooks (``tests/batches.py``) and aggregated by a real consumer in burst mode.
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

from turnfleet.telemetry.aggregate import SLOWEST_TURNS_KEPT
from turnfleet.telemetry.latency import latency_report, percentile, slowest_turns
from turnfleet.telemetry.stats import totals, turn_stats
from tests.batches import OFFLINE, T0, AttemptBatch, support_turn
from tests.consuming import aggregate_without_ack, drain, pick
from turnfleet import keys

MINI = "gpt-4o-mini"


def summary(count: int, p50: float, p95: float, p99: float, top: float) -> dict[str, Any]:
    return {"count": count, "p50": p50, "p95": p95, "p99": p99, "max": top}


def many_calls_turn(turn_id: str = "t-many") -> AttemptBatch:
    """100 Triage calls of 1..100 ms (shuffled), 2 Billing calls on another model, 3 tools."""
    durations = list(range(1, 101))
    random.Random(7).shuffle(durations)
    batch = AttemptBatch(turn_id).started().agent("Triage")
    for ms in durations:
        batch.llm("Triage", 10, 1, duration_ms=float(ms))
    batch.handoff("Triage", "Billing").agent("Billing")
    batch.llm("Billing", 10, 1, model=MINI, duration_ms=10.0)
    batch.llm("Billing", 10, 1, model=MINI, duration_ms=20.0)
    for ms in (5.0, 1.0, 3.0):
        batch.tool("Billing", "lookup_order", duration_ms=ms)
    return batch.completed(duration_ms=6000.0)


async def lrange(redis: Any, dimension: str, name: str, metric: str) -> list[float]:
    return [float(v) for v in await redis.lrange(keys.latency_samples(dimension, name, metric), 0, -1)]


# -- percentiles ------------------------------------------------------------------------------


def test_nearest_rank_is_always_a_sample() -> None:
    assert [percentile(list(range(1, 101)), p) for p in (50, 95, 99, 100)] == [50, 95, 99, 100]
    assert [percentile([1.0, 3.0, 5.0], p) for p in (50, 95, 99)] == [3.0, 5.0, 5.0]
    assert percentile([42.0], 1) == 42.0
    assert percentile([], 50) is None


async def test_call_percentiles_are_exact_per_model_agent_and_tool(redis: Any) -> None:
    await many_calls_turn().send(redis)
    await drain(redis)
    report = await latency_report(redis)
    assert report["model"] == {OFFLINE: summary(100, 50.0, 95.0, 99.0, 100.0),
                               MINI: summary(2, 10.0, 20.0, 20.0, 20.0)}
    assert report["agent"] == {"Triage": summary(100, 50.0, 95.0, 99.0, 100.0),
                               "Billing": summary(2, 10.0, 20.0, 20.0, 20.0)}
    assert report["tool"] == {"lookup_order": summary(3, 3.0, 5.0, 5.0, 5.0)}
    # The model's list is newest first: the last call aggregated is at the head.
    assert (await lrange(redis, "model", MINI, "call")) == [20.0, 10.0]


async def test_turn_percentiles_over_finished_turns(redis: Any) -> None:
    for i in range(1, 21):  # totals 10..200 ms, one model call of i ms, queue wait 2·i
        batch = AttemptBatch(f"t-{i}", at=T0 + timedelta(seconds=i)).started(queue_wait_ms=2.0 * i)
        batch.agent("Triage").llm("Triage", 10, 1, duration_ms=float(i))
        if i % 2:
            batch.completed(duration_ms=10.0 * i, queue_wait_ms=2.0 * i)
        else:
            batch.failed(duration_ms=10.0 * i)  # failed turns count as finished turns too
        await batch.send(redis)
    await drain(redis)
    turn = (await latency_report(redis))["turn"]
    assert turn == {
        "queue_wait": summary(20, 20.0, 38.0, 40.0, 40.0),
        "model": summary(20, 10.0, 19.0, 20.0, 20.0),
        "tool": summary(20, 0.0, 0.0, 0.0, 0.0),
        "other": summary(20, 90.0, 171.0, 180.0, 180.0),
        "total": summary(20, 100.0, 190.0, 200.0, 200.0),
    }


async def test_empty_report_lists_turn_metrics_with_no_samples(redis: Any) -> None:
    empty = summary(0, None, None, None, None)  # type: ignore[arg-type]
    assert await latency_report(redis) == {
        "turn": {m: empty for m in ("queue_wait", "model", "tool", "other", "total")},
        "model": {}, "agent": {}, "tool": {},
    }


# -- per-turn breakdown -----------------------------------------------------------------------


async def test_other_ms_is_duration_minus_model_minus_tool(redis: Any) -> None:
    await support_turn("t-ok", duration_ms=1000.0).send(redis)  # 3 × 100 ms model, 7.5 ms tool
    failed = AttemptBatch("t-bad").started(queue_wait_ms=30.0).agent("Triage")
    failed.llm("Triage", 10, 1, duration_ms=40.0).tool("Triage", "lookup_order", 5.0, "down")
    await failed.failed(duration_ms=500.0).send(redis)
    overlapping = AttemptBatch("t-par").started(queue_wait_ms=1.0).agent("Billing")
    overlapping.llm("Billing", 10, 1, duration_ms=50.0)
    overlapping.tool("Billing", "lookup_order", 40.0).tool("Billing", "lookup_order", 40.0)
    await overlapping.completed(duration_ms=100.0, queue_wait_ms=1.0).send(redis)  # tools overlap
    await drain(redis)

    fields = {"status": 0, "duration_ms": 0, "queue_wait_ms": 0, "model_ms": 0, "tool_ms": 0,
              "other_ms": 0}
    assert pick(await turn_stats(redis, "t-ok"), fields) == {
        "status": "completed", "duration_ms": 1000.0, "queue_wait_ms": 12.0, "model_ms": 300.0,
        "tool_ms": 7.5, "other_ms": 692.5}
    assert pick(await turn_stats(redis, "t-bad"), fields) == {
        "status": "failed", "duration_ms": 500.0, "queue_wait_ms": 30.0, "model_ms": 40.0,
        "tool_ms": 5.0, "other_ms": 455.0}
    assert pick(await turn_stats(redis, "t-par"), fields) == {
        "status": "completed", "duration_ms": 100.0, "queue_wait_ms": 1.0, "model_ms": 50.0,
        "tool_ms": 80.0, "other_ms": 0.0}


async def test_breakdown_is_the_finishing_attempts_while_sums_count_every_attempt(redis: Any) -> None:
    first = AttemptBatch("t-1", attempt=1).started().agent("Triage")
    first.llm("Triage", 10, 1, duration_ms=100.0).failed("Timeout", "slow", 120.0, terminal=False)
    second = AttemptBatch("t-1", attempt=2).started().agent("Triage")
    second.llm("Triage", 10, 1, duration_ms=50.0).completed(duration_ms=80.0)
    await second.send(redis)  # either order: the breakdown is the terminal attempt's
    await first.send(redis)
    await drain(redis)
    turn = await turn_stats(redis, "t-1")
    assert (turn["model_ms"], turn["other_ms"], turn["duration_ms"]) == (50.0, 30.0, 80.0)
    assert turn["llm_ms_sum"] == 150.0
    # One finished turn: one turn sample; every model call is a call sample.
    report = await latency_report(redis)
    assert report["turn"]["total"]["count"] == 1
    assert report["model"][OFFLINE] == summary(2, 50.0, 100.0, 100.0, 100.0)


# -- samples: capped, counted once ------------------------------------------------------------


async def test_samples_keep_only_the_latest_latency_samples(redis: Any) -> None:
    for t in range(3):  # 3 turns × 3 model calls; the list keeps the 5 latest
        batch = AttemptBatch(f"t-{t}", at=T0 + timedelta(seconds=t)).started().agent("Triage")
        for c in range(3):
            batch.llm("Triage", 10, 1, duration_ms=float(10 * t + c))
        await batch.completed(duration_ms=100.0 + t).send(redis)
    await drain(redis, latency_samples=5)
    assert await lrange(redis, "model", OFFLINE, "call") == [22.0, 21.0, 20.0, 12.0, 11.0]
    assert await lrange(redis, "agent", "Triage", "call") == [22.0, 21.0, 20.0, 12.0, 11.0]
    assert await lrange(redis, "turn", "fleet", "total") == [102.0, 101.0, 100.0]
    report = await latency_report(redis)
    assert report["model"][OFFLINE] == summary(5, 20.0, 22.0, 22.0, 22.0)
    assert (await totals(redis))["llm_calls"] == 9  # the counters still count every call


async def test_duplicate_and_redelivered_batches_add_no_samples(redis: Any) -> None:
    batch = many_calls_turn()
    await batch.send(redis)
    await batch.send(redis)  # re-sent by a worker after a lost reply
    await drain(redis)
    await batch.send(redis)
    await aggregate_without_ack(redis)  # aggregated by a consumer that then died
    await drain(redis, name="survivor", claim_idle_ms=0)  # and redelivered
    report = await latency_report(redis)
    assert report["model"][OFFLINE]["count"] == 100
    assert report["tool"]["lookup_order"]["count"] == 3
    assert {m: s["count"] for m, s in report["turn"].items()} == dict.fromkeys(report["turn"], 1)
    assert await redis.zcard(keys.SLOWEST_TURNS) == 1


# -- slowest turns ----------------------------------------------------------------------------


async def test_slowest_turns_are_ordered_with_their_breakdown(redis: Any) -> None:
    for i, duration in enumerate((300.0, 1000.0, 50.0, 700.0)):
        await support_turn(f"t-{i}", f"c-{i}", "cust-a", duration_ms=duration).send(redis)
    await AttemptBatch("t-f", "c-f", "cust-b").started(queue_wait_ms=3.0).agent("Triage") \
        .llm("Triage", 10, 1, duration_ms=20.0).failed(duration_ms=800.0).send(redis)
    await drain(redis)
    rows = await slowest_turns(redis, limit=3)
    assert [(r["turn_id"], r["duration_ms"], r["status"]) for r in rows] == [
        ("t-1", 1000.0, "completed"), ("t-f", 800.0, "failed"), ("t-3", 700.0, "completed")]
    assert rows[0] == {
        "turn_id": "t-1", "conversation_id": "c-1", "customer_id": "cust-a", "status": "completed",
        "duration_ms": 1000.0, "queue_wait_ms": 12.0, "model_ms": 300.0, "tool_ms": 7.5,
        "other_ms": 692.5, "finished_at": rows[0]["finished_at"],
    }
    assert rows[0]["finished_at"].startswith("2025-03-04T10:00:00")
    assert (rows[1]["model_ms"], rows[1]["other_ms"], rows[1]["queue_wait_ms"]) == (20.0, 780.0, 3.0)
    assert [r["turn_id"] for r in await slowest_turns(redis)] == ["t-1", "t-f", "t-3", "t-0", "t-2"]
    assert await slowest_turns(redis, limit=0) == []


async def test_slowest_turns_keep_only_the_slowest_thousand(redis: Any) -> None:
    n = SLOWEST_TURNS_KEPT + 5
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(n):  # durations 1..n ms: the 5 fastest fall out
            batch = AttemptBatch(f"t-{i + 1}", f"c-{i % 50}").started().completed(float(i + 1))
            pipe.xadd(keys.TELEMETRY_STREAM, {"turn_id": batch.turn_id, "batch": batch.batch_json()})
        await pipe.execute()
    assert await drain(redis, batch_size=500) == n
    assert await redis.zcard(keys.SLOWEST_TURNS) == SLOWEST_TURNS_KEPT
    slowest = await redis.zrange(keys.SLOWEST_TURNS, 0, 0, withscores=True)
    assert slowest == [("t-6", 6.0)]
    assert [r["turn_id"] for r in await slowest_turns(redis, limit=2)] == [f"t-{n}", f"t-{n - 1}"]
