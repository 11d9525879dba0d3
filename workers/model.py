"""OfflineModel: a deterministic, offline implementation of the Agents SDK's ``Model``.

No machine here reaches an LLM service, yet the fleet must run real agent loops: real function
calls, real handoffs, real token usage. This model reads what an LLM would read (the system
instructions, the conversation in Responses format — this run's items and earlier turns loaded
from session memory — and the agent's tools and handoffs) and answers with what the Support
Desk's agents would say. The same input always gives the same output, ids and usage, so
telemetry totals for a scenario are known in advance.

Decisions (``decide``) are made from the latest user message, matched case-insensitively, and
from what already happened in this turn (tool calls and their outputs after that message). An
agent does what it holds the tool for (``check_refund_eligibility`` → refunds,
``lookup_order`` → order status, ``escalate_to_human`` → escalation); an agent with handoffs to
specialists (Triage) routes, greets and declines; an agent whose only handoff goes back to
Triage (a specialist) hands anything outside its tools back to Triage. See ``decide`` for the
phrasings understood.

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

import hashlib
import json
import math
import re
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

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

from turnfleet.tool_errors import is_tool_error

if TYPE_CHECKING:
    from agents.agent_output import AgentOutputSchemaBase
    from agents.model_settings import ModelSettings
    from openai.types.responses.response_prompt_param import ResponsePromptParam

log = structlog.get_logger(__name__)

DEFAULT_MODEL_NAME = "turnfleet-offline"
CHARS_PER_TOKEN = 4

# Tool names the Support Desk's agents use (workers/tools.py); capabilities are judged by them.
LOOKUP_ORDER = "lookup_order"
CHECK_REFUND = "check_refund_eligibility"
PROCESS_REFUND = "process_refund"
ESCALATE = "escalate_to_human"

Intent = Literal["escalate", "refund", "order_status", "greeting", "thanks", "out_of_scope"]


# --------------------------------------------------------------------------------------------
# Text of items, tools and outputs (what usage is counted on)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return dict(item)
    dump = getattr(item, "model_dump", None)
    if callable(dump):
        return dict(dump(exclude_unset=True))
    raise TypeError(f"unsupported input item {type(item).__name__}")


def normalize_input(input: str | Sequence[Any]) -> list[dict[str, Any]]:
    """The input as a list of Responses-format dicts (a bare string is one user message)."""
    if isinstance(input, str):
        return [{"content": input, "role": "user"}]
    return [_as_dict(item) for item in input]


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for part in content:
        part = _as_dict(part)
        text = part.get("text")
        if text is None:
            text = part.get("refusal", "")
        parts.append(str(text))
    return "".join(parts)


def _kind(item: Mapping[str, Any]) -> str:
    kind = item.get("type")
    if kind is None and "role" in item:
        return "message"
    return str(kind)


def item_text(item: Mapping[str, Any]) -> str:
    """The text of one input item, as counted for usage (see the module docstring)."""
    kind = _kind(item)
    if kind == "message":
        return f"{item.get('role', '')}: {_content_text(item.get('content'))}"
    if kind == "function_call":
        return f"{item.get('name', '')}({item.get('arguments', '')})"
    if kind == "function_call_output":
        return _content_text(item.get("output"))
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


def _latest_user_index(items: Sequence[Mapping[str, Any]]) -> int | None:
    for index in range(len(items) - 1, -1, -1):
        if _kind(items[index]) == "message" and items[index].get("role") == "user":
            return index
    return None


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
    latest_user = _latest_user_index(items)
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
# Reading the conversation


_ESCALATE = re.compile(
    r"\b(human|real person|actual person|a person|someone real|manager|supervisor|"
    r"representative|escalat\w*|live (agent|chat)|(talk|speak|chat) (to|with) (an? )?"
    r"(agent|someone|somebody|person))\b"
)
_REFUND = re.compile(
    r"\b(refund\w*|money back|reimburs\w*|charge ?back|send (it|this|that) back|"
    r"return (it|this|that|the|my)\b)"
)
_STATUS = re.compile(
    r"\b(status|track\w*|shipp\w*|shipped|deliver\w*|arriv\w*|eta|package|parcel|"
    r"update on|tracking)\b"
)
_WHERE = re.compile(r"\b(where|when (will|is|does|do))\b")
_ORDERISH = re.compile(r"\b(orders?|it|my|stuff|things|purchase)\b")
_ORDER_WORD = re.compile(r"\b(orders?|purchase)\b")
_GREETING = re.compile(
    r"^\W*(hi|hello|hey|hiya|howdy|greetings|good (morning|afternoon|evening))\b|"
    r"\b(my name is|i'?m|i am|this is)\s+[a-z]+|\bcustomer\s+c-\d+"
)
_THANKS = re.compile(r"\b(thanks|thank you|thx|cheers|bye|goodbye|that'?s all|that is all)\b")
_NAME_CAPITALISED = re.compile(r"\b(?:[Ii]'?m|[Ii] am|[Tt]his is)\s+([A-Z][a-zA-Z'-]+)")
_NAME_DECLARED = re.compile(r"\bmy name is\s+([a-zA-Z][a-zA-Z'-]+)", re.IGNORECASE)
_ORDER_ID_EXPLICIT = re.compile(
    r"(?:\border\b|#)\s*(?:number|no\.?|id|num)?\s*[:#]?\s*(\d{3,10})\b", re.IGNORECASE
)
_ORDER_ID_BARE = re.compile(r"(?<![\w$.,:/-])(\d{4,10})(?![\w-]|[.,:/]\d)")


def order_ids_in(text: str) -> list[str]:
    """Order ids mentioned in free text, in order of appearance.

    "order 1042", "#1042", "order number 1042" count; so does a bare 4–10 digit number that is
    not part of a customer id ("C-100"), a date, an amount or a ticket id.
    """
    found = [(m.start(1), m.group(1)) for m in _ORDER_ID_EXPLICIT.finditer(text)]
    found += [(m.start(1), m.group(1)) for m in _ORDER_ID_BARE.finditer(text)]
    seen: list[str] = []
    for _, oid in sorted(found):
        if oid not in seen:
            seen.append(oid)
    return seen


def classify(text: str) -> Intent | None:
    """The intent a message states on its own, or None when it only gives an order id / nothing."""
    lowered = text.lower()
    if _ESCALATE.search(lowered):
        return "escalate"
    if _REFUND.search(lowered):
        return "refund"
    if _STATUS.search(lowered) or (_WHERE.search(lowered) and _ORDERISH.search(lowered)):
        return "order_status"
    return None


def customer_name(text: str) -> str | None:
    """The name a customer introduces themselves with ("I'm Dana", "my name is dana")."""
    match = _NAME_DECLARED.search(text) or _NAME_CAPITALISED.search(text)
    return match.group(1).capitalize() if match else None


@dataclass(frozen=True)
class ToolCallRecord:
    name: str
    arguments: dict[str, Any]
    output: str | None

    @property
    def result(self) -> dict[str, Any] | None:
        """The output as JSON, or None when the tool failed (a tool error, or plain text)."""
        if self.output is None or is_tool_error(self.output):
            return None
        try:
            value = json.loads(self.output)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class Conversation:
    """The input, read the way the Support Desk's agents need it."""

    items: list[dict[str, Any]]
    user_text: str
    previous_user_text: str | None
    calls: list[ToolCallRecord]  # this turn's function calls (tools and handoffs), in order
    handed_to: list[str]  # agents that received a handoff during this turn

    @classmethod
    def read(cls, input: str | Sequence[Any]) -> Conversation:
        items = normalize_input(input)
        latest = _latest_user_index(items)
        user_text = _content_text(items[latest].get("content")) if latest is not None else ""
        previous = None
        if latest is not None:
            earlier = _latest_user_index(items[:latest])
            if earlier is not None:
                previous = _content_text(items[earlier].get("content"))
        turn = items[latest + 1 :] if latest is not None else items
        outputs = {
            item.get("call_id"): _content_text(item.get("output"))
            for item in turn
            if _kind(item) == "function_call_output"
        }
        calls: list[ToolCallRecord] = []
        handed_to: list[str] = []
        for item in turn:
            if _kind(item) != "function_call":
                continue
            try:
                arguments = json.loads(item.get("arguments") or "{}")
            except ValueError:
                arguments = {}
            record = ToolCallRecord(
                name=str(item.get("name", "")),
                arguments=arguments if isinstance(arguments, dict) else {},
                output=outputs.get(item.get("call_id")),
            )
            calls.append(record)
            result = record.result
            if result is not None and set(result) == {"assistant"}:
                handed_to.append(str(result["assistant"]))
        return cls(items, user_text, previous, calls, handed_to)

    def latest_order_id(self) -> str | None:
        """The order this message is about: named in it, else the most recent one mentioned."""
        ids = order_ids_in(self.user_text)
        if ids:
            return ids[0]
        for item in reversed(self.items):
            kind = _kind(item)
            if kind == "message":
                ids = order_ids_in(_content_text(item.get("content")))
                if ids:
                    return ids[-1]
            elif kind in ("function_call", "function_call_output"):
                raw = item.get("arguments") if kind == "function_call" else item.get("output")
                try:
                    value = json.loads(_content_text(raw) or "{}")
                except ValueError:
                    continue
                if isinstance(value, dict) and value.get("order_id"):
                    return str(value["order_id"])
        return None

    def intent(self) -> Intent:
        stated = classify(self.user_text)
        if stated is not None:
            return stated
        lowered = self.user_text.lower()
        if order_ids_in(self.user_text):
            # "It's 1042" answers our question: carry on with what the previous message asked.
            previous = classify(self.previous_user_text or "")
            return previous if previous in ("refund", "order_status") else "order_status"
        if _GREETING.search(lowered):
            return "greeting"
        if _THANKS.search(lowered):
            return "thanks"
        if _ORDER_WORD.search(lowered):
            return "order_status"
        return "out_of_scope"

    def last_call(self, name: str, order_id: str | None = None) -> ToolCallRecord | None:
        for call in reversed(self.calls):
            if call.name != name or call.output is None:
                continue
            if order_id is None or str(call.arguments.get("order_id", "")).lstrip("#") == order_id:
                return call
        return None


# --------------------------------------------------------------------------------------------
# Deciding


@dataclass(frozen=True)
class HandoffOption:
    """A handoff as the model sees it: the tool to call and who it reaches."""

    tool_name: str
    agent_name: str
    description: str = ""

    @classmethod
    def of(cls, handoff: Handoff) -> HandoffOption:
        return cls(handoff.tool_name, handoff.agent_name, handoff.tool_description)

    def serves(self, *words: str) -> bool:
        text = f"{self.agent_name} {self.tool_name}".lower()
        return any(word in text for word in words)


@dataclass(frozen=True)
class Decision:
    """What the model answers: a final message, a tool call, or a handoff (a function call)."""

    kind: Literal["message", "tool_call", "handoff"]
    intent: Intent
    text: str = ""
    name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, separators=(",", ":"), ensure_ascii=False)


_ROUTES: dict[str, tuple[str, ...]] = {
    "refund": ("billing", "refund"),
    "order_status": ("order",),
    "escalate": ("human", "escalat"),
}
_CAPABILITY: dict[str, str] = {
    "refund": CHECK_REFUND,
    "order_status": LOOKUP_ORDER,
    "escalate": ESCALATE,
}

OFFER = "I can check on an order, help with a refund, or connect you with a person."


def _message(intent: Intent, text: str) -> Decision:
    return Decision("message", intent, text=text)


def _call(intent: Intent, name: str, **arguments: Any) -> Decision:
    return Decision("tool_call", intent, name=name, arguments=arguments)


def _items(result: Mapping[str, Any]) -> str:
    items = result.get("items") or []
    return f" ({', '.join(str(i) for i in items)})" if items else ""


def _tool_failed(intent: Intent, what: str) -> Decision:
    return _message(
        intent,
        f"I'm sorry, something went wrong while {what}. "
        "Would you like me to connect you with a human agent?",
    )


def _ask_for_order_id(intent: Intent) -> Decision:
    if intent == "refund":
        return _message(
            intent,
            "I can help with a refund. Which order is it for? Please share the order number.",
        )
    return _message(intent, "I can check on that. Could you share the order number?")


def _already_refunded(oid: str, result: Mapping[str, Any]) -> Decision:
    """An order refunded before (by another turn): tell the customer when, how much, which."""
    when = str(result.get("refunded_at") or "")[:10]
    return _message(
        "refund",
        f"Order {oid} was already refunded: ${result.get('amount')} on {when}, refund "
        f"{result.get('refund_id')}. It goes back to your original payment method within 5-10 "
        "business days of that date. Is there anything else I can help with?",
    )


def _order_status_message(result: Mapping[str, Any]) -> str:
    if result.get("found") is False:
        return (
            f"I couldn't find order {result.get('order_id', '')} on your account. "
            "Could you double-check the order number?"
        )
    oid, status = result.get("order_id"), result.get("status")
    what = f"Order {oid}{_items(result)}"
    carrier, eta, delivered = result.get("carrier"), result.get("eta"), result.get("delivered_on")
    if status == "shipped":
        text = f"{what} has shipped with {carrier} and is expected to arrive on {eta}."
    elif status == "delivered":
        text = f"{what} was delivered by {carrier} on {delivered}."
    elif status == "processing":
        text = f"{what} is still processing; the estimated delivery date is {eta}."
    elif status == "cancelled":
        text = f"{what} was cancelled, so it won't be shipped."
    else:
        text = f"{what} is currently {status}."
    return text + " Is there anything else I can help with?"


def _refund_flow(conv: Conversation, tools: Collection[str], oid: str) -> Decision:
    refund = conv.last_call(PROCESS_REFUND, oid)
    if refund is not None:
        result = refund.result
        if result is None:
            return _tool_failed("refund", f"processing the refund for order {oid}")
        if result.get("already_refunded"):
            return _already_refunded(oid, result)
        if result.get("refunded"):
            return _message(
                "refund",
                f"I've refunded ${result['amount']} for order {oid} (refund "
                f"{result.get('refund_id')}). It will appear on your original payment method "
                "within 5-10 business days. Is there anything else I can help with?",
            )
        return _message(
            "refund",
            f"I'm sorry, I couldn't process the refund for order {oid}: {result.get('reason')}",
        )
    check = conv.last_call(CHECK_REFUND, oid)
    if check is None:
        return _call("refund", CHECK_REFUND, order_id=oid)
    result = check.result
    if result is None:
        return _tool_failed("refund", f"checking refund eligibility for order {oid}")
    if result.get("found") is False:
        return _message(
            "refund",
            f"I couldn't find order {oid} on your account. Could you double-check the order "
            "number?",
        )
    if result.get("already_refunded"):
        return _already_refunded(oid, result)
    if not result.get("eligible"):
        return _message(
            "refund",
            f"I'm sorry, order {oid} isn't eligible for a refund. {result.get('reason', '')} "
            "If you'd like, I can connect you with a human agent.",
        )
    if PROCESS_REFUND in tools:
        return _call("refund", PROCESS_REFUND, order_id=oid, amount=str(result["amount"]))
    return _message(
        "refund",
        f"Order {oid} is eligible for a refund of ${result['amount']}, but I can't issue it "
        "myself. Would you like me to connect you with a human agent?",
    )


def _do(intent: Intent, conv: Conversation, tools: Collection[str]) -> Decision:
    """The current agent holds the tool for ``intent``: run the flow one step further."""
    if intent == "escalate":
        done = conv.last_call(ESCALATE)
        if done is None:
            oid = conv.latest_order_id()
            about = f" (order {oid})" if oid else ""
            reason = f"Customer asked for a human{about}: {conv.user_text.strip()[:200]}"
            return _call(intent, ESCALATE, reason=reason)
        result = done.result
        if result is None or "ticket_id" not in result:
            return _tool_failed(intent, "opening a ticket with our human support team")
        if result.get("already_open"):
            return _message(
                intent,
                "Your request is already with our human support team under ticket "
                f"{result['ticket_id']}; someone will get back to you shortly.",
            )
        return _message(
            intent,
            "I've passed this to our human support team. Your ticket number is "
            f"{result['ticket_id']}; someone will get back to you shortly.",
        )
    oid = conv.latest_order_id()
    if oid is None:
        return _ask_for_order_id(intent)
    if intent == "refund":
        return _refund_flow(conv, tools, oid)
    lookup = conv.last_call(LOOKUP_ORDER, oid)
    if lookup is None:
        return _call(intent, LOOKUP_ORDER, order_id=oid)
    if lookup.result is None:
        return _tool_failed(intent, f"looking up order {oid}")
    return _message(intent, _order_status_message(lookup.result))


def _answer(intent: Intent, conv: Conversation) -> Decision:
    """Conversation the front desk handles itself: greetings, thanks, out-of-scope requests."""
    if intent == "greeting":
        name = customer_name(conv.user_text)
        hello = f"Hi {name}!" if name else "Hi there!"
        return _message(
            intent,
            f"{hello} Thanks for contacting the support desk. How can I help you today? {OFFER}",
        )
    if intent == "thanks":
        return _message(intent, "You're welcome! Is there anything else I can help you with?")
    return _message(
        intent,
        f"I'm sorry, I can't help with that - I'm the support desk for your orders. {OFFER}",
    )


def decide(
    input: str | Sequence[Any],
    tool_names: Collection[str],
    handoffs: Sequence[HandoffOption],
) -> Decision:
    """The next step for an agent with these tools and handoffs, given the conversation.

    Pure and deterministic; ``OfflineModel`` turns the decision into output items.

    Understood (latest user message, case-insensitive):

    * escalation — "talk to a human", "speak to a manager", "escalate", "a real person",
      "representative", "supervisor": ``escalate_to_human(reason)`` then the ticket id (the
      open one, when the conversation already has a ticket);
    * refund — "refund", "money back", "return it", "reimburse": eligibility check, then
      ``process_refund`` with the eligible amount, or an explanation when not eligible, or
      the original refund (id, amount, date) when the order was already refunded;
    * order status — "where is order 1042?", "status of my order #1042", "track 1042",
      "has it shipped?", "when will it arrive?": ``lookup_order`` then status/carrier/date;
    * a bare order id ("It's 1042", "#1043") continues what the previous message asked;
    * "it", "that order", "my order" refer to the most recent order id in the conversation;
      with none at all the agent asks for the order number;
    * greeting — "hi", "hello", "I'm Dana", "my name is Dana", "customer C-100"; thanks/bye;
    * anything else is politely declined with what the desk can do.
    """
    conv = Conversation.read(input)
    intent = conv.intent()
    tools = set(tool_names)
    capability = _CAPABILITY.get(intent)
    if capability is not None and capability in tools:
        return _do(intent, conv, tools)

    to_triage = next((h for h in handoffs if h.serves("triage")), None)
    specialists = [h for h in handoffs if h is not to_triage]

    def handoff(option: HandoffOption) -> Decision | None:
        if option.agent_name in conv.handed_to:
            return None  # already routed there this turn: never ping-pong
        return Decision("handoff", intent, name=option.tool_name)

    if to_triage is not None and not specialists:
        # A specialist: anything outside its tools goes back to the front desk.
        routed = handoff(to_triage)
        if routed is not None:
            return routed
    if intent in _ROUTES:
        if intent != "escalate" and conv.latest_order_id() is None:
            return _ask_for_order_id(intent)
        for option in specialists:
            if option.serves(*_ROUTES[intent]):
                routed = handoff(option)
                if routed is not None:
                    return routed
        return _message(
            intent,
            "I'm sorry, I can't take care of that right now. Would you like me to connect you "
            "with a human agent?",
        )
    return _answer(intent, conv)


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

    Stateless and safe to share between concurrent runs.
    """

    def __init__(self, model_name: str = DEFAULT_MODEL_NAME) -> None:
        self.model_name = model_name

    def respond(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        tools: Sequence[Tool],
        handoffs: Sequence[Handoff],
    ) -> tuple[Decision, ModelResponse]:
        """Decision and response for one call, without tracing (for tests and tooling)."""
        items = normalize_input(input)
        decision = decide(
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
