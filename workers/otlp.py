"""OtlpSink: a kept turn attempt's trace record, sent to any OpenTelemetry backend over OTLP/HTTP.

The trace store decides per turn attempt whether its spans are kept (sampled, failed or slow)
and redacts them; only then does a record reach ``OtlpSink.export``. Building OpenTelemetry
spans from that finished record, rather than running an OTel tracer beside the SDK's, is what
makes the sampling decision at trace end possible and keeps unredacted data inside the worker.

What a caller may rely on:

* ``export(record)`` does not block on the network and does not raise for a bad collector: it
  writes the record's spans as OTLP protobuf bytes (``otlp_wire``: no OpenTelemetry span
  objects, no encoder; ~20 µs a span) and queues them; one background thread batches and POSTs
  them, retrying as OpenTelemetry's OTLP/HTTP exporter does (up to ``timeout_s`` a batch). A
  full queue drops the record's spans, counted in ``stats().spans_dropped`` and logged once.
* One OTel trace per turn *attempt* (each attempt runs under its own SDK trace). Its trace id
  is the SDK trace id's 32 hex digits (``trace_<hex>`` → ``<hex>``), so a trace found in a
  backend is found in the trace store by the same id. Each SDK span keeps its parent; a ROOT
  span named ``"<workflow> turn"`` spans the attempt and adopts the spans that had no parent
  (or whose parent was not kept). Span ids are stable 64-bit hashes of the SDK span ids
  (``turnfleet.sdk_span_id`` keeps the original); the root's id hashes trace id + attempt.
  The root carries ``turnfleet.attempt`` and ``turnfleet.attempt.final`` (false: the turn
  was retried after it) and the tags ``attempt <n>`` / ``retried`` / ``failed``, so a
  receiver's session view can tell a retried attempt from a turn.
* Attribute names come from the maintained conventions packages: OpenInference
  (``openinference.semconv.trace``, what Arize Phoenix reads) and the OpenTelemetry GenAI
  conventions (``opentelemetry.semconv._incubating.attributes.gen_ai_attributes``), plus
  Langfuse's own few names (constants below, with the link) and ``turnfleet.*``. Sessions,
  on the root span only (``turn_attributes`` says why): ``gen_ai.conversation.id`` /
  ``session.id`` / ``langfuse.session.id`` = the conversation; ``user.id`` /
  ``langfuse.user.id`` = the customer. Token usage and cost (turnfleet's price
  table) are only on model-call spans, so a backend that sums them counts each call once.
* Text follows ``trace_include_sensitive_data`` and the store's redaction: the root carries
  the turn's text and answer (``input.value`` / ``output.value``), model calls their messages
  once, in GenAI's form (capped: ``capped_history``; ``_put_messages`` says why), tools their arguments and results — only when the record has
  them. See ``span_attributes`` and ``root_attributes`` for the full mapping.
* A failed attempt's root and the span that failed have status ERROR with the real cause
  (``InternalServerError: Error code: 500``) and an OTel ``exception`` event.
* ``force_flush`` returns True only when everything queued so far reached the collector;
  call it (or ``shutdown``) when the worker stops, or the last batch is lost.

OpenTelemetry and the conventions packages are the optional extra (``turnfleet[otlp]``); this
module is imported only when an OTLP endpoint is set.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog
from pydantic import ValidationError

from turnfleet.models import TokenUsage
from turnfleet.pricing import PriceTable
from turnfleet.settings import DEFAULT_PRICES, TelemetrySettings
from turnfleet.workers import otlp_wire as wire

if TYPE_CHECKING:
    from turnfleet.settings import WorkerProcessSettings

log = structlog.get_logger(__name__)

OTLP_EXTRA_MISSING = "OTLP export needs the otlp extra: pip install 'turnfleet[otlp]'"

# --------------------------------------------------------------------------------------------
# The conventions: every attribute name a receiver reads comes from here.

try:
    from openinference.semconv.trace import (
        MessageAttributes as MA,
        OpenInferenceMimeTypeValues as Mime,
        OpenInferenceSpanKindValues as Kind,
        SpanAttributes as OI,
        ToolCallAttributes as TC,
    )
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as GA
    from opentelemetry.semconv.attributes import error_attributes as ERR
    from opentelemetry.semconv.attributes import exception_attributes as EXC
except ImportError as exc:  # the module is imported only when an OTLP endpoint is set
    raise ImportError(OTLP_EXTRA_MISSING) from exc

# Langfuse's own names, which no maintained package publishes; see "property mapping" at
# https://langfuse.com/integrations/native/opentelemetry (it also reads session.id, user.id,
# gen_ai.conversation.id, gen_ai.usage.* and input.value / output.value).
LANGFUSE_SESSION_ID = "langfuse.session.id"
LANGFUSE_USER_ID = "langfuse.user.id"
LANGFUSE_TRACE_TAGS = "langfuse.trace.tags"
LANGFUSE_COST_DETAILS = "langfuse.observation.cost_details"  # JSON {"total": usd}
GEN_AI_USAGE_COST = "gen_ai.usage.cost"  # USD; read by Langfuse, not (yet) an OTel name
EXCEPTION_EVENT = "exception"  # the OTel exception event's name (OTel trace API spec)

INSTRUMENTATION_SCOPE = "turnfleet.workers.otlp"
USER_AGENT = "turnfleet-otlp"
GEN_AI_PROVIDER = GA.GenAiProviderNameValues.OPENAI.value  # the API the fleet speaks (OpenAI-compatible)
OFFLINE_PROVIDER = "turnfleet"  # the embedded offline models (turnfleet-offline[-flawed]): no vendor


def provider_of(model: Any) -> str:
    """``gen_ai.provider.name`` of a model call: the provider a LiteLLM name routes to
    (``litellm/anthropic/…`` → ``anthropic``), ``turnfleet`` for the embedded offline models,
    else ``openai`` (the OpenAI-compatible endpoint the fleet calls)."""
    name = str(model or "")
    if name.startswith("litellm/") and name.count("/") >= 2:
        return name.split("/", 2)[1] or GEN_AI_PROVIDER
    if name.startswith("turnfleet-offline"):
        return OFFLINE_PROVIDER
    return GEN_AI_PROVIDER
HANDOFF, GUARDRAIL = "handoff", "guardrail"  # gen_ai.operation.name of spans GenAI has no value for

# Size caps (characters), so an attribute never carries a whole conversation: a turn's text
# and answer on the root, each message's text, and at most MAX_HISTORY messages of a model
# call's input (the system message plus the latest ones; the history repeats in every call).
MAX_VALUE_CHARS = 4_000
MAX_MESSAGE_CHARS = 2_000
MAX_HISTORY = 12

# OpenInference span kinds (Arize Phoenix shows spans by these).
_OPENINFERENCE_KIND = {
    "turn": Kind.CHAIN.value,
    "agent": Kind.AGENT.value,
    "generation": Kind.LLM.value,
    "response": Kind.LLM.value,
    "function": Kind.TOOL.value,
    "handoff": Kind.TOOL.value,
    "guardrail": Kind.GUARDRAIL.value,
}
_MODEL_CALLS = ("generation", "response")
_HEX32 = re.compile(r"[0-9a-fA-F]{32}")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
Pricing = Callable[[str | None, TokenUsage], float | None]


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
# Attributes (pure: no OpenTelemetry SDK needed)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


_SCALARS = frozenset({str, bool, int, float})


def _put(attrs: dict[str, Any], key: str, value: Any) -> None:
    if type(value) in _SCALARS:  # most values: no conversion
        attrs[key] = value
        return
    legal = attribute_value(value)
    if legal is not None:
        attrs[key] = legal


def _put_data(attrs: dict[str, Any], prefix: str, data: Mapping[str, Any] | None) -> None:
    for key, value in (data or {}).items():
        if key != "type":
            _put(attrs, f"{prefix}.{key}", value)


def _put_text(attrs: dict[str, Any], key: str, mime_key: str, value: Any, limit: int) -> None:
    """An OpenInference input/output value: text as text, anything else as JSON; capped."""
    if value is None:
        return
    text, mime = (value, Mime.TEXT) if isinstance(value, str) else (_json(value), Mime.JSON)
    attrs[key] = clip(text, limit)
    attrs[mime_key] = mime.value


def token_usage(usage: Mapping[str, Any]) -> TokenUsage:
    """A span's usage (the SDK's ``model_usage_to_span_usage``) as turnfleet's ``TokenUsage``."""
    details_in = usage.get("input_tokens_details") or {}
    details_out = usage.get("output_tokens_details") or {}
    return TokenUsage(
        requests=int(usage.get("requests") or 1),
        input_tokens=int(usage.get("input_tokens") or 0),
        output_tokens=int(usage.get("output_tokens") or 0),
        cached_tokens=int(details_in.get("cached_tokens") or 0),
        reasoning_tokens=int(details_out.get("reasoning_tokens") or 0),
    )


def _put_usage(attrs: dict[str, Any], usage: Mapping[str, Any] | None, model: str | None,
               pricing: Pricing | None) -> None:
    """A model call's token counts and cost (not remembered by counts: in production they
    differ from call to call, and pricing one is a few microseconds)."""
    if not usage:
        return
    input_tokens, output_tokens = usage.get("input_tokens"), usage.get("output_tokens")
    details_in = usage.get("input_tokens_details") or {}
    details_out = usage.get("output_tokens_details") or {}
    cached, written = details_in.get("cached_tokens"), details_in.get("cache_write_tokens")
    reasoning = details_out.get("reasoning_tokens")
    _put(attrs, GA.GEN_AI_USAGE_INPUT_TOKENS, input_tokens)
    _put(attrs, GA.GEN_AI_USAGE_OUTPUT_TOKENS, output_tokens)
    _put(attrs, GA.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, cached)
    _put(attrs, GA.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS, written)
    _put(attrs, GA.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, reasoning)
    _put(attrs, OI.LLM_TOKEN_COUNT_PROMPT, input_tokens)
    _put(attrs, OI.LLM_TOKEN_COUNT_COMPLETION, output_tokens)
    _put(attrs, OI.LLM_TOKEN_COUNT_PROMPT_DETAILS_CACHE_READ, cached)
    _put(attrs, OI.LLM_TOKEN_COUNT_PROMPT_DETAILS_CACHE_WRITE, written)
    _put(attrs, OI.LLM_TOKEN_COUNT_COMPLETION_DETAILS_REASONING, reasoning)
    total = usage.get("total_tokens")
    if total is None and isinstance(input_tokens, int) and isinstance(output_tokens, int):
        total = input_tokens + output_tokens
    _put(attrs, OI.LLM_TOKEN_COUNT_TOTAL, total)
    cost = pricing(model, token_usage(usage)) if pricing is not None else None
    if cost is not None:  # turnfleet's price table: a model the receiver cannot price is not $0
        attrs[OI.LLM_COST_TOTAL] = cost
        attrs[GEN_AI_USAGE_COST] = cost
        attrs[LANGFUSE_COST_DETAILS] = _json({"total": cost})


# -- model-call messages ---------------------------------------------------------------------


def _content_text(content: Any) -> str | None:
    """A message's text: a string, or the text parts of a Responses / chat content list."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") if isinstance(p, Mapping) else str(p) for p in content]
        return "\n".join(p for p in parts if p) or None
    return _json(content)


def messages(items: Any) -> list[dict[str, Any]]:
    """A generation span's input or output (Responses items or chat messages) as plain
    messages: ``role``, ``content``, ``tool_calls`` [{id, name, arguments}], ``tool_call_id``.
    Consecutive function calls form one assistant message; reasoning items are left out."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for item in items or []:
        if not isinstance(item, Mapping):
            continue
        kind = item.get("type")
        if kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id"), "name": item.get("name"),
                    "arguments": item.get("arguments")}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str) else _json(output)})
        elif "role" in item:
            message: dict[str, Any] = {"role": item["role"], "content": _content_text(item.get("content"))}
            calls = [
                {"id": c.get("id"), "name": (c.get("function") or {}).get("name"),
                 "arguments": (c.get("function") or {}).get("arguments")}
                for c in item.get("tool_calls") or [] if isinstance(c, Mapping)
            ]
            if calls:
                message["tool_calls"] = calls
            if item.get("tool_call_id"):
                message["tool_call_id"] = item["tool_call_id"]
            out.append(message)
    return out


def capped_history(history: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The system message (if first) and the latest messages, MAX_HISTORY in all; each text
    clipped to MAX_MESSAGE_CHARS. Returns (messages, how many were left out)."""
    head = history[:1] if history and history[0].get("role") == "system" else []
    tail = history[len(head):][-(MAX_HISTORY - len(head)):]
    kept = [  # a message is copied only to clip its text (``messages`` made it: never shared)
        {**m, "content": clip(m["content"], MAX_MESSAGE_CHARS)}
        if isinstance(m.get("content"), str) and len(m["content"]) > MAX_MESSAGE_CHARS else m
        for m in head + tail
    ]
    return kept, len(history) - len(kept)


def _put_messages(attrs: dict[str, Any], genai_key: str, history: list[dict[str, Any]],
                  output: bool = False) -> None:
    """GenAI's JSON parts (``gen_ai.input.messages`` / ``.output.messages``): one attribute.

    The messages go in one form only: the OTel GenAI one, which GenAI-aware receivers
    (Langfuse, Logfire, Datadog, ...) read and Arize Phoenix turns into its own
    ``llm.*_messages`` on ingestion (``phoenix.trace.gen_ai.conversion``). OpenInference's
    flattened copy is ``openinference_messages`` (``_put_openinference_messages``), off by
    default: the history is most of a turn's bytes, and it was sent twice. An output message
    has the ``finish_reason`` GenAI requires (``tool_call`` when it calls tools, else ``stop``;
    the record keeps no other): without it Phoenix's conversion refuses the whole list.
    """
    if history:
        # The list's JSON is its messages' JSON joined as json.dumps joins a list's items: each
        # distinct message is encoded once (a call's input repeats the earlier calls' messages
        # and the agents' instructions; a conversation's later turns repeat its history).
        attrs[genai_key] = "[" + ", ".join([_message_json(message, output) for message in history]) + "]"


_MESSAGE_JSON: dict[tuple[Any, ...], str] = {}  # (output, the message's fields) -> its GenAI part's JSON
_MESSAGE_JSON_ENTRIES = 4096


def _message_json(message: Mapping[str, Any], output: bool) -> str:
    calls = message.get("tool_calls")
    try:
        key = (output, message["role"], message.get("content"), message.get("tool_call_id"),
               tuple(tuple(call.items()) for call in calls) if calls else None)
        done = _MESSAGE_JSON.get(key)
    except TypeError:  # an unhashable value (not what ``messages`` makes): encoded, not remembered
        return _json(_genai_message(message, output))
    if done is None:
        if len(_MESSAGE_JSON) >= _MESSAGE_JSON_ENTRIES:
            _MESSAGE_JSON.clear()
        done = _MESSAGE_JSON[key] = _json(_genai_message(message, output))
    return done


def _genai_message(message: Mapping[str, Any], output: bool) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    if message.get("tool_call_id"):
        parts.append({"type": "tool_call_response", "id": message["tool_call_id"],
                      "response": message.get("content")})
    elif message.get("content") is not None:
        parts.append({"type": "text", "content": message["content"]})
    for call in message.get("tool_calls") or []:
        parts.append({"type": "tool_call", **call})
    part = {"role": message["role"], "parts": parts}
    if output:
        part["finish_reason"] = "tool_call" if message.get("tool_calls") else "stop"
    return part


def _put_openinference_messages(attrs: dict[str, Any], oi_key: str, history: list[dict[str, Any]]) -> None:
    """OpenInference's flattened ``llm.*_messages.<i>.message.*`` (for a receiver that reads
    only those and does not convert GenAI's: ``OtlpSink(openinference_messages=True)``)."""
    for i, message in enumerate(history):
        prefix = f"{oi_key}.{i}."
        attrs[prefix + MA.MESSAGE_ROLE] = message["role"]
        _put(attrs, prefix + MA.MESSAGE_CONTENT, message.get("content"))
        _put(attrs, prefix + MA.MESSAGE_TOOL_CALL_ID, message.get("tool_call_id"))
        for j, call in enumerate(message.get("tool_calls") or []):
            call_prefix = f"{prefix}{MA.MESSAGE_TOOL_CALLS}.{j}."
            _put(attrs, call_prefix + TC.TOOL_CALL_ID, call.get("id"))
            _put(attrs, call_prefix + TC.TOOL_CALL_FUNCTION_NAME, call.get("name"))
            _put(attrs, call_prefix + TC.TOOL_CALL_FUNCTION_ARGUMENTS_JSON, call.get("arguments"))


def decision_text(output: list[dict[str, Any]]) -> str | None:
    """What a model call decided, readably: its answer, else the calls it made."""
    texts = [m["content"] for m in output if m.get("content")]
    if texts:
        return "\n".join(texts)
    calls = [c for m in output for c in m.get("tool_calls") or []]
    return "; ".join(f"{c.get('name')}({c.get('arguments') or ''})" for c in calls) or None


def _put_generation_io(attrs: dict[str, Any], span_data: Mapping[str, Any],
                       openinference_messages: bool = False) -> None:
    if span_data.get("input") is not None:
        history, left_out = capped_history(messages(span_data["input"]))
        _put_messages(attrs, GA.GEN_AI_INPUT_MESSAGES, history)
        if openinference_messages:
            _put_openinference_messages(attrs, OI.LLM_INPUT_MESSAGES, history)
        if left_out:
            attrs["turnfleet.input_messages.left_out"] = left_out
        if history:
            _put_text(attrs, OI.INPUT_VALUE, OI.INPUT_MIME_TYPE, history[-1].get("content"),
                      MAX_MESSAGE_CHARS)
    if span_data.get("output") is not None:
        output, _ = capped_history(messages(span_data["output"]))
        _put_messages(attrs, GA.GEN_AI_OUTPUT_MESSAGES, output, output=True)
        if openinference_messages:
            _put_openinference_messages(attrs, OI.LLM_OUTPUT_MESSAGES, output)
        _put_text(attrs, OI.OUTPUT_VALUE, OI.OUTPUT_MIME_TYPE, decision_text(output), MAX_VALUE_CHARS)


# -- per span --------------------------------------------------------------------------------


def turn_attributes(trace: Mapping[str, Any]) -> dict[str, Any]:
    """The turn-wide attributes: the conversation, the customer, the turn attempt. On the
    attempt's root span only (``root_attributes``): the receivers read them per trace, from
    its root — Phoenix attaches a trace to a session from any one span's ``session.id`` and
    takes a session's user from its earliest span with ``user.id`` (the root starts first);
    Langfuse sets a trace's session, user and tags from its root span (``isRootSpan`` in its
    ``OtelIngestionProcessor``; other spans only send redundant trace updates). Copied onto
    every span they were ~170 of a turn's ~370 attributes."""
    metadata = trace.get("metadata") or {}
    attrs: dict[str, Any] = {}
    group_id = trace.get("group_id") or trace.get("conversation_id")
    for key in (GA.GEN_AI_CONVERSATION_ID, OI.SESSION_ID, LANGFUSE_SESSION_ID):
        _put(attrs, key, group_id)
    customer = trace.get("customer_id") or metadata.get("customer_id")
    for key in (OI.USER_ID, LANGFUSE_USER_ID):
        _put(attrs, key, customer)
    _put(attrs, "turnfleet.turn_id", trace.get("turn_id") or metadata.get("turn_id"))
    attempt = trace.get("attempt", metadata.get("attempt"))
    _put(attrs, "turnfleet.attempt", int(attempt) if attempt is not None else None)
    _put(attrs, "turnfleet.attempt.final", trace.get("final"))
    _put(attrs, "turnfleet.kept_because", trace.get("kept_because"))
    return attrs


def span_attributes(span_data: Mapping[str, Any], pricing: Pricing | None = None,
                    tool_call_id: str | None = None,
                    openinference_messages: bool = False) -> tuple[str, str, dict[str, Any]]:
    """``(span name, SDK span type, attributes)`` for one exported SDK ``span_data``.

    ========== ======================== =================================================
    SDK type   name                     attributes (GenAI ``GA``, OpenInference ``OI``)
    ========== ======================== =================================================
    agent      ``invoke_agent <agent>`` GA/OI agent name, turnfleet.agent.tools /
                                        .handoffs / .output_type
    generation ``chat <model>``         GA request model, response model (only once a
                                        response came), temperature, top_p, max_tokens;
                                        OI llm.model_name / .provider; usage
                                        (GA gen_ai.usage.* incl. cache read/creation and
                                        reasoning, OI llm.token_count.*); cost from the
                                        price table (OI llm.cost.total, gen_ai.usage.cost,
                                        Langfuse cost details); if recorded: messages
                                        (GA gen_ai.input.messages / .output.messages,
                                        capped: ``capped_history``; OI llm.input_messages
                                        / llm.output_messages only when asked:
                                        ``_put_messages``), OI input.value (the last input
                                        message), output.value (the answer, else the calls)
    response   ``chat <model>``         the same as generation, plus GA response id (the
                                        trace buffer keeps the Response's model, config,
                                        instructions + input, output: ``response_span``;
                                        without sensitive data the SDK keeps no Response:
                                        then only the id and usage, no model, no cost)
    function   ``execute_tool <tool>``  GA tool name / type / call id (matched from the
                                        model's calls) / call arguments / result, OI
                                        tool.name, input.value / output.value (if recorded)
    handoff    ``handoff <from> → <to>``turnfleet.handoff.from_agent / .to_agent, GA/OI
                                        tool name ``transfer_to_<to>``
    guardrail  ``guardrail <name>``     turnfleet.guardrail.name / .triggered, OI
                                        output.value
    custom     ``<name>`` (SDK task:    turnfleet.custom.<key> per data key (dicts as
               ``task <workflow>``,     JSON); turn: GA agent name
               turn: ``turn <n>
               <agent>``)
    other      ``<type>``               turnfleet.<type>.<key>
    ========== ======================== =================================================

    GA ``gen_ai.operation.name`` is invoke_agent / chat / execute_tool, or handoff /
    guardrail / the custom span's name / the type; every span also gets
    ``gen_ai.provider.name`` and OI's span kind, a model call the deprecated ``gen_ai.system`` too.
    """
    kind = str(span_data.get("type") or "custom")
    attrs: dict[str, Any] = {}
    Op = GA.GenAiOperationNameValues
    if kind == "agent":
        agent = span_data.get("name") or "agent"
        name, operation = f"invoke_agent {agent}", Op.INVOKE_AGENT.value
        _put(attrs, GA.GEN_AI_AGENT_NAME, agent)
        _put(attrs, OI.AGENT_NAME, agent)
        _put(attrs, "turnfleet.agent.tools", span_data.get("tools"))
        _put(attrs, "turnfleet.agent.handoffs", span_data.get("handoffs"))
        _put(attrs, "turnfleet.agent.output_type", span_data.get("output_type"))
    elif kind in _MODEL_CALLS:  # a Responses call's span as the trace buffer keeps it (response_span)
        model = span_data.get("model")
        name, operation = (f"chat {model}" if model else "chat"), Op.CHAT.value
        _put(attrs, GA.GEN_AI_RESPONSE_ID, span_data.get("response_id"))
        _put_model_config(attrs, span_data)
        _put_usage(attrs, span_data.get("usage"), model, pricing)
        _put_generation_io(attrs, span_data, openinference_messages)
    elif kind == "function":
        tool = span_data.get("name") or "tool"
        name, operation = f"execute_tool {tool}", Op.EXECUTE_TOOL.value
        _put(attrs, GA.GEN_AI_TOOL_NAME, tool)
        _put(attrs, OI.TOOL_NAME, tool)
        _put(attrs, GA.GEN_AI_TOOL_TYPE, "function")
        _put(attrs, GA.GEN_AI_TOOL_CALL_ID, tool_call_id)
        _put(attrs, GA.GEN_AI_TOOL_CALL_ARGUMENTS, span_data.get("input"))
        _put(attrs, GA.GEN_AI_TOOL_CALL_RESULT, span_data.get("output"))
        _put_text(attrs, OI.INPUT_VALUE, OI.INPUT_MIME_TYPE, span_data.get("input"), MAX_VALUE_CHARS)
        _put_text(attrs, OI.OUTPUT_VALUE, OI.OUTPUT_MIME_TYPE, span_data.get("output"), MAX_VALUE_CHARS)
        _put(attrs, "turnfleet.tool.mcp_data", span_data.get("mcp_data"))
    elif kind == "handoff":
        source, target = span_data.get("from_agent"), span_data.get("to_agent")
        name, operation = f"handoff {source or '?'} → {target or '?'}", HANDOFF
        _put(attrs, "turnfleet.handoff.from_agent", source)
        _put(attrs, "turnfleet.handoff.to_agent", target)
        if target:
            _put(attrs, GA.GEN_AI_TOOL_NAME, f"transfer_to_{target}")
            _put(attrs, OI.TOOL_NAME, f"transfer_to_{target}")
    elif kind == "guardrail":
        guardrail = span_data.get("name") or "guardrail"
        name, operation = f"guardrail {guardrail}", GUARDRAIL
        _put(attrs, "turnfleet.guardrail.name", guardrail)
        _put(attrs, "turnfleet.guardrail.triggered", span_data.get("triggered"))
        _put_text(attrs, OI.OUTPUT_VALUE, OI.OUTPUT_MIME_TYPE,
                  {"triggered": bool(span_data.get("triggered"))}, MAX_VALUE_CHARS)
    elif kind == "custom":
        operation = str(span_data.get("name") or "custom")
        data = span_data.get("data") or {}
        sdk_kind = data.get("sdk_span_type")
        if sdk_kind == "task" and data.get("name"):
            name = f"task {data['name']}"
        elif sdk_kind == "turn":
            name = f"turn {data.get('turn', '?')} {data.get('agent_name', '')}".rstrip()
            _put(attrs, GA.GEN_AI_AGENT_NAME, data.get("agent_name"))
        else:
            name = operation
        _put_data(attrs, "turnfleet.custom", data)
    else:
        label = span_data.get("name") or span_data.get("model")
        name, operation = (f"{kind} {label}" if label else kind), kind
        _put_data(attrs, f"turnfleet.{kind}", span_data)
    _put_kind(attrs, kind, operation, span_data.get("model"))
    return name, kind, attrs


def _put_model_config(attrs: dict[str, Any], span_data: Mapping[str, Any]) -> None:
    """A model call's model and settings (the same for every call of one model and config)."""
    model = span_data.get("model")
    _put(attrs, GA.GEN_AI_REQUEST_MODEL, model)
    # The model that answered, only once an answer came (the SDK records usage for every
    # answer): Phoenix shows gen_ai.response.* as the output of a span that has none.
    if span_data.get("usage") or span_data.get("output"):
        _put(attrs, GA.GEN_AI_RESPONSE_MODEL, model)
    _put(attrs, OI.LLM_MODEL_NAME, model)
    _put(attrs, OI.LLM_PROVIDER, provider_of(model))
    config = {k: v for k, v in (span_data.get("model_config") or {}).items() if v is not None}
    _put(attrs, GA.GEN_AI_REQUEST_TEMPERATURE, config.get("temperature"))
    _put(attrs, GA.GEN_AI_REQUEST_TOP_P, config.get("top_p"))
    _put(attrs, GA.GEN_AI_REQUEST_MAX_TOKENS, config.get("max_tokens"))
    _put(attrs, OI.LLM_INVOCATION_PARAMETERS, config or None)


def _put_kind(attrs: dict[str, Any], kind: str, operation: str, model: Any) -> None:
    """Every span's last attributes: the operation, the provider, the OpenInference kind."""
    attrs[GA.GEN_AI_OPERATION_NAME] = operation
    if kind in _MODEL_CALLS:
        provider = provider_of(model)
        attrs[GA.GEN_AI_SYSTEM] = provider  # deprecated name, still read by older receivers for model calls
    else:
        provider = GEN_AI_PROVIDER
    attrs[GA.GEN_AI_PROVIDER_NAME] = provider
    attrs[OI.OPENINFERENCE_SPAN_KIND] = _OPENINFERENCE_KIND.get(kind, Kind.CHAIN.value)


def root_attributes(trace: Mapping[str, Any]) -> dict[str, Any]:
    """The attempt's root span: the workflow, the turn's text and answer (when recorded:
    ``trace_include_sensitive_data``; redacted by the store; capped at MAX_VALUE_CHARS), the
    attempt's marks (``turnfleet.attempt``, ``turnfleet.attempt.final``, a ``retried`` tag on
    an attempt that was not the turn's last)."""
    attrs = turn_attributes(trace)
    workflow = str(trace.get("workflow_name") or "Agent workflow")
    attrs[GA.GEN_AI_OPERATION_NAME] = GA.GenAiOperationNameValues.INVOKE_WORKFLOW.value
    attrs[GA.GEN_AI_WORKFLOW_NAME] = workflow
    attrs[GA.GEN_AI_PROVIDER_NAME] = GEN_AI_PROVIDER
    attrs[OI.OPENINFERENCE_SPAN_KIND] = Kind.CHAIN.value
    _put_text(attrs, OI.INPUT_VALUE, OI.INPUT_MIME_TYPE, trace.get("input"), MAX_VALUE_CHARS)
    _put_text(attrs, OI.OUTPUT_VALUE, OI.OUTPUT_MIME_TYPE, trace.get("output"), MAX_VALUE_CHARS)
    attempt = trace.get("attempt") or (trace.get("metadata") or {}).get("attempt")
    tags = [f"attempt {attempt}"] if attempt is not None else []
    if trace.get("final") is False:
        tags.append("retried")
    if trace.get("status") == "failed":
        tags.append("failed")
    if tags:
        attrs[OI.TAG_TAGS] = tags
        attrs[LANGFUSE_TRACE_TAGS] = tags
    _put(attrs, "turnfleet.sdk_trace_id", trace.get("id"))
    _put(attrs, "turnfleet.status", trace.get("status"))
    _put_data(attrs, "turnfleet.metadata", trace.get("metadata"))
    return attrs


def error_description(error: Any) -> str:
    """``"<type>: <message>"`` (the failure's real cause) for a record's or a span's error."""
    if isinstance(error, Mapping):
        kind, message = error.get("type") or error.get("error_type"), error.get("message")
        data = error.get("data")
        # The SDK's span errors say "Error running tool"; the cause is in data["error"].
        if isinstance(data, Mapping) and isinstance(data.get("error"), str) and data["error"] != message:
            message = f"{message}: {data['error']}" if message else data["error"]
        return ": ".join(str(part) for part in (kind, message) if part) or "error"
    return str(error)


def exception_event(error: Any) -> dict[str, Any]:
    """The OTel exception event's attributes for an error (type, message)."""
    if isinstance(error, Mapping):
        kind = error.get("type") or error.get("error_type") or "Error"
        message = error_description({**error, "type": None})
    else:
        kind, message = "Error", str(error)
    return {EXC.EXCEPTION_TYPE: str(kind), EXC.EXCEPTION_MESSAGE: message}


def tool_call_ids(sdk_spans: list[Mapping[str, Any]]) -> dict[str, str]:
    """SDK function span id -> the model's call id, matched by tool name and arguments in
    the order the calls were made (only when model outputs were recorded)."""
    tools = [sdk for sdk in sdk_spans if (sdk.get("span_data") or {}).get("type") == "function"]
    if not tools:
        return {}  # no tool ran: nothing to match
    pending: dict[tuple[Any, Any], list[str]] = {}
    for sdk in sdk_spans:
        data = sdk.get("span_data") or {}
        if data.get("type") in _MODEL_CALLS:
            for call_id, name, arguments in _calls_in(data.get("output")):
                if call_id:
                    pending.setdefault((name, arguments), []).append(call_id)
    out: dict[str, str] = {}
    for sdk in sorted(tools, key=lambda s: s.get("started_at") or ""):
        data = sdk["span_data"]
        ids = pending.get((data.get("name"), data.get("input")))
        if ids:
            out[str(sdk["id"])] = ids.pop(0)
    return out


def _calls_in(items: Any) -> list[tuple[Any, Any, Any]]:
    """(id, name, arguments) of the tool calls in a model call's output, as :func:`messages`
    reads them (without building the messages)."""
    if isinstance(items, str):
        return []
    out = []
    for item in items or []:
        if not isinstance(item, Mapping):
            continue
        kind = item.get("type")
        if kind == "function_call":
            out.append((item.get("call_id") or item.get("id"), item.get("name"), item.get("arguments")))
        elif kind != "function_call_output" and "role" in item:
            for c in item.get("tool_calls") or []:
                if isinstance(c, Mapping):
                    out.append((c.get("id"), (c.get("function") or {}).get("name"),
                                (c.get("function") or {}).get("arguments")))
    return out


# --------------------------------------------------------------------------------------------
# The sink: records → OTLP bytes (otlp_wire) → one background thread that POSTs them

_otel: SimpleNamespace | None = None


def _load_otel() -> SimpleNamespace:
    """The OpenTelemetry SDK's ``Resource`` (the resource's attributes as every OTel SDK makes
    them: ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME``, ``telemetry.sdk.*``), on first need."""
    global _otel
    if _otel is None:
        try:
            from opentelemetry.sdk.resources import Resource
        except ImportError as exc:
            raise ImportError(OTLP_EXTRA_MISSING) from exc
        _otel = SimpleNamespace(Resource=Resource)
    return _otel


DESCRIBED_ENTRIES = 4096
_ZERO_ID, _ONE_ID = bytes(8), (1).to_bytes(8, "big")
_NO_NAMES: frozenset[str] = frozenset()
_UNSET = wire.status(wire.STATUS_UNSET, None)  # the status of a span that did not fail
_DICT = object()  # marks a frozen dict (a list of pairs is not the same value)
_SELF_FROZEN = frozenset({str, int, type(None)})  # the types _frozen returns as they are


def _frozen(value: Any) -> Any:
    """A hashable form of a JSON value, equal only for equal values of the same types (1, 1.0
    and True differ); TypeError for anything else."""
    kind = type(value)
    if kind is str or kind is int or value is None:
        return value
    if kind is dict:
        # Most are flat (a model's settings: ~20 entries, mostly None): the same tuple, built in C.
        if _SELF_FROZEN.issuperset(map(type, value.values())):
            return (_DICT, *value.items())
        return (_DICT, *[(k, _frozen(v)) for k, v in value.items()])
    if kind is list:
        if _SELF_FROZEN.issuperset(map(type, value)):
            return tuple(value)
        return tuple([_frozen(v) for v in value])
    if kind is bool or kind is float:
        return (kind, value)
    raise TypeError(kind.__name__)


def _span_id(sdk_span_id: str) -> bytes:
    """:func:`otel_span_id` as the 8 bytes on the wire (the digest's first 8: the same number)."""
    head = hashlib.sha256(sdk_span_id.encode("utf-8")).digest()[:8]
    return head if head != _ZERO_ID else _ONE_ID


@dataclass(frozen=True)
class OtlpStats:
    """Counters since the sink was made (for logs and /metrics)."""

    records: int
    records_dropped: int  # malformed: could not be converted
    spans_queued: int
    spans_exported: int
    spans_failed: int  # their batch failed (after retries)
    spans_dropped: int = 0  # the queue was full: never sent


RETRYABLE_STATUS = frozenset({429, 502, 503, 504})  # as OpenTelemetry's OTLP/HTTP exporter
MAX_ATTEMPTS = 6  # a batch's POSTs at most (backoff 1, 2, 4, ... s ± 20 %, within timeout_s)
DEFAULT_MAX_QUEUE_SPANS = 2048  # OpenTelemetry's BatchSpanProcessor defaults
DEFAULT_BATCH_SPANS = 512
DEFAULT_SCHEDULE_DELAY_MS = 5000.0


class _Post:
    """POSTs bodies to one OTLP/HTTP endpoint over a kept-alive connection (http.client)."""

    def __init__(self, endpoint: str, headers: Mapping[str, str], timeout_s: float) -> None:
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"OTLP endpoint must be an http(s) URL: {endpoint!r}")
        self._https = url.scheme == "https"
        self._host, self._port = url.hostname, url.port
        self._path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._headers = {"Content-Type": "application/x-protobuf", "User-Agent": USER_AGENT, **headers}
        self._timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=timeout)
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def once(self, body: bytes, timeout: float) -> tuple[int | None, str | None]:
        """One POST: (HTTP status, None) or (None, the connection error)."""
        try:
            conn = self._connection(timeout)
            conn.request("POST", self._path, body, self._headers)
            answer = conn.getresponse()
            answer.read()
            if answer.will_close:
                self.close()
            return answer.status, None
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            return None, f"{type(exc).__name__}: {exc}"

    def send(self, body: bytes, stopping: threading.Event) -> tuple[bool, str]:
        """POST ``body`` until it is taken, refused for good, or ``timeout_s`` ran out.

        As OpenTelemetry's exporter: a connection error is retried at once (a stale kept-alive
        connection), then connection errors and 429/502/503/504 with backoff; other statuses
        are final."""
        deadline = time.monotonic() + self._timeout_s
        why = ""
        for attempt in range(MAX_ATTEMPTS):
            status, error = self.once(body, max(deadline - time.monotonic(), 0.001))
            if error is not None and deadline > time.monotonic():
                status, error = self.once(body, max(deadline - time.monotonic(), 0.001))
            if status is not None and 200 <= status < 400:
                return True, ""
            why = error or f"HTTP {status}"
            if status is not None and status not in RETRYABLE_STATUS:
                return False, why
            backoff = 2**attempt * random.uniform(0.8, 1.2)
            if attempt + 1 == MAX_ATTEMPTS or backoff > deadline - time.monotonic() or stopping.wait(backoff):
                return False, why
        return False, why

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class OtlpSink:
    """Sends kept trace records to an OTLP/HTTP traces endpoint (see the module docstring).

    ``endpoint`` is the full traces URL (``http://collector:4318/v1/traces``); ``headers`` go
    with every request (auth for Langfuse, Honeycomb, ...). ``timeout_s`` bounds one batch's
    export, retries included. ``max_queue_size`` spans wait for the sender at most; a record
    that does not fit is dropped and counted (``spans_dropped``). A batch leaves when it holds
    ``max_batch_spans`` spans or ``schedule_delay_ms`` after the previous one, or at a flush.
    ``pricing(model, usage)`` is a model call's cost in USD (None: unknown), sent as the call's
    cost attributes. ``openinference_messages`` adds OpenInference's flattened copy of each
    model call's messages (``llm.input_messages.*``) beside GenAI's, for a receiver that reads
    only those.

    ``export`` converts the record to OTLP protobuf in the caller (``otlp_wire``: no
    OpenTelemetry span objects, no encoder) and queues the bytes; one background thread batches
    and POSTs them.
    """

    def __init__(
        self,
        endpoint: str,
        headers: Mapping[str, str] | None = None,
        service_name: str = "turnfleet-worker",
        *,
        timeout_s: float = 10.0,
        resource_attributes: Mapping[str, Any] | None = None,
        max_queue_size: int | None = None,
        max_batch_spans: int | None = None,
        schedule_delay_ms: float | None = None,
        pricing: Pricing | None = None,
        openinference_messages: bool = False,
    ) -> None:
        otel = _load_otel()
        self._pricing = pricing
        self._openinference_messages = openinference_messages
        self._described_cache: dict[tuple[Any, ...], tuple[str, str, bytes, frozenset[str]]] = {}
        self._model_parts: dict[tuple[Any, ...], tuple[str, bytes, bytes]] = {}
        self.endpoint = endpoint
        self._post = _Post(endpoint, dict(headers or {}), timeout_s)
        resource = otel.Resource.create({**dict(resource_attributes or {}), "service.name": service_name})
        self._head = wire.resource_spans_head(dict(resource.attributes), INSTRUMENTATION_SCOPE)
        self._max_queue = max_queue_size or DEFAULT_MAX_QUEUE_SPANS
        self._batch_spans = max_batch_spans or DEFAULT_BATCH_SPANS
        self._delay_s = (schedule_delay_ms if schedule_delay_ms is not None else DEFAULT_SCHEDULE_DELAY_MS) / 1000
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[list[bytes]] = deque()  # each record's encoded spans
        self._queued_spans = 0
        self._enqueued = 0  # records put in the queue, ever
        self._handled = 0  # of those, sent or failed
        self._flush_to = 0  # the sender sends at once until _handled reaches this
        self._records = 0
        self._records_dropped = 0
        self._spans_queued = 0
        self._spans_exported = 0
        self._spans_failed = 0
        self._spans_dropped = 0
        self._failed_batches = 0
        self._failures_reported = 0
        self._full_logged = False
        self._closed = False
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="turnfleet-otlp", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: WorkerProcessSettings) -> OtlpSink | None:
        """The sink the worker's settings ask for, or None when no endpoint is set."""
        if not settings.otlp_endpoint:
            return None
        extra = {"service.instance.id": settings.worker_name} if settings.worker_name else None
        # The fleet's price table (TURNFLEET_PRICES over the defaults), as telemetry prices calls.
        try:
            custom = TelemetrySettings().prices
        except ValidationError as exc:  # telemetry's settings are refused by telemetry itself
            log.warning("otlp.prices_unreadable", error=str(exc)[:200])
            custom = {}
        prices = PriceTable({**DEFAULT_PRICES, **custom})
        return cls(settings.otlp_endpoint, settings.otlp_headers, resource_attributes=extra,
                   pricing=prices.cost_usd)

    # ----------------------------------------------------------------------------------------

    def export(self, record: Mapping[str, Any]) -> None:
        """Queue one record's spans for export; returns at once, never raises for the network.

        A malformed record is logged and dropped (telemetry must not fail a turn).
        """
        if self._closed:
            log.warning("otlp.export_after_shutdown", endpoint=self.endpoint)
            return
        try:
            spans = self.encode_spans(record)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            trace = record.get("trace") if isinstance(record, Mapping) else None
            trace_id = trace.get("id") if isinstance(trace, Mapping) else None
            log.warning("otlp.record_dropped", trace_id=trace_id, error=repr(exc))
            with self._lock:
                self._records_dropped += 1
            return
        with self._wake:
            self._records += 1
            if self._queued_spans + len(spans) > self._max_queue:
                self._spans_dropped += len(spans)
                if not self._full_logged:
                    self._full_logged = True
                    log.warning("otlp.queue_full", endpoint=self.endpoint, max_queue_size=self._max_queue)
                return
            self._queue.append(spans)
            self._queued_spans += len(spans)
            self._spans_queued += len(spans)
            self._enqueued += 1
            if self._queued_spans >= self._batch_spans:
                self._wake.notify()

    def encode(self, records: Iterable[Mapping[str, Any]]) -> bytes:
        """The ``ExportTraceServiceRequest`` body for ``records`` (what one batch POSTs)."""
        return wire.request(self._head, [s for record in records for s in self.encode_spans(record)])

    def encode_spans(self, record: Mapping[str, Any]) -> list[bytes]:
        """The record's spans as OTLP ``Span`` messages (bytes), the turn's root span first."""
        trace = record["trace"]
        sdk_spans: list[Mapping[str, Any]] = list(record.get("spans") or [])
        sdk_trace_id = str(trace["id"])
        trace_id = otel_trace_id(sdk_trace_id).to_bytes(16, "big")
        attempt = int(trace.get("attempt") or (trace.get("metadata") or {}).get("attempt") or 1)

        times: list[tuple[int | None, int | None]] = [
            (iso_to_ns(s["started_at"]) if s.get("started_at") else None,
             iso_to_ns(s["ended_at"]) if s.get("ended_at") else None) for s in sdk_spans]
        starts = [start for start, _ in times if start is not None]
        ends = [end for _, end in times if end is not None]
        if trace.get("started_at"):
            starts.append(iso_to_ns(trace["started_at"]))
        if trace.get("ended_at"):
            ends.append(iso_to_ns(trace["ended_at"]))
        if not starts:
            raise ValueError("a trace record needs started_at or timed spans")
        root_start = min(starts)
        root_end = max([*ends, root_start])

        root_id = _span_id(f"{sdk_trace_id}#turn-attempt-{attempt}")  # turn_span_id's bytes
        workflow = str(trace.get("workflow_name") or "Agent workflow")
        root_attrs = root_attributes(trace)
        root_events, root_status = b"", _UNSET
        if trace.get("status") == "failed":
            error = trace.get("error") or "turn failed"
            root_events, root_status = _failure(error, root_end)
            if isinstance(error, Mapping) and error.get("type"):
                root_attrs[ERR.ERROR_TYPE] = str(error["type"])
        out = [wire.span(trace_id, root_id, None, f"{workflow} turn", wire.KIND_INTERNAL,
                         root_start, root_end, root_attrs, root_events, root_status)]

        ids = {str(s["id"]): _span_id(str(s["id"])) for s in sdk_spans}
        call_ids = tool_call_ids(sdk_spans)
        for sdk, (start, end) in zip(sdk_spans, times):
            sdk_id, sdk_parent = str(sdk["id"]), sdk.get("parent_id")
            data, call_id = sdk.get("span_data") or {}, call_ids.get(sdk_id)
            name, kind, attr_bytes, attr_keys = self._described(data, call_id)
            # The span's own attributes, after what its data says (in this order).
            own: dict[str, Any] = {"turnfleet.sdk_span_id": sdk_id}
            metadata = sdk.get("metadata")
            if metadata is not None:
                _put(own, "turnfleet.span_metadata", metadata)
            parent_id = ids.get(str(sdk_parent)) if sdk_parent is not None else None
            if parent_id is None:  # adopted by the root: the SDK parent it had (not kept) is said here only
                parent_id = root_id
                _put(own, "turnfleet.sdk_parent_id", sdk_parent)
            start = root_start if start is None else start
            end = start if end is None else max(start, end)
            error = sdk.get("error")
            events, span_status = b"", _UNSET
            if error:
                events, span_status = _failure(error, end)
                if isinstance(error, Mapping):
                    _put(own, "turnfleet.error.data", error.get("data"))
            if len(own) == 1 and "turnfleet.sdk_span_id" not in attr_keys:  # the usual: its id only
                attr_bytes += wire.string_attribute(wire.SPAN_ATTRIBUTE, "turnfleet.sdk_span_id", sdk_id)
            elif attr_keys.isdisjoint(own):
                attr_bytes += wire.attributes(wire.SPAN_ATTRIBUTE, own, remember=False)
            else:  # a data attribute of the same name: one mapping, as the names collide in it
                attrs = span_attributes(data, self._pricing, call_id, self._openinference_messages)[2]
                attrs.update(own)
                attr_bytes = wire.attributes(wire.SPAN_ATTRIBUTE, attrs)
            out.append(wire.span(trace_id, ids[sdk_id], parent_id, name,
                                 wire.KIND_CLIENT if kind in _MODEL_CALLS else wire.KIND_INTERNAL,
                                 start, end, attr_bytes, events, span_status))
        return out

    def _model_call(self, data: Mapping[str, Any]) -> tuple[str, str, bytes, frozenset[str]]:
        """A model call's span as :meth:`_described` gives it: its model-and-settings
        attributes and its last ones are the same for every call of one model and config
        (remembered as bytes); its id, usage and messages are written for the call. The parts
        are written in ``span_attributes``' order, and none makes a span's own names."""
        kind, model = str(data["type"]), data.get("model")
        answered = bool(data.get("usage") or data.get("output"))
        key = (kind, _frozen(model), answered, _frozen(data.get("model_config") or {}))
        parts = self._model_parts.get(key)
        if parts is None:
            head: dict[str, Any] = {}
            _put_model_config(head, data)
            tail: dict[str, Any] = {}
            _put_kind(tail, kind, GA.GenAiOperationNameValues.CHAT.value, model)
            parts = (f"chat {model}" if model else "chat", wire.attributes(wire.SPAN_ATTRIBUTE, head),
                     wire.attributes(wire.SPAN_ATTRIBUTE, tail))
            if len(self._model_parts) >= DESCRIBED_ENTRIES:
                self._model_parts.clear()
            self._model_parts[key] = parts
        name, head_bytes, tail_bytes = parts
        call: dict[str, Any] = {}
        _put(call, GA.GEN_AI_RESPONSE_ID, data.get("response_id"))
        rest: dict[str, Any] = {}
        _put_usage(rest, data.get("usage"), model, self._pricing)
        _put_generation_io(rest, data, self._openinference_messages)
        return (name, kind, wire.attributes(wire.SPAN_ATTRIBUTE, call, remember=False) + head_bytes
                + wire.attributes(wire.SPAN_ATTRIBUTE, rest) + tail_bytes, _NO_NAMES)

    def _described(self, data: Mapping[str, Any], tool_call_id: str | None) -> tuple[str, str, bytes, frozenset[str]]:
        """A span's name, SDK type, the OTLP bytes of the attributes its data makes, and their
        names. Remembered by the data's value for all but model calls: an agent's, a handoff's,
        a guardrail's or a task's span is the same in every turn of a workflow (a model call's
        messages are remembered one by one instead: ``_message_json``)."""
        key: tuple[Any, ...] | None = None
        if data.get("type") in _MODEL_CALLS:
            try:
                return self._model_call(data)
            except TypeError:  # a value that is not plain JSON: described whole, below
                pass
        else:
            try:
                key = (_frozen(data), tool_call_id)
                done = self._described_cache.get(key)
            except TypeError:  # a value that is not plain JSON: described, not remembered
                key = done = None
            if done is not None:
                return done
        name, kind, attrs = span_attributes(data, self._pricing, tool_call_id, self._openinference_messages)
        done = (name, kind, wire.attributes(wire.SPAN_ATTRIBUTE, attrs), frozenset(attrs))
        if key is not None:
            if len(self._described_cache) >= DESCRIBED_ENTRIES:
                self._described_cache.clear()
            self._described_cache[key] = done
        return done

    # -- the sender thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(self._due, self._delay_s)
                if not self._queue:
                    if self._stopping.is_set():
                        return
                    continue
                batch: list[list[bytes]] = []
                spans = 0
                while self._queue and (not batch or spans + len(self._queue[0]) <= self._batch_spans):
                    spans += len(self._queue[0])
                    batch.append(self._queue.popleft())
                self._queued_spans -= spans
            try:
                ok, why = self._post.send(wire.request(self._head, [s for r in batch for s in r]), self._stopping)
            except Exception as exc:  # noqa: BLE001 - the sender outlives any one batch
                ok, why = False, repr(exc)
            with self._wake:
                if ok:
                    self._spans_exported += spans
                else:
                    self._spans_failed += spans
                    self._failed_batches += 1
                self._handled += len(batch)
                self._full_logged = False
                self._wake.notify_all()
            if not ok:
                log.warning("otlp.export_failed", spans=spans, endpoint=self.endpoint, error=why[:200])

    def _due(self) -> bool:
        """Whether a batch should leave now (called with the lock held)."""
        if self._stopping.is_set():
            return True
        return bool(self._queue) and (self._queued_spans >= self._batch_spans or self._flush_to > self._handled)

    def force_flush(self, timeout_s: float = 10) -> bool:
        """Send what is queued; True when it all reached the collector within ``timeout_s``.

        False when the wait ran out (the export carries on in the background) or when any
        batch failed since the previous flush (those spans are lost; see ``stats``).
        """
        if self._closed:
            return False
        with self._wake:
            target = self._flush_to = max(self._flush_to, self._enqueued)
            self._wake.notify_all()
            if not self._wake.wait_for(lambda: self._handled >= target, timeout_s):
                log.warning("otlp.flush_timeout", endpoint=self.endpoint, timeout_s=timeout_s)
                return False
            ok = self._failed_batches == self._failures_reported
            self._failures_reported = self._failed_batches
        return ok

    def shutdown(self) -> None:
        """Send what is queued, then stop the sender thread. Later ``export`` calls are ignored."""
        with self._wake:
            if self._closed:
                return
            self._closed = True
            self._stopping.set()
            self._wake.notify_all()
        self._thread.join()
        self._post.close()

    def stats(self) -> OtlpStats:
        with self._lock:
            return OtlpStats(
                records=self._records,
                records_dropped=self._records_dropped,
                spans_queued=self._spans_queued,
                spans_exported=self._spans_exported,
                spans_failed=self._spans_failed,
                spans_dropped=self._spans_dropped,
            )

    def __enter__(self) -> OtlpSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def _failure(error: Any, at: int) -> tuple[bytes, bytes]:
    """ERROR status with the real cause, and the OTel exception event (wire fields)."""
    return (wire.event(EXCEPTION_EVENT, at, exception_event(error)),
            wire.status(wire.STATUS_ERROR, error_description(error)))
