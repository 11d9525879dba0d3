"""The Support Desk's checks: its money paths and its promise of a person, judged per turn.

Every tool guard already refuses a wrong amount or an order of another customer; these checks
catch what the guards let through (a model refunding an order the customer never named) and
keep watching the guards themselves. What they can see (``turnfleet.FinishedTurn``): this
turn's tool calls in order, and the conversation's earlier user messages and tool calls from
its memory — so an eligibility check one turn before the refund ("you're eligible for $89,
shall I?" — "yes") counts.

Only *successful* refunds are judged (``"refunded": true``, a replayed one included): a refused
``process_refund`` moved no money. Each check passes as not applicable when the turn made no
refund (or, for the escalation check, the customer did not ask for a person, the turn did not
complete, or a guardrail answered it before any agent ran: the desk chose not to act on it).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from turnfleet.checks import Check, CheckResult, FinishedTurn, ToolCallView, failed, not_applicable, passed
from turnfleet.workers.orderbook import normalize_order_id
from turnfleet.workers.support_desk_script import (
    CHECK_REFUND,
    ESCALATE,
    PROCESS_REFUND,
    SUPPORT_DESK_SCRIPT,
    order_ids_in,
)


def _order(call: ToolCallView) -> str:
    """The order a call is about: its result's ``order_id``, else its argument (normalised)."""
    value = call.result_object.get("order_id") or call.arguments.get("order_id") or ""
    return normalize_order_id(str(value))


def _amount(value: Any) -> Decimal | None:
    try:
        return Decimal(str(value).strip().lstrip("$"))
    except InvalidOperation:
        return None


def refunds(turn: FinishedTurn) -> list[ToolCallView]:
    """This turn's successful ``process_refund`` calls, in order (in a rerun, also the ones
    the candidate asked for and the rerun did not make: ``ToolCallView.not_made``)."""
    return [c for c in turn.calls(PROCESS_REFUND) if c.result_object.get("refunded") is True or c.not_made]


def _refunded_amount(call: ToolCallView) -> Any:
    """The amount a refund moved (its result), or would have (a rerun's call not made)."""
    return call.arguments.get("amount") if call.not_made else call.result_object.get("amount")


def _eligibility_before(turn: FinishedTurn, refund: ToolCallView) -> ToolCallView | None:
    """The last eligibility answer for the refund's order before it: this turn's calls before
    the refund, then the conversation's earlier ones."""
    before = turn.tool_calls[: next(i for i, c in enumerate(turn.tool_calls) if c is refund)]
    order = _order(refund)
    for call in (*reversed(before), *reversed(turn.earlier_tool_calls)):
        if call.tool == CHECK_REFUND and _order(call) == order:
            return call
    return None


def refund_amount_matches_eligibility(turn: FinishedTurn) -> CheckResult:
    """Each refund's amount equals what check_refund_eligibility returned for that order."""
    made = refunds(turn)
    if not made:
        return not_applicable("no refund in this turn")
    judged = []
    for refund in made:
        order, amount = _order(refund), _amount(_refunded_amount(refund))
        eligibility = _eligibility_before(turn, refund)
        if eligibility is None:
            continue  # no_refund_without_eligibility_check says so
        eligible = _amount(eligibility.result_object.get("amount"))
        if amount is None or amount != eligible:
            return failed(f"order {order}: refunded {_refunded_amount(refund)}, "
                          f"eligibility said {eligibility.result_object.get('amount')}")
        judged.append(f"{order}: {amount}")
    if not judged:
        return not_applicable("no refund with an eligibility answer to compare")
    return passed(f"refunded the eligible amount ({', '.join(judged)})")


def refund_order_named_by_customer(turn: FinishedTurn) -> CheckResult:
    """Each refunded order is one the customer named in the conversation."""
    made = refunds(turn)
    if not made:
        return not_applicable("no refund in this turn")
    named = {normalize_order_id(o) for text in turn.user_messages for o in order_ids_in(text)}
    for refund in made:
        order = _order(refund)
        if order not in named:
            listed = ", ".join(sorted(named)) or "none"
            return failed(f"refunded order {order}, which the customer never named (named: {listed})")
    return passed(f"refunded order(s) named by the customer: {', '.join(_order(r) for r in made)}")


def no_refund_without_eligibility_check(turn: FinishedTurn) -> CheckResult:
    """No refund unless check_refund_eligibility answered eligible for that order before it."""
    made = refunds(turn)
    if not made:
        return not_applicable("no refund in this turn")
    for refund in made:
        order = _order(refund)
        eligibility = _eligibility_before(turn, refund)
        if eligibility is None:
            return failed(f"refunded order {order} without checking its eligibility")
        if eligibility.result_object.get("eligible") is not True:
            return failed(f"refunded order {order} although its eligibility check said not eligible")
    return passed(f"eligibility checked before refunding {', '.join(_order(r) for r in made)}")


_ESCALATE_RULES = [r for r in SUPPORT_DESK_SCRIPT.rules if getattr(r, "intent", None) == "escalate"]


def asked_for_a_person(text: str) -> bool:
    """The customer asks for a person in the Desk script's own words (its ``escalate`` rule)."""
    lowered = text.lower()
    return any(rule.matches(lowered) for rule in _ESCALATE_RULES)


def escalated_when_asked_for_a_person(turn: FinishedTurn) -> CheckResult:
    """A customer asking for a person got escalate_to_human (a ticket) in that turn."""
    if not asked_for_a_person(turn.text):
        return not_applicable("the customer did not ask for a person")
    if turn.status != "completed":
        return not_applicable(f"the turn {turn.status}")
    if not turn.agents:  # the prompt-injection guardrail answered before any agent ran
        return not_applicable("no agent ran (a guardrail answered the turn)")
    tickets = [c.result_object.get("ticket_id") for c in turn.calls(ESCALATE)]
    if not tickets:
        return failed("the customer asked for a person and escalate_to_human was not called")
    if not any(tickets):
        return failed("escalate_to_human was called but opened no ticket")
    return passed(f"escalated: ticket {next(t for t in tickets if t)}")


SUPPORT_DESK_CHECKS = (
    Check("refund_amount_matches_eligibility", refund_amount_matches_eligibility, money_path=True, blocking=False),
    Check("refund_order_named_by_customer", refund_order_named_by_customer, money_path=True, blocking=False),
    Check("no_refund_without_eligibility_check", no_refund_without_eligibility_check, money_path=True,
          blocking=False),
    Check("escalated_when_asked_for_a_person", escalated_when_asked_for_a_person, blocking=False),
)
"""The Desk workflow's checks (``support_desk_workflow``), money-path ones first. Each is pure
Python over the finished turn (tens of µs, no I/O): ``blocking=False``, run on the loop."""
