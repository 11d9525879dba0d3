"""The turn job in this process (real Redis, real SDK, the offline model): tracing, retries,
memory roll-back and once-only side effects. A flaky model is a real ``Model`` that fails."""

from __future__ import annotations

import json

import pytest
from agents.extensions.memory import RedisSession
from arq import Retry

from turnfleet.producer import Producer
from turnfleet import keys
from turnfleet.workers.job import run_turn
from turnfleet.workers.model import OfflineModel
from tests.worker_runtime import FlakyModel, runtime


async def test_each_turn_runs_under_a_trace_grouped_by_conversation(redis, collector):
    producer = Producer(redis=redis)
    turn_id = await producer.enqueue_turn(
        conversation_id="conv-t", customer_id="C-100", text="Where is order 1042?",
        metadata={"channel": "email"},
    )
    assert await run_turn(runtime(redis, OfflineModel()), turn_id, "conv-t") == "completed"
    assert len(collector.traces) == 1
    trace = collector.traces[0]
    assert trace["workflow_name"] == "Support Desk"
    assert trace["group_id"] == "conv-t"
    assert trace["metadata"] == {"customer_id": "C-100", "turn_id": turn_id, "attempt": "1", "channel": "email"}
    kinds = [s.span_data.type for s in collector.spans]
    result = await producer.result(turn_id)
    assert kinds.count("generation") == result.usage.requests == 3
    assert kinds.count("function") == 1 and kinds.count("handoff") == 1


async def test_a_turn_marked_untraced_makes_no_trace_but_still_counts(redis, collector):
    producer = Producer(redis=redis)
    turn_id = await producer.enqueue_turn(conversation_id="conv-u", customer_id="C-100", text="Hello", trace=False)
    assert await run_turn(runtime(redis, OfflineModel()), turn_id, "conv-u") == "completed"
    assert collector.traces == [] and collector.spans == []
    batch = (await redis.xrange(keys.TELEMETRY_STREAM))[-1][1]
    assert batch["turn_id"] == turn_id and '"llm_end"' in batch["batch"]


async def test_a_transient_model_failure_is_retried_and_memory_and_refund_happen_once(redis):
    producer = Producer(redis=redis)
    turn_id = await producer.enqueue_turn(
        conversation_id="conv-r", customer_id="C-100", text="I want a refund for order 1042"
    )
    # Calls: 1 Triage→handoff, 2 eligibility, 3 process_refund, 4 final answer (fails once).
    ctx = runtime(redis, FlakyModel(fail_on=4))
    with pytest.raises(Retry):
        await run_turn(ctx, turn_id, "conv-r")
    pending = await producer.result(turn_id)
    assert pending.status == "queued" and pending.attempts == 1
    assert [e.error_type for e in pending.errors] == ["ConnectionError"]

    assert await run_turn(ctx, turn_id, "conv-r") == "completed"
    result = await producer.result(turn_id)
    assert result.attempts == 2 and "$89.00" in result.final_output
    assert [e.attempt for e in result.errors] == [1]
    ledger = await redis.xrange(keys.REFUND_LEDGER)
    assert len(ledger) == 1 and ledger[0][1]["amount"] == "89.00"
    replayed = [c for c in result.tool_calls if c.tool == "process_refund"]
    assert '"replayed":true' in replayed[0].output.replace(" ", "")
    session = RedisSession(session_id=keys.session_id("conv-r"), redis_client=redis, key_prefix=keys.SESSION_PREFIX)
    users = [i for i in await session.get_items() if i.get("role") == "user"]
    assert [u["content"] for u in users] == ["I want a refund for order 1042"]
    # Telemetry has both attempts: the failed one flagged, its tokens spent.
    batches = [f["batch"] for _, f in await redis.xrange(keys.TELEMETRY_STREAM)]
    assert len(batches) == 2 and '"attempt_failed"' in batches[0] and '"turn_completed"' in batches[1]


async def test_attempts_used_up_by_lost_workers_end_the_turn_failed(redis):
    producer = Producer(redis=redis)
    turn_id = await producer.enqueue_turn(conversation_id="conv-x", customer_id="C-100", text="Hello")
    nxt = await producer.enqueue_turn(conversation_id="conv-x", customer_id="C-100", text="Hello again")
    # Three attempts started and never finished (their workers died): the record says so.
    await redis.hset(keys.turn(turn_id), mapping={"attempts": 3, "status": "running"})
    assert await run_turn(runtime(redis, OfflineModel()), turn_id, "conv-x") == "failed"
    result = await producer.result(turn_id)
    assert result.status == "failed" and result.error_type == "AttemptsExhausted" and result.attempts == 3
    assert await redis.get(keys.conversation_active("conv-x")) == nxt  # the conversation moves on


async def test_the_job_payload_in_redis_is_json(redis):
    producer = Producer(redis=redis)
    turn_id = await producer.enqueue_turn(conversation_id="conv-j", customer_id="C-100", text="Hello")
    raw = await redis.get(keys.ARQ_JOB_PREFIX + turn_id)
    payload = json.loads(raw)
    assert payload["f"] == "run_turn" and payload["a"] == [turn_id, "conv-j"]


async def test_the_session_messages_key_is_where_the_sdk_keeps_items(redis):
    from turnfleet.connection import connect

    # Through the SDK's public Session API (not its private ``_messages_key``): what
    # RedisSession stores lands in the list keys.session_messages names.
    session = RedisSession(session_id=keys.session_id("conv-k"), redis_client=redis,
                           key_prefix=keys.SESSION_PREFIX)
    item = {"role": "user", "content": "Where is order 1042?"}
    await session.add_items([item])
    assert [json.loads(raw) for raw in await redis.lrange(keys.session_messages("conv-k"), 0, -1)] == [item]
    from turnfleet.workers.memory import ConversationMemory

    assert ConversationMemory(connect("redis://127.0.0.1:1"), "conv-k").messages_key == keys.session_messages("conv-k")


def test_the_steps_of_a_turn_attempt_take_few_arguments():
    """Past five, the arguments are an object waiting to be named (CONVENTIONS.md): the job's
    steps share one ``Attempt`` instead of passing its runtime, request, hooks, lease, trace
    and timing from function to function."""
    import ast
    import inspect

    import turnfleet.workers.attempt
    import turnfleet.workers.job

    too_many = []
    for module in (turnfleet.workers.job, turnfleet.workers.attempt):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                a = node.args
                count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                if count > 5:
                    too_many.append(f"{module.__name__}.{node.name}: {count}")
    assert too_many == []
