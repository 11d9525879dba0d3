"""OfflineModel: a deterministic, offline implementation of the Agents SDK's ``Model``.

No machine here reaches an LLM service, yet the fleet must run real agent loops: real function
calls, real handoffs, real token usage. This model reads what an LLM would read (the system
instructions, the conversation in Responses format — this run's items and earlier turns loaded
from session memory — and the agent's tools and handoffs) and answers what the workflow's
script says (``turnfleet/offline_script.py``: rules are data the workflow supplies, so adding a
tool to a workflow never means editing this module). ``OfflineModel()`` without a script
follows the built-in app's, the Support Desk's (``workers/support_desk_script.py``). The same
input always gives the same output, ids and usage, so telemetry totals for a scenario are known
in advance.

Token usage, deterministic and computed from text at 4 characters a token:

* ``input_tokens = ceil(input_chars / 4)`` where ``input_chars`` is
  ``len(system_instructions)`` + Σ ``len(item_text(item))`` over the input items + Σ over
  tools and handoffs of ``len(name) + len(description) + len(canonical_json(parameters))``.
* ``item_text``: a message is ``f"{role}: {text}"`` (text parts joined with ``""``); a
  ``function_call`` is ``f"{name}({arguments})"``; a ``function_call_output`` is its output
  text; any other item is its canonical JSON.
* ``cached_tokens = floor(history_chars / 4)``, ``history_chars`` being Σ ``len(item_text)``
  over the items before the latest user message: the earlier turns of the conversation, which a
  provider's prompt cache would already hold. 0 on a conversation's first turn; never more
  than ``input_tokens``.
* ``output_tokens = ceil(output_chars / 4)``, ``output_chars`` being Σ ``len(text)`` of the
  output messages + Σ ``len(name) + len(arguments)`` of the output function calls.
* ``reasoning_tokens = 0``, ``requests = 1``, ``total_tokens = input + output``.

``canonical_json`` is ``json.dumps(value, sort_keys=True, separators=(",", ":"),
ensure_ascii=False)``. Call ids, item ids and the response id are derived from a hash of the
input and the decision, so they are unique within a run (every call of a run sees a longer
input) and stable across identical runs.

Like the SDK's OpenAI models, the model opens its own ``generation_span`` (model name, model
config, usage; input and output only when ``tracing.include_data()``) — a custom ``Model`` gets
no LLM span otherwise, and traces would show no model calls and no tokens.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import structlog
from agents.exceptions import UserError
from agents.handoffs import Handoff
from agents.items import (
    ModelResponse,
    TResponseInputItem,
    TResponseOutputItem,
    TResponseStreamEvent,
)
from agents.models.interface import Model, ModelTracing
from agents.tool import Tool
from agents.tracing import SpanError, generation_span
from agents.usage import Usage, model_usage_to_span_usage
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseFunctionToolCall,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseUsage,
)
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

from turnfleet.offline_script import (
    Decision,
    HandoffOption,
    Script,
    content_text,
    kind_of,
    latest_user_index,
    normalize_input,
)

if TYPE_CHECKING:
    from agents.agent_output import AgentOutputSchemaBase
    from agents.model_settings import ModelSettings
    from openai.types.responses.response_prompt_param import ResponsePromptParam

log = structlog.get_logger(__name__)

DEFAULT_MODEL_NAME = "turnfleet-offline"
CHARS_PER_TOKEN = 4

# --------------------------------------------------------------------------------------------
# Text of items, tools and outputs (what usage is counted on)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def item_text(item: Mapping[str, Any]) -> str:
    """The text of one input item, as counted for usage (see the module docstring)."""
    kind = kind_of(item)
    if kind == "message":
        return f"{item.get('role', '')}: {content_text(item.get('content'))}"
    if kind == "function_call":
        return f"{item.get('name', '')}({item.get('arguments', '')})"
    if kind == "function_call_output":
        return content_text(item.get("output"))
    return canonical_json(item)


def tool_text(tool: Tool | Handoff) -> str:
    """Name, description and parameter schema of a tool or handoff, as counted for usage."""
    if isinstance(tool, Handoff):
        return tool.tool_name + tool.tool_description + canonical_json(tool.input_json_schema)
    name = str(getattr(tool, "name", type(tool).__name__))
    description = str(getattr(tool, "description", "") or "")
    params = getattr(tool, "params_json_schema", None)
    return name + description + (canonical_json(params) if params is not None else "")


def output_text(item: TResponseOutputItem) -> str:
    if isinstance(item, ResponseOutputMessage):
        return "".join(
            getattr(part, "text", "") or getattr(part, "refusal", "") for part in item.content
        )
    if isinstance(item, ResponseFunctionToolCall):
        return item.name + item.arguments
    return canonical_json(item.model_dump(exclude_none=True))


def compute_usage(
    system_instructions: str | None,
    items: Sequence[Mapping[str, Any]],
    tools: Sequence[Tool],
    handoffs: Sequence[Handoff],
    output: Sequence[TResponseOutputItem],
) -> Usage:
    """The documented usage formula; same text in, same numbers out."""
    texts = [item_text(item) for item in items]
    input_chars = (
        len(system_instructions or "")
        + sum(len(text) for text in texts)
        + sum(len(tool_text(tool)) for tool in [*tools, *handoffs])
    )
    latest_user = latest_user_index(items)
    history_chars = sum(len(text) for text in texts[: latest_user or 0])
    input_tokens = math.ceil(input_chars / CHARS_PER_TOKEN)
    output_tokens = math.ceil(sum(len(output_text(item)) for item in output) / CHARS_PER_TOKEN)
    return Usage(
        requests=1,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
        input_tokens_details=InputTokensDetails(
            cached_tokens=history_chars // CHARS_PER_TOKEN, cache_write_tokens=0
        ),
        output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
    )


# --------------------------------------------------------------------------------------------
# Deciding: the workflow's script


@functools.cache
def builtin_script() -> Script:
    """The built-in app's script (the Support Desk's): a model given no script follows it."""
    from turnfleet.workers.support_desk_script import SUPPORT_DESK_SCRIPT

    return SUPPORT_DESK_SCRIPT


def decide(
    input: str | Sequence[Any],
    tool_names: Collection[str],
    handoffs: Sequence[HandoffOption],
    script: Script | None = None,
) -> Decision:
    """The next step for an agent with these tools and handoffs, by ``script`` (default: the
    built-in one). Pure and deterministic; ``OfflineModel`` turns it into output items."""
    return (script or builtin_script()).decide(input, tool_names, handoffs)

# --------------------------------------------------------------------------------------------
# The Model


def _digest(*parts: Any) -> str:
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()[:24]


def _output_items(decision: Decision, digest: str) -> list[TResponseOutputItem]:
    if decision.kind == "message":
        return [
            ResponseOutputMessage(
                id=f"msg_{digest}",
                type="message",
                role="assistant",
                status="completed",
                content=[
                    ResponseOutputText(type="output_text", text=decision.text, annotations=[])
                ],
            )
        ]
    return [
        ResponseFunctionToolCall(
            id=f"fc_{digest}",
            call_id=f"call_{digest}",
            type="function_call",
            name=decision.name,
            arguments=decision.arguments_json,
            status="completed",
        )
    ]


def _json_safe(value: Any) -> Any:
    return json.loads(canonical_json(value))


class OfflineModel(Model):
    """The embedded default model: deterministic, offline, with real calls, handoffs and usage.

    ``script`` is the workflow's (``turnfleet/offline_script.py``); without one, the built-in
    app's, the Support Desk's. Stateless and safe to share between concurrent runs.
    """

    def __init__(self, model_name: str = DEFAULT_MODEL_NAME, script: Script | None = None) -> None:
        self.model_name = model_name
        self.script = script if script is not None else builtin_script()

    def respond(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        tools: Sequence[Tool],
        handoffs: Sequence[Handoff],
    ) -> tuple[Decision, ModelResponse]:
        """Decision and response for one call, without tracing (for tests and tooling)."""
        items = normalize_input(input)
        decision = self.script.decide(
            items,
            [str(getattr(tool, "name", "")) for tool in tools],
            [HandoffOption.of(h) for h in handoffs],
        )
        digest = _digest(
            self.model_name,
            system_instructions,
            [item_text(item) for item in items],
            decision.kind,
            decision.name,
            decision.arguments,
            decision.text,
        )
        output = _output_items(decision, digest)
        usage = compute_usage(system_instructions, items, tools, handoffs, output)
        return decision, ModelResponse(output=output, usage=usage, response_id=f"resp_{digest}")

    def _generation_span(self, model_settings: ModelSettings, tracing: ModelTracing) -> Any:
        config: dict[str, Any] = model_settings.to_traceable_dict()
        if not tracing.include_data():
            config.pop("metadata", None)
        config["provider"] = "turnfleet-offline"
        return generation_span(
            model=self.model_name, model_config=config, disabled=tracing.is_disabled()
        )

    def _traced_response(
        self,
        span: Any,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        tools: Sequence[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: Sequence[Handoff],
        tracing: ModelTracing,
    ) -> ModelResponse:
        try:
            if tracing.include_data():
                system = [{"role": "system", "content": system_instructions}]
                span.span_data.input = system + _json_safe(normalize_input(input))
            if output_schema is not None and not output_schema.is_plain_text():
                raise UserError(
                    "OfflineModel answers in plain text; the agent declares a structured "
                    f"output type ({output_schema.name()})."
                )
            decision, response = self.respond(system_instructions, input, tools, handoffs)
        except Exception as error:
            message = str(error) if tracing.include_data() else "Error details are redacted."
            span.set_error(SpanError(message="Error getting response", data={"error": message}))
            raise
        span.span_data.usage = model_usage_to_span_usage(response.usage)
        if tracing.include_data():
            span.span_data.output = [item.model_dump(exclude_none=True) for item in response.output]
        log.debug(
            "model.decision",
            kind=decision.kind,
            intent=decision.intent,
            name=decision.name or None,
            input_tokens=response.usage.input_tokens,
            output_tokens=response.usage.output_tokens,
        )
        return response

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        with self._generation_span(model_settings, tracing) as span:
            return self._traced_response(
                span, system_instructions, input, tools, output_schema, handoffs, tracing
            )

    async def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        """The whole response at once, as the minimal Responses event sequence."""
        with self._generation_span(model_settings, tracing) as span:
            response = self._traced_response(
                span, system_instructions, input, tools, output_schema, handoffs, tracing
            )
            for event in _stream_events(response, self.model_name):
                yield event


def _stream_events(response: ModelResponse, model_name: str) -> list[TResponseStreamEvent]:
    """created, then added/done per output item, then completed (which carries the usage)."""
    usage = response.usage
    final = Response(
        id=response.response_id or "resp_offline",
        created_at=0,
        model=model_name,
        object="response",
        output=list(response.output),
        tool_choice="auto",
        tools=[],
        top_p=None,
        parallel_tool_calls=False,
        status="completed",
        usage=ResponseUsage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            total_tokens=usage.total_tokens,
            input_tokens_details=usage.input_tokens_details,
            output_tokens_details=usage.output_tokens_details,
        ),
    )
    pending = final.model_copy(update={"output": [], "status": "in_progress", "usage": None})
    events: list[TResponseStreamEvent] = [
        ResponseCreatedEvent(type="response.created", sequence_number=0, response=pending)
    ]
    for index, item in enumerate(response.output):
        events.append(
            ResponseOutputItemAddedEvent(
                type="response.output_item.added",
                item=item,
                output_index=index,
                sequence_number=len(events),
            )
        )
        events.append(
            ResponseOutputItemDoneEvent(
                type="response.output_item.done",
                item=item,
                output_index=index,
                sequence_number=len(events),
            )
        )
    events.append(
        ResponseCompletedEvent(
            type="response.completed", response=final, sequence_number=len(events)
        )
    )
    return events
