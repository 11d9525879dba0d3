"""OTLP/protobuf written directly: the bytes of an ``ExportTraceServiceRequest``.

Why not OpenTelemetry's SDK and encoder: the sink used to build a ``ReadableSpan`` per span
and let the OTLP exporter turn each into ``opentelemetry-proto`` messages, attribute by
attribute, then serialize them. For a kept turn (~20 spans, ~270 attributes) that was ~1.4 ms
of CPU a turn, more than all the rest of turnfleet's observability (issue 19, BENCHMARKS §14b).
A kept record is final when it is exported, so each span is written once, as protobuf's wire
format: varints, fixed 64-bit times, length-delimited strings and messages. Attribute keys
repeat (they are the conventions' names) and so do many whole attributes (span kinds,
operation names, providers): their bytes are remembered.

Field numbers are ``opentelemetry/proto/trace/v1/trace.proto`` and ``common/v1/common.proto``
(stable since OTLP 1.0). What this writes is checked by decoding it with
``opentelemetry-proto``'s own messages (tests/test_otlp_wire.py), against what the
OpenTelemetry SDK's encoder sent for the same records.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Span.kind (SpanKind) and Status.code (StatusCode) values.
KIND_INTERNAL, KIND_CLIENT = 1, 3
STATUS_UNSET, STATUS_ERROR = 0, 2
# Span.flags as the OpenTelemetry SDK's encoder writes them for a local span:
# SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK set, IS_REMOTE not.
LOCAL_SPAN_FLAGS = 0x100

_SMALL = [bytes((i,)) for i in range(128)]
_INT64 = 1 << 64
_pack_q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack
_pack_i = struct.Struct("<I").pack


def varint(n: int) -> bytes:
    """``n`` (0 ≤ n < 2**64) as a protobuf varint."""
    if n < 128:
        return _SMALL[n]
    if n < 16384:  # two bytes: most lengths of a span's strings and messages
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n > 127:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or message) with its tag."""
    n = len(payload)
    return tag + (_SMALL[n] if n < 128 else varint(n)) + payload


# -- AnyValue / KeyValue (common.proto) ---------------------------------------------------------


def any_value(value: Any) -> bytes:
    """An ``AnyValue``'s bytes for an attribute value (str, bool, int, float, bytes, or a
    sequence / mapping of those), as the SDK's encoder maps them."""
    kind = type(value)
    if kind is str:
        return field(b"\x0a", value.encode("utf-8"))
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        if -(1 << 63) <= value < (1 << 63):
            return b"\x18" + varint(value % _INT64)
        return field(b"\x0a", str(value).encode())  # beyond int64: its digits, not a failed batch
    if kind is float:
        return b"\x21" + _pack_d(value)
    if kind is list or kind is tuple:
        return field(b"\x2a", b"".join(field(b"\x0a", any_value(v)) for v in value))
    if isinstance(value, str):
        return field(b"\x0a", str(value).encode("utf-8"))
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return any_value(int(value))
    if isinstance(value, float):
        return any_value(float(value))
    if isinstance(value, (bytes, bytearray)):
        return field(b"\x3a", bytes(value))
    if isinstance(value, Mapping):
        return field(b"\x32", b"".join(field(b"\x0a", key_value(str(k), v)) for k, v in value.items()))
    if isinstance(value, Sequence):
        return field(b"\x2a", b"".join(field(b"\x0a", any_value(v)) for v in value))
    raise TypeError(f"not an OTLP attribute value: {kind.__name__}")


_KEYS: dict[str, bytes] = {}  # attribute key -> its KeyValue.key field
_WHOLE: dict[tuple[bytes, str, type, Any], bytes] = {}  # (tag, key, type, short str or bool) -> the field
_WHOLE_MAX_CHARS = 80
_CACHE_ENTRIES = 8192


def _key(key: str) -> bytes:
    done = _KEYS.get(key)
    if done is None:
        if len(_KEYS) >= _CACHE_ENTRIES:
            _KEYS.clear()
        done = _KEYS[key] = field(b"\x0a", key.encode("utf-8"))
    return done


def key_value(key: str, value: Any) -> bytes:
    """A ``KeyValue`` message's bytes."""
    return _key(key) + field(b"\x12", any_value(value))


def attributes(tag: bytes, attrs: Mapping[str, Any], remember: bool = True) -> bytes:
    """Each attribute as a repeated ``KeyValue`` field ``tag``, in the mapping's order.

    The hot path of the export (a turn has hundreds of attributes): short strings, ints and
    bools come whole from a cache; a long string's bytes are copied once, by the join.
    ``remember=False`` for values that do not repeat (a span's own id): written, not cached."""
    out: list[bytes] = []
    append = out.append
    whole_cache = _WHOLE
    for key, value in attrs.items():
        kind = type(value)
        if kind is str:
            if len(value) <= _WHOLE_MAX_CHARS and remember:
                cache_key = (tag, key, kind, value)
                whole = whole_cache.get(cache_key)
                if whole is None:
                    whole = _remember(cache_key, field(tag, key_value(key, value)))
                append(whole)
                continue
            data = value.encode("utf-8")
            n = len(data)
            head = b"\x0a" + (_SMALL[n] if n < 128 else varint(n))
            value_len = len(head) + n
            key_field = _key(key)
            kv_len = len(key_field) + 1 + len(varint(value_len)) + value_len
            append(tag + varint(kv_len) + key_field + b"\x12" + varint(value_len) + head)
            append(data)
        elif (kind is int or kind is bool) and remember:
            cache_key = (tag, key, kind, value)
            whole = whole_cache.get(cache_key)
            if whole is None:
                whole = _remember(cache_key, field(tag, key_value(key, value)))
            append(whole)
        else:
            append(field(tag, key_value(key, value)))
    return b"".join(out)


def string_attribute(tag: bytes, key: str, value: str) -> bytes:
    """One string attribute's field, not cached (``attributes(tag, {key: value}, remember=False)``)."""
    return field(tag, _key(key) + field(b"\x12", field(b"\x0a", value.encode("utf-8"))))


def _remember(cache_key: tuple[bytes, str, type, Any], whole: bytes) -> bytes:
    if len(_WHOLE) >= _CACHE_ENTRIES:
        _WHOLE.clear()
    _WHOLE[cache_key] = whole
    return whole


# -- Span (trace.proto) ---------------------------------------------------------------------------


def status(code: int, message: str | None) -> bytes:
    """``Span.status`` (always present, as the SDK's encoder writes it)."""
    body = (field(b"\x12", message.encode("utf-8")) if message else b"") + (
        b"\x18" + varint(code) if code else b"")
    return field(b"\x7a", body)


def event(name: str, time_ns: int, attrs: Mapping[str, Any]) -> bytes:
    """One ``Span.events`` field."""
    return field(b"\x5a", b"\x09" + _pack_q(time_ns) + field(b"\x12", name.encode("utf-8"))
                 + attributes(b"\x1a", attrs))


SPAN_ATTRIBUTE = b"\x4a"  # Span.attributes' tag, for :func:`attributes`


def span(trace_id: bytes, span_id: bytes, parent_id: bytes | None, name: str, kind: int,
         start_ns: int, end_ns: int, attrs: Mapping[str, Any] | bytes, events: bytes = b"",
         status_field: bytes = b"\x7a\x00") -> bytes:
    """One ``Span`` message's bytes (``trace_id`` 16 bytes, span ids 8; ``attrs`` a mapping or
    already ``attributes(SPAN_ATTRIBUTE, ...)``; ``events`` from :func:`event`,
    ``status_field`` from :func:`status`)."""
    return b"".join((
        b"\x0a\x10", trace_id, b"\x12\x08", span_id,
        b"\x22\x08" + parent_id if parent_id else b"",
        field(b"\x2a", name.encode("utf-8")),
        b"\x30", _SMALL[kind],
        b"\x39", _pack_q(start_ns), b"\x41", _pack_q(end_ns),
        attrs if type(attrs) is bytes else attributes(SPAN_ATTRIBUTE, attrs),
        events,
        status_field,
        b"\x85\x01", _pack_i(LOCAL_SPAN_FLAGS),
    ))


def resource_spans_head(resource: Mapping[str, Any], scope_name: str) -> tuple[bytes, bytes]:
    """The constant parts of a request: ``ResourceSpans.resource``'s field and the
    ``ScopeSpans.scope`` field (written once per sink)."""
    return (field(b"\x0a", attributes(b"\x0a", resource)),
            field(b"\x0a", field(b"\x0a", scope_name.encode("utf-8"))))


def request(head: tuple[bytes, bytes], spans: Iterable[bytes]) -> bytes:
    """An ``ExportTraceServiceRequest``: one resource, one scope, ``spans`` (from :func:`span`)."""
    resource, scope = head
    # One join of the parts (a batch is ~40 turns' spans, ~600 kB): each nesting written as
    # tag + length before its parts, not by copying the parts into it.
    parts: list[bytes] = [b"", b"", resource, b"", scope]
    scope_len = len(scope)
    for s in spans:
        n = len(s)
        head_s = b"\x12" + (_SMALL[n] if n < 128 else varint(n))
        parts += (head_s, s)
        scope_len += len(head_s) + n
    scope_head = b"\x12" + varint(scope_len)
    parts[3] = scope_head
    resource_len = len(resource) + len(scope_head) + scope_len
    parts[0], parts[1] = b"\x0a", varint(resource_len)
    return b"".join(parts)
