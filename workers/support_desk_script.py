"""The Support Desk's script for the offline model: what its agents do, as data.

One instance of ``turnfleet/offline_script.py``'s ``Script`` (read its docstring for how a script
decides). Understood (latest user message, case-insensitive):

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

Triage (handoffs to Billing and Orders) routes, greets and declines; a specialist (its only
handoff goes back to Triage) hands anything outside its tools back to Triage. Importing this
module does not import the Agents SDK.

``SUPPORT_DESK_FLAWED_SCRIPT`` is the same script with one planted mistake, for the model
``turnfleet-offline-flawed`` (the wrong-refund story: a bad turn no tool guard stops, which
the checks must catch): on about one refund turn in three (``flawed_turn``, a digest of the
customer's message, so the same traffic always fails on the same turns) a customer with
another eligible order gets *that* order checked and refunded, for its own right amount,
instead of the one they named (``other_eligible_order``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from turnfleet.offline_script import (
    Call,
    Facts,
    FollowUp,
    Intent,
    Outcome,
    Rule,
    Script,
    Slot,
    Step,
)

# Tool names of the Support Desk's agents (workers/tools.py).
LOOKUP_ORDER = "lookup_order"
CHECK_REFUND = "check_refund_eligibility"
PROCESS_REFUND = "process_refund"
ESCALATE = "escalate_to_human"

OFFER = "I can check on an order, help with a refund, or connect you with a person."
ANYTHING_ELSE = "Is there anything else I can help with?"

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

ORDER_ID = Slot("order_id", (_ORDER_ID_EXPLICIT, _ORDER_ID_BARE))
"""Order ids in free text: "order 1042", "#1042", "order number 1042", or a bare 4–10 digit
number that is not part of a customer id ("C-100"), a date, an amount or a ticket id."""


def order_ids_in(text: str) -> list[str]:
    """Order ids mentioned in free text, in order of appearance (``ORDER_ID``)."""
    return ORDER_ID.find(text)


def customer_name(text: str) -> str | None:
    """The name a customer introduces themselves with ("I'm Dana", "my name is dana")."""
    match = _NAME_DECLARED.search(text) or _NAME_CAPITALISED.search(text)
    return match.group(1).capitalize() if match else None


def _greeting(facts: Facts) -> str:
    name = customer_name(facts.text)
    hello = f"Hi {name}!" if name else "Hi there!"
    return f"{hello} Thanks for contacting the support desk. How can I help you today? {OFFER}"


def _failed(what: str) -> str:
    return (
        f"I'm sorry, something went wrong while {what}. "
        "Would you like me to connect you with a human agent?"
    )


def _already_refunded(facts: Facts) -> str:
    """An order refunded before (by another turn): tell the customer when, how much, which."""
    result = facts.result
    when = str(result.get("refunded_at") or "")[:10]
    return (
        f"Order {facts.slot} was already refunded: ${result.get('amount')} on {when}, refund "
        f"{result.get('refund_id')}. It goes back to your original payment method within 5-10 "
        f"business days of that date. {ANYTHING_ELSE}"
    )


def _items(result: Mapping[str, Any]) -> str:
    items = result.get("items") or []
    return f" ({', '.join(str(i) for i in items)})" if items else ""


def _order_status(facts: Facts) -> str:
    result = facts.result
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
    return f"{text} {ANYTHING_ELSE}"


def _escalation_reason(facts: Facts) -> str:
    about = f" (order {facts.slot})" if facts.slot else ""
    return f"Customer asked for a human{about}: {facts.text.strip()[:200]}"


def _refunded(facts: Facts) -> str:
    result = facts.result
    return (
        f"I've refunded ${result['amount']} for order {facts.slot} (refund "
        f"{result.get('refund_id')}). It will appear on your original payment method "
        f"within 5-10 business days. {ANYTHING_ELSE}"
    )


def _not_processed(facts: Facts) -> str:
    return (
        f"I'm sorry, I couldn't process the refund for order {facts.slot}: "
        f"{facts.result.get('reason')}"
    )


def _not_eligible(facts: Facts) -> str:
    return (
        f"I'm sorry, order {facts.slot} isn't eligible for a refund. "
        f"{facts.result.get('reason', '')} If you'd like, I can connect you with a human agent."
    )


def _eligible_but_cannot_issue(facts: Facts) -> str:
    return (
        f"Order {facts.slot} is eligible for a refund of ${facts.result['amount']}, but I can't "
        "issue it myself. Would you like me to connect you with a human agent?"
    )


ESCALATE_FLOW = Step(
    Call(ESCALATE, {"reason": _escalation_reason}),
    outcomes=(
        Outcome(lambda r: "ticket_id" not in r, _failed("opening a ticket with our human support team")),
        Outcome(
            "already_open",
            "Your request is already with our human support team under ticket {ticket_id}; "
            "someone will get back to you shortly.",
        ),
        Outcome(
            None,
            "I've passed this to our human support team. Your ticket number is {ticket_id}; "
            "someone will get back to you shortly.",
        ),
    ),
    failed=_failed("opening a ticket with our human support team"),
    per_slot=False,
)

REFUND_FLOW = (
    Step(
        Call(CHECK_REFUND, {"order_id": "{order_id}"}),
        outcomes=(
            Outcome(
                lambda r: r.get("found") is False,
                "I couldn't find order {order_id} on your account. Could you double-check the "
                "order number?",
            ),
            Outcome("already_refunded", _already_refunded),
            Outcome(lambda r: not r.get("eligible"), _not_eligible),
            Outcome(
                None,
                Call(
                    PROCESS_REFUND,
                    {"order_id": "{order_id}", "amount": lambda f: str(f.result["amount"])},
                    otherwise=_eligible_but_cannot_issue,
                ),
            ),
        ),
        failed=_failed("checking refund eligibility for order {order_id}"),
    ),
    Step(
        Call(PROCESS_REFUND),
        outcomes=(
            Outcome("already_refunded", _already_refunded),
            Outcome("refunded", _refunded),
            Outcome(None, _not_processed),
        ),
        failed=_failed("processing the refund for order {order_id}"),
    ),
)

ORDER_STATUS_FLOW = Step(
    Call(LOOKUP_ORDER, {"order_id": "{order_id}"}),
    outcomes=(Outcome(None, _order_status),),
    failed=_failed("looking up order {order_id}"),
)

SUPPORT_DESK_SCRIPT = Script(
    rules=(
        Rule("escalate", _ESCALATE),
        Rule("refund", _REFUND),
        Rule("order_status", _STATUS),
        Rule("order_status", (_WHERE, _ORDERISH)),
        # "It's 1042" answers our question: carry on with what the previous message asked.
        FollowUp(continues=("refund", "order_status"), otherwise="order_status"),
        Rule("greeting", _GREETING),
        Rule("thanks", _THANKS),
        Rule("order_status", _ORDER_WORD),
    ),
    intents=(
        Intent("escalate", steps=(ESCALATE_FLOW,), route=("human", "escalat")),
        Intent(
            "refund",
            steps=REFUND_FLOW,
            route=("billing", "refund"),
            ask="I can help with a refund. Which order is it for? Please share the order number.",
        ),
        Intent(
            "order_status",
            steps=(ORDER_STATUS_FLOW,),
            route=("order",),
            ask="I can check on that. Could you share the order number?",
        ),
        Intent("greeting", reply=_greeting),
        Intent("thanks", reply="You're welcome! Is there anything else I can help you with?"),
        Intent(
            "out_of_scope",
            reply=f"I'm sorry, I can't help with that - I'm the support desk for your orders. {OFFER}",
        ),
    ),
    fallback="out_of_scope",
    slot=ORDER_ID,
    home=("triage",),
    unavailable=(
        "I'm sorry, I can't take care of that right now. Would you like me to connect you with "
        "a human agent?"
    ),
)
"""The Support Desk's script: the offline model's default (the built-in app's)."""


# --------------------------------------------------------------------------------------------
# The flawed variant (module docstring)

FLAWED_ONE_IN = 3


def flawed_turn(text: str) -> bool:
    """Whether the flawed model errs on a refund asked for in ``text`` (the latest user
    message): about one message in ``FLAWED_ONE_IN``, always the same ones."""
    return hashlib.sha256(text.encode("utf-8")).digest()[0] % FLAWED_ONE_IN == 0


def other_eligible_order(order_id: str) -> str | None:
    """Another order of the same customer that the order book judges refundable (the lowest
    number), or None. A demo copy of a packaged order (``copy_orders``: the packaged number
    plus a run number) maps to the same copy of its sibling. The flawed model peeks at the
    book to make a plausible mistake; the tools still judge everything for real."""
    from turnfleet.workers.orderbook import load_order_book, normalize_order_id

    book = load_order_book()
    oid = normalize_order_id(order_id)
    base, run = oid, ""
    if oid not in book.orders:
        base = next((o for o in book.orders if oid.startswith(o) and len(oid) - len(o) >= 4
                     and oid[len(o):].isdigit()), "")
        if not base:
            return None
        run = oid[len(base):]
    named = book.orders[base]
    others = sorted(o.order_id for o in book.orders.values()
                    if o.customer_id == named.customer_id and o.order_id != base
                    and book.refund_eligibility(o).eligible)
    return others[0] + run if others else None


def _order_to_check(facts: Facts) -> str:
    """The planted mistake: on a flawed turn, another eligible order of the customer's."""
    named = facts.slot or ""
    if named and flawed_turn(facts.text):
        return other_eligible_order(named) or named
    return named


def _checked_order(facts: Facts) -> str:
    """The order the eligibility answer is about (the one the flawed model went on with)."""
    return str(facts.result.get("order_id") or facts.slot or "")


def _flawed_refund_flow() -> tuple[Step, ...]:
    check, refund = REFUND_FLOW
    *judged, eligible = check.outcomes
    assert isinstance(eligible.then, Call) and eligible.then.tool == PROCESS_REFUND
    go_on = replace(eligible.then, arguments={**eligible.then.arguments, "order_id": _checked_order})
    # per_slot=False: the calls this turn made count whichever order they were about (the
    # flawed turn's calls are about another order than the one the customer named).
    return (
        replace(check, call=replace(check.call, arguments={"order_id": _order_to_check}),
                outcomes=(*judged, replace(eligible, then=go_on)), per_slot=False),
        replace(refund, per_slot=False),
    )


SUPPORT_DESK_FLAWED_SCRIPT = replace(
    SUPPORT_DESK_SCRIPT,
    intents=tuple(replace(i, steps=_flawed_refund_flow()) if i.name == "refund" else i
                  for i in SUPPORT_DESK_SCRIPT.intents),
)
"""The Desk's script with the planted wrong-order refund (module docstring); everything else
is the Desk's script."""
