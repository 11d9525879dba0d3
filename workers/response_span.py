"""What a Responses-API model call's span keeps: the same as a Chat Completions call's.

The SDK's ``ResponseSpanData.export()`` keeps only the response id and the usage: the model,
the instructions, the input items and the output live on the span object (the openai
``Response`` and ``input``, set only when ``trace_include_sensitive_data`` is on) and are lost
when the trace buffer stores the export. A ``generation`` span (Chat Completions, LiteLLM, the
offline model) exports model, config, input and output, so the OTLP export and the trace store
could show a chat call fully and a Responses call as an id. :func:`response_span_export` is
the export the buffer stores instead: the SDK's fields plus those, in the generation span's
shape (``model``, ``model_config``, ``input`` with the instructions as the system message
first, ``output`` as the Response's output items), all plain JSON.

Without sensitive data the SDK sets no ``Response`` on the span, so there is no model name
(and so no cost) and no text: only the usage, as the SDK exports it. A call that failed has
no ``Response`` either: its span carries the error only.
"""

from __future__ import annotations

from typing import Any

from agents.tracing.span_data import ResponseSpanData


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data (pydantic models dumped, without unset ``None`` fields)."""
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_none=True, mode="json")
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def response_span_export(data: ResponseSpanData) -> dict[str, Any]:
    """The span data's export with the model call's model, config, input and output added
    (when the SDK recorded the ``Response``; see the module docstring)."""
    exported = data.export()
    response = data.response
    if response is None:
        return exported
    instructions = response.instructions
    system = [{"role": "system", "content": instructions}] if isinstance(instructions, str) else (
        plain(instructions or []))
    given = data.input
    items = [{"role": "user", "content": given}] if isinstance(given, str) else plain(given or [])
    config = {"temperature": response.temperature, "top_p": response.top_p,
              "max_tokens": response.max_output_tokens}
    return {
        **exported,
        "model": response.model,
        "model_config": {k: v for k, v in config.items() if v is not None},
        "input": system + items if data.input is not None else None,
        "output": plain(response.output),
    }
