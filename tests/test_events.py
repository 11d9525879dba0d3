"""The telemetry event contract (``turnfleet/events.py``): every kind is handled everywhere,
the hooks write the same JSON as before it, older events still read, and a payload that does
not fit its kind is refused when read, never half-counted."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

from agents import Agent, RunContextWrapper, function_tool
from agents.items import ModelResponse
from agents.tool_context import ToolContext
from agents.usage import Usage
from openai.types.responses import ResponseFunctionToolCall, ResponseOutputMessage, ResponseOutputText
from prometheus_client.parser import text_string_to_metric_families

from turnfleet.telemetry.aggregate import PLANNERS
from turnfleet.telemetry.consumer import read_dead_letters
from turnfleet.telemetry.metrics import exposition
from turnfleet.telemetry.stats import totals, turn_stats
from turnfleet.telemetry.replay import NODES, tree_from_events
from tests.batches import T0, AttemptBatch, CheckEntry, support_turn
from tests.consuming import drain, pending
from turnfleet import events as ev
from turnfleet import keys
from turnfleet.events import PAYLOADS, EventKind, batch_json, parse_events
from turnfleet.models import ErrorInfo, TokenUsage
from turnfleet.redaction import Redactor
from turnfleet.tool_errors import MARKER
from turnfleet.workers.hooks import TelemetryHooks

ROOT = Path(__file__).resolve().parent.parent
CARD = "4111 1111 1111 1111"


def every_kind_batches() -> list[AttemptBatch]:
    """Two turns whose batches hold every kind of event at least once."""
    retried = (AttemptBatch("t-every", "c-every", "cust-every", attempt=1).started().agent("Triage")
               .llm("Triage", 10, 2).failed("ModelError", terminal=False))
    done = (AttemptBatch("t-every", "c-every", "cust-every", attempt=2).started()
            .guardrail("prompt_injection", "Triage")
            .agent("Triage").llm("Triage", 120, 20).handoff("Triage", "Billing").agent("Billing")
            .tool("Billing", "lookup_order", error="boom").llm("Billing", 300, 40)
            .spans_dropped(3).completed())
    failed = (AttemptBatch("t-failed", "c-failed", "cust-every").started().agent("Triage")
              .llm("Triage", 10, 2).failed("ModelError"))
    return [retried, done, failed]


def readme_event_table() -> dict[str, str]:
    """The README's event table: kind -> its row."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Telemetry events", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", section, re.M)}


def test_every_event_kind_has_a_payload_a_plan_a_replay_node_and_a_readme_row() -> None:
    kinds = set(EventKind)
    assert set(PAYLOADS) == kinds
    assert all(payload.event_kind == kind for kind, payload in PAYLOADS.items())
    assert set(PLANNERS) == kinds
    assert set(NODES) == kinds
    table = readme_event_table()
    assert set(table) == {k.value for k in kinds}
    for kind, payload in PAYLOADS.items():
        assert f"`{payload.__name__}`" in table[kind.value], kind
        for metric in PLANNERS[kind].metrics:  # the README names what /metrics shows of it
            assert metric.removesuffix("_count").removesuffix("_total") in table[kind.value], metric


async def test_a_batch_of_every_kind_moves_each_metric_its_kind_feeds(redis: Any) -> None:
    batches = every_kind_batches()
    # Every kind a worker's hooks write (feedback is the producer's: tests/test_feedback.py;
    # checks are the check job's).
    assert {e.kind for b in batches for e in b.events} == set(EventKind) - {EventKind.feedback, EventKind.check}
    for batch in batches:
        await batch.send(redis)
    await CheckEntry("t-every").check("c", "failed").send(redis)  # the check job's entry
    assert await drain(redis) == len(batches) + 1
    text = (await exposition(redis, worker_max_age_s=15)).decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    fed = {metric: kind for kind, plan in PLANNERS.items() for metric in plan.metrics}
    assert fed, "no kind feeds a metric"
    assert {m: samples.get(m, 0.0) > 0 for m in fed} == {m: True for m in fed}
    stats = await turn_stats(redis, "t-every")
    assert (stats["handoffs"], stats["guardrails_tripped"], stats["spans_dropped"]) == (1, 1, 3)


def test_each_kind_with_a_replay_node_makes_one_node_per_event() -> None:
    events = every_kind_batches()[1].events
    tree = tree_from_events(events)

    def walk(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [n for node in nodes for n in (node, *walk(node["children"]))]

    assert len(walk(tree)) == sum(NODES[e.kind] is not None for e in events)
    assert [n["kind"] for n in walk(tree)] == [
        "guardrail", "agent", "generation", "handoff", "agent", "tool", "generation"]


# -- the wire format -----------------------------------------------------------------------------

# What the hooks wrote before the contract (recorded from the previous commit's
# workers/hooks.py with the same calls as ``drive_hooks``): kind and detail, with data included
# and without.
HOOKS_WROTE = {
    True: [
        ["turn_started", {"queue_wait_ms": 3.5}], ["agent_start", {}],
        ["llm_start", {"input_items": 1}],
        ["llm_end", {"decision": {"calls": [{"name": "lookup_order", "arguments": "{\"order_id\":\"1043\"}"}]},
                     "response_id": "r-1"}],
        ["handoff", {"from_agent": "Triage", "to_agent": "Billing"}], ["agent_start", {}],
        ["tool_start", {"call_id": "call-1", "arguments": "{\"order_id\":\"1043\"}"}],
        ["tool_end", {"call_id": "call-1", "arguments": "{\"order_id\":\"1043\"}",
                      "result": "{\"order_id\":\"1043\",\"status\":\"shipped\"}"}],
        ["llm_end", {"decision": {"message": "Shipped."}, "response_id": None}],
        ["agent_end", {"output": "Shipped."}],
        ["guardrail", {"guardrail": "prompt_injection", "kind": "input", "triggered": True}],
        ["spans_dropped", {"count": 2}], ["attempt_failed", {"agents": ["Triage", "Billing"]}],
        ["turn_failed", {"agents": ["Triage", "Billing"]}],
        ["turn_completed", {"queue_wait_ms": 3.5, "agents": ["Triage", "Billing"],
                            "final_output": "Shipped."}],
    ],
    False: [
        ["turn_started", {"queue_wait_ms": 3.5}], ["agent_start", {}],
        ["llm_start", {"input_items": 1}],
        ["llm_end", {"decision": {"calls": [{"name": "lookup_order"}]}, "response_id": "r-1"}],
        ["handoff", {"from_agent": "Triage", "to_agent": "Billing"}], ["agent_start", {}],
        ["tool_start", {"call_id": "call-1"}], ["tool_end", {"call_id": "call-1"}],
        ["llm_end", {"decision": {"message": True}, "response_id": None}], ["agent_end", {}],
        ["guardrail", {"guardrail": "prompt_injection", "kind": "input", "triggered": True}],
        ["spans_dropped", {"count": 2}], ["attempt_failed", {"agents": ["Triage", "Billing"]}],
        ["turn_failed", {"agents": ["Triage", "Billing"]}],
        ["turn_completed", {"queue_wait_ms": 3.5, "agents": ["Triage", "Billing"]}],
    ],
}


@function_tool
def lookup_order(order_id: str) -> str:
    """Look up an order."""
    return "{}"


async def drive_hooks(hooks: TelemetryHooks) -> None:
    """One call of every hook, with the SDK's own objects."""
    triage, billing = Agent(name="Triage"), Agent(name="Billing")
    ctx: RunContextWrapper[Any] = RunContextWrapper(context=None)
    usage = Usage(requests=1, input_tokens=10, output_tokens=2, total_tokens=12)
    call = ResponseFunctionToolCall(type="function_call", name="lookup_order",
                                    arguments='{"order_id":"1043"}', call_id="call-1")
    answer = ResponseOutputMessage(id="m-1", type="message", role="assistant", status="completed",
                                   content=[ResponseOutputText(type="output_text", text="Shipped.",
                                                               annotations=[])])
    hooks.turn_started(3.5, "Triage")
    await hooks.on_agent_start(ctx, triage)
    await hooks.on_llm_start(ctx, triage, "sys", [{"role": "user", "content": "hi"}])
    await hooks.on_llm_end(ctx, triage, ModelResponse(output=[call], usage=usage, response_id="r-1"))
    await hooks.on_handoff(ctx, triage, billing)
    await hooks.on_agent_start(ctx, billing)
    tool_ctx = ToolContext(context=None, tool_name="lookup_order", tool_call_id="call-1",
                           tool_arguments='{"order_id":"1043"}')
    await hooks.on_tool_start(tool_ctx, billing, lookup_order)
    await hooks.on_tool_end(tool_ctx, billing, lookup_order, '{"order_id":"1043","status":"shipped"}')
    await hooks.on_llm_end(ctx, billing, ModelResponse(output=[answer], usage=usage, response_id=None))
    await hooks.on_agent_end(ctx, billing, "Shipped.")
    hooks.guardrail_tripped("prompt_injection", "Triage")
    hooks.spans_dropped(2)
    hooks.turn_errored(terminal=False, duration_ms=5.0, error_type="ModelError", message="boom")
    hooks.turn_errored(terminal=True, duration_ms=6.0, error_type="ModelError", message="boom")
    hooks.turn_completed(40.0, 3.5, "Shipped.")


def hooks(include_data: bool = True, redactor: Redactor | None = None) -> TelemetryHooks:
    return TelemetryHooks(turn_id="t-1", attempt=1, conversation_id="c-1", customer_id="C-1",
                          model_name="m", include_data=include_data, redactor=redactor)


def test_hooks_write_the_same_json_as_before_the_contract_and_it_reads_back_the_same() -> None:
    for include_data, wrote in HOOKS_WROTE.items():
        h = hooks(include_data)
        asyncio.run(drive_hooks(h))
        written = h.batch_json()
        assert [[e["kind"], e["detail"]] for e in json.loads(written)] == wrote
        assert batch_json(parse_events(written)) == written  # read and written again: unchanged


# A batch in the previous wire shape, written by hand: pydantic's "Z" timestamps, details that
# lack fields added later (no ``call_id``, no ``response_id``) or carry one a reader does not
# know (``"shard"``), as a newer writer might.
OLD_BATCH = json.dumps([
    {"event_id": "t-old:1:1", "kind": "turn_started", "seq": 1, "turn_id": "t-old", "attempt": 1,
     "conversation_id": "c-old", "customer_id": "cust-old", "agent": "Billing",
     "model": "turnfleet-offline", "tool": None, "ts": "2025-03-04T10:00:00.001000Z",
     "usage": None, "duration_ms": None, "error": None, "detail": {"queue_wait_ms": 12.0}},
    {"event_id": "t-old:1:2", "kind": "agent_start", "seq": 2, "turn_id": "t-old", "attempt": 1,
     "conversation_id": "c-old", "customer_id": "cust-old", "agent": "Billing",
     "ts": "2025-03-04T10:00:00.002000Z", "detail": {}},
    {"event_id": "t-old:1:3", "kind": "llm_end", "seq": 3, "turn_id": "t-old", "attempt": 1,
     "conversation_id": "c-old", "customer_id": "cust-old", "agent": "Billing",
     "model": "turnfleet-offline", "ts": "2025-03-04T10:00:00.103000Z",
     "usage": {"requests": 1, "input_tokens": 120, "output_tokens": 20, "cached_tokens": 0,
               "reasoning_tokens": 0},
     "duration_ms": 100.0, "detail": {"decision": {"calls": [{"name": "lookup_order"}]}}},
    {"event_id": "t-old:1:4", "kind": "tool_end", "seq": 4, "turn_id": "t-old", "attempt": 1,
     "conversation_id": "c-old", "customer_id": "cust-old", "agent": "Billing",
     "tool": "lookup_order", "ts": "2025-03-04T10:00:00.110000Z", "duration_ms": 7.5,
     "error": {"type": "ToolError", "message": "down"},
     "detail": {"arguments": "{}", "result": "down", "shard": 3}},
    {"event_id": "t-old:1:5", "kind": "turn_completed", "seq": 5, "turn_id": "t-old", "attempt": 1,
     "conversation_id": "c-old", "customer_id": "cust-old", "agent": "Billing",
     "model": "turnfleet-offline", "ts": "2025-03-04T10:00:00.200000Z",
     "usage": {"requests": 1, "input_tokens": 120, "output_tokens": 20, "cached_tokens": 0,
               "reasoning_tokens": 0},
     "duration_ms": 200.0, "detail": {"queue_wait_ms": 12.0, "agents": ["Billing"]}},
])


async def test_events_in_the_previous_shape_are_counted_and_replayed(redis: Any) -> None:
    await redis.xadd(keys.TELEMETRY_STREAM, {"turn_id": "t-old", "batch": OLD_BATCH})
    assert await drain(redis) == 1
    stats = await turn_stats(redis, "t-old")
    assert {k: stats[k] for k in ("status", "input_tokens", "output_tokens", "llm_calls",
                                  "tool_calls", "tool_errors", "queue_wait_ms", "agents")} == {
        "status": "completed", "input_tokens": 120, "output_tokens": 20, "llm_calls": 1,
        "tool_calls": 1, "tool_errors": 1, "queue_wait_ms": 12.0, "agents": ["Billing"]}
    assert tree_from_events(parse_events(OLD_BATCH)) == [{
        "kind": "agent", "name": "Billing", "started_at": "2025-03-04T10:00:00.002000Z",
        "duration_ms": None, "detail": {}, "error": None, "children": [
            {"kind": "generation", "name": "turnfleet-offline",
             "started_at": "2025-03-04T10:00:00.003000+00:00", "duration_ms": 100.0,
             "detail": {"input_tokens": 120, "output_tokens": 20,
                        "decision": {"calls": [{"name": "lookup_order"}]}},
             "error": None, "children": []},
            {"kind": "tool", "name": "lookup_order",
             "started_at": "2025-03-04T10:00:00.102500+00:00", "duration_ms": 7.5,
             "detail": {"arguments": "{}", "result": "down", "outcome": "tool error"},
             "error": "down", "children": []},
        ]}]


async def test_a_payload_that_does_not_fit_its_kind_is_malformed_when_read(redis: Any) -> None:
    # Before the contract, a spans_dropped count of "lots" passed the read and crashed the
    # planner on every delivery until the entry was dead-lettered as an error. The hooks
    # cannot write such a count: the batch is theirs, its one payload altered by hand.
    await support_turn("t-1").send(redis)
    bad = {"turn_id": "t-bad", "batch": json.dumps([
        {**e.export(), "detail": {"count": "lots"}} if e.kind == EventKind.spans_dropped else e.export()
        for e in AttemptBatch("t-bad").started().spans_dropped(1).events])}
    bad_id = await redis.xadd(keys.TELEMETRY_STREAM, bad)
    await support_turn("t-2").send(redis)
    assert await drain(redis, dead_letter_after=3) == 3
    [dead] = await read_dead_letters(redis)
    assert (dead.entry_id, dead.reason, dead.stage, dead.deliveries) == (bad_id, "malformed", "parse", 1)
    assert "detail.count" in dead.error and dead.fields == bad
    overall = await totals(redis)
    assert (overall["telemetry_malformed"], overall["turns_completed"]) == (1, 2)
    assert await pending(redis) == 0 and await turn_stats(redis, "t-bad") == {}


# -- redaction -----------------------------------------------------------------------------------

SECRET_JSON = json.dumps({"card": CARD})
SAMPLES: dict[EventKind, ev.EventDetail] = {
    EventKind.turn_started: ev.TurnStartedDetail(queue_wait_ms=1.0),
    EventKind.agent_start: ev.AgentStartDetail(),
    EventKind.agent_end: ev.AgentEndDetail(output=f"card {CARD}"),
    EventKind.llm_start: ev.LlmStartDetail(input_items=1),
    EventKind.llm_end: ev.LlmEndDetail(
        decision=ev.Decision(calls=[ev.DecisionCall(name="pay", arguments=SECRET_JSON)],
                             message=f"card {CARD}"),
        response_id=f"r {CARD}"),
    EventKind.tool_start: ev.ToolStartDetail(call_id=f"c {CARD}", arguments=SECRET_JSON),
    EventKind.tool_end: ev.ToolEndDetail(call_id=f"c {CARD}", arguments=SECRET_JSON,
                                         result=SECRET_JSON, once=ev.OnceOutcome(replayed=True)),
    EventKind.handoff: ev.HandoffDetail(from_agent=f"a {CARD}", to_agent=f"b {CARD}"),
    EventKind.guardrail: ev.GuardrailDetail(guardrail=f"g {CARD}", kind=f"k {CARD}", triggered=True),
    EventKind.turn_completed: ev.TurnCompletedDetail(queue_wait_ms=1.0, agents=[f"a {CARD}"],
                                                     final_output=f"card {CARD}"),
    EventKind.attempt_failed: ev.AttemptFailedDetail(agents=[f"a {CARD}"]),
    EventKind.turn_failed: ev.TurnFailedDetail(agents=[f"a {CARD}"]),
    EventKind.spans_dropped: ev.SpansDroppedDetail(count=1),
    EventKind.feedback: ev.FeedbackDetail(feedback_id=f"f {CARD}", score=-1, source=f"s {CARD}",
                                          comment=f"card {CARD}"),
    EventKind.check: ev.CheckDetail(check=f"c {CARD}", outcome="failed", money_path=True,
                                    reason=f"card {CARD}", error=f"e {CARD}", duration_us=1.0),
}


def test_redaction_reaches_every_field_of_every_payload_kind() -> None:
    assert set(SAMPLES) == set(EventKind)
    for kind, sample in SAMPLES.items():  # each sample sets every field its payload has
        assert sample.model_fields_set == set(type(sample).model_fields), kind
    h = hooks(redactor=Redactor())
    for sample in SAMPLES.values():
        h.emit(sample, error=ErrorInfo(type="X", message=f"card {CARD}"))
    written = h.batch_json()
    assert CARD not in written and written.count("[REDACTED:card]") >= 2 * len(SAMPLES)
    assert [e["kind"] for e in json.loads(written)] == [k.value for k in SAMPLES]
    # Without a redactor the same batch carries the card: the assertion above can fail.
    plain = hooks()
    plain.events = h.events
    assert CARD in plain.batch_json()


def test_events_are_stamped_in_order_with_deterministic_ids() -> None:
    batch = AttemptBatch("t-1", attempt=2).started().agent("Triage")
    assert [(e.event_id, e.seq, type(e).__name__) for e in batch.events] == [
        ("t-1:2:1", 1, "TurnStartedEvent"), ("t-1:2:2", 2, "AgentStartEvent")]
    assert batch.events[0].ts > T0


async def _drive_with_once_and_tool_error(h: TelemetryHooks) -> None:
    """drive_hooks, then a tool call whose ``once`` found a stored value and whose result is
    a tool error: the payload fields the plain run leaves unset."""
    from turnfleet.context import OnceNote, TurnContext

    await drive_hooks(h)
    turn = TurnContext(turn_id="t-1", conversation_id="c-1", customer_id="C-1", attempt=1, redis=None)
    turn.once_notes["call-2"] = OnceNote(replayed=True)
    tool_ctx = ToolContext(context=turn, tool_name="lookup_order", tool_call_id="call-2",
                           tool_arguments='{"order_id":"1043"}')
    billing = Agent(name="Billing")
    await h.on_tool_start(tool_ctx, billing, lookup_order)
    await h.on_tool_end(tool_ctx, billing, lookup_order,
                        json.dumps({MARKER: True, "tool": "lookup_order", "error_type": "ConnectionError"}))


def test_hooks_write_each_event_in_its_wire_form_without_building_models(monkeypatch) -> None:
    """The hooks write the wire form straight (issue 19: a model built and dumped per event
    was ~0.5 ms a turn); it is the contract's: every event reads back as its kind's model and
    is written again byte for byte, with and without data, redacted or not."""

    def no_models(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a pydantic event was built on the hooks' path")

    for include_data in (True, False):
        for redactor in (None, Redactor()):
            h = hooks(include_data, redactor)
            with monkeypatch.context() as m:
                m.setattr(ev, "event", no_models)
                asyncio.run(_drive_with_once_and_tool_error(h))
                written = h.batch_json()
            parsed = parse_events(written)
            assert batch_json(parsed) == written
            assert [e.kind for e in parsed].count(EventKind.tool_end) == 2
            last = parsed[-1]
            assert last.kind == EventKind.tool_end and last.detail.once == ev.OnceOutcome(replayed=True)
            assert last.error == ErrorInfo(type="ToolError", message="lookup_order raised ConnectionError")
            if redactor is None:  # the models ``events`` gives are the same events
                assert batch_json(h.events) == written


def test_a_batch_is_written_as_utf8_and_a_non_finite_number_as_json_writes_it() -> None:
    """The batch goes through orjson (issue 19): non-ASCII text as UTF-8, not ``\\u`` escapes,
    decoding to the same events. A NaN or infinite number a hook passed through is still
    written ``NaN`` / ``Infinity`` (json's spelling; orjson would write null): the consumer's
    poison path (tests/test_dead_letter.py) depends on it."""
    h = hooks(True, Redactor())
    h.turn_started(1.0, "Triage")
    h.turn_completed(20.0, 1.0, "Grüße aus Köln 🙂, order 1043 ships today")
    written = h.batch_json()
    assert "Grüße aus Köln 🙂" in written and "\\u00fc" not in written
    assert batch_json(parse_events(written)) == json.dumps(json.loads(written), separators=(",", ":"))
    for value, spelled in ((float("nan"), "NaN"), (float("inf"), "Infinity")):
        odd = hooks(True, Redactor())
        odd.turn_started(value, "Triage")
        odd.turn_completed(20.0, 1.0, "Grüße")
        text = odd.batch_json()
        assert f'"queue_wait_ms":{spelled}' in text and "Grüße" not in text  # json, as before
        assert json.loads(text)[1]["detail"]["final_output"] == "Grüße"


def test_event_timestamps_are_written_as_isoformat_writes_utc_with_z() -> None:
    """The hooks stamp events without building a datetime per event (issue 19); the text is
    what ``datetime.isoformat`` wrote (microseconds floored, left out when 0, ``Z``)."""
    from datetime import datetime, timedelta, timezone

    from turnfleet.workers.hooks import iso_z

    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    instants = [0, 999, 1_000, 1_732_500_000_000_000_000, 1_732_500_000_123_456_789,
                1_732_500_000_999_999_999, 4_102_444_799_999_999_000]
    instants += [1_732_500_000_000_000_000 + i * 7_777_777_777 for i in range(200)]
    for ns in instants:
        expected = (epoch + timedelta(microseconds=ns // 1000)).isoformat().replace("+00:00", "Z")
        assert iso_z(ns) == expected
    h = hooks()
    h.turn_started(1.0, "Triage")
    ts = json.loads(h.batch_json())[0]["ts"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", ts)


def test_hooks_sum_a_turns_usage_as_counts_without_a_token_usage_per_model_call(monkeypatch) -> None:
    """Each model call's usage is read as counts and summed as counts (issue 19: two
    ``TokenUsage`` models a call, ~4 µs); ``hooks.usage`` is the sum, as a model, when read,
    and the turn's events carry the same counts."""
    built: list[dict[str, Any]] = []
    init = TokenUsage.__init__

    def counting(self: TokenUsage, **fields: Any) -> None:
        built.append(fields)
        init(self, **fields)

    h = hooks()
    with monkeypatch.context() as m:
        m.setattr(TokenUsage, "__init__", counting)
        asyncio.run(drive_hooks(h))
    assert built == []
    total = TokenUsage(requests=2, input_tokens=20, output_tokens=4)
    assert h.usage == total
    events = json.loads(h.batch_json())
    assert [e["usage"] for e in events if e["kind"] == "llm_end"] == [
        TokenUsage(requests=1, input_tokens=10, output_tokens=2).model_dump()] * 2
    ends = [e for e in events if e["kind"] in ("turn_completed", "turn_failed", "attempt_failed")]
    assert len(ends) == 3 and all(e["usage"] == total.model_dump() for e in ends)
    h.usage = TokenUsage(requests=5)  # set (as before): what the next events carry
    h.turn_completed(1.0, None, "ok")
    assert json.loads(h.batch_json())[-1]["usage"] == TokenUsage(requests=5).model_dump()


def test_an_event_with_nothing_to_redact_goes_into_the_batch_as_it_is() -> None:
    """An event whose detail is numbers only and that carries no error is not copied for the
    batch (issue 19); every other event is, redacted (the hooks' own list stays as it was)."""
    h = hooks(True, Redactor())
    asyncio.run(drive_hooks(h))
    before = json.dumps(h._events)
    exported = [h._export(e) for e in h._events]
    as_is = {e["kind"] for e, x in zip(h._events, exported) if x is e}
    assert as_is == {"turn_started", "agent_start", "llm_start", "spans_dropped"}
    assert all(x is not e for e, x in zip(h._events, exported) if e["kind"] not in as_is)
    assert json.dumps(h._events) == before
