"""Replay: a turn (or a whole conversation) as the tree of what happened.

Sampled turns are rebuilt from their stored spans (``keys.trace``): agents, model calls with
the decision each took, tool calls with arguments and results, handoffs, custom spans, with
their timings. Turns whose spans were not kept (sampling, tracing off for the turn) are
rebuilt from the hook-event timeline the worker stored for every attempt
(``keys.turn_events``, read through the event contract ``turnfleet.events``; the node each
kind makes is its entry in :data:`NODES`) and marked ``source: "events"``. Both are redacted
already: they are telemetry, written by the worker after redaction.

Feedback given on the turn (``Producer.feedback``) is the replay's ``feedback`` list
(:func:`turn_feedback`): score, source, comment (redacted), at. The checks the turn's workflow
ran on it (written once by the worker's check job) are its ``checks`` list (:func:`turn_checks`):
check, outcome, passed, reason (redacted), money_path, applicable, error, duration_us; an LLM
judge's score, model and usage (its own tokens, counted apart from the turn's).

Node shape (also the ``--json`` output): ``{"kind": "agent"|"generation"|"tool"|"handoff"|
"custom"|"guardrail", "name", "started_at", "duration_ms", "detail": {...}, "error",
"children": [...]}``. ``started_at`` (ISO 8601, ``None`` when unknown) is the span's start, or
for a node rebuilt from events the hook event's time (minus the call's duration for model and
tool calls): with ``duration_ms`` it places the node on the attempt's timeline, which runs from
the attempt's ``started_at`` to its ``ended_at``.

A tool node's ``detail.outcome`` names what its answer means when that is not plain success:
``"tool error"`` (the tool raised, ``turnfleet.tool_errors``; the node's ``error`` is set too),
``"already refunded"`` (the order was refunded before, by another turn: an answer, not an
error), ``"ticket already open"``, ``"replayed"`` (a retried attempt got its own earlier
result), ``"already done"`` (a ``turnfleet.once`` call got another turn's record back).
A tool that called ``turnfleet.once`` has ``detail.once`` (``created``, ``replayed``,
``already``): from its ``once:<name>`` spans, or from its ``tool_end`` event — so it shows
even when arguments and results are kept out (``trace_include_sensitive_data`` off).
A tripped guardrail is a ``guardrail`` node (``detail.triggered``), and the
attempt's ``guardrail`` names it: the turn completed with the workflow's safe reply.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from pydantic import TypeAdapter, ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from turnfleet.telemetry.stats import conversation_stats, turn_stats
from turnfleet import keys
from turnfleet.connection import RAW
from turnfleet.events import (
    CHECK_OUTCOMES,
    EventKind,
    GuardrailDetail,
    HandoffDetail,
    LlmEndDetail,
    TelemetryEvent,
    ToolEndDetail,
    validate_events,
)
from turnfleet.queue import TurnQueue
from turnfleet.tool_errors import tool_outcome

SDK_WRAPPER_SPANS = ("task", "turn")  # the SDK's own grouping spans, folded into their parent
_TS: TypeAdapter[datetime] = TypeAdapter(datetime)
_TERMINAL_STATUS = {EventKind.turn_completed: "completed", EventKind.turn_failed: "failed",
                    EventKind.attempt_failed: "failed"}


def _ms(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() * 1000


def _node(kind: str, name: str, duration_ms: float | None = None, error: Any = None,
          started_at: str | None = None, **detail: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "name": name,
        "started_at": started_at,
        "duration_ms": duration_ms,
        "detail": {k: v for k, v in detail.items() if v is not None},
        "error": error,
        "children": [],
    }


def _decision_from_output(output: Any) -> dict[str, Any] | None:
    """The decision in a generation span's output items (present when data is included)."""
    if not isinstance(output, list):
        return None
    calls, message = [], []
    for item in output:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "function_call":
            calls.append({"name": item.get("name"), "arguments": item.get("arguments")})
        elif item.get("type") == "message":
            for part in item.get("content") or []:
                if isinstance(part, dict) and part.get("text"):
                    message.append(part["text"])
    out: dict[str, Any] = {}
    if calls:
        out["calls"] = calls
    if message:
        out["message"] = "\n".join(message)
    return out or None


def tree_from_spans(spans: list[dict[str, Any]], decisions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rebuild the span tree; ``decisions`` (from llm_end events, in order) fill in generations
    whose span carries no output (``trace_include_sensitive_data=False``)."""
    children: dict[str | None, list[dict[str, Any]]] = {}
    ids = {s["id"] for s in spans}
    for span in sorted(spans, key=lambda s: s.get("started_at") or ""):
        parent = span.get("parent_id") if span.get("parent_id") in ids else None
        children.setdefault(parent, []).append(span)
    generation_index = 0

    def build(span: dict[str, Any]) -> list[dict[str, Any]]:
        nonlocal generation_index
        data = span.get("span_data") or {}
        kind = data.get("type")
        inner = [n for child in children.get(span["id"], []) for n in build(child)]
        if kind == "custom" and (data.get("data") or {}).get("sdk_span_type") in SDK_WRAPPER_SPANS:
            return inner
        duration = _ms(span.get("started_at"), span.get("ended_at"))
        error = (span.get("error") or {}).get("message") if span.get("error") else None
        if kind == "agent":
            node = _node("agent", data.get("name", "?"), duration, error)
        elif kind in ("generation", "response"):  # a Responses-API call is stored in a generation's shape
            usage = data.get("usage") or {}
            decision = _decision_from_output(data.get("output"))
            if decision is None and generation_index < len(decisions):
                decision = decisions[generation_index]
            generation_index += 1
            node = _node("generation", data.get("model") or "model", duration, error,
                         input_tokens=usage.get("input_tokens"), output_tokens=usage.get("output_tokens"),
                         decision=decision)
        elif kind == "function":
            once = _once_in(inner)
            node = _node("tool", data.get("name", "?"), duration, error,
                         arguments=data.get("input"), result=data.get("output"),
                         outcome=tool_outcome(data.get("output")) or _once_outcome(once), once=once)
        elif kind == "handoff":
            node = _node("handoff", f"{data.get('from_agent')} → {data.get('to_agent')}", duration, error,
                         from_agent=data.get("from_agent"), to_agent=data.get("to_agent"))
        elif kind == "custom":
            node = _node("custom", data.get("name", "custom"), duration, error, data=data.get("data"))
        elif kind == "guardrail":
            node = _node("guardrail", data.get("name", "guardrail"), duration, error,
                         triggered=data.get("triggered"))
        else:
            node = _node(kind or "span", data.get("name", kind or "span"), duration, error)
        node["started_at"] = span.get("started_at")
        node["children"] = inner
        return [node]

    return [n for root in children.get(None, []) for n in build(root)]


def _once_in(nodes: list[dict[str, Any]]) -> dict[str, bool] | None:
    """What the ``once:<name>`` custom spans under a tool call found (any of them), if any."""
    found: dict[str, bool] | None = None
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if node["kind"] != "custom":
            continue
        todo.extend(node["children"])
        data = node["detail"].get("data")
        if str(node["name"]).startswith("once:") and isinstance(data, dict):
            found = found or {"created": False, "replayed": False, "already": False}
            for flag in found:
                found[flag] |= data.get(flag) is True
    return found


def _once_outcome(once: dict[str, bool] | None) -> str | None:
    """The label of a tool call whose ``once`` found an earlier record."""
    if not once:
        return None
    return "already done" if once.get("already") else "replayed" if once.get("replayed") else None


def _iso(ts: datetime) -> str:
    """An event's time as the worker wrote it (pydantic's JSON form)."""
    return _TS.dump_python(ts, mode="json")


def _agent_node(e: TelemetryEvent) -> dict[str, Any]:
    return _node("agent", e.agent or "?", started_at=_iso(e.ts))


def _generation_node(e: TelemetryEvent) -> dict[str, Any]:
    detail = e.detail
    assert isinstance(detail, LlmEndDetail)
    usage = e.usage
    return _node("generation", e.model or "model", e.duration_ms, _error_message(e), _started(e),
                 input_tokens=usage.input_tokens if usage else None,
                 output_tokens=usage.output_tokens if usage else None,
                 decision=_decision(detail))


def _tool_node(e: TelemetryEvent) -> dict[str, Any]:
    detail = e.detail
    assert isinstance(detail, ToolEndDetail)
    once = detail.once.model_dump() if detail.once is not None else None
    return _node("tool", e.tool or "?", e.duration_ms, _error_message(e), _started(e),
                 arguments=detail.arguments, result=detail.result,
                 outcome="tool error" if e.error else tool_outcome(detail.result) or _once_outcome(once),
                 once=once)


def _handoff_node(e: TelemetryEvent) -> dict[str, Any]:
    detail = e.detail
    assert isinstance(detail, HandoffDetail)
    return _node("handoff", f"{detail.from_agent} → {detail.to_agent}", None, None, _iso(e.ts),
                 from_agent=detail.from_agent, to_agent=detail.to_agent)


def _guardrail_node(e: TelemetryEvent) -> dict[str, Any]:
    detail = e.detail
    assert isinstance(detail, GuardrailDetail)
    return _node("guardrail", detail.guardrail or "guardrail", None, None, _iso(e.ts),
                 triggered=detail.triggered)


@dataclass(frozen=True)
class EventNode:
    """The replay node one kind of event makes, and where it goes: ``opens`` an agent (the
    following nodes are its children), or a child of the current agent; ``before_agent``: a
    node of its own when no agent has started yet (an input guardrail trips before any)."""

    build: Callable[[TelemetryEvent], dict[str, Any]]
    opens: bool = False
    before_agent: bool = False


NODES: dict[EventKind, EventNode | None] = {
    EventKind.turn_started: None,  # the attempt's start: its ``started_at``
    EventKind.agent_start: EventNode(_agent_node, opens=True),
    EventKind.agent_end: None,  # the agent's node closes with the next one
    EventKind.llm_start: None,  # a model call is one node, built from its end
    EventKind.llm_end: EventNode(_generation_node),
    EventKind.tool_start: None,  # a tool call is one node, built from its end
    EventKind.tool_end: EventNode(_tool_node),
    EventKind.handoff: EventNode(_handoff_node),
    EventKind.guardrail: EventNode(_guardrail_node, before_agent=True),
    EventKind.turn_completed: None,  # the attempt's status
    EventKind.attempt_failed: None,  # the attempt's status and error
    EventKind.turn_failed: None,  # the attempt's status and error
    EventKind.spans_dropped: None,  # counted in the turn's telemetry figures
    EventKind.feedback: None,  # given after the turn: the replay's ``feedback`` list
    EventKind.check: None,  # judged after the turn: the replay's ``checks`` list
}
"""The registry: the node each kind of hook event makes in a tree rebuilt from events."""


def tree_from_events(events: list[TelemetryEvent]) -> list[dict[str, Any]]:
    """The hook-event timeline as the same tree shape (no custom spans, no span timings)."""
    roots: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for e in sorted(events, key=lambda e: e.seq):
        spec = NODES[e.kind]
        if spec is None:
            continue
        node = spec.build(e)
        if spec.opens:
            current = node
            roots.append(node)
        elif current is not None:
            current["children"].append(node)
        elif spec.before_agent:
            roots.append(node)
    return roots


def _error_message(e: TelemetryEvent) -> str | None:
    return e.error.message if e.error else None


def _decision(detail: LlmEndDetail) -> dict[str, Any] | None:
    """The decision as written (``None`` when the event has none)."""
    if "decision" not in detail.model_fields_set:
        return None
    return detail.decision.model_dump(mode="json", exclude_unset=True)


def _started(event: TelemetryEvent) -> str | None:
    """When a call that ended with ``event`` started: its time minus its duration."""
    if event.duration_ms is None:
        return _iso(event.ts)
    return (event.ts - timedelta(milliseconds=event.duration_ms)).isoformat()


def _decisions(events: list[TelemetryEvent]) -> list[dict[str, Any]]:
    return [
        _decision(e.detail) or {}
        for e in sorted(events, key=lambda e: e.seq)
        if isinstance(e.detail, LlmEndDetail)
    ]


log = structlog.get_logger(__name__)


def _stored_json(raw: Any) -> Any:
    """A stored JSON document, or ``None`` when it is not one (invalid UTF-8, bad JSON, too
    deep): what workers wrote is read as untrusted, so one bad value never breaks a replay."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError, TypeError):
        return None


async def _read_raw(client: Redis, *command: Any) -> Any:
    """A read with its reply as bytes; a key of the wrong type reads as nothing."""
    try:
        return await client.execute_command(*command, **RAW)
    except ResponseError:
        return None


async def _stored_attempts(
    redis: Redis, turn_id: str, trace_redis: Redis | None
) -> tuple[dict[int, dict[str, Any]], dict[int, list[TelemetryEvent]], list[str]]:
    """The turn's trace records and event timelines by attempt, and what could not be read."""
    unreadable: list[str] = []
    by_attempt_trace: dict[int, dict[str, Any]] = {}
    for raw in await _read_raw(trace_redis or redis, "LRANGE", keys.trace(turn_id), 0, -1) or []:
        record = _stored_json(raw)
        trace = record.get("trace") if isinstance(record, dict) else None
        attempt = trace.get("attempt", 1) if isinstance(trace, dict) else None
        if not isinstance(attempt, int) or not isinstance(record.get("spans"), list):
            unreadable.append("a trace record")
            continue
        by_attempt_trace[attempt] = record
    by_attempt_events: dict[int, list[TelemetryEvent]] = {}
    for raw_attempt, raw in (await _read_raw(redis, "HGETALL", keys.turn_events(turn_id)) or {}).items():
        events = _stored_json(raw)
        try:
            attempt: int | None = int(raw_attempt)
            events = validate_events(events) if isinstance(events, list) else None
        except (ValueError, ValidationError):  # not a number; not events of the contract
            attempt = None
        if attempt is None or events is None:
            unreadable.append(f"the event timeline of attempt {raw_attempt.decode(errors='replace')[:20]}")
            continue
        by_attempt_events[attempt] = events
    if unreadable:
        log.warning("replay.unreadable", turn_id=turn_id, what=unreadable)
    return by_attempt_trace, by_attempt_events, unreadable


def _tree(record: dict[str, Any] | None, events: list[TelemetryEvent]) -> tuple[str, list[Any] | None]:
    """The attempt's tree from its spans, else from its events; ``None`` if neither reads."""
    if record is not None:
        try:
            return "trace", tree_from_spans(record["spans"], _decisions(events))
        except (TypeError, KeyError, AttributeError, ValueError):
            pass  # a damaged trace record: the events still tell the story
    try:
        return "events", tree_from_events(events)
    except (TypeError, KeyError, AttributeError, ValueError):
        return "events", None


async def turn_replay(redis: Redis, turn_id: str, trace_redis: Redis | None = None) -> dict[str, Any] | None:
    """Everything known about one turn: result, telemetry figures, and per attempt its tree.

    Never raises on what is stored: an unreadable trace record or event timeline is left out
    and named under ``unreadable``."""
    result = await TurnQueue(redis).get(turn_id)
    if result is None:
        return None
    by_attempt_trace, by_attempt_events, unreadable = await _stored_attempts(redis, turn_id, trace_redis)
    attempts = []
    for attempt in sorted(set(by_attempt_events) | set(by_attempt_trace)):
        events = by_attempt_events.get(attempt, [])
        record = by_attempt_trace.get(attempt)
        terminal = [e for e in events if e.kind in _TERMINAL_STATUS]
        status = (_TERMINAL_STATUS[terminal[-1].kind] if terminal
                  else record["trace"].get("status") if record else "unknown")
        entry: dict[str, Any] = {"attempt": attempt, "status": status}
        source, tree = _tree(record, events)
        if tree is None:
            unreadable.append(f"the tree of attempt {attempt}")
            tree = []
        if source == "trace":
            entry.update(source="trace", kept_because=record["trace"].get("kept_because"),
                         trace_id=record["trace"].get("id"),
                         started_at=record["trace"].get("started_at"),
                         ended_at=record["trace"].get("ended_at"),
                         tree=tree)
        else:
            ordered = sorted(events, key=lambda e: e.seq)
            entry.update(source="events", kept_because=None, trace_id=None,
                         started_at=_iso(ordered[0].ts) if ordered else None,
                         ended_at=_iso(ordered[-1].ts) if ordered else None,
                         tree=tree)
        if terminal and terminal[-1].error:
            entry["error"] = terminal[-1].error.model_dump(mode="json")
        tripped = [e.detail for e in events if isinstance(e.detail, GuardrailDetail)]
        if tripped:
            entry["guardrail"] = tripped[-1].guardrail
        attempts.append(entry)
    replay = {
        "turn": result.model_dump(mode="json"),
        "telemetry": await turn_stats(redis, turn_id),
        "attempts": attempts,
        "feedback": await turn_feedback(redis, turn_id),
        "checks": await turn_checks(redis, turn_id),
    }
    if unreadable:
        replay["unreadable"] = unreadable
    return replay


async def turn_feedback(redis: Redis, turn_id: str) -> list[dict[str, Any]]:
    """The feedback given on a turn as telemetry counted it (``keys.turn_feedback``): dicts of
    ``feedback_id``, ``score``, ``source``, ``comment`` (redacted, clipped) and ``at``, oldest
    first. An unreadable item is left out."""
    items = []
    for raw in (await redis.hgetall(keys.turn_feedback(turn_id))).values():
        try:
            item = json.loads(raw)
        except ValueError:
            continue
        if isinstance(item, dict):
            items.append(item)
    return sorted(items, key=lambda x: (str(x.get("at")), str(x.get("feedback_id"))))


CHECK_ITEM_FIELDS = ("check", "outcome", "passed", "reason", "money_path", "applicable", "error",
                     "duration_us", "score", "model", "usage")  # the last three: an LLM judge's


async def turn_checks(redis: Redis, turn_id: str) -> list[dict[str, Any]]:
    """The turn's check outcomes as the check job wrote them (``keys.turn_checks``: a JSON
    list), in the workflow's order; ``[]`` before they were written (or for a workflow without
    checks). An item without an ``outcome`` gets one from ``passed`` / ``applicable``; an
    unreadable value or item is left out."""
    raw = await redis.get(keys.turn_checks(turn_id))
    try:
        items = json.loads(raw) if raw else []
    except ValueError:
        return []
    out = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("check"), str):
            continue
        kept = {f: item.get(f) for f in CHECK_ITEM_FIELDS}
        if kept["outcome"] not in CHECK_OUTCOMES:
            kept["outcome"] = ("not_applicable" if item.get("applicable") is False
                               else "passed" if item.get("passed") else "failed")
        out.append(kept)
    return out


async def conversation_replay(
    redis: Redis, conversation_id: str, trace_redis: Redis | None = None
) -> dict[str, Any] | None:
    turn_ids = await TurnQueue(redis).conversation_turn_ids(conversation_id)
    if not turn_ids:
        return None
    turns = []
    for tid in turn_ids:
        replay = await turn_replay(redis, tid, trace_redis)
        if replay is not None:
            turns.append(replay)
    return {
        "conversation_id": conversation_id,
        "turns": turns,
        "totals": await conversation_stats(redis, conversation_id),
    }
