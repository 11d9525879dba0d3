"""The OTLP bytes ``OtlpSink`` writes itself (``otlp_wire``), decoded with opentelemetry-proto's
own messages: for records of real SDK runs they equal, span for span and attribute for
attribute, what the sink sent through the OpenTelemetry SDK and its OTLP encoder before issue
19 (``tests/data/otlp_golden.json``, written by that code)."""

from __future__ import annotations

import base64
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
