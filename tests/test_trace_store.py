"""The trace buffer, sampler and store in this process: real SDK spans, real Redis."""

from __future__ import annotations

import json

from agents import Runner, trace

from tests.tracing import traces_to
from turnfleet import keys
from turnfleet.redaction import Redactor
from turnfleet.context import TurnContext
from turnfleet.workers.model import OfflineModel
from turnfleet.workers.support_desk import build_support_desk
from turnfleet.workers.trace_store import TraceBuffer, TraceSampler, TraceStore, conversation_fraction


async def run_traced(redis, buffer: TraceBuffer, text: str, conversation_id: str = "conv-1") -> str:
    with traces_to(buffer):
        desk = build_support_desk(OfflineModel())
        with trace("Support Desk", group_id=conversation_id) as t:
            await Runner.run(desk.starting_agent(None), text,
                             context=TurnContext("t-1", conversation_id, "C-100", 1, redis))
        return t.trace_id


def turn(conversation_id: str = "conv-1") -> dict:
    return {"turn_id": "t-1", "attempt": 1, "conversation_id": conversation_id, "customer_id": "C-100",
            "status": "completed", "started_at": "x", "ended_at": "y"}


def test_sampling_is_stable_per_conversation_and_keeps_failures_and_slow_turns():
    half = TraceSampler(rate=0.5, keep_slower_than_ms=1000)
    ids = [f"c{i}" for i in range(1000)]
    assert [half.sampled(c) for c in ids] == [half.sampled(c) for c in ids]
    assert 400 < sum(half.sampled(c) for c in ids) < 600
    assert all(0 <= conversation_fraction(c) < 1 for c in ids)
    none = TraceSampler(rate=0.0, keep_slower_than_ms=1000)
    assert none.keep_reason("c1", failed=False, duration_ms=10) is None
    assert none.keep_reason("c1", failed=True, duration_ms=10) == "failed"
    assert none.keep_reason("c1", failed=False, duration_ms=1001) == "slow"
    assert TraceSampler(rate=1.0).keep_reason("c1", failed=False, duration_ms=10) == "sampled"


async def test_a_full_buffer_drops_and_counts_spans(redis):
    buffer = TraceBuffer(max_spans=3)
    trace_id = await run_traced(redis, buffer, "Where is order 1043?")
    store = TraceStore(buffer, redis, TraceSampler(1.0), Redactor(), retention_s=60)
    reason, dropped = await store.finish_attempt(trace_id, turn(), failed=False, duration_ms=5)
    assert reason == "sampled" and dropped == 9  # 12 spans (one the desk's guardrail), 3 held
    record = json.loads((await redis.lrange(keys.trace("t-1"), 0, -1))[0])
    assert len(record["spans"]) == 3
    assert 0 < await redis.ttl(keys.trace("t-1")) <= 60
    assert buffer.take(trace_id) == (None, [], 0)  # taken once; the buffer holds nothing


async def test_an_unsampled_trace_is_discarded_and_frees_the_buffer(redis):
    buffer = TraceBuffer(max_spans=100)
    trace_id = await run_traced(redis, buffer, "Hello")
    store = TraceStore(buffer, redis, TraceSampler(0.0), Redactor(), retention_s=60)
    assert await store.finish_attempt(trace_id, turn(), failed=False, duration_ms=5) == (None, 0)
    assert await redis.exists(keys.trace("t-1")) == 0
    assert buffer._held == 0


async def test_the_sdk_openai_exporter_stays_off_unless_configured(redis_url, monkeypatch):
    from agents.tracing.processors import BatchTraceProcessor

    from turnfleet.workers.settings import shutdown, startup

    with traces_to() as provider:
        for enabled, expected in (("false", []), ("true", [BatchTraceProcessor])):
            monkeypatch.setenv("TURNFLEET_OPENAI_TRACE_EXPORT", enabled)
            ctx = {"redis_url": redis_url}
            await startup(ctx)
            try:
                kinds = [type(p) for p in provider.processors]
                assert kinds[0] is TraceBuffer and kinds[1:] == expected
            finally:
                await shutdown(ctx)
