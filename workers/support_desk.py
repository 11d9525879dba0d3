"""The Support Desk: Triage routes, Billing refunds, Orders answers order questions.

``build_support_desk(model)`` wires the three agents to one ``Model`` (the offline model or an
OpenAI-compatible one); the instructions are real prompts, so the same desk runs on an LLM.

Where a turn starts: a conversation handed to a specialist should start its next turn at that
specialist (``SupportDesk.starting_agent(current_agent)``), so that a follow-up such as
"refund it" goes straight to Billing with the conversation's context; a specialist hands
anything outside its job back to Triage. Starting every turn at Triage would cost one extra
model call per turn and re-route what is already routed.
"""

from __future__ import annotations

from dataclasses import dataclass

from agents import Agent
from agents.models.interface import Model

from workers.context import TurnContext
from workers.tools import check_refund_eligibility, escalate_to_human, lookup_order, process_refund

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
   offer to connect the customer with a person.
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


@dataclass
class SupportDesk:
    """The desk's agents by name, and where a turn starts."""

    agents: dict[str, Agent[TurnContext]]

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
        handoff_description="Front desk: greets, routes requests, declines what the desk can't do.",
        model=model,
        tools=[escalate_to_human],
    )
    billing = Agent[TurnContext](
        name=BILLING,
        instructions=BILLING_INSTRUCTIONS,
        handoff_description="Refunds and charges: checks eligibility and issues refunds.",
        model=model,
        tools=[lookup_order, check_refund_eligibility, process_refund, escalate_to_human],
    )
    orders = Agent[TurnContext](
        name=ORDERS,
        instructions=ORDERS_INSTRUCTIONS,
        handoff_description="Order status: where an order is, carrier, delivery dates.",
        model=model,
        tools=[lookup_order, escalate_to_human],
    )
    triage.handoffs = [billing, orders]
    billing.handoffs = [triage]
    orders.handoffs = [triage]
    return SupportDesk(agents={agent.name: agent for agent in (triage, billing, orders)})
