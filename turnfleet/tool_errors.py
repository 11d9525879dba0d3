"""What a tool error is, defined once: tools write it, hooks, telemetry and models read it.

A **tool error** is an exception inside a tool: the tool could not do its job. The tool
answers the model with ``tool_error_output(...)`` (a JSON object carrying the ``tool_error``
marker, so the model can still say sorry or escalate) and every reader recognises it with
``tool_error_of(output)``. It is counted in ``tool_errors``, found under the ``ToolError``
facet of ``turnfleet find`` and moves ``turnfleet_tool_errors_total``.

A **business answer** is not a tool error, whatever it says: "order not found", "not
eligible", "already refunded" are answers the tool gives on purpose. Those carry a
``reason``, never the ``tool_error`` marker.

The SDK's own failure text (a ``function_tool`` without a ``failure_error_function``
answers ``"An error occurred while running the tool..."``) is recognised too, so tools written
without this module count the same way.
"""

from __future__ import annotations

import json
from typing import Any

from turnfleet.models import ErrorInfo

TOOL_ERROR = "ToolError"  # the error type telemetry records for a tool error
MARKER = "tool_error"  # the key of a tool error's JSON output
SDK_FAILURE_PREFIX = "An error occurred while running the tool"  # agents.tool default


def tool_error_output(tool: str, error: BaseException) -> str:
    """The answer a tool gives the model when it raised ``error`` (no message text: it may
    carry data the model should not see; the type says enough to decide what to do)."""
    return json.dumps(
        {
            MARKER: True,
            "tool": tool,
            "error_type": type(error).__name__,
            "message": f"The tool failed ({type(error).__name__}). Try again or escalate.",
        },
        separators=(",", ":"),
    )


def tool_error_of(output: object) -> ErrorInfo | None:
    """The tool error in a tool's output, or ``None`` for any other answer."""
    text = output if isinstance(output, str) else str(output)
    if text.startswith(SDK_FAILURE_PREFIX):
        return ErrorInfo(type=TOOL_ERROR, message=text)
    if not text.startswith("{") or f'"{MARKER}"' not in text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get(MARKER) is not True:
        return None
    return ErrorInfo(
        type=TOOL_ERROR,
        message=f"{value.get('tool', 'tool')} raised {value.get('error_type', 'an exception')}",
    )


def is_tool_error(output: object) -> bool:
    return tool_error_of(output) is not None


def tool_outcome(result: Any) -> str | None:
    """What a tool's answer means when it is not plain success, as replays label it:
    ``"tool error"``, ``"already refunded"`` (an answer: the order was refunded before, by
    another turn), ``"ticket already open"``, ``"replayed"`` (a retried attempt got its own
    earlier result); ``None`` otherwise."""
    if result is None:
        return None
    text = result if isinstance(result, str) else json.dumps(result)
    if tool_error_of(text) is not None:
        return "tool error"
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    if value.get("already_refunded"):
        return "already refunded"
    if value.get("already_open"):
        return "ticket already open"
    if value.get("replayed"):
        return "replayed"
    return None
