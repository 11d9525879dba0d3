"""Telemetry aggregation: exact totals, exactly once, through redelivery, claims and crashes.

Batches are written by the worker's own hooks (``tests/batches.py``) and XADDed as the workers
write them; a real consumer (in this event loop, or a subprocess that is killed) aggregates them.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from turnfleet.telemetry.consumer import TelemetryConsumer, caught_up, run_consumer
from turnfleet.telemetry.stats import conversation_stats, customer_day_stats, stats, totals, turn_stats
from tests.batches import OFFLINE, T0, TURN_COST_NUSD, TURN_TOKENS, AttemptBatch, support_turn
from tests.consuming import aggregate_without_ack, drain, pending, pick, settings
from turnfleet import keys
from turnfleet.models import TokenUsage

REPO = Path(__file__).resolve().parents[1]


# -- exact totals -------------------------------------------------------------------------


async def test_totals_per_subject_equal_the_sum_of_llm_end_usage(redis: Any) -> None:
    await support_turn("t-1", "c-1", "cust-a").send(redis)
    await support_turn("t-2", "c-1", "cust-a").send(redis)
    await support_turn("t-3", "c-2", "cust-b", model="gpt-4o-mini").send(redis)
    assert await drain(redis) == 3

    def times(n: int) -> dict[str, int]:
        return {k: v * n for k, v in TURN_TOKENS.items()}

    assert pick(await turn_stats(redis, "t-1"), TURN_TOKENS) == TURN_TOKENS
    assert pick(await conversation_stats(redis, "c-1"), TURN_TOKENS) == times(2)
    assert pick(await conversation_stats(redis, "c-2"), TURN_TOKENS) == times(1)
    by_customer = {r["customer_id"]: r for r in await stats(redis, "customer")}
    assert pick(by_customer["cust-a"], TURN_TOKENS) == times(2)
    assert pick(by_customer["cust-b"], TURN_TOKENS) == times(1)
    by_model = {r["model"]: r for r in await stats(redis, "model")}
    assert pick(by_model[OFFLINE], TURN_TOKENS) == times(2)
    assert pick(by_model["gpt-4o-mini"], TURN_TOKENS) == times(1)
    assert pick(await totals(redis), TURN_TOKENS) == times(3)
    assert pick(await customer_day_stats(redis, "cust-a", "2025-03-04"), TURN_TOKENS) == times(2)

    overall = await totals(redis)
    assert overall["turns_completed"] == 3
    assert (overall["tool_calls"], overall["tool_errors"], overall["handoffs"]) == (3, 0, 3)
    assert overall["latency_count"] == 3 and overall["latency_ms_sum"] == 3000.0
    assert overall["llm_ms_sum"] == 900.0 and overall["tool_ms_sum"] == 22.5


async def test_cost_is_exact_for_a_known_price(redis: Any) -> None:
    await support_turn("t-1", "c-1", "cust-a").send(redis)
    await support_turn("t-2", "c-1", "cust-a").send(redis)
    await support_turn("t-3", "c-2", "cust-a", model="gpt-4o-mini").send(redis)
    await drain(redis)

    assert (await turn_stats(redis, "t-1"))["cost_usd"] == 0.00043
    assert (await conversation_stats(redis, "c-1"))["cost_usd"] == 0.00086
    # gpt-4o-mini: 0.15 / 0.075 / 0.60 per 1M → 30 000 + 61 500 + 81 000 n$.
    assert (await turn_stats(redis, "t-3"))["cost_usd"] == 0.0001725
    assert (await totals(redis))["cost_usd"] == (2 * TURN_COST_NUSD + 172_500) / 10**9
    by_model = {r["model"]: r["cost_usd"] for r in await stats(redis, "model")}
    assert by_model == {OFFLINE: 0.00086, "gpt-4o-mini": 0.0001725}
    assert (await customer_day_stats(redis, "cust-a", "2025-03-04"))["cost_usd"] == 0.0010325


async def test_turn_record_keeps_path_models_timings_and_status(redis: Any) -> None:
    await support_turn("t-1", "c-1", "cust-a", duration_ms=1234.5).send(redis)
    await drain(redis)
    turn = await turn_stats(redis, "t-1")
    assert pick(turn, {"status": 0, "conversation_id": 0, "customer_id": 0, "attempts": 0,
                       "agents": 0, "model": 0, "models": 0, "duration_ms": 0,
                       "queue_wait_ms": 0, "latency_ms_max": 0}) == {
        "status": "completed", "conversation_id": "c-1", "customer_id": "cust-a", "attempts": 1,
        "agents": ["Triage", "Billing"], "model": OFFLINE, "models": [OFFLINE],
        "duration_ms": 1234.5, "queue_wait_ms": 12.0, "latency_ms_max": 1234.5,
    }
    assert turn["finished_at"].startswith("2025-03-04T10:00:00")
    assert await turn_stats(redis, "never-seen") == {}


async def test_stats_list_subjects_most_recent_first(redis: Any) -> None:
    for i in range(3):
        await support_turn(f"t-{i}", f"c-{i}", "cust-a", at=T0 + timedelta(minutes=i)).send(redis)
    await drain(redis)
    rows = await stats(redis, "conversation")
    assert [r["subject"] for r in rows] == ["c-2", "c-1", "c-0"]
    assert rows[0]["customer_id"] == "cust-a"
    assert rows[0]["last_event_at"].startswith("2025-03-04T10:02:00")
    assert [r["subject"] for r in await stats(redis, "conversation", limit=2)] == ["c-2", "c-1"]
    with pytest.raises(ValueError, match="by must be one of"):
        await stats(redis, "turnip")  # type: ignore[arg-type]


# -- exactly once -------------------------------------------------------------------------


async def test_same_batch_added_twice_is_counted_once(redis: Any) -> None:
    batch = support_turn("t-1")
    await batch.send(redis)
    await batch.send(redis)  # a worker that re-sends after a lost reply
    assert await drain(redis) == 2
    await batch.send(redis)  # and once more, after the first two were acknowledged
    assert await drain(redis) == 1
    turn = await turn_stats(redis, "t-1")
    assert pick(turn, TURN_TOKENS) == TURN_TOKENS
    assert (turn["turns_completed"], turn["handoffs"], turn["tool_calls"]) == (1, 1, 1)
    assert turn["cost_usd"] == 0.00043 and turn["latency_count"] == 1
    assert pick(await totals(redis), TURN_TOKENS) == TURN_TOKENS


async def test_unacked_entry_is_claimed_by_another_consumer_and_not_double_counted(redis: Any) -> None:
    await support_turn("t-1").send(redis)
    await aggregate_without_ack(redis)
    assert await pending(redis) == 1
    assert not await caught_up(redis)

    # A second consumer takes over entries idle longer than claim_idle_ms (0 here).
    assert await drain(redis, name="survivor", claim_idle_ms=0) == 1
    assert pick(await totals(redis), TURN_TOKENS) == TURN_TOKENS
    assert (await totals(redis))["turns_completed"] == 1
    assert await pending(redis) == 0
    assert await caught_up(redis)


CRASHING_CONSUMER = """
import asyncio, os, signal, sys
from turnfleet.telemetry.consumer import TelemetryConsumer
from turnfleet.connection import connect
from turnfleet.models import TokenUsage
from turnfleet.settings import TelemetrySettings

async def main():
    consumer = TelemetryConsumer(connect(sys.argv[1]), TelemetrySettings(), name="doomed")
    evaluate = consumer.alerts.evaluate
    async def evaluate_then_die(touched):
        await evaluate(touched)
        os.kill(os.getpid(), signal.SIGKILL)  # aggregate stored, alerts done, no XACK
    consumer.alerts.evaluate = evaluate_then_die
    await consumer.run(burst=True)

asyncio.run(main())
"""


async def test_consumer_killed_before_ack_loses_nothing_and_counts_nothing_twice(
    redis: Any, redis_url: str, fleet_env: dict[str, str]
) -> None:
    await support_turn("t-1").send(redis)
    await support_turn("t-2").send(redis)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_CONSUMER, redis_url, cwd=REPO, env=fleet_env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    assert await asyncio.wait_for(proc.wait(), 30) == -9
    assert await pending(redis) == 2
    assert (await totals(redis))["turns_completed"] == 2  # counted before it died

    assert await drain(redis, name="survivor", claim_idle_ms=0) == 2
    overall = await totals(redis)
    assert pick(overall, TURN_TOKENS) == {k: 2 * v for k, v in TURN_TOKENS.items()}
    assert overall["turns_completed"] == 2 and overall["cost_usd"] == 0.00086
    assert await pending(redis) == 0


async def test_out_of_order_retry_does_not_undo_a_finished_turn(redis: Any) -> None:
    first = AttemptBatch("t-1", attempt=1).started().agent("Triage").llm("Triage", 100, 10)
    first.failed("Timeout", "model timed out", terminal=False)
    second = AttemptBatch("t-1", attempt=2).started().agent("Triage").llm("Triage", 100, 10)
    second.completed()
    await second.send(redis)  # two consumers may finish them in either order
    await first.send(redis)
    await drain(redis)
    turn = await turn_stats(redis, "t-1")
    assert (turn["status"], turn["attempts"], turn["attempts_failed"]) == ("completed", 2, 1)


# -- failures and unknowns ------------------------------------------------------------------


async def test_failed_attempt_tokens_are_counted_and_flagged(redis: Any) -> None:
    first = AttemptBatch("t-1", attempt=1).started().agent("Triage").llm("Triage", 120, 20)
    first.failed("APITimeoutError", "model timed out", terminal=False)
    second = AttemptBatch("t-1", attempt=2).started().agent("Triage").llm("Triage", 120, 20)
    second.completed(duration_ms=800.0)
    await first.send(redis)
    await second.send(redis)
    await drain(redis)

    turn = await turn_stats(redis, "t-1")
    assert pick(turn, {"input_tokens": 0, "output_tokens": 0, "llm_calls": 0}) == {
        "input_tokens": 240, "output_tokens": 40, "llm_calls": 2}
    assert turn["failed_attempt_tokens"] == 140 and turn["failed_attempt_cost_usd"] == 0.00008
    assert turn["cost_usd"] == 0.00016
    assert (turn["attempts_failed"], turn["turns_completed"], turn["turns_failed"]) == (1, 1, 0)
    assert (turn["status"], turn["attempts"]) == ("completed", 2)
    assert (turn["error_type"], turn["error_message"]) == ("APITimeoutError", "model timed out")
    assert turn["latency_count"] == 1 and turn["duration_ms"] == 800.0

    # A terminally failed attempt's tokens are flagged too.
    last = AttemptBatch("t-2").started().agent("Triage").llm("Triage", 50, 5)
    await last.tool("Triage", "lookup_order", error="order service down").failed().send(redis)
    await drain(redis)
    t2 = await turn_stats(redis, "t-2")
    assert (t2["status"], t2["turns_failed"], t2["failed_attempt_tokens"]) == ("failed", 1, 55)
    assert (t2["tool_calls"], t2["tool_errors"], t2["error_type"]) == (1, 1, "ModelError")
    overall = await totals(redis)
    assert (overall["failed_attempt_tokens"], overall["turns_failed"]) == (195, 1)
    assert overall["input_tokens"] == 290


async def test_unknown_model_is_counted_as_unknown_cost_never_zero(redis: Any) -> None:
    await AttemptBatch("t-1", model="mystery-llm").started().agent("A").llm("A", 100, 10) \
        .completed().send(redis)
    await AttemptBatch("t-2", model="mystery-llm").started().agent("A").llm("A", 100, 10) \
        .completed().send(redis)
    with capture_logs() as logs:
        await drain(redis)
    turn = await turn_stats(redis, "t-1")
    assert (turn["cost_usd"], turn["cost_unknown_calls"], turn["cost_complete"]) == (None, 1, False)
    assert turn["input_tokens"] == 100
    model = {r["model"]: r for r in await stats(redis, "model")}["mystery-llm"]
    assert (model["cost_usd"], model["cost_unknown_calls"]) == (None, 2)
    assert [e["model"] for e in logs if e["event"] == "pricing.unknown_model"] == ["mystery-llm"]

    # Mixed with priced calls: cost is the known part, flagged as incomplete.
    await support_turn("t-3").send(redis)
    await drain(redis)
    conv = await conversation_stats(redis, "c-1")
    assert (conv["cost_usd"], conv["cost_unknown_calls"], conv["cost_complete"]) == (0.00043, 2, False)


async def test_usage_mismatch_between_turn_completed_and_llm_end_is_logged_not_counted(redis: Any) -> None:
    batch = support_turn("t-1")
    batch.events[-1] = batch.events[-1].model_copy(update={"usage": TokenUsage(input_tokens=1)})
    await batch.send(redis)
    with capture_logs() as logs:
        await drain(redis)
    assert [e["turn_id"] for e in logs if e["event"] == "telemetry.usage_mismatch"] == ["t-1"]
    assert pick(await turn_stats(redis, "t-1"), TURN_TOKENS) == TURN_TOKENS


async def test_malformed_entries_are_acked_counted_and_do_not_stop_later_ones(redis: Any) -> None:
    await support_turn("t-1").send(redis)
    # Raw on purpose: no worker writes these (not JSON, no batch, an event without its
    # envelope, not a list), so the hooks cannot build them.
    await redis.xadd(keys.TELEMETRY_STREAM, {"turn_id": "t-x", "batch": "{not json"})
    await redis.xadd(keys.TELEMETRY_STREAM, {"turn_id": "t-x"})
    await redis.xadd(keys.TELEMETRY_STREAM, {"batch": json.dumps([{"kind": "llm_end"}])})
    await redis.xadd(keys.TELEMETRY_STREAM, {"batch": json.dumps({"not": "a list"})})
    await support_turn("t-2").send(redis)
    with capture_logs() as logs:
        assert await drain(redis) == 6
    malformed = [e for e in logs if e["event"] == "telemetry.malformed"]
    assert len(malformed) == 4 and all(e["log_level"] == "error" for e in malformed)
    assert malformed[0]["turn_id"] == "t-x" and "Invalid JSON" in malformed[0]["error"]
    overall = await totals(redis)
    assert (overall["telemetry_malformed"], overall["turns_completed"]) == (4, 2)
    assert await pending(redis) == 0

    # Handled again (a redelivery), a malformed entry is not counted twice.
    consumer = TelemetryConsumer(redis, settings(), name="again")
    entries = await redis.xrange(keys.TELEMETRY_STREAM)
    assert await consumer.handle(entries) == 6
    overall = await totals(redis)
    assert (overall["telemetry_malformed"], overall["turns_completed"]) == (4, 2)


# -- the consumer loop ----------------------------------------------------------------------


async def test_caught_up_follows_delivery_and_acknowledgement(redis: Any) -> None:
    assert await caught_up(redis)  # nothing was ever written
    await support_turn("t-1").send(redis)
    assert not await caught_up(redis)  # written, no group yet
    await drain(redis)
    assert await caught_up(redis)
    await support_turn("t-2").send(redis)
    assert not await caught_up(redis)  # not delivered
    await redis.xreadgroup(keys.TELEMETRY_GROUP, "slow", {keys.TELEMETRY_STREAM: ">"})
    assert not await caught_up(redis)  # delivered, pending
    await drain(redis, claim_idle_ms=0)
    assert await caught_up(redis)


async def test_run_consumer_in_burst_drains_the_stream(redis: Any, redis_url: str) -> None:
    for i in range(5):
        await support_turn(f"t-{i}", f"c-{i % 2}").send(redis)
    assert await run_consumer(settings(batch_size=2), redis_url, burst=True) == 5
    assert (await totals(redis))["turns_completed"] == 5
    assert await caught_up(redis)


async def test_stop_ends_the_loop_after_the_current_batch(redis: Any) -> None:
    consumer = TelemetryConsumer(redis, settings(), name="long-running")
    task = asyncio.create_task(consumer.run())
    await AttemptBatch("t-1").started().agent("Triage").failed().send(redis)
    # The turn_failed alert is written after the entry is aggregated: wait on it.
    reply = await redis.xread({keys.ALERTS_STREAM: "0-0"}, block=10_000)
    assert reply, "the consumer did not handle the entry"
    consumer.stop()
    assert await asyncio.wait_for(task, 5) == 1
    assert await caught_up(redis)


async def test_entry_trimmed_while_pending_is_acknowledged(redis: Any) -> None:
    consumer = TelemetryConsumer(redis, settings(), name="dead")
    await consumer.ensure_group()
    entry_id = await support_turn("t-1").send(redis)
    await redis.xreadgroup(keys.TELEMETRY_GROUP, "dead", {keys.TELEMETRY_STREAM: ">"})
    await redis.xdel(keys.TELEMETRY_STREAM, entry_id)
    with capture_logs() as logs:
        await drain(redis, name="survivor", claim_idle_ms=0)
    assert [e["entry_id"] for e in logs if e["event"] == "telemetry.entry_gone"] == [entry_id]
    assert await pending(redis) == 0
