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
from turnfleet.workers.trace_store import TraceBuffer, TraceSampler, TraceStore, conversation_fraction, redact_record


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


class ScanCounting(Redactor):
    """A Redactor that remembers every string its detectors were run on."""

    def __init__(self) -> None:
        super().__init__()
        self.scanned: list[str] = []

    def _text(self, s: str) -> str:
        self.scanned.append(s)
        return super()._text(s)


def redacted_whole(record: dict, redactor: Redactor) -> dict:
    """The record redacted as before issue 19: every string of it through the detectors."""
    spans = []
    for span in record["spans"]:
        data = dict(span["span_data"])
        if data.get("type") == "function":
            data.update({k: redactor.json_text(data[k]) for k in ("input", "output") if isinstance(data.get(k), str)})
        spans.append({**span, "span_data": data})
    return redactor.value({"trace": record["trace"], "spans": spans})


async def test_redaction_scans_the_content_and_not_the_sdks_ids_and_times(redis):
    buffer = TraceBuffer(max_spans=100)
    text = "Refund order 1042, card 4242 4242 4242 4242, mail jane.doe@acme.example"
    trace_id = await run_traced(redis, buffer, text)
    trace, spans, _ = buffer.take(trace_id)
    planted = "span_of 4111 1111 1111 1111"  # an id key in no SDK shape: redacted as any text
    spans[-1] = {**spans[-1], "parent_id": planted, "metadata": {"note": "call +1 415 555 0100"}}
    record = {"trace": {**trace, **turn(), "input": text, "started_at": "2026-01-02T03:04:05.678901+00:00"},
              "spans": spans}
    scanning = ScanCounting()

    got = redact_record(record, scanning)

    assert got == redacted_whole(record, Redactor())  # the same record as redacting every string
    sdk_values = {s[k] for s in spans for k in ("id", "trace_id", "started_at", "ended_at")} | {
        trace["id"], record["trace"]["started_at"]}
    assert not sdk_values & set(scanning.scanned)  # the SDK's ids and timestamps were not scanned
    assert planted in scanning.scanned and "4111" not in json.dumps(got)
    assert "4242 4242" not in json.dumps(got) and "jane.doe" not in json.dumps(got)
    assert "555 0100" not in json.dumps(got)
