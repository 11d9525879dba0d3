"""A team's own ``TracingProcessor`` (issue 16): ``Workflow(trace_processors=[...])`` gets the
workflow's kept, redacted traces and spans — what the trace store keeps — never the unsampled
or unredacted ones; a processor that raises never fails a turn; the worker's stop flushes and
shuts them down. A worker's real startup and shutdown, its job in this process, real Redis."""

from __future__ import annotations

import json


from tests.apps.traced_app import SECRET, broken, collector
from tests.tracing import traces_to
from turnfleet import keys
from turnfleet.producer import Producer
from turnfleet.workers.job import run_turn
from turnfleet.workers.settings import shutdown, startup
from turnfleet.workers.trace_store import TRACE_FIELDS, TraceBuffer


async def run_turn_of_traced_app(redis, redis_url, monkeypatch, rate: str) -> str:
    """One turn of each workflow of ``tests/apps/traced_app.py`` in a worker started and
    stopped for them; returns the turn of the workflow with processors."""
    for processor in (collector, broken):
        processor.reset()
    monkeypatch.setenv("TURNFLEET_APP", "tests.apps.traced_app:app")
    monkeypatch.setenv("TURNFLEET_TRACE_SAMPLE_RATE", rate)
    ctx = {"redis_url": redis_url}
    with traces_to() as provider:
        await startup(ctx)
        try:
            # The SDK itself hands spans to our buffer only: a team's processor is not there.
            assert [type(p) for p in provider.processors] == [TraceBuffer]
            producer = Producer(redis=redis)
            turn_id = await producer.enqueue_turn(
                conversation_id="c-traced", customer_id="C-100", text="Where is order 1042?",
                agent="traced-desk")
            plain_id = await producer.enqueue_turn(
                conversation_id="c-plain", customer_id="C-100", text="Where is order 1042?",
                agent="plain-desk")
            assert await run_turn(ctx, turn_id, "c-traced") == "completed"
            assert await run_turn(ctx, plain_id, "c-plain") == "completed"
            # The other workflow's turn was kept too (same rate), but not handed to these.
            assert await redis.exists(keys.trace(plain_id)) == (rate == "1")
        finally:
            await shutdown(ctx)
    assert (collector.flushed, collector.shut) == (True, True)  # the worker's stop
    return turn_id


async def test_a_teams_processor_gets_the_kept_redacted_spans_and_a_broken_one_fails_nothing(
        redis, redis_url, monkeypatch):
    turn_id = await run_turn_of_traced_app(redis, redis_url, monkeypatch, "1")
    (stored,) = [json.loads(r) for r in await redis.lrange(keys.trace(turn_id), 0, -1)]
    (trace,) = collector.started
    assert collector.ended == [trace] and trace.trace_id == stored["trace"]["id"]
    assert trace.export() == {k: stored["trace"][k] for k in TRACE_FIELDS}
    assert (trace.record["turn_id"], trace.record["kept_because"]) == (turn_id, "sampled")
    assert [s.export() for s in collector.spans] == stored["spans"]  # what the store keeps
    assert sorted(s.span_id for s in collector.span_starts) == sorted(s["id"] for s in stored["spans"])
    (custom,) = [s for s in collector.spans if s.span_data.type == "custom" and s.span_data.name == "vendor.lookup"]
    assert custom.span_data.data["order_id"] == "1042"
    assert custom.span_data.data["api_key"].startswith("[REDACTED")  # the tool's secret, redacted
    sent = json.dumps([s.export() for s in collector.spans]) + json.dumps(trace.record)
    assert SECRET not in sent and "function" in {s.span_data.type for s in collector.spans}


async def test_a_teams_processor_gets_nothing_of_an_unsampled_turn(redis, redis_url, monkeypatch):
    turn_id = await run_turn_of_traced_app(redis, redis_url, monkeypatch, "0")
    assert not await redis.exists(keys.trace(turn_id))
    assert (collector.started, collector.span_starts, collector.spans) == ([], [], [])


def test_trace_processors_are_not_part_of_the_fingerprint():
    from tests.apps.traced_app import workflow
    from turnfleet import Workflow

    assert Workflow(name=workflow.name, agent=workflow.agent).fingerprint() == workflow.fingerprint()


async def test_trace_include_sensitive_data_keeps_a_teams_tool_io_out_of_its_spans(redis, redis_url, monkeypatch):
    """``trace_include_sensitive_data`` keeps its SDK meaning inside a team's tools: off, the
    tool's function span carries no input or output — in the store and at the team's processor
    — while a custom span's data (the team's own choice) is kept, redacted."""
    monkeypatch.setenv("TURNFLEET_TRACE_INCLUDE_SENSITIVE_DATA", "false")
    turn_id = await run_turn_of_traced_app(redis, redis_url, monkeypatch, "1")
    (stored,) = [json.loads(r) for r in await redis.lrange(keys.trace(turn_id), 0, -1)]
    functions = [s for s in collector.spans if s.span_data.type == "function"]
    assert [s.span_data.name for s in functions] == ["lookup_order"]
    assert all(s.export()["span_data"].get("input") is None and s.export()["span_data"].get("output") is None
               for s in functions)
    assert "1042" not in json.dumps([s for s in stored["spans"] if s["span_data"]["type"] == "function"])
    (custom,) = [s for s in collector.spans if s.span_data.type == "custom" and s.span_data.name == "vendor.lookup"]
    assert custom.span_data.data["api_key"].startswith("[REDACTED")
