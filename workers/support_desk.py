"""The Support Desk: Triage routes, Billing refunds, Orders answers order questions.

``build_support_desk(model)`` wires the three agents to one ``Model`` (the offline model or an
OpenAI-compatible one); the instructions are real prompts, so the same desk runs on an LLM. On
the offline model the agents follow the desk's script (``workers/support_desk_script.py``).

Where a turn starts: a conversation handed to a specialist should start its next turn at that
specialist (``SupportDesk.starting_agent(current_agent)``), so that a follow-up such as
"refund it" goes straight to Billing with the conversation's context; a specialist hands
anything outside its job back to Triage. Starting every turn at Triage would cost one extra
model call per turn and re-route what is already routed.

Guardrail: every agent has the input guardrail ``prompt_injection`` (deterministic, offline,
run before the first model call so a refused message costs no tokens): a message that tells
the desk to ignore, forget or override its instructions, asks for its system prompt, or
switches it into another "mode" trips it. A tripwire is an outcome, not a failure: the turn
completes with the reply the desk defines for that guardrail (``SupportDesk.guardrail_reply``),
the worker records a ``guardrail`` telemetry event, and the message is not kept in the
conversation's memory (it must not steer later turns).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from agents import Agent, GuardrailFunctionOutput, RunContextWrapper, input_guardrail
from agents.models.interface import Model

from turnfleet.models import DEFAULT_WORKFLOW
from turnfleet.context import TurnContext
from turnfleet.offline_script import Script
from turnfleet.workers.support_desk_checks import SUPPORT_DESK_CHECKS
from turnfleet.workers.support_desk_script import SUPPORT_DESK_SCRIPT
from turnfleet.workflow import App, Workflow
from turnfleet.workers.tools import check_refund_eligibility, escalate_to_human, lookup_order, process_refund

TRIAGE = "Triage"
BILLING = "Billing"
ORDERS = "Orders"

_HOUSE_RULES = """
House rules:
- Be brief, warm and concrete. Never invent order details, amounts, dates or ticket numbers:
  use only what the tools return.
- Orders are identified by their order number (e.g. 1042). If the customer refers to "it" or
  "that order", use the most recent order number in the conversation; if there is none, ask for
  it before doing anything else.
- If the customer asks for a human, a manager or to escalate, call escalate_to_human with a
  one-sentence reason and give them the ticket number it returns.
""".strip()

TRIAGE_INSTRUCTIONS = f"""
You are Triage, the first point of contact of an online shop's customer support desk.

Your job is to understand what the customer needs and route them:
- Questions about where an order is, its status, shipping or delivery: hand off to Orders.
- Refunds, returns, charges or money back: hand off to Billing.
- Greetings: greet the customer (by name if they gave it) and ask how you can help.
- Anything the desk can't help with (weather, general knowledge, other companies): decline
  politely and say what you can do: check on an order, help with a refund, or connect them
  with a person.
Do not answer order or refund questions yourself; the specialists have the tools for that.

{_HOUSE_RULES}
""".strip()

BILLING_INSTRUCTIONS = f"""
You are Billing, the refunds specialist of an online shop's customer support desk.

For a refund request:
1. Call check_refund_eligibility with the order number.
2. If the order is eligible, call process_refund with the same order number and exactly the
   eligible amount it returned (e.g. "89.00"). Then confirm the amount and the refund id, and
   say it reaches the original payment method within 5-10 business days.
3. If it is not eligible, do not call process_refund: explain the reason the tool gave and
   offer to connect the customer with a person. If it says the order was already refunded,
   tell the customer when, how much and the refund id it returns: an order is refunded once.
You may use lookup_order to answer questions about an order's status.
If the customer asks about something else (greetings, unrelated questions), hand off back to
Triage.

{_HOUSE_RULES}
""".strip()

ORDERS_INSTRUCTIONS = f"""
You are Orders, the order-status specialist of an online shop's customer support desk.

For a question about an order, call lookup_order with the order number and answer with its
status, the carrier, and the expected delivery date (or the date it was delivered). If the
order is not found on the customer's account, say so and ask them to check the number.
For refunds or anything else outside order status, hand off back to Triage.

{_HOUSE_RULES}
""".strip()


SIDE_EFFECT_TOOLS = (process_refund.name, escalate_to_human.name)
"""The Desk's tools that change the world (a refund, a ticket): a rerun never runs them."""

PROMPT_INJECTION = "prompt_injection"

_INJECTION = re.compile(
    r"\b(ignore|disregard|forget|override|bypass)\b[^.?!\n]{0,40}?\b(instructions?|rules|"
    r"prompts?|guidelines|polic(y|ies)|guardrails?)\b"
    r"|\b(system|developer|hidden|initial) (prompt|message|instructions)\b"
    r"|\b(developer|god|dan|jailbreak|admin) mode\b|\bjailbreak\w*\b"
    r"|\byou are (now|no longer)\b|\bpretend (to be|you are)\b",
    re.IGNORECASE,
)

GUARDRAIL_REPLIES = {
    PROMPT_INJECTION: (
        "I can't change how I work or share my instructions, but I'm happy to help with your "
        "orders: I can check on an order, help with a refund, or connect you with a person."
    ),
}
"""The safe reply a turn completes with when a guardrail's tripwire fires, per guardrail."""
DEFAULT_GUARDRAIL_REPLY = (
    "I'm sorry, I can't help with that request. I can check on an order, help with a refund, or "
    "connect you with a person."
)


def _latest_user_text(items: str | list[Any]) -> str:
    if isinstance(items, str):
        return items
    for item in reversed(items):
        get = item.get if isinstance(item, dict) else lambda k, d=None, i=item: getattr(i, k, d)
        if get("role") == "user":
            content = get("content")
            if isinstance(content, str):
                return content
            return " ".join(str(p.get("text", "")) for p in content or [] if isinstance(p, dict))
    return ""


def injection_attempt(text: str) -> str | None:
    """The phrase that makes ``text`` a prompt-injection attempt, or None."""
    match = _INJECTION.search(text)
    return match.group(0) if match else None


@input_guardrail(name=PROMPT_INJECTION, run_in_parallel=False)
async def prompt_injection(
    ctx: RunContextWrapper[TurnContext], agent: Agent[TurnContext], items: str | list[Any]
) -> GuardrailFunctionOutput:
    """Trips on the latest user message when it tries to override the desk's instructions."""
    matched = injection_attempt(_latest_user_text(items))
    return GuardrailFunctionOutput(output_info={"matched": matched}, tripwire_triggered=bool(matched))


@dataclass
class SupportDesk:
    """The desk's agents by name, where a turn starts, what a tripped guardrail answers, and the
    script the offline model follows for them (``OfflineModel(script=desk.script)``; also the
    model's default, as the built-in app's)."""

    agents: dict[str, Agent[TurnContext]]
    guardrail_replies: dict[str, str] = field(default_factory=lambda: dict(GUARDRAIL_REPLIES))
    script: Script = SUPPORT_DESK_SCRIPT

    def guardrail_reply(self, guardrail: str) -> str:
        """The reply a turn completes with when ``guardrail`` tripped."""
        return self.guardrail_replies.get(guardrail) or DEFAULT_GUARDRAIL_REPLY

    def starting_agent(self, name: str | None) -> Agent[TurnContext]:
        """The agent a turn starts at: the conversation's current agent, else Triage."""
        return self.agents.get(name or TRIAGE) or self.agents[TRIAGE]

    @property
    def triage(self) -> Agent[TurnContext]:
        return self.agents[TRIAGE]


def build_support_desk(model: Model) -> SupportDesk:
    """Three agents on one model; handoffs are set after creation because they are circular."""
    triage = Agent[TurnContext](
        name=TRIAGE,
        instructions=TRIAGE_INSTRUCTIONS,
        input_guardrails=[prompt_injection],
        handoff_description="Front desk: greets, routes requests, declines what the desk can't do.",
        model=model,
        tools=[escalate_to_human],
    )
    billing = Agent[TurnContext](
        name=BILLING,
        instructions=BILLING_INSTRUCTIONS,
        input_guardrails=[prompt_injection],
        handoff_description="Refunds and charges: checks eligibility and issues refunds.",
        model=model,
        tools=[lookup_order, check_refund_eligibility, process_refund, escalate_to_human],
    )
    orders = Agent[TurnContext](
        name=ORDERS,
        instructions=ORDERS_INSTRUCTIONS,
        input_guardrails=[prompt_injection],
        handoff_description="Order status: where an order is, carrier, delivery dates.",
        model=model,
        tools=[lookup_order, escalate_to_human],
    )
    triage.handoffs = [billing, orders]
    billing.handoffs = [triage]
    orders.handoffs = [triage]
    return SupportDesk(agents={agent.name: agent for agent in (triage, billing, orders)})


def support_desk_workflow(model: Model, trace_name: str = "Support Desk") -> Workflow:
    """The built-in workflow (``support-desk``): the Desk's agents as a ``turnfleet.Workflow``,
    what a worker serves without ``--app``, with its checks (``workers/support_desk_checks.py``)."""
    desk = build_support_desk(model)
    return Workflow(name=DEFAULT_WORKFLOW, agent=desk.triage, guardrail_replies=dict(GUARDRAIL_REPLIES),
                    default_guardrail_reply=DEFAULT_GUARDRAIL_REPLY, trace_name=trace_name,
                    offline_script=desk.script, checks=SUPPORT_DESK_CHECKS,
                    side_effect_tools=SIDE_EFFECT_TOOLS)


def builtin_app(model: Model, trace_name: str = "Support Desk") -> App:
    return App([support_desk_workflow(model, trace_name)])
