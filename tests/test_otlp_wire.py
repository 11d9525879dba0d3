"""The OTLP bytes ``OtlpSink`` writes itself (``otlp_wire``), decoded with opentelemetry-proto's
own messages: for records of real SDK runs they equal, span for span and attribute for
attribute, what the sink sent through the OpenTelemetry SDK and its OTLP encoder before issue
19 (``tests/data/otlp_golden.json``, written by that code)."""

from __future__ import annotations

import base64
import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from turnfleet.pricing import PriceTable
from turnfleet.settings import DEFAULT_PRICES
from turnfleet.workers import otlp_wire as wire
from turnfleet.workers.otlp import OtlpSink

GOLDEN = json.loads((Path(__file__).parent / "data" / "otlp_golden.json").read_text())
# The resource as Resource.create makes it: service.instance.id is a fresh UUID per process.
PER_PROCESS = {"service.instance.id"}


def decoded(body: bytes) -> dict[str, Any]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    out = MessageToDict(request)
    for resource_spans in out["resourceSpans"]:
        resource = resource_spans["resource"]
        resource["attributes"] = [a for a in resource["attributes"]
                                  if a["key"] not in PER_PROCESS or a["value"]["stringValue"] == "host-a:1"]
    return out


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_the_written_request_equals_what_the_opentelemetry_encoder_sent(case: dict[str, Any]) -> None:
    pricing = PriceTable(DEFAULT_PRICES).cost_usd if case["pricing"] else None
    sink = OtlpSink("http://127.0.0.1:9/v1/traces", service_name="tf-golden", pricing=pricing, **case["sink"])
    try:
        body = sink.encode([GOLDEN["records"][case["record"]]])
    finally:
        sink.shutdown()
    expected = decoded(base64.b64decode(case["request_b64"]))
    got = decoded(body)
    (want_spans,) = [s["spans"] for rs in expected["resourceSpans"] for s in rs["scopeSpans"]]
    (got_spans,) = [s["spans"] for rs in got["resourceSpans"] for s in rs["scopeSpans"]]
    assert [s["name"] for s in got_spans] == [s["name"] for s in want_spans]
    for mine, theirs in zip(got_spans, want_spans):
        assert mine == theirs, mine["name"]  # attributes in the same order, values of the same type
    assert got == expected


@pytest.mark.parametrize("value", [
    "", "text", "é漢字🙂" * 40, "x" * 300, True, False, 0, 1, 127, 128, 300, 2**62, -1, -(2**63), 2**63 - 1,
    0.0, -2.5, 1e300, math.inf, ["a", "b"], [1, 2, 3], [True], [1.5, 2.5], [], {"k": "v", "n": 1}, b"\x00\xff",
])
def test_each_value_kind_decodes_to_the_same_any_value_as_protobuf_writes_it(value: Any) -> None:
    expected = AnyValue()
    if isinstance(value, bool):
        expected.bool_value = value
    elif isinstance(value, int):
        expected.int_value = value
    elif isinstance(value, float):
        expected.double_value = value
    elif isinstance(value, str):
        expected.string_value = value
    elif isinstance(value, bytes):
        expected.bytes_value = value
    elif isinstance(value, dict):
        for k, v in value.items():
            kv = expected.kvlist_value.values.add()
            kv.key = k
            kv.value.CopyFrom(_any(v))
    else:
        expected.array_value.SetInParent()
        for v in value:
            expected.array_value.values.add().CopyFrom(_any(v))
    got = AnyValue()
    got.ParseFromString(wire.any_value(value))
    assert got == expected and got.WhichOneof("value") == expected.WhichOneof("value")


def _any(value: Any) -> AnyValue:
    out = AnyValue()
    out.ParseFromString(wire.any_value(value))
    return out


def _sink(**kwargs: Any) -> OtlpSink:
    return OtlpSink("http://127.0.0.1:9/v1/traces", service_name="tf-golden",
                    pricing=PriceTable(DEFAULT_PRICES).cost_usd, **kwargs)


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_a_second_export_from_the_remembered_parts_writes_the_same_bytes(case: dict[str, Any]) -> None:
    """What the sink remembers between records (a span's described attributes, each message's
    JSON, a call's usage attributes) gives the same request as writing it afresh."""
    pricing = PriceTable(DEFAULT_PRICES).cost_usd if case["pricing"] else None
    sink = OtlpSink("http://127.0.0.1:9/v1/traces", service_name="tf-golden", pricing=pricing, **case["sink"])
    try:
        record = GOLDEN["records"][case["record"]]
        first, again = sink.encode([record]), sink.encode([copy.deepcopy(record)])
    finally:
        sink.shutdown()
    assert again == first
    assert decoded(again) == decoded(base64.b64decode(case["request_b64"]))


def test_each_distinct_message_is_encoded_once_across_a_records_model_calls(monkeypatch) -> None:
    """A model call's input repeats the earlier calls' messages (the refund record's three
    Billing calls each carry its instructions and the customer's question): each message's
    JSON is written once and joined into each call's list (issue 19)."""
    from turnfleet.workers import otlp

    encoded: list[str] = []
    real = otlp._json

    def counting(value: Any) -> str:
        out = real(value)
        encoded.append(out)
        return out

    monkeypatch.setattr(otlp, "_MESSAGE_JSON", {}, raising=False)  # a cold cache
    monkeypatch.setattr(otlp, "_json", counting)
    sink = _sink()
    try:
        body = sink.encode([GOLDEN["records"]["refund"]])
    finally:
        sink.shutdown()
    billing = [text for text in encoded if "You are Billing" in text]
    assert len(billing) == 1, f"the Billing instructions were JSON-encoded {len(billing)} times"
    inputs = [a["value"]["stringValue"] for rs in decoded(body)["resourceSpans"] for ss in rs["scopeSpans"]
              for s in ss["spans"] for a in s.get("attributes", []) if a["key"] == "gen_ai.input.messages"]
    assert sum("You are Billing" in text for text in inputs) == 3  # still in each call's input


def test_a_span_whose_data_repeats_is_described_once_and_model_calls_each_time(monkeypatch) -> None:
    """An agent's, a handoff's, a guardrail's or a task's span is the same in every turn of a
    workflow: the attributes its data makes are remembered as bytes. A model call's messages
    and usage are written for each call (its model and settings are remembered)."""
    from turnfleet.workers import otlp

    described: list[str] = []
    messages_written: list[str] = []
    real, real_io = otlp.span_attributes, otlp._put_generation_io

    def counting(span_data: Any, *args: Any) -> Any:
        described.append(str(span_data.get("type")))
        return real(span_data, *args)

    def counting_io(attrs: Any, span_data: Any, *args: Any) -> None:
        messages_written.append(str(span_data.get("type")))
        real_io(attrs, span_data, *args)

    monkeypatch.setattr(otlp, "span_attributes", counting)
    monkeypatch.setattr(otlp, "_put_generation_io", counting_io)
    record = GOLDEN["records"]["refund"]
    model_calls = [s for s in record["spans"] if s["span_data"]["type"] in ("generation", "response")]
    sink = _sink()
    try:
        first = sink.encode([record])
        assert len(described) == len(record["spans"]) - len(model_calls)
        assert len(messages_written) == len(model_calls)
        described.clear()
        messages_written.clear()
        again = sink.encode([copy.deepcopy(record)])
    finally:
        sink.shutdown()
    assert again == first
    assert described == []
    assert len(messages_written) == len(model_calls)


def test_remembered_attributes_tell_true_1_and_1_0_apart_and_keep_a_spans_own_names_last() -> None:
    """Span data equal as Python values but not as JSON (``True``, ``1``, ``1.0``) are
    described apart; a span's own attribute of the same name as one its data makes
    (``turnfleet.error.data`` of an unknown span type ``error``) is written once, in place."""
    base = copy.deepcopy(GOLDEN["records"]["minimal"])
    started = base["trace"].get("started_at") or "2025-01-01T00:00:00+00:00"

    def span(i: int, data: dict[str, Any], error: Any = None) -> dict[str, Any]:
        return {"object": "trace.span", "id": f"span_{i:024x}", "trace_id": base["trace"]["id"],
                "parent_id": None, "started_at": started, "ended_at": started, "span_data": data,
                "error": error}

    base["trace"]["started_at"] = started
    base["spans"] = [span(1, {"type": "guardrail", "name": "g", "triggered": True}),
                     span(2, {"type": "guardrail", "name": "g", "triggered": 1}),
                     span(3, {"type": "guardrail", "name": "g", "triggered": 1.0}),
                     span(4, {"type": "error", "data": "from the data"},
                          {"message": "boom", "data": {"why": "from the error"}})]
    sink = _sink()
    try:
        body = sink.encode([base])
    finally:
        sink.shutdown()
    spans = [s for rs in decoded(body)["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]][1:]
    triggered = [next(a["value"] for a in s["attributes"] if a["key"] == "turnfleet.guardrail.triggered")
                 for s in spans[:3]]
    assert triggered == [{"boolValue": True}, {"intValue": "1"}, {"doubleValue": 1.0}]
    names = [a["key"] for a in spans[3]["attributes"]]
    assert names.count("turnfleet.error.data") == 1
    value = next(a["value"] for a in spans[3]["attributes"] if a["key"] == "turnfleet.error.data")
    assert json.loads(value["stringValue"]) == {"why": "from the error"}
