"""The whole data path for real: producer → Redis → arq worker processes → telemetry.

Workers and the telemetry consumer run as ``turnfleet`` subprocesses in burst mode (drain,
then exit), so a test waits on process exit and on result keys, never on a sleep.
"""

from __future__ import annotations

import json

import pytest
from agents.extensions.memory import RedisSession

from turnfleet.telemetry.alert_reads import read_alerts
from turnfleet.telemetry.stats import conversation_stats, turn_stats
from turnfleet import keys
from tests.processes import run_burst, start_burst
from turnfleet.models import TokenUsage


async def test_three_turn_conversation_telemetry_totals_equal_model_usage(producer, redis, fleet_env, tmp_path):
    texts = [
        "Hi, I'm Dana Whitfield, customer C-100.",
        "Where is order 1043?",
        "I want to talk to a human, please.",
    ]
    ids = [await producer.enqueue_turn(conversation_id="conv-dana", customer_id="C-100", text=t) for t in texts]
    run_burst("worker", fleet_env, tmp_path)
    results = [await producer.result(t) for t in ids]
    assert [r.status for r in results] == ["completed"] * 3
    assert results[1].tool_calls[0].tool == "lookup_order"
    assert json.loads(results[1].tool_calls[0].arguments) == {"order_id": "1043"}
    assert "ESC-" in results[2].final_output

    run_burst("telemetry", fleet_env, tmp_path)
    model_usage = sum((r.usage for r in results), TokenUsage())
    assert model_usage.input_tokens > 0 and model_usage.requests >= 5
    totals = await conversation_stats(redis, "conv-dana")
    assert totals["input_tokens"] == model_usage.input_tokens
    assert totals["output_tokens"] == model_usage.output_tokens
    assert totals["cached_tokens"] == model_usage.cached_tokens
    assert totals["llm_calls"] == model_usage.requests
    assert totals["turns_completed"] == 3
    assert totals["tool_calls"] == 2
    # Cost: the offline model is priced like gpt-4.1-mini ($0.40 in, $0.10 cached, $1.60 out per 1M).
    expected_cost = (
        (model_usage.input_tokens - model_usage.cached_tokens) * 0.40
        + model_usage.cached_tokens * 0.10
        + model_usage.output_tokens * 1.60
    ) / 1e6
    assert totals["cost_usd"] == pytest.approx(expected_cost, abs=1e-9)
    per_turn = [await turn_stats(redis, t) for t in ids]
    assert [s["input_tokens"] for s in per_turn] == [r.usage.input_tokens for r in results]


async def test_refund_is_made_once_for_the_right_amount(producer, redis, fleet_env, tmp_path):
    turn_id = await producer.enqueue_turn(
        conversation_id="conv-priya", customer_id="C-102",
        text="I'd like a refund for order 1047, the headphones stopped working.",
    )
    run_burst("worker", fleet_env, tmp_path)
    result = await producer.result(turn_id)
    assert result.status == "completed"
    assert result.agents == ["Triage", "Billing"]
    refund = [c for c in result.tool_calls if c.tool == "process_refund"]
    assert len(refund) == 1 and json.loads(refund[0].arguments)["amount"] in ("229.00", 229.0)
    assert "$229.00" in result.final_output
    ledger = await redis.xrange(keys.REFUND_LEDGER)
    assert len(ledger) == 1
    assert ledger[0][1]["order_id"] == "1047" and ledger[0][1]["amount"] == "229.00"


async def test_fifty_turns_over_five_conversations_with_two_workers_run_in_order(
    producer, redis, fleet_env, tmp_path
):
    questions = ["Where is order 1043?", "Hello there", "What's the status of order 1053?",
                 "Where is order 1042?", "Thanks, bye"]
    batch = [
        {"conversation_id": f"conv-{c}", "customer_id": "C-100",
         "text": f"{questions[i % len(questions)]} (message {i})"}
        for c in range(5) for i in range(10)
    ]
    ids = await producer.enqueue_turns(batch)
    workers = [start_burst("worker", {**fleet_env, "TURNFLEET_WORKER_NAME": f"w{n}"}, tmp_path, f"worker-{n}")
               for n in (1, 2)]
    for w in workers:
        assert w.wait(120) == 0, w.output()[-3000:]
    results = {t: await producer.result(t) for t in ids}
    assert all(r.status == "completed" for r in results.values())
    for c in range(5):
        conv = [results[t] for t in ids[c * 10:(c + 1) * 10]]
        # One at a time, in enqueue order: each turn started after the previous one finished.
        for before, after in zip(conv, conv[1:]):
            assert before.finished_at <= after.started_at
        # Memory holds the user messages in enqueue order, each once.
        session = RedisSession(session_id=keys.session_id(f"conv-{c}"), redis_client=redis,
                               key_prefix=keys.SESSION_PREFIX)
        users = [i["content"] for i in await session.get_items() if i.get("role") == "user"]
        assert users == [b["text"] for b in batch[c * 10:(c + 1) * 10]]


async def test_a_failed_turn_does_not_stall_its_conversation(producer, redis, fleet_env, tmp_path):
    # With one model call allowed per run, a routed question exceeds max_turns: a
    # deterministic failure, recorded at once; the greeting after it still runs.
    env = {**fleet_env, "TURNFLEET_MAX_AGENT_TURNS": "1"}
    failing = await producer.enqueue_turn(conversation_id="conv-f", customer_id="C-100", text="Where is order 1043?")
    after = await producer.enqueue_turn(conversation_id="conv-f", customer_id="C-100", text="Hi, I'm Dana.")
    run_burst("worker", env, tmp_path)
    first, second = await producer.result(failing), await producer.result(after)
    assert first.status == "failed" and first.error_type == "MaxTurnsExceeded"
    assert first.attempts == 1 and first.errors[0].error_type == "MaxTurnsExceeded"
    assert second.status == "completed"

    run_burst("telemetry", fleet_env, tmp_path)
    totals = await conversation_stats(redis, "conv-f")
    assert totals["turns_failed"] == 1 and totals["turns_completed"] == 1
    alerts = [a for _, a in await read_alerts(redis) if a.rule == "turn_failed"]
    assert [a.turn_id for a in alerts] == [failing]


async def test_conversation_cost_alert_fires_once(producer, redis, fleet_env, tmp_path):
    for text in ["Hello, this is Aiko Tanaka.", "What's the status of order 1052?",
                 "I want a refund for order 1052.", "Please escalate this to a manager."]:
        await producer.enqueue_turn(conversation_id="conv-aiko", customer_id="C-104", text=text)
    run_burst("worker", fleet_env, tmp_path)
    env = {**fleet_env, "TURNFLEET_ALERT_CONVERSATION_COST_USD": "0.0005"}
    run_burst("telemetry", env, tmp_path, name="telemetry-1")
    # More events for the same conversation, aggregated by another consumer run: still one alert.
    await producer.enqueue_turn(conversation_id="conv-aiko", customer_id="C-104", text="Thanks, bye")
    run_burst("worker", fleet_env, tmp_path, name="worker-2")
    run_burst("telemetry", env, tmp_path, name="telemetry-2")
    alerts = [a for _, a in await read_alerts(redis) if a.rule == "conversation_cost"]
    assert len(alerts) == 1
    alert = alerts[0]
    assert alert.conversation_id == "conv-aiko" and alert.customer_id == "C-104"
    assert alert.figures["threshold_usd"] == 0.0005
    assert alert.figures["cost_usd"] > 0.0005
