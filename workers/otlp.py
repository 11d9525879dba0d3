"""OtlpSink: a kept turn's trace record, sent to any OpenTelemetry backend over OTLP/HTTP.

The trace store decides per turn attempt whether its spans are kept (sampled, failed or slow)
and redacts them; only then does a record reach ``OtlpSink.export``. Building OpenTelemetry
spans from that finished record, rather than running an OTel tracer beside the SDK's, is what
makes the sampling decision at trace end possible and keeps unredacted data inside the worker.

What a caller may rely on:

* ``export(record)`` does not block on the network and does not raise for a bad collector: it
  converts the record (a few microseconds a span) and queues the spans on an OpenTelemetry
  ``BatchSpanProcessor``, whose own thread sends them with ``OTLPSpanExporter`` (retries with
  backoff up to ``timeout_s`` a batch). A full queue drops spans (the processor logs it).
* One OTel trace per record. Its trace id is the SDK trace id's 32 hex digits
  (``trace_<hex>`` → ``<hex>``), so a trace found in a backend is found in the trace store
  by the same id. Each SDK span keeps its parent; a ROOT span named ``"<workflow> turn"``
  spans the attempt and adopts the spans that had no parent (or whose parent was not kept).
  Span ids are stable 64-bit hashes of the SDK span ids (``turnfleet.sdk_span_id`` keeps the
  original); the root's id hashes trace id + attempt.
* Attributes follow the OpenTelemetry GenAI semantic conventions (``gen_ai.*``), plus
  ``session.id``/``user.id`` (read by Langfuse, Phoenix/OpenInference) and ``turnfleet.*``;
  token usage is only on model-call spans, so a backend that sums it counts each call once.
  Inputs, outputs, tool arguments and results appear only when the record has them (the
  run had ``trace_include_sensitive_data``). See ``span_attributes`` for the full mapping.
* ``force_flush`` returns True only when everything queued so far reached the collector;
  call it (or ``shutdown``) when the worker stops, or the last batch is lost.

OpenTelemetry is an optional extra (``turnfleet[otlp]``) imported only when a sink is made.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from turnfleet.settings import WorkerProcessSettings

log = structlog.get_logger(__name__)

OTLP_EXTRA_MISSING = "OTLP export needs the otlp extra: pip install 'turnfleet[otlp]'"
INSTRUMENTATION_SCOPE = "turnfleet.workers.otlp"
GEN_AI_SYSTEM = "openai"

# OpenInference span kinds (Arize Phoenix shows spans by these).
_OPENINFERENCE_KIND = {
    "turn": "CHAIN",
    "agent": "AGENT",
    "generation": "LLM",
    "response": "LLM",
    "function": "TOOL",
    "handoff": "TOOL",
    "guardrail": "GUARDRAIL",
}
_MODEL_CALLS = ("generation", "response")
_HEX32 = re.compile(r"[0-9a-fA-F]{32}")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


# --------------------------------------------------------------------------------------------
# Ids and times


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def otel_trace_id(sdk_trace_id: str) -> int:
    """The 128-bit OTel trace id: the SDK id's 32 hex digits, else a hash of the whole id."""
    digits = sdk_trace_id.removeprefix("trace_")
    value = int(digits, 16) if _HEX32.fullmatch(digits) else int(_digest(sdk_trace_id)[:32], 16)
    return value or 1  # 0 is OTel's "invalid"


def otel_span_id(sdk_span_id: str) -> int:
    """A stable 64-bit OTel span id for an SDK span id (the same for the span and its children)."""
    return int(_digest(sdk_span_id)[:16], 16) or 1


def turn_span_id(sdk_trace_id: str, attempt: int) -> int:
    """The root span's id: one per attempt, so retries of a turn never collide."""
    return otel_span_id(f"{sdk_trace_id}#turn-attempt-{attempt}")


def iso_to_ns(value: str) -> int:
    """Nanoseconds since the epoch for an ISO-8601 timestamp (naive means UTC), exactly."""
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


# --------------------------------------------------------------------------------------------
# Attributes (pure: no OpenTelemetry import needed)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def attribute_value(value: Any) -> Any:
    """``value`` as an OTel-legal attribute (str/bool/int/float or a homogeneous list of one);
    anything else as JSON text; None when there is nothing to record."""
    if value is None:
        return None
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        kinds = {type(item) for item in value}
        if len(kinds) == 1 and kinds <= {str, bool, int, float}:
            return list(value)
        if not value:
            return None
    return _json(value)


def _put(attrs: dict[str, Any], key: str, value: Any) -> None:
    legal = attribute_value(value)
    if legal is not None:
        attrs[key] = legal


def _put_data(attrs: dict[str, Any], prefix: str, data: Mapping[str, Any] | None) -> None:
    for key, value in (data or {}).items():
        if key != "type":
            _put(attrs, f"{prefix}.{key}", value)


def _put_usage(attrs: dict[str, Any], usage: Mapping[str, Any] | None) -> None:
    if not usage:
        return
    input_tokens, output_tokens = usage.get("input_tokens"), usage.get("output_tokens")
    _put(attrs, "gen_ai.usage.input_tokens", input_tokens)
    _put(attrs, "gen_ai.usage.output_tokens", output_tokens)
    details_in = usage.get("input_tokens_details") or {}
    details_out = usage.get("output_tokens_details") or {}
    _put(attrs, "gen_ai.usage.cache_read.input_tokens", details_in.get("cached_tokens"))
    _put(attrs, "gen_ai.usage.cache_creation.input_tokens", details_in.get("cache_write_tokens"))
    _put(attrs, "gen_ai.usage.reasoning.output_tokens", details_out.get("reasoning_tokens"))
    # OpenInference's names, for Phoenix.
    _put(attrs, "llm.token_count.prompt", input_tokens)
    _put(attrs, "llm.token_count.completion", output_tokens)
    total = usage.get("total_tokens")
    if total is None and isinstance(input_tokens, int) and isinstance(output_tokens, int):
        total = input_tokens + output_tokens
    _put(attrs, "llm.token_count.total", total)


def turn_attributes(trace: Mapping[str, Any]) -> dict[str, Any]:
    """What every span of a record carries: the conversation, the customer, the turn attempt."""
    metadata = trace.get("metadata") or {}
    attrs: dict[str, Any] = {}
    group_id = trace.get("group_id") or trace.get("conversation_id")
    _put(attrs, "gen_ai.conversation.id", group_id)
    _put(attrs, "session.id", group_id)
    _put(attrs, "user.id", trace.get("customer_id") or metadata.get("customer_id"))
    _put(attrs, "turnfleet.turn_id", trace.get("turn_id") or metadata.get("turn_id"))
    attempt = trace.get("attempt", metadata.get("attempt"))
    _put(attrs, "turnfleet.attempt", int(attempt) if attempt is not None else None)
    _put(attrs, "turnfleet.kept_because", trace.get("kept_because"))
    return attrs


def span_attributes(span_data: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """``(span name, operation, attributes)`` for one exported SDK ``span_data``.

    ========== ================================ ==========================================
    SDK type   name                             attributes
    ========== ================================ ==========================================
    agent      ``invoke_agent <agent>``         gen_ai.agent.name, turnfleet.agent.tools /
                                                .handoffs / .output_type
    generation ``chat <model>``                 gen_ai.request.model, gen_ai.response.model,
                                                gen_ai.request.temperature/top_p/max_tokens,
                                                gen_ai.usage.*, gen_ai.input.messages /
                                                gen_ai.output.messages (if recorded),
                                                turnfleet.model_config
    response   ``chat``                         gen_ai.response.id, gen_ai.usage.*
    function   ``execute_tool <tool>``          gen_ai.tool.name, gen_ai.tool.type,
                                                gen_ai.tool.call.arguments / .result
                                                (if recorded), turnfleet.tool.mcp_data
    handoff    ``handoff <from> → <to>``        turnfleet.handoff.from_agent / .to_agent
    guardrail  ``guardrail <name>``             turnfleet.guardrail.name / .triggered
    custom     ``<name>`` (SDK task: ``task     turnfleet.custom.<key>`` per data key
               <workflow>``, turn: ``turn <n>   (dicts as JSON); turn: gen_ai.agent.name
               <agent>``)
    other      ``<type>``                       turnfleet.<type>.<key>
    ========== ================================ ==========================================

    ``gen_ai.operation.name`` is invoke_agent / chat / execute_tool / handoff / guardrail, the
    custom span's name, or the type; every span also gets ``gen_ai.system`` and
    ``gen_ai.provider.name`` ("openai") and ``openinference.span.kind``.
    """
    kind = str(span_data.get("type") or "custom")
    attrs: dict[str, Any] = {}
    if kind == "agent":
        agent = span_data.get("name") or "agent"
        name, operation = f"invoke_agent {agent}", "invoke_agent"
        _put(attrs, "gen_ai.agent.name", agent)
        _put(attrs, "turnfleet.agent.tools", span_data.get("tools"))
        _put(attrs, "turnfleet.agent.handoffs", span_data.get("handoffs"))
        _put(attrs, "turnfleet.agent.output_type", span_data.get("output_type"))
    elif kind == "generation":
        model = span_data.get("model")
        name, operation = (f"chat {model}" if model else "chat"), "chat"
        _put(attrs, "gen_ai.request.model", model)
        _put(attrs, "gen_ai.response.model", model)
        _put(attrs, "llm.model_name", model)
        config = {k: v for k, v in (span_data.get("model_config") or {}).items() if v is not None}
        for key in ("temperature", "top_p", "max_tokens"):
            _put(attrs, f"gen_ai.request.{key}", config.get(key))
        _put(attrs, "turnfleet.model_config", config or None)
        _put_usage(attrs, span_data.get("usage"))
        _put(attrs, "gen_ai.input.messages", span_data.get("input"))
        _put(attrs, "gen_ai.output.messages", span_data.get("output"))
    elif kind == "response":
        name, operation = "chat", "chat"
        _put(attrs, "gen_ai.response.id", span_data.get("response_id"))
        _put_usage(attrs, span_data.get("usage"))
    elif kind == "function":
        tool = span_data.get("name") or "tool"
        name, operation = f"execute_tool {tool}", "execute_tool"
        _put(attrs, "gen_ai.tool.name", tool)
        _put(attrs, "gen_ai.tool.type", "function")
        _put(attrs, "gen_ai.tool.call.arguments", span_data.get("input"))
        _put(attrs, "gen_ai.tool.call.result", span_data.get("output"))
        _put(attrs, "turnfleet.tool.mcp_data", span_data.get("mcp_data"))
    elif kind == "handoff":
        source, target = span_data.get("from_agent"), span_data.get("to_agent")
        name, operation = f"handoff {source or '?'} → {target or '?'}", "handoff"
        _put(attrs, "turnfleet.handoff.from_agent", source)
        _put(attrs, "turnfleet.handoff.to_agent", target)
    elif kind == "guardrail":
        guardrail = span_data.get("name") or "guardrail"
        name, operation = f"guardrail {guardrail}", "guardrail"
        _put(attrs, "turnfleet.guardrail.name", guardrail)
        _put(attrs, "turnfleet.guardrail.triggered", span_data.get("triggered"))
    elif kind == "custom":
        operation = str(span_data.get("name") or "custom")
        data = span_data.get("data") or {}
        sdk_kind = data.get("sdk_span_type")
        if sdk_kind == "task" and data.get("name"):
            name = f"task {data['name']}"
        elif sdk_kind == "turn":
            name = f"turn {data.get('turn', '?')} {data.get('agent_name', '')}".rstrip()
            _put(attrs, "gen_ai.agent.name", data.get("agent_name"))
        else:
            name = operation
        _put_data(attrs, "turnfleet.custom", data)
    else:
        label = span_data.get("name") or span_data.get("model")
        name, operation = (f"{kind} {label}" if label else kind), kind
        _put_data(attrs, f"turnfleet.{kind}", span_data)
    attrs["gen_ai.operation.name"] = operation
    attrs["gen_ai.system"] = GEN_AI_SYSTEM
    attrs["gen_ai.provider.name"] = GEN_AI_SYSTEM
    attrs["openinference.span.kind"] = _OPENINFERENCE_KIND.get(kind, "CHAIN")
    return name, kind, attrs


def _error_description(error: Any) -> str:
    if isinstance(error, Mapping):
        kind, message = error.get("type") or error.get("error_type"), error.get("message")
        return ": ".join(str(part) for part in (kind, message) if part) or "error"
    return str(error)


# --------------------------------------------------------------------------------------------
# OpenTelemetry (the optional extra)

_otel: SimpleNamespace | None = None


def _load_otel() -> SimpleNamespace:
    """The OpenTelemetry names this module uses, imported on first need."""
    global _otel
    if _otel is None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import ReadableSpan
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
            from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
        except ImportError as exc:
            raise ImportError(OTLP_EXTRA_MISSING) from exc
        _otel = SimpleNamespace(
            OTLPSpanExporter=OTLPSpanExporter,
            Resource=Resource,
            ReadableSpan=ReadableSpan,
            BatchSpanProcessor=BatchSpanProcessor,
            SpanExportResult=SpanExportResult,
            InstrumentationScope=InstrumentationScope,
            SpanContext=SpanContext,
            SpanKind=SpanKind,
            Status=Status,
            StatusCode=StatusCode,
            TraceFlags=TraceFlags,
        )
    return _otel


class _CountingExporter:
    """Wraps the real exporter to count what reached the collector and what did not."""

    def __init__(self, inner: Any, otel: SimpleNamespace, endpoint: str) -> None:
        self._inner = inner
        self._otel = otel
        self._endpoint = endpoint
        self._lock = threading.Lock()
        self.spans_exported = 0
        self.spans_failed = 0
        self.failed_batches = 0

    def export(self, spans: Any) -> Any:
        result = self._otel.SpanExportResult.FAILURE
        try:
            result = self._inner.export(spans)
            return result
        finally:  # an exception is logged by the BatchSpanProcessor; here it is counted
            ok = result == self._otel.SpanExportResult.SUCCESS
            with self._lock:
                if ok:
                    self.spans_exported += len(spans)
                else:
                    self.spans_failed += len(spans)
                    self.failed_batches += 1
            if not ok:
                log.warning("otlp.export_failed", spans=len(spans), endpoint=self._endpoint)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return bool(self._inner.force_flush(timeout_millis))


@dataclass(frozen=True)
class OtlpStats:
    """Counters since the sink was made (for logs and /metrics)."""

    records: int
    records_dropped: int
    spans_queued: int
    spans_exported: int
    spans_failed: int


class OtlpSink:
    """Sends kept trace records to an OTLP/HTTP traces endpoint (see the module docstring).

    ``endpoint`` is the full traces URL (``http://collector:4318/v1/traces``); ``headers`` go
    with every request (auth for Langfuse, Honeycomb, ...). ``exporter`` replaces the OTLP
    exporter with any OpenTelemetry ``SpanExporter`` (``endpoint`` is then only a label).
    ``timeout_s`` bounds one batch's export, retries included. ``max_queue_size`` spans wait
    for the exporter at most; more are dropped.
    """

    def __init__(
        self,
        endpoint: str,
        headers: Mapping[str, str] | None = None,
        service_name: str = "turnfleet-worker",
        *,
        exporter: Any = None,
        timeout_s: float = 10.0,
        resource_attributes: Mapping[str, Any] | None = None,
        max_queue_size: int | None = None,
        schedule_delay_ms: float | None = None,
    ) -> None:
        otel = _load_otel()
        self._otel = otel
        self.endpoint = endpoint
        if exporter is None:
            exporter = otel.OTLPSpanExporter(
                endpoint=endpoint, headers=dict(headers or {}), timeout=timeout_s
            )
        self._exporter = _CountingExporter(exporter, otel, endpoint)
        self._processor = otel.BatchSpanProcessor(
            self._exporter, max_queue_size=max_queue_size, schedule_delay_millis=schedule_delay_ms
        )
        self._resource = otel.Resource.create(
            {**dict(resource_attributes or {}), "service.name": service_name}
        )
        self._scope = otel.InstrumentationScope(INSTRUMENTATION_SCOPE)
        self._lock = threading.Lock()
        self._records = 0
        self._records_dropped = 0
        self._spans_queued = 0
        self._failures_reported = 0
        self._closed = False

    @classmethod
    def from_settings(cls, settings: WorkerProcessSettings) -> OtlpSink | None:
        """The sink the worker's settings ask for, or None when no endpoint is set."""
        if not settings.otlp_endpoint:
            return None
        extra = {"service.instance.id": settings.worker_name} if settings.worker_name else None
        return cls(settings.otlp_endpoint, settings.otlp_headers, resource_attributes=extra)

    # ----------------------------------------------------------------------------------------

    def export(self, record: Mapping[str, Any]) -> None:
        """Queue one record's spans for export; returns at once, never raises for the network.

        A malformed record is logged and dropped (telemetry must not fail a turn).
        """
        if self._closed:
            log.warning("otlp.export_after_shutdown", endpoint=self.endpoint)
            return
        try:
            spans = self.to_spans(record)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            trace = record.get("trace") if isinstance(record, Mapping) else None
            trace_id = trace.get("id") if isinstance(trace, Mapping) else None
            log.warning("otlp.record_dropped", trace_id=trace_id, error=repr(exc))
            with self._lock:
                self._records_dropped += 1
            return
        for span in spans:
            self._processor.on_end(span)
        with self._lock:
            self._records += 1
            self._spans_queued += len(spans)

    def to_spans(self, record: Mapping[str, Any]) -> list[Any]:
        """The record as OpenTelemetry ``ReadableSpan``s, the turn's root span first."""
        otel = self._otel
        trace = record["trace"]
        sdk_spans: list[Mapping[str, Any]] = list(record.get("spans") or [])
        sdk_trace_id = str(trace["id"])
        trace_id = otel_trace_id(sdk_trace_id)
        attempt = int(trace.get("attempt") or (trace.get("metadata") or {}).get("attempt") or 1)
        sampled = otel.TraceFlags(otel.TraceFlags.SAMPLED)

        def context(span_id: int) -> Any:
            return otel.SpanContext(trace_id, span_id, is_remote=False, trace_flags=sampled)

        common = turn_attributes(trace)
        starts = [iso_to_ns(s["started_at"]) for s in sdk_spans if s.get("started_at")]
        ends = [iso_to_ns(s["ended_at"]) for s in sdk_spans if s.get("ended_at")]
        if trace.get("started_at"):
            starts.append(iso_to_ns(trace["started_at"]))
        if trace.get("ended_at"):
            ends.append(iso_to_ns(trace["ended_at"]))
        if not starts:
            raise ValueError("a trace record needs started_at or timed spans")
        root_start = min(starts)
        root_end = max([*ends, root_start])

        root_id = turn_span_id(sdk_trace_id, attempt)
        workflow = str(trace.get("workflow_name") or "Agent workflow")
        root_attrs = dict(common)
        root_attrs["gen_ai.operation.name"] = "invoke_workflow"
        root_attrs["gen_ai.workflow.name"] = workflow
        root_attrs["openinference.span.kind"] = "CHAIN"
        _put(root_attrs, "turnfleet.sdk_trace_id", sdk_trace_id)
        _put(root_attrs, "turnfleet.status", trace.get("status"))
        _put_data(root_attrs, "turnfleet.metadata", trace.get("metadata"))
        root_status = otel.Status(otel.StatusCode.UNSET)
        if trace.get("status") == "failed":
            description = _error_description(trace.get("error") or "turn failed")
            root_status = otel.Status(otel.StatusCode.ERROR, description)
        root = otel.ReadableSpan(
            name=f"{workflow} turn",
            context=context(root_id),
            parent=None,
            resource=self._resource,
            attributes=root_attrs,
            kind=otel.SpanKind.INTERNAL,
            status=root_status,
            start_time=root_start,
            end_time=root_end,
            instrumentation_scope=self._scope,
        )

        kept = {str(s["id"]) for s in sdk_spans}
        out = [root]
        for sdk in sdk_spans:
            name, kind, attrs = span_attributes(sdk.get("span_data") or {})
            attrs.update(common)
            sdk_id, sdk_parent = str(sdk["id"]), sdk.get("parent_id")
            attrs["turnfleet.sdk_span_id"] = sdk_id
            _put(attrs, "turnfleet.sdk_parent_id", sdk_parent)
            _put(attrs, "turnfleet.span_metadata", sdk.get("metadata"))
            parent_id = otel_span_id(str(sdk_parent)) if sdk_parent in kept else root_id
            start = iso_to_ns(sdk["started_at"]) if sdk.get("started_at") else root_start
            end = iso_to_ns(sdk["ended_at"]) if sdk.get("ended_at") else start
            error = sdk.get("error")
            if error:
                status = otel.Status(otel.StatusCode.ERROR, _error_description(error))
                if isinstance(error, Mapping):
                    _put(attrs, "turnfleet.error.data", error.get("data"))
            else:
                status = otel.Status(otel.StatusCode.UNSET)
            out.append(
                otel.ReadableSpan(
                    name=name,
                    context=context(otel_span_id(sdk_id)),
                    parent=context(parent_id),
                    resource=self._resource,
                    attributes=attrs,
                    kind=otel.SpanKind.CLIENT if kind in _MODEL_CALLS else otel.SpanKind.INTERNAL,
                    status=status,
                    start_time=start,
                    end_time=max(start, end),
                    instrumentation_scope=self._scope,
                )
            )
        return out

    def force_flush(self, timeout_s: float = 10) -> bool:
        """Send what is queued; True when it all reached the collector within ``timeout_s``.

        False when the wait ran out (the export carries on in the background) or when any
        batch failed since the previous flush (those spans are lost; see ``stats``).
        """
        if self._closed:
            return False
        done = threading.Event()

        def flush() -> None:
            try:
                self._processor.force_flush()
            finally:
                done.set()

        threading.Thread(target=flush, name="turnfleet-otlp-flush", daemon=True).start()
        if not done.wait(timeout_s):
            log.warning("otlp.flush_timeout", endpoint=self.endpoint, timeout_s=timeout_s)
            return False
        with self._lock:
            failures = self._exporter.failed_batches
            ok = failures == self._failures_reported
            self._failures_reported = failures
        return ok

    def shutdown(self) -> None:
        """Send what is queued, then stop the export thread. Later ``export`` calls are ignored."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._processor.shutdown()

    def stats(self) -> OtlpStats:
        with self._lock:
            return OtlpStats(
                records=self._records,
                records_dropped=self._records_dropped,
                spans_queued=self._spans_queued,
                spans_exported=self._exporter.spans_exported,
                spans_failed=self._exporter.spans_failed,
            )

    def __enter__(self) -> OtlpSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

