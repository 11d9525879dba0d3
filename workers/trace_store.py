"""The trace store: our ``TracingProcessor``, sampling, and the one write per kept turn.

The processor only buffers: span callbacks run inside the agent run and must not wait on
Redis. When a turn attempt ends, the job takes the attempt's trace from the buffer, decides
whether to keep it (``TraceSampler``), redacts it, and writes it to ``keys.trace(turn_id)``
with the retention setting (a completed attempt's in the finish script, with its result; a
failed one's in one command of its own); the same record goes to the OTLP sink if
one is configured. Spans that cannot be kept — the buffer was full, or the write failed
because Redis was unreachable — are counted and reported in the turn's telemetry
(``spans_dropped``), never silently lost.

**A team's own processors** (``Workflow(trace_processors=[...])``, their vendor's exporter, as
the SDK's ``add_trace_processor``) are never registered with the SDK, so they never see a span
that is unsampled or unredacted: when the store keeps an attempt's trace, it hands each of the
workflow's processors the kept, redacted record as SDK objects (:class:`StoredTrace`,
:class:`StoredSpan`): ``on_trace_start``, ``on_span_start`` / ``on_span_end`` per span,
``on_trace_end``, in the job, after the write (also when the write failed: the trace was kept).
A completed attempt's trace is written by the finish script with its result (no command of
its own): a stale attempt, whose result is refused, writes and hands on no trace either.
A processor that raises is logged (``trace.processor_failed``) and never fails the turn;
``force_flush`` and ``shutdown`` run when the worker stops.

Sampling is per conversation (a stable hash of its id against the rate), so a sampled
conversation is complete. Failed attempts and turns slower than the threshold are kept
whatever the rate: the decision is made at trace end. Aggregates never depend on it: they
come from the hook events of every turn.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import structlog
from agents.tracing import Span, Trace, TracingProcessor
from agents.tracing.span_data import ResponseSpanData, SpanData
from redis.asyncio import Redis

from turnfleet import fastjson, keys
from turnfleet.redaction import Redactor
from turnfleet.workers.response_span import response_span_export

log = structlog.get_logger(__name__)


def conversation_fraction(conversation_id: str) -> float:
    """A stable number in [0, 1) for a conversation: the same on every worker and run."""
    digest = hashlib.sha256(conversation_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class TraceSampler:
    rate: float = 1.0
    keep_slower_than_ms: float | None = None

    def sampled(self, conversation_id: str) -> bool:
        return self.rate >= 1.0 or conversation_fraction(conversation_id) < self.rate

    def keep_reason(self, conversation_id: str, *, failed: bool, duration_ms: float) -> str | None:
        """Why this attempt's spans are kept ('failed', 'slow', 'sampled'), or None."""
        if failed:
            return "failed"
        if self.keep_slower_than_ms is not None and duration_ms > self.keep_slower_than_ms:
            return "slow"
        if self.sampled(conversation_id):
            return "sampled"
        return None


@dataclass
class _Buffered:
    trace: dict[str, Any] | None = None
    spans: list[dict[str, Any]] = field(default_factory=list)
    dropped: int = 0


class TraceBuffer(TracingProcessor):
    """Holds each trace's exported spans in memory until the job takes them.

    At most ``max_spans`` spans are held by the process; beyond that new spans are dropped
    and counted against their trace.
    """

    def __init__(self, max_spans: int = 20_000) -> None:
        self.max_spans = max_spans
        self._traces: dict[str, _Buffered] = {}
        self._held = 0
        self._lock = threading.Lock()  # the SDK may call processors from other threads

    def on_trace_start(self, trace: Trace) -> None:
        with self._lock:
            self._traces.setdefault(trace.trace_id, _Buffered())

    def on_trace_end(self, trace: Trace) -> None:
        exported = trace.export()
        with self._lock:
            self._traces.setdefault(trace.trace_id, _Buffered()).trace = exported

    def on_span_start(self, span: Span[Any]) -> None:
        pass

    def on_span_end(self, span: Span[Any]) -> None:
        exported = span.export()
        if exported is None:
            return
        if isinstance(span.span_data, ResponseSpanData):  # its export drops model and messages
            exported["span_data"] = response_span_export(span.span_data)
        with self._lock:
            buffered = self._traces.get(span.trace_id)
            if buffered is None:
                buffered = self._traces[span.trace_id] = _Buffered()
            if self._held >= self.max_spans:
                buffered.dropped += 1
                return
            buffered.spans.append(exported)
            self._held += 1

    def take(self, trace_id: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]], int]:
        """Remove and return (trace, spans, dropped) of one trace."""
        with self._lock:
            buffered = self._traces.pop(trace_id, None)
            if buffered is None:
                return None, [], 0
            self._held -= len(buffered.spans)
            return buffered.trace, buffered.spans, buffered.dropped

    def shutdown(self) -> None:
        with self._lock:
            self._traces.clear()
            self._held = 0

    def force_flush(self) -> None:
        """Nothing waits in the background: the job writes each turn's trace itself."""


class StoredSpanData(SpanData):
    """A kept span's data as stored (redacted): its exported fields, read as attributes too
    (``span_data.name``, ``span_data.data`` of a custom span, ``span_data.input``...)."""

    def __init__(self, exported: dict[str, Any]) -> None:
        self._exported = exported

    @property
    def type(self) -> str:
        return str(self._exported.get("type") or "custom")

    def export(self) -> dict[str, Any]:
        return dict(self._exported)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_exported"][name]
        except KeyError:
            raise AttributeError(name) from None


class _Ended:
    """A trace or span that ended before it was kept: starting or finishing it does nothing."""

    @property
    def tracing_api_key(self) -> str | None:
        return None

    def start(self, mark_as_current: bool = False) -> None:
        pass

    def finish(self, reset_current: bool = False) -> None:
        pass

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        pass


class StoredSpan(_Ended, Span[StoredSpanData]):
    """A kept, redacted span as the SDK's ``Span`` interface, for a team's processor
    (``set_error`` does nothing either)."""

    def __init__(self, exported: dict[str, Any]) -> None:
        self._exported = exported
        self._data = StoredSpanData(dict(exported.get("span_data") or {}))

    @property
    def trace_id(self) -> str:
        return str(self._exported.get("trace_id"))

    @property
    def span_id(self) -> str:
        return str(self._exported.get("id"))

    @property
    def span_data(self) -> StoredSpanData:
        return self._data

    @property
    def parent_id(self) -> str | None:
        return self._exported.get("parent_id")

    @property
    def error(self) -> Any:
        return self._exported.get("error")

    @property
    def started_at(self) -> str | None:
        return self._exported.get("started_at")

    @property
    def ended_at(self) -> str | None:
        return self._exported.get("ended_at")

    def set_error(self, error: Any) -> None:
        pass

    def export(self) -> dict[str, Any]:
        return dict(self._exported)


TRACE_FIELDS = ("object", "id", "workflow_name", "group_id", "metadata")  # the SDK's Trace.export


class StoredTrace(_Ended, Trace):
    """A kept, redacted trace as the SDK's ``Trace`` interface; ``record`` is the whole stored
    trace (with turnfleet's turn fields: turn, attempt, status, ``kept_because``)."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    @property
    def trace_id(self) -> str:
        return str(self.record.get("id"))

    @property
    def name(self) -> str:
        return str(self.record.get("workflow_name"))

    @property
    def group_id(self) -> str | None:
        return self.record.get("group_id")

    @property
    def metadata(self) -> dict[str, Any] | None:
        return self.record.get("metadata")

    def export(self) -> dict[str, Any]:
        return {k: self.record.get(k) for k in TRACE_FIELDS}


def _call(processor: Any, method: str, arg: Any = None, **context: Any) -> None:
    """One call of a team's processor: what it raises is logged, never the turn's failure."""
    try:
        getattr(processor, method)(*(() if arg is None else (arg,)))
    except Exception as exc:  # noqa: BLE001 - a team's exporter must not fail a turn
        log.warning("trace.processor_failed", processor=type(processor).__name__, method=method,
                    error_type=type(exc).__name__, error=str(exc)[:200], **context)


def deliver(processors: Iterable[Any], record: dict[str, Any]) -> None:
    """Hand one kept, redacted record to a team's processors, as the SDK would have."""
    trace = StoredTrace(record["trace"])
    spans = [StoredSpan(s) for s in record["spans"] if isinstance(s, dict)]
    turn_id = record["trace"].get("turn_id")
    for processor in processors:
        _call(processor, "on_trace_start", trace, turn_id=turn_id)
        for span in sorted(spans, key=lambda s: s.started_at or ""):
            _call(processor, "on_span_start", span, turn_id=turn_id)
        for span in spans:  # the order they ended in (the buffer's)
            _call(processor, "on_span_end", span, turn_id=turn_id)
        _call(processor, "on_trace_end", trace, turn_id=turn_id)


@dataclass(frozen=True)
class Kept:
    """An attempt's trace the store keeps: the redacted ``record``, its ``json`` as stored
    (one list item of ``keys.trace``), and why it is kept."""

    record: dict[str, Any]
    json: str
    turn_id: str
    reason: str
    dropped: int  # spans the buffer could not hold
    workflow: str | None = None


# What the SDK itself writes in a trace's or span's export: its ids (``trace_<32 hex>``,
# ``span_<24 hex>``), ISO-8601 timestamps and the object kind. No text of a conversation has
# these shapes, and each id and timestamp is new (the redactor's cache never helps): running
# the detectors over them was most of ``redact_record``'s work (issue 19). A value of these
# keys in any other shape (a team's own span id, say) is redacted like everything else.
SDK_FIELDS = frozenset({"object", "id", "trace_id", "parent_id", "started_at", "ended_at"})
# Each field's own shape (a timestamp is not an id): [0-9], not \d, which is any script's digits.
_SDK_ID = re.compile(r"trace_[0-9a-f]{32}|span_[0-9a-f]{24}")
_SDK_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?(?:[+\-][0-9]{2}:[0-9]{2}|Z)?")
_SDK_SHAPES = {"object": re.compile(r"trace(?:\.span)?"), "id": _SDK_ID, "trace_id": _SDK_ID,
               "parent_id": _SDK_ID, "started_at": _SDK_TIME, "ended_at": _SDK_TIME}
# The same checks, as _redact_fields runs them (12 spans × 7 fields a Support Desk record: the
# loop's dispatch was ~3 µs a span): a key's kind, then its shape's own test.
_OBJECT, _ID, _TIME = 0, 1, 2
_SDK_KIND = {"object": _OBJECT, "id": _ID, "trace_id": _ID, "parent_id": _ID, "started_at": _TIME,
             "ended_at": _TIME}
_SDK_OBJECTS = frozenset({"trace", "trace.span"})  # what _SDK_SHAPES["object"] matches
_id_shape = _SDK_ID.fullmatch
_time_shape = _SDK_TIME.fullmatch


def _redact_fields(item: Mapping[str, Any], redactor: Redactor, ids: set[str] | None = None) -> dict[str, Any]:
    """A trace's or span's fields redacted, the SDK's ids and timestamps passed as they are.

    ``ids``: the SDK ids of one record already matched (every span repeats the trace id, and
    a parent's id is another span's id): looked up, not matched again."""
    if ids is None:
        ids = set()
    kept: dict[str, Any] = {}
    rest: dict[str, Any] | None = None
    for key, value in item.items():
        if type(value) is str:
            kind = _SDK_KIND.get(key) if type(key) is str else None
            if kind == _ID:
                if value in ids or _id_shape(value):
                    ids.add(value)
                    kept[key] = value
                    continue
            elif kind == _TIME:
                if _time_shape(value):
                    kept[key] = value
                    continue
            elif kind == _OBJECT and value in _SDK_OBJECTS:
                kept[key] = value
                continue
        if key == "span_data" and isinstance(value, dict):
            kept[key] = _redact_span_data(value, redactor)
        elif rest is None:
            rest = {key: value}
        else:
            rest[key] = value
    if rest:  # the other fields after the SDK's, as before
        kept.update(redactor.value(rest))
    return kept


def _redact_span_data(data: dict[str, Any], redactor: Redactor) -> dict[str, Any]:
    """A span's data; a tool's input and output are JSON in strings, redacted as JSON."""
    if data.get("type") != "function":
        return redactor.value(data)
    as_json = {key: redactor.json_text(data[key]) for key in ("input", "output")
               if isinstance(data.get(key), str) and not redactor.is_sensitive_field(key)}
    if not as_json:
        return redactor.value(data)
    return {**redactor.value({k: v for k, v in data.items() if k not in as_json}), **as_json}


def redact_record(record: dict[str, Any], redactor: Redactor) -> dict[str, Any]:
    """The record as it may leave the worker: every value redaction covers, redacted (span
    data, metadata, errors, the turn's text and ids...), the SDK's own ids and timestamps
    passed through (``SDK_FIELDS``)."""
    ids: set[str] = set()
    return {"trace": _redact_fields(record["trace"], redactor, ids),
            "spans": [_redact_fields(span, redactor, ids) if isinstance(span, dict) else redactor.value(span)
                      for span in record["spans"]]}


class TraceStore:
    """Writes kept trace records to Redis (and the OTLP sink); counts what it cannot keep."""

    def __init__(
        self,
        buffer: TraceBuffer,
        redis: Redis,
        sampler: TraceSampler,
        redactor: Redactor,
        retention_s: int,
        sink: Any = None,
        processors: Mapping[str, Sequence[Any]] | None = None,
    ) -> None:
        """``processors``: a workflow's name -> the team's own processors of that workflow."""
        self.processors = {name: list(ps) for name, ps in (processors or {}).items() if ps}
        self.buffer = buffer
        self.redis = redis
        self.sampler = sampler
        self.redactor = redactor
        self.retention_s = retention_s
        self.sink = sink

    def prepare(
        self, trace_id: str | None, turn: dict[str, Any], *, failed: bool, duration_ms: float,
        workflow: str | None = None,
    ) -> tuple[Kept | None, int]:
        """Take one attempt's trace from the buffer and decide: (the kept, redacted record ready
        to write, or None; spans dropped so far). Nothing is written: the caller writes
        ``Kept.json`` (with the turn's result, in the finish script: no round trip of its own)
        and then calls :meth:`written`, or calls :meth:`write`."""
        if not trace_id:
            return None, 0
        trace, spans, dropped = self.buffer.take(trace_id)
        if trace is None:
            return None, dropped
        reason = self.sampler.keep_reason(turn["conversation_id"], failed=failed, duration_ms=duration_ms)
        if reason is None:
            return None, dropped
        record = redact_record(
            {"trace": {**trace, **turn, "kept_because": reason}, "spans": spans}, self.redactor
        )
        return Kept(record, fastjson.dumps(record, default=str), turn["turn_id"], reason, dropped, workflow), dropped

    async def finish_attempt(
        self, trace_id: str | None, turn: dict[str, Any], *, failed: bool, duration_ms: float,
        workflow: str | None = None,
    ) -> tuple[str | None, int]:
        """Keep or discard one attempt's trace (of ``workflow``: its processors get it when
        kept), written in a command of its own. Returns (why kept or None, spans dropped)."""
        kept, dropped = self.prepare(trace_id, turn, failed=failed, duration_ms=duration_ms, workflow=workflow)
        if kept is None:
            return None, dropped
        return await self.write(kept)

    async def write(self, kept: Kept) -> tuple[str | None, int]:
        """One command to the trace store, then the OTLP sink and the team's processors."""
        spans = kept.record["spans"]
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.rpush(keys.trace(kept.turn_id), kept.json)
                pipe.expire(keys.trace(kept.turn_id), self.retention_s)
                await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - the turn goes on; the loss is counted
            log.warning("trace.dropped", turn_id=kept.turn_id, spans=len(spans), error=str(exc))
            self._deliver(kept)  # kept, though not stored: the team's processors still get it
            return None, kept.dropped + len(spans)
        self.written(kept)
        return kept.reason, kept.dropped

    def written(self, kept: Kept) -> None:
        """``kept`` is stored: hand it to the OTLP sink and the workflow's own processors."""
        if self.sink is not None:
            try:
                self.sink.export(kept.record)
            except Exception as exc:  # noqa: BLE001 - an exporter must not fail a turn
                log.warning("trace.otlp_export_failed", turn_id=kept.turn_id, error=str(exc))
        self._deliver(kept)

    def _deliver(self, kept: Kept) -> None:
        team = self.processors.get(kept.workflow or "")
        if team:
            deliver(team, kept.record)

    def shutdown_processors(self) -> None:
        """The worker stops: each team processor flushes what it holds, then shuts down."""
        unique = {id(p): p for ps in self.processors.values() for p in ps}
        for processor in unique.values():
            _call(processor, "force_flush")
            _call(processor, "shutdown")
