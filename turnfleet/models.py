"""The data contract: what a producer sends, what a worker answers, what telemetry counts.

Telemetry events (``TelemetryEvent``, ``EventKind`` and a payload class per kind) are in
:mod:`turnfleet.events`.

Everything here is plain pydantic and JSON; nothing imports the Agents SDK, so a service
that only enqueues turns can depend on it cheaply.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from turnfleet.redaction import detect

ID_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}\Z")
"""Ids (turn, conversation, customer, agent): 1–128 chars, ASCII letters, digits and ``._:@-``.

Braces, spaces and control characters are refused: ids become parts of Redis keys and of
the ``Location`` header, and braces would break the per-conversation hash tags. Anchored
with ``\\A``/``\\Z`` (not ``^``/``$``: Python's ``$`` also matches before a final newline, which
let ``"C-100\\n"`` through as a second customer).
"""

ID_SCHEMA_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
"""The same grammar for JSON Schema / OpenAPI, where ``$`` (ECMA-262) is the end of the text."""

DEFAULT_MAX_TEXT_CHARS = 8000
MAX_COUNT = 2**40  # largest token count a single event may carry
DEFAULT_MAX_METADATA_ITEMS = 32
DEFAULT_MAX_METADATA_BYTES = 4096


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_turn_id() -> str:
    return f"t_{uuid.uuid4().hex}"


def check_id(value: str) -> str:
    """The id itself, or ValueError saying what is wrong (the caller names the field)."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if not value:
        raise ValueError("must not be empty")
    if len(value) > 128:
        raise ValueError(f"is {len(value)} characters long; the limit is 128")
    if not ID_PATTERN.fullmatch(value):
        raise ValueError(
            f"{ascii(value)} has characters outside letters, digits and . _ : @ - "
            "(or starts with a symbol)"
        )
    return value


_LOOKS_LIKE = {
    "email": "an e-mail address",
    "phone": "a phone number",
    "card": "a card number",
    "ssn": "a US social security number",
    "iban": "a bank account (IBAN)",
    "secret": "a secret (a key, token or password)",
}


def check_pseudonymous_id(value: str) -> str:
    """An id a client hands us: :func:`check_id`, and nothing the redactor would redact.

    Ids are pseudonymous by contract: they name keys, alerts, ``/metrics`` labels and log
    lines, which are never redacted by position, so an id that is an e-mail address, a phone
    number, a card, an SSN, an IBAN or a secret (by the same built-in detectors as text,
    ``turnfleet.redaction.DETECTORS``) is refused. The message names what it looks like and
    never repeats the value. A digits-only id passes unless text with it would be redacted
    (``1234567890`` passes; ``07700900123`` is a UK phone number; ``4111111111111111`` a card).

    Checked where an id enters (requests, API key entries), not where a stored one is read
    back: a turn recorded before this rule still decodes, is answered and can be erased.
    """
    check_id(value)
    kind = detect(value)
    if kind is not None:
        what = _LOOKS_LIKE.get(kind, f"personal data ({kind})")
        raise ValueError(f"looks like {what}; ids must be pseudonymous, e.g. an internal "
                         "customer number")
    return value


def check_unicode(value: str) -> str:
    """The string itself, or ValueError if it cannot be encoded as UTF-8.

    Lone surrogates (``"\\ud800"`` as a JSON escape, or the bytes of invalid UTF-8 that
    Python smuggles into ``sys.argv``) are valid ``str`` values but cannot be written to
    Redis, so they are refused at the edge instead of failing at the write.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(value[exc.start])
        what = (f"the byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF  # undecodable argv byte
                else f"a lone surrogate (U+{bad:04X})")
        raise ValueError(f"is not valid UTF-8 text: character {exc.start} is {what}") from None
    return value


DEFAULT_WORKFLOW = "support-desk"  # the built-in workflow, always known


class TurnRequest(BaseModel):
    """One user message handed to the fleet.

    Limits on ``text`` and ``metadata`` come from the validation context
    (``max_text_chars``, ``max_metadata_items``, ``max_metadata_bytes``) so that each producer
    applies its own settings; without a context the documented defaults apply.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    turn_id: str = Field(default_factory=new_turn_id)
    conversation_id: str
    customer_id: str
    text: str
    metadata: dict[str, str] = Field(default_factory=dict)
    agent: str = DEFAULT_WORKFLOW  # the workflow that runs the turn
    trace: bool = True
    enqueued_at: datetime = Field(default_factory=utcnow)

    @field_validator("turn_id", "conversation_id", "customer_id", "agent", mode="before")
    @classmethod
    def _ids(cls, value: Any, info: ValidationInfo) -> str:
        # A request from a client (Python objects: the Python API, the CLI, the HTTP body once
        # parsed) must carry pseudonymous ids; a stored request, read back as JSON, only the
        # grammar: it was checked under the rules of the day it came in.
        if info.mode == "python":
            return check_pseudonymous_id(value)
        return check_id(value)

    @field_validator("text", mode="before")
    @classmethod
    def _text(cls, value: Any, info: ValidationInfo) -> str:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        if not value.strip():
            raise ValueError("must not be empty")
        check_unicode(value)
        limit = (info.context or {}).get("max_text_chars", DEFAULT_MAX_TEXT_CHARS)
        if len(value) > limit:
            raise ValueError(f"is {len(value)} characters long; the limit is {limit}")
        return value

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, value: Any, info: ValidationInfo) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ValueError("must be a flat mapping of strings to strings")
        ctx = info.context or {}
        max_items = ctx.get("max_metadata_items", DEFAULT_MAX_METADATA_ITEMS)
        max_bytes = ctx.get("max_metadata_bytes", DEFAULT_MAX_METADATA_BYTES)
        for key, item in value.items():
            if not isinstance(key, str) or not isinstance(item, str):
                raise ValueError(
                    f"must be flat str→str; key {key!r} has a {type(item).__name__} value"
                )
            if not key:
                raise ValueError("keys must not be empty")
            try:
                check_unicode(key)
                check_unicode(item)
            except ValueError as exc:
                raise ValueError(f"key {ascii(key)}: {exc}") from None
        if len(value) > max_items:
            raise ValueError(f"has {len(value)} items; the limit is {max_items}")
        size = sum(len(k.encode()) + len(v.encode()) for k, v in value.items())
        if size > max_bytes:
            raise ValueError(f"is {size} bytes; the limit is {max_bytes}")
        return dict(value)


class TokenUsage(BaseModel):
    """Token counts as the SDK's ``Usage`` reports them (cached ⊂ input, reasoning ⊂ output)."""

    # Bounded so that sums stay within Redis's 64-bit counters: an absurd figure is refused
    # when the event is read (and dead-lettered), not half-applied.
    requests: int = Field(default=0, ge=0, le=MAX_COUNT)
    input_tokens: int = Field(default=0, ge=0, le=MAX_COUNT)
    output_tokens: int = Field(default=0, ge=0, le=MAX_COUNT)
    cached_tokens: int = Field(default=0, ge=0, le=MAX_COUNT)
    reasoning_tokens: int = Field(default=0, ge=0, le=MAX_COUNT)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            requests=self.requests + other.requests,
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
        )


class ToolCall(BaseModel):
    agent: str
    tool: str
    call_id: str | None = None
    arguments: str = ""
    output: str | None = None
    duration_ms: float | None = None


class Handoff(BaseModel):
    from_agent: str
    to_agent: str


class AttemptError(BaseModel):
    attempt: int
    error_type: str
    message: str
    at: datetime = Field(default_factory=utcnow)
    usage: TokenUsage | None = None  # what the failed attempt spent (None: not known, e.g. lost worker)


TurnStatus = Literal["queued", "running", "completed", "failed"]
TERMINAL_STATUSES = ("completed", "failed")


class TurnResult(BaseModel):
    """How a turn ended (or where it is). Kept without expiry, readable by turn id."""

    turn_id: str
    conversation_id: str
    customer_id: str
    status: TurnStatus
    text: str = ""
    final_output: str | None = None
    agents: list[str] = Field(default_factory=list)
    tool_calls: list[ToolCall] = Field(default_factory=list)
    handoffs: list[Handoff] = Field(default_factory=list)
    model: str | None = None
    usage: TokenUsage = Field(default_factory=TokenUsage)
    attempts: int = 0
    errors: list[AttemptError] = Field(default_factory=list)
    error_type: str | None = None
    error_message: str | None = None
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: float | None = None
    queue_wait_ms: float | None = None
    worker: str | None = None
    warnings: list[str] = Field(default_factory=list)  # e.g. a corrupt memory item skipped
    # The workflow that ran (or will run) the turn and its version (``Workflow.version_label()``:
    # ``<declared>@<fingerprint>`` or the fingerprint alone). ``None`` in results written before
    # they were recorded; a turn not yet started shows its request's workflow and no version.
    workflow: str | None = None
    version: str | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES


class ErrorInfo(BaseModel):
    type: str
    message: str


class Alert(BaseModel):
    """An alert as written to the alert stream: what fired, on whom, and the figures why."""

    alert_id: str
    rule: str
    severity: Literal["info", "warning", "critical"] = "warning"
    subject_kind: Literal["conversation", "customer", "turn", "fleet", "model"]
    subject: str
    window: str
    message: str
    figures: dict[str, float | int | str] = Field(default_factory=dict)
    conversation_id: str | None = None
    customer_id: str | None = None
    turn_id: str | None = None
    fired_at: datetime = Field(default_factory=utcnow)


# -- feedback (issue 17) ----------------------------------------------------------------------

FEEDBACK_SOURCES = ("customer", "agent", "operator")
DEFAULT_MAX_FEEDBACK_COMMENT_CHARS = 2000  # a longer comment is refused at the edge
FEEDBACK_COMMENT_KEPT_CHARS = 500  # what telemetry keeps of a comment (redacted, then clipped)


def feedback_id(turn_id: str, idempotency_key: str | None = None) -> str:
    """A feedback's id: derived from the client's idempotency key (the same key on the same
    turn is the same feedback, counted once), or new. It is the feedback event's id too."""
    if idempotency_key is None:
        return f"fb_{uuid.uuid4().hex}"
    return f"fb_{uuid.uuid5(uuid.NAMESPACE_URL, f'turnfleet:{turn_id}:{idempotency_key}').hex}"


class FeedbackRequest(BaseModel):
    """A score on one turn (``Producer.feedback``, ``turnfleet feedback``,
    ``POST /v1/turns/{id}/feedback``). ``idempotency_key``: the same key again on the same turn
    is the same feedback (counted once)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    turn_id: str
    score: Literal[-1, 1]
    comment: str | None = None
    source: Literal["customer", "agent", "operator"] = "customer"
    idempotency_key: str | None = None

    @field_validator("score", mode="before")
    @classmethod
    def _score(cls, value: Any) -> int:
        if isinstance(value, bool) or value not in (-1, 1) or not isinstance(value, int):
            raise ValueError("must be -1 or 1")
        return value

    @field_validator("turn_id", "idempotency_key", mode="before")
    @classmethod
    def _ids(cls, value: Any) -> str | None:
        return None if value is None else check_id(value)

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, value: Any) -> str:
        if value not in FEEDBACK_SOURCES:
            raise ValueError(f"must be one of {', '.join(FEEDBACK_SOURCES)}")
        return value

    @field_validator("comment", mode="before")
    @classmethod
    def _comment(cls, value: Any, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError("must be a string")
        check_unicode(value)
        limit = (info.context or {}).get("max_feedback_comment_chars", DEFAULT_MAX_FEEDBACK_COMMENT_CHARS)
        if len(value) > limit:
            raise ValueError(f"is {len(value)} characters long; the limit is {limit}")
        return value or None


class FeedbackResult(BaseModel):
    """What a recorded feedback is: its id and the turn it is linked to."""

    feedback_id: str
    turn_id: str
    conversation_id: str
    customer_id: str
    score: int
    source: str
    comment: str | None = None  # as telemetry keeps it: redacted, clipped
    at: datetime
