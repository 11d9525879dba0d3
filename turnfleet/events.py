"""The telemetry event contract: one envelope, one typed payload per event kind.

A worker's hooks write, per turn attempt, a batch of :class:`TelemetryEvent`; the telemetry
consumer aggregates it and the replay rebuilds a turn's tree from it. What each kind carries
in ``detail`` is one small class here (as the Agents SDK's ``tracing/span_data.py`` has one
class per span kind), so writer and readers share one definition instead of each keeping the
shape of a free dict in its head.

- :data:`PAYLOADS` is the registry kind → payload class. The readers keep their own table per
  kind next to it (``turnfleet.telemetry.aggregate.PLANNERS``, ``turnfleet.telemetry.replay.NODES``) and a test
  checks that every kind is in each, in ``/metrics`` where it feeds a counter, and in the
  README's event table. Adding a kind: its member of :class:`EventKind`, its payload class and
  registry line here, its planner and replay entry, its README row (and the hook that emits it).
- The wire format is the JSON of :meth:`TelemetryEvent.export`: ``detail`` holds the fields the
  writer set (an absent field and its default read the same). Payloads ignore fields they do
  not know, so a reader tolerates a writer that adds one; every field has a default, so a
  payload written before a field existed still reads. A payload that does not fit its kind
  (a ``count`` that is no integer) makes the event, and so its batch, unreadable: the consumer
  counts it malformed, as it does a batch that is no JSON.
- Versions: the batch (not each event) carries the format version, in its stream entry's ``v``
  field (:mod:`turnfleet.versions`; none is version 1). This module's shape is batch version
  ``versions.BATCH``. A writer that adds an event kind, or changes a payload so that older
  readers would misread it, writes a newer batch version: an older consumer then leaves the
  batch pending for a newer one instead of counting it malformed. A version-1 batch holding a
  kind this reader does not know is malformed (dead-lettered), as before.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, TypeAdapter, create_model

from turnfleet.models import MAX_COUNT, ErrorInfo, TokenUsage, utcnow


class EventKind(str, Enum):
    turn_started = "turn_started"
    agent_start = "agent_start"
    agent_end = "agent_end"
    llm_start = "llm_start"
    llm_end = "llm_end"
    tool_start = "tool_start"
    tool_end = "tool_end"
    handoff = "handoff"
    guardrail = "guardrail"
    turn_completed = "turn_completed"
    attempt_failed = "attempt_failed"  # this attempt failed; the turn will be tried again
    turn_failed = "turn_failed"  # terminal
    spans_dropped = "spans_dropped"  # trace spans this attempt could not keep
    feedback = "feedback"  # a score on a finished turn (batch version versions.BATCH_FEEDBACK)
    check = "check"  # one check's outcome on a finished turn (batch version versions.BATCH_CHECK)


# -- payloads ------------------------------------------------------------------------------


class EventDetail(BaseModel):
    """What one kind of event carries in ``detail``. Subclasses set ``event_kind``."""

    model_config = ConfigDict(extra="ignore")

    event_kind: ClassVar[EventKind]
    json_fields: ClassVar[tuple[str, ...]] = ()
    """Fields holding a JSON document as text: redacted as JSON (field names inside count)."""

    def export(self) -> dict[str, Any]:
        """The wire form: the fields that were set (by the writer, or in the stored JSON)."""
        return self.model_dump(mode="json", exclude_unset=True)


class TurnStartedDetail(EventDetail):
    event_kind = EventKind.turn_started
    queue_wait_ms: float | None = None  # enqueue (or due time) to this attempt's start


class AgentStartDetail(EventDetail):
    event_kind = EventKind.agent_start


class AgentEndDetail(EventDetail):
    event_kind = EventKind.agent_end
    output: str | None = None  # clipped; only when data may be included


class LlmStartDetail(EventDetail):
    event_kind = EventKind.llm_start
    input_items: int | None = None


class DecisionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str | None = None
    arguments: str | None = None  # clipped; only when data may be included


class Decision(BaseModel):
    """What the model decided in one call: the tools/handoffs it called, or its answer."""

    model_config = ConfigDict(extra="ignore")
    calls: list[DecisionCall] | None = None
    message: str | bool | None = None  # the answer (clipped), or True when data is kept out


class LlmEndDetail(EventDetail):
    event_kind = EventKind.llm_end
    decision: Decision = Field(default_factory=Decision)
    response_id: str | None = None


class ToolStartDetail(EventDetail):
    event_kind = EventKind.tool_start
    json_fields = ("arguments",)
    call_id: str | None = None
    arguments: str | None = None  # clipped; only when data may be included


class OnceOutcome(BaseModel):
    """What a tool call's ``turnfleet.once`` calls found (``turnfleet.side_effects``)."""

    model_config = ConfigDict(extra="ignore")
    created: bool = False  # stored by this call
    replayed: bool = False  # stored before by this turn: a retried attempt got it back
    already: bool = False  # stored before by another turn (once per key)


class ToolEndDetail(EventDetail):
    event_kind = EventKind.tool_end
    json_fields = ("arguments", "result")
    call_id: str | None = None
    arguments: str | None = None  # clipped; only when data may be included
    result: str | None = None  # clipped; only when data may be included
    # Set when the tool called ``once``; kept whatever data may be included (no content).
    # Added without a new batch version: an older reader ignores it (payloads ignore unknown
    # fields) and reads every other field as before; a batch without it reads as ``None``.
    once: OnceOutcome | None = None


class HandoffDetail(EventDetail):
    event_kind = EventKind.handoff
    from_agent: str | None = None
    to_agent: str | None = None


class GuardrailDetail(EventDetail):
    """A guardrail's tripwire fired: an outcome of the turn (the safe reply), not an error."""

    event_kind = EventKind.guardrail
    guardrail: str | None = None
    kind: str | None = None  # "input" or "output"
    triggered: bool = True


class TurnCompletedDetail(EventDetail):
    event_kind = EventKind.turn_completed
    queue_wait_ms: float | None = None
    agents: list[str] | None = None  # the agents that ran, in order
    final_output: str | None = None  # clipped; only when data may be included


class AttemptFailedDetail(EventDetail):
    event_kind = EventKind.attempt_failed
    agents: list[str] | None = None


class TurnFailedDetail(EventDetail):
    event_kind = EventKind.turn_failed
    agents: list[str] | None = None


class SpansDroppedDetail(EventDetail):
    event_kind = EventKind.spans_dropped
    count: int = Field(default=0, ge=0, le=MAX_COUNT)


class FeedbackDetail(EventDetail):
    """A score on a turn, given after it ran (``Producer.feedback``). Its event's id is the
    feedback id (so the same feedback re-sent counts once) and its ``attempt`` is 0 (no
    attempt wrote it); written alone in an entry of batch version ``versions.BATCH_FEEDBACK``,
    which an older consumer leaves pending."""

    event_kind = EventKind.feedback
    feedback_id: str | None = None
    score: int = Field(default=0, ge=-1, le=1)
    source: str | None = None  # customer, agent or operator
    comment: str | None = None  # redacted, then clipped


CHECK_OUTCOMES = ("passed", "failed", "not_applicable", "inputs_expired")
"""What a ``check`` event says of its check: ``passed``; ``failed``; ``not_applicable`` (the
check had nothing to judge: a pass kept apart); ``inputs_expired`` (retention or the raw-text
lifetime removed the record or memory the check needs: neither pass nor failure)."""


class CheckDetail(EventDetail):
    """One check of the turn's workflow, run once on the finished turn from its record and
    memory (``turnfleet.checks.run_checks``, docs/ARCHITECTURE.md "Checks"). Its event's id is
    :func:`check_event_id` (so the same check on the same turn counts once however often it
    is written) and its ``attempt`` is 0; the checks of one turn are one entry of batch version
    ``versions.BATCH_CHECK``. A check that calls a model (an LLM judge) sets the envelope's
    ``model`` and ``usage``: counted apart from the turn's own tokens and cost."""

    event_kind = EventKind.check
    check: str = ""
    outcome: Literal["passed", "failed", "not_applicable", "inputs_expired"] = "passed"
    money_path: bool = False
    reason: str | None = None  # redacted, then clipped
    error: str | None = None  # the exception's type when the check raised
    duration_us: float = Field(default=0.0, ge=0)


def check_event_id(turn_id: str, check: str) -> str:
    """A check event's id: one per turn and check, whichever run of the check job wrote it."""
    return f"{turn_id}:check:{check}"


PAYLOADS: dict[EventKind, type[EventDetail]] = {
    cls.event_kind: cls
    for cls in (
        TurnStartedDetail, AgentStartDetail, AgentEndDetail, LlmStartDetail, LlmEndDetail,
        ToolStartDetail, ToolEndDetail, HandoffDetail, GuardrailDetail, TurnCompletedDetail,
        AttemptFailedDetail, TurnFailedDetail, SpansDroppedDetail, FeedbackDetail, CheckDetail,
    )
}
"""The registry: each event kind's payload class."""


# -- the envelope --------------------------------------------------------------------------


class TelemetryEvent(BaseModel):
    """One thing that happened in a turn attempt, as telemetry counts it.

    ``event_id`` is ``{turn_id}:{attempt}:{seq}``: deterministic, so a redelivered or
    re-sent event is recognised and counted once. ``detail`` is the kind's payload
    (:data:`PAYLOADS`), redacted before it leaves the worker. Build one with :func:`event`;
    read a batch with :func:`parse_events`, which gives each event its kind's class.
    """

    event_id: str
    kind: EventKind
    seq: int
    turn_id: str
    attempt: int
    conversation_id: str
    customer_id: str
    agent: str | None = None
    model: str | None = None
    tool: str | None = None
    ts: datetime = Field(default_factory=utcnow)
    usage: TokenUsage | None = None
    duration_ms: float | None = None
    error: ErrorInfo | None = None
    detail: SerializeAsAny[EventDetail] = Field(default_factory=EventDetail)

    @staticmethod
    def make_id(turn_id: str, attempt: int, seq: int) -> str:
        return f"{turn_id}:{attempt}:{seq}"

    def export(self) -> dict[str, Any]:
        """The wire form (JSON types), ``detail`` as its payload's :meth:`EventDetail.export`."""
        data = self.model_dump(mode="json", exclude={"detail"})
        data["detail"] = self.detail.export()
        return data


EVENT_CLASSES: dict[EventKind, type[TelemetryEvent]] = {
    kind: create_model(
        payload.__name__.removesuffix("Detail") + "Event",
        __base__=TelemetryEvent,
        __module__=__name__,
        kind=(Literal[kind], kind),  # type: ignore[valid-type]
        detail=(payload, Field(default_factory=payload)),
    )
    for kind, payload in PAYLOADS.items()
}
"""Each kind's event class: the envelope with ``detail`` typed as that kind's payload."""

AnyEvent = Annotated[Union[tuple(EVENT_CLASSES.values())], Field(discriminator="kind")]  # type: ignore[misc]
_BATCH: TypeAdapter[list[TelemetryEvent]] = TypeAdapter(list[AnyEvent])  # type: ignore[valid-type]


def event(detail: EventDetail, *, turn_id: str, attempt: int, seq: int, conversation_id: str,
          customer_id: str, event_id: str | None = None, **fields: Any) -> TelemetryEvent:
    """The event of ``detail``'s kind, with its deterministic id (``event_id`` when given: a
    feedback's is its feedback id); ``fields`` are the envelope's optional ones (``agent``,
    ``model``, ``tool``, ``ts``, ``usage``, ``duration_ms``, ``error``)."""
    cls = EVENT_CLASSES[detail.event_kind]
    return cls(event_id=event_id or TelemetryEvent.make_id(turn_id, attempt, seq), kind=detail.event_kind,
               seq=seq, turn_id=turn_id, attempt=attempt, conversation_id=conversation_id,
               customer_id=customer_id, detail=detail, **fields)


def parse_events(raw: str | bytes) -> list[TelemetryEvent]:
    """A JSON array of events, each as its kind's class. Raises pydantic's ``ValidationError``
    (a ``ValueError``) naming what does not fit."""
    return _BATCH.validate_json(raw)


def validate_events(items: Sequence[Any]) -> list[TelemetryEvent]:
    """Like :func:`parse_events`, from already decoded JSON."""
    return _BATCH.validate_python(items)


def batch_json(events: Sequence[TelemetryEvent]) -> str:
    """Events as the JSON array a worker writes (unredacted: redaction is the writer's)."""
    return json.dumps([e.export() for e in events], separators=(",", ":"))
