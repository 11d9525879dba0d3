"""The redacted form of what a turn keeps: what stays once its raw text has expired.

The raw-text expiry (``telemetry/raw_expiry.py``, ``TURNFLEET_RAW_RETENTION_S``) rewrites a
finished turn's stored request, result, attempt errors, escalation ticket and memory items
into these forms, and the producer compares a repeated enqueue of an expired turn with the
stored request through the same :func:`redact_request` (no digest of the raw text is kept).
One place, so both sides agree on what "the same turn" is.

Customer text goes through the same ``Redactor`` as telemetry and the operator views (its
strings via ``Redactor.text``, as ``Redactor.value`` treats them), so an operator's redacted
view of a turn reads the same before and after its raw text expired. Ids, agents, tools,
token counts, times and statuses are kept as they are: ids are pseudonymous by contract, and
replay, stats and idempotency need the rest.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from turnfleet.connection import lenient_text
from turnfleet.models import DEFAULT_MAX_TEXT_CHARS, AttemptError, ToolCall, TurnRequest, TurnResult
from turnfleet.redaction import Redactor

__all__ = ["redact_error", "redact_memory_item", "redact_request", "redact_result", "redact_ticket",
           "redact_unreadable"]


def _text(redactor: Redactor, s: str) -> str:
    # A marker can be longer than what it replaced: a request near the length limit must still
    # decode as a TurnRequest (its validator holds stored requests to the default limit).
    return redactor.text(s)[:DEFAULT_MAX_TEXT_CHARS]


def redact_request(req: TurnRequest, redactor: Redactor) -> TurnRequest:
    """``req`` with its text and metadata redacted (metadata keys as text, a sensitive field's
    whole value replaced); ids, agent, trace flag and enqueue time as they were. Applying it
    to its own output changes nothing."""
    redacted = req.model_copy(update={"text": _text(redactor, req.text),
                                      "metadata": redactor.value(dict(req.metadata))})
    try:
        TurnRequest.model_validate_json(redacted.model_dump_json())
    except ValidationError:  # markers pushed the metadata past its size limit: keep its keys only
        redacted = redacted.model_copy(update={"metadata": {k: "" for k in redacted.metadata}})
    return redacted


def redact_error(error: AttemptError, redactor: Redactor) -> AttemptError:
    return error.model_copy(update={"message": redactor.text(error.message)})


def _tool_call(call: ToolCall, redactor: Redactor) -> ToolCall:
    return call.model_copy(update={
        "arguments": redactor.text(call.arguments),
        "output": None if call.output is None else redactor.text(call.output),
    })


def redact_result(result: TurnResult, redactor: Redactor) -> TurnResult:
    """``result`` with the customer's text, the answer, tool arguments and outputs, error
    messages and warnings redacted; agents, tools, handoffs, usage, times and ids kept."""
    def opt(s: str | None) -> str | None:
        return None if s is None else redactor.text(s)

    return result.model_copy(update={
        "text": _text(redactor, result.text),
        "final_output": opt(result.final_output),
        "tool_calls": [_tool_call(c, redactor) for c in result.tool_calls],
        "errors": [redact_error(e, redactor) for e in result.errors],
        "error_message": opt(result.error_message),
        "warnings": [redactor.text(w) for w in result.warnings],
    })


def redact_ticket(ticket: dict[str, Any], redactor: Redactor) -> dict[str, Any]:
    """An escalation ticket (``keys.conversation_escalation``): its ``*_id`` fields kept, the
    rest (the reason, in the customer's words) redacted."""
    return {k: v if k.endswith("_id") else redactor.value(v) for k, v in ticket.items()}


def redact_memory_item(raw: bytes | str, redactor: Redactor) -> str:
    """A conversation memory item (SDK item JSON) redacted, in the compact JSON the memory
    writes; an item that is no JSON is redacted as text (it stays unreadable, and skipped)."""
    try:
        item = json.loads(raw)
    except (ValueError, RecursionError):
        return redact_unreadable(raw, redactor)
    return json.dumps(redactor.value(item), separators=(",", ":"))


def redact_unreadable(raw: bytes | str, redactor: Redactor) -> str:
    """A stored value that cannot be decoded (a corrupt request, result or error): its text
    redacted, invalid UTF-8 replaced. It stays undecodable; readers report it as before."""
    return redactor.text(lenient_text(raw) or "")
