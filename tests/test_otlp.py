"""OtlpSink against a real OTLP/HTTP receiver, with records made by real SDK runs.

The receiver is an HTTP server on a free local port that decodes ``ExportTraceServiceRequest``
protobufs, as a collector (or Langfuse, Phoenix, Jaeger) would; tests wait on its condition,
never on a sleep.
"""

from __future__ import annotations

import copy
import socket
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from agents import RunConfig, Runner, trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from turnfleet.settings import WorkerProcessSettings
from turnfleet.context import TurnContext
from turnfleet.workers.model import OfflineModel
from turnfleet.workers.otlp import OTLP_EXTRA_MISSING, OtlpSink, otel_span_id, otel_trace_id
from turnfleet.workers.support_desk import build_support_desk

STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which) if which else None


class Receiver:
    """A minimal OTLP/HTTP traces receiver: POST /v1/traces, protobuf in, protobuf out."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.requests: list[dict[str, str]] = []  # headers of each request
        self.refusals: list[int] = []  # statuses to answer the next requests with, instead of taking them
        self.refused = 0
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                with receiver.arrived:
                    status = receiver.refusals.pop(0) if receiver.refusals else None
                    receiver.refused += status is not None
                if status is not None:  # a collector that is busy for a while
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.store(request, dict(self.headers))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def store(self, request: ExportTraceServiceRequest, headers: dict[str, str]) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "kind": span.kind,
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "status": span.status.code,
                            "status_message": span.status.message,
                            "attributes": {kv.key: _value(kv.value) for kv in span.attributes},
                            "events": [
                                {"name": e.name,
                                 "attributes": {kv.key: _value(kv.value) for kv in e.attributes}}
                                for e in span.events
                            ],
                            "resource": resource,
                            "scope": scope_spans.scope.name,
                        }
                    )
        with self.arrived:
            self.spans.extend(spans)
            self.requests.append({k.lower(): v for k, v in headers.items()})
            self.arrived.notify_all()

    def wait_for_spans(self, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.spans) >= count, timeout), (
                f"{len(self.spans)} of {count} spans arrived"
            )
            return list(self.spans)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


@pytest.fixture
def sink(receiver: Receiver) -> Iterator[OtlpSink]:
    made = OtlpSink(receiver.endpoint, {"Authorization": "Bearer test-key"}, service_name="tf-test")
    try:
        yield made
    finally:
        made.shutdown()


async def refund_record(redis: Any, collector: Any) -> dict[str, Any]:
    """The trace store's record for one real Support Desk turn (refund: handoff + two tools)."""
    started = datetime.now(timezone.utc).isoformat()
    context = TurnContext(
        turn_id="t-1", conversation_id="conv-1", customer_id="C-100", attempt=1, redis=redis
    )
    with trace("Support Desk", group_id="conv-1"):
        await Runner.run(
            build_support_desk(OfflineModel()).starting_agent(None),
            "I want a refund for order 1042",
            context=context,
            run_config=RunConfig(workflow_name="Support Desk", group_id="conv-1"),
        )
    ended = datetime.now(timezone.utc).isoformat()
    (exported,) = collector.traces
    return {
        "trace": {
            **exported,
            "turn_id": "t-1",
            "attempt": 1,
            "conversation_id": "conv-1",
            "customer_id": "C-100",
            "status": "completed",
            "kept_because": "sampled",
            "started_at": started,
            "ended_at": ended,
        },
        "spans": [span.export() for span in collector.spans],
    }


def send(sink: OtlpSink, receiver: Receiver, record: dict[str, Any]) -> list[dict[str, Any]]:
    """Export one record and return what the receiver got: its spans plus the turn's root."""
    sink.export(record)
    assert sink.force_flush(5) is True
    return receiver.wait_for_spans(len(record["spans"]) + 1)


def by_sdk_id(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Received spans by the SDK span id they came from (the root has none)."""
    return {
        s["attributes"]["turnfleet.sdk_span_id"]: s
        for s in spans
        if "turnfleet.sdk_span_id" in s["attributes"]
    }


def ancestors(span: dict[str, Any], spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    index = {s["span_id"]: s for s in spans}
    chain = []
    while span["parent_span_id"]:
        span = index[span["parent_span_id"]]
        chain.append(span)
    return chain


async def test_a_turn_arrives_as_one_otel_trace_with_its_tree_intact(
    redis, collector, receiver: Receiver, sink: OtlpSink
) -> None:
    record = await refund_record(redis, collector)
    sdk_spans = record["spans"]

    spans = send(sink, receiver, record)
    assert len(spans) == len(sdk_spans) + 1

    # One trace, whose id is the SDK trace id's hex digits; every span's parent is in it.
    trace_hex = record["trace"]["id"].removeprefix("trace_")
    assert {s["trace_id"] for s in spans} == {trace_hex}
    assert f"{otel_trace_id(record['trace']['id']):032x}" == trace_hex
    ids = {s["span_id"] for s in spans}
    (root,) = [s for s in spans if not s["parent_span_id"]]
    assert all(s["parent_span_id"] in ids for s in spans if s is not root)
    assert root["name"] == "Support Desk turn"
    assert root["attributes"]["gen_ai.operation.name"] == "invoke_workflow"
    assert root["start"] <= min(s["start"] for s in spans) and root["end"] >= max(s["end"] for s in spans)

    # Every SDK span arrived, under the OTel id derived from its SDK id, with its SDK parent.
    received = by_sdk_id(spans)
    assert set(received) == {s["id"] for s in sdk_spans}
    for sdk in sdk_spans:
        otel = received[sdk["id"]]
        assert otel["span_id"] == f"{otel_span_id(sdk['id']):016x}"
        expected_parent = (
            f"{otel_span_id(sdk['parent_id']):016x}" if sdk["parent_id"] else root["span_id"]
        )
        assert otel["parent_span_id"] == expected_parent

    # Billing's model calls and tool calls sit under the Billing agent span.
    (billing,) = [s for s in spans if s["name"] == "invoke_agent Billing"]
    assert billing["attributes"]["gen_ai.agent.name"] == "Billing"
    generations = [s for s in spans if s["attributes"].get("gen_ai.operation.name") == "chat"]
    tools = [s for s in spans if s["attributes"].get("gen_ai.operation.name") == "execute_tool"]
    assert len(generations) == 4 and [t["name"] for t in tools] == [
        "execute_tool check_refund_eligibility",
        "execute_tool process_refund",
    ]
    billing_calls = [g for g in generations if billing in ancestors(g, spans)]
    assert len(billing_calls) == 3
    assert all(billing in ancestors(t, spans) for t in tools)
    (handoff,) = [s for s in spans if s["attributes"].get("gen_ai.operation.name") == "handoff"]
    assert handoff["name"] == "handoff Triage → Billing"

    # Model calls carry the SDK span's usage and model; nothing else carries usage.
    for sdk in sdk_spans:
        data = sdk["span_data"]
        attrs = received[sdk["id"]]["attributes"]
        if data["type"] == "generation":
            assert received[sdk["id"]]["name"] == "chat turnfleet-offline"
            assert attrs["gen_ai.usage.input_tokens"] == data["usage"]["input_tokens"]
            assert attrs["gen_ai.usage.output_tokens"] == data["usage"]["output_tokens"]
            assert attrs["gen_ai.request.model"] == attrs["gen_ai.response.model"] == "turnfleet-offline"
            assert attrs["gen_ai.system"] == attrs["gen_ai.provider.name"] == "turnfleet"  # the offline model
            assert attrs["gen_ai.input.messages"].startswith("[")  # sensitive data was included
        else:
            assert "gen_ai.usage.input_tokens" not in attrs
    assert sum(g["attributes"]["gen_ai.usage.input_tokens"] for g in generations) == sum(
        s["span_data"]["usage"]["input_tokens"] for s in sdk_spans if s["span_data"]["type"] == "generation"
    )

    # The refund tool call is readable: name, arguments, result.
    (refund,) = [t for t in tools if t["attributes"]["gen_ai.tool.name"] == "process_refund"]
    assert refund["attributes"]["gen_ai.tool.call.arguments"] == '{"order_id":"1042","amount":"89.00"}'
    assert '"refunded":true' in refund["attributes"]["gen_ai.tool.call.result"]

    # The conversation, customer and turn are on the attempt's root (receivers read them per
    # trace, from its root: otlp.turn_attributes); the resource names the service.
    (root,) = [s for s in spans if not s["parent_span_id"]]
    attrs = root["attributes"]
    assert attrs["session.id"] == attrs["gen_ai.conversation.id"] == "conv-1"
    assert attrs["user.id"] == "C-100"
    assert attrs["turnfleet.turn_id"] == "t-1" and attrs["turnfleet.attempt"] == 1
    assert attrs["turnfleet.kept_because"] == "sampled"
    assert all(span["resource"]["service.name"] == "tf-test" for span in spans)
    assert all(span["status"] != STATUS_ERROR for span in spans)
    assert receiver.requests[0]["authorization"] == "Bearer test-key"
    assert receiver.requests[0]["content-type"] == "application/x-protobuf"
    stats = sink.stats()
    assert stats.records == 1 and stats.spans_exported == len(spans) and stats.spans_failed == 0


async def test_failed_spans_and_turns_arrive_with_error_status(
    redis, collector, receiver: Receiver, sink: OtlpSink
) -> None:
    record = copy.deepcopy(await refund_record(redis, collector))
    record["trace"].update(status="failed", kept_because="failed")
    (tool,) = [s for s in record["spans"] if s["span_data"].get("name") == "process_refund"]
    tool["error"] = {"message": "Error running tool", "data": {"tool_name": "process_refund"}}

    spans = send(sink, receiver, record)

    failed = by_sdk_id(spans)[tool["id"]]
    assert failed["status"] == STATUS_ERROR and failed["status_message"] == "Error running tool"
    assert failed["attributes"]["turnfleet.error.data"] == '{"tool_name": "process_refund"}'
    (root,) = [s for s in spans if not s["parent_span_id"]]
    assert root["status"] == STATUS_ERROR and root["attributes"]["turnfleet.status"] == "failed"
    others = [s for s in spans if s is not failed and s is not root]
    assert all(s["status"] != STATUS_ERROR for s in others)
    assert root["attributes"]["turnfleet.kept_because"] == "failed"


async def test_without_sensitive_data_no_arguments_or_messages_are_exported(
    redis, collector, receiver: Receiver, sink: OtlpSink
) -> None:
    record = copy.deepcopy(await refund_record(redis, collector))
    for span in record["spans"]:
        if span["span_data"]["type"] in ("function", "generation"):
            span["span_data"].update(input=None, output=None)

    spans = send(sink, receiver, record)

    for span in spans:
        attrs = span["attributes"]
        for key in ("gen_ai.tool.call.arguments", "gen_ai.tool.call.result",
                    "gen_ai.input.messages", "gen_ai.output.messages"):
            assert key not in attrs
    tools = [s for s in spans if s["attributes"].get("gen_ai.operation.name") == "execute_tool"]
    assert {t["attributes"]["gen_ai.tool.name"] for t in tools} == {"check_refund_eligibility", "process_refund"}


async def test_a_span_whose_parent_was_not_kept_hangs_under_the_turn(
    redis, collector, receiver: Receiver, sink: OtlpSink
) -> None:
    record = copy.deepcopy(await refund_record(redis, collector))
    (billing,) = [
        s for s in record["spans"] if s["span_data"]["type"] == "agent" and s["span_data"]["name"] == "Billing"
    ]
    record["spans"].remove(billing)

    spans = send(sink, receiver, record)

    ids = {s["span_id"] for s in spans}
    (root,) = [s for s in spans if not s["parent_span_id"]]
    assert all(s["parent_span_id"] in ids for s in spans if s is not root)
    orphans = [s for s in spans if s["attributes"].get("turnfleet.sdk_parent_id") == billing["id"]]
    assert orphans and all(s["parent_span_id"] == root["span_id"] for s in orphans)


def _refused_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1/traces"


def minimal_record() -> dict[str, Any]:
    """A kept record with no SDK spans (tracing data excluded): only the turn's root is sent."""
    return {
        "trace": {
            "id": "trace_0123456789abcdef0123456789abcdef",
            "workflow_name": "Support Desk",
            "group_id": "conv-9",
            "metadata": None,
            "turn_id": "t-9",
            "attempt": 2,
            "customer_id": "C-9",
            "status": "completed",
            "kept_because": "slow",
            "started_at": "2025-06-15T10:00:00+00:00",
            "ended_at": "2025-06-15T10:00:01.5+00:00",
        },
        "spans": [],
    }


def test_an_unreachable_collector_never_raises_into_the_worker() -> None:
    record = minimal_record()
    sink = OtlpSink(_refused_endpoint(), timeout_s=0.5)
    try:
        sink.export(record)
        assert sink.force_flush(5) is False
        stats = sink.stats()
        assert stats.spans_queued == 1 and stats.spans_failed == 1 and stats.spans_exported == 0
        sink.export({"trace": {"id": "trace_x"}, "spans": [{"id": "span_1"}]})  # malformed: dropped
        assert sink.stats().records_dropped == 1
    finally:
        sink.shutdown()
    sink.export(record)  # after shutdown: ignored, not raised
    assert sink.force_flush(1) is False


def test_the_worker_settings_make_the_sink(receiver: Receiver) -> None:
    assert OtlpSink.from_settings(WorkerProcessSettings(otlp_endpoint=None)) is None
    settings = WorkerProcessSettings(
        otlp_endpoint=receiver.endpoint, otlp_headers={"x-api-key": "k"}, worker_name="host-a:1"
    )
    with OtlpSink.from_settings(settings) as sink:
        (root,) = send(sink, receiver, minimal_record())
    assert root["name"] == "Support Desk turn" and root["end"] - root["start"] == 1_500_000_000
    assert root["resource"]["service.name"] == "turnfleet-worker"
    assert root["resource"]["service.instance.id"] == "host-a:1"
    assert root["attributes"]["session.id"] == "conv-9" and root["attributes"]["turnfleet.attempt"] == 2
    assert receiver.requests[0]["x-api-key"] == "k"


def test_a_missing_otlp_extra_says_how_to_install_it(monkeypatch) -> None:
    import turnfleet.workers.otlp as otlp

    monkeypatch.setattr(otlp, "_otel", None)
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.resources", None)
    with pytest.raises(ImportError, match=r"pip install 'turnfleet\[otlp\]'") as raised:
        OtlpSink("http://127.0.0.1:4318/v1/traces")
    assert str(raised.value) == OTLP_EXTRA_MISSING


def test_a_busy_collector_gets_the_batch_again_and_a_full_queue_drops_counted(receiver: Receiver) -> None:
    receiver.refusals = [503]  # retried, as OpenTelemetry's exporter retries 429/502/503/504
    with OtlpSink(receiver.endpoint, max_queue_size=1, schedule_delay_ms=60_000) as sink:
        sink.export(minimal_record())
        sink.export(minimal_record())  # one span waits already: this one does not fit
        assert sink.stats().spans_dropped == 1 and sink.stats().spans_queued == 1
        assert sink.force_flush(10) is True
        stats = sink.stats()
    assert receiver.refused == 1 and len(receiver.wait_for_spans(1)) == 1
    assert (stats.records, stats.spans_exported, stats.spans_failed, stats.spans_dropped) == (2, 1, 0, 1)


def test_the_remembered_parts_key_a_value_by_its_types_flat_or_nested() -> None:
    """``_frozen`` (the key model calls' settings and other spans' data are remembered by):
    equal for equal values, different when a value differs only in type (1, 1.0, True), the
    same form whether a dict or list is flat (built in one go) or nested."""
    from turnfleet.workers.otlp import _frozen

    flat = {"temperature": None, "top_p": None, "provider": "p", "max_tokens": 5}
    assert _frozen(flat) == _frozen(copy.deepcopy(flat))
    keys = {_frozen({**flat, "max_tokens": v}) for v in (1, 1.0, True, "1", None)}
    assert len(keys) == 5
    assert _frozen({"a": 1, "b": "x"}) != _frozen({"b": "x", "a": 1})  # order is the attributes'
    assert _frozen(["a", 1, None]) == ("a", 1, None) != _frozen(["a", True, None])
    nested = {"usage": {"input_tokens": 1, "details": {"cached": 0}}, "tools": ["x", "y"],
              "data": [{"k": 1.5}]}
    assert _frozen(nested) == _frozen(copy.deepcopy(nested))
    assert _frozen(nested) != _frozen({**nested, "data": [{"k": 1}]})
    with pytest.raises(TypeError):
        _frozen({"x": object()})


def test_capped_history_copies_a_message_only_to_clip_its_text() -> None:
    """The messages ``messages`` made are its own: one whose text fits is kept as it is (issue
    19: a copy per message per model call), a longer one is a clipped copy."""
    from turnfleet.workers.otlp import MAX_MESSAGE_CHARS, capped_history

    short = {"role": "user", "content": "hi"}
    calls = {"role": "assistant", "tool_calls": [{"id": "c", "name": "f", "arguments": "{}"}]}
    long = {"role": "assistant", "content": "x" * (MAX_MESSAGE_CHARS + 5)}
    kept, left_out = capped_history([short, calls, long])
    assert left_out == 0 and kept[0] is short and kept[1] is calls
    assert kept[2] is not long and len(kept[2]["content"]) == MAX_MESSAGE_CHARS
    assert long["content"] == "x" * (MAX_MESSAGE_CHARS + 5)
