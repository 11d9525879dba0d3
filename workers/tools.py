"""The Support Desk's tools: order lookup, refund eligibility, refunds and escalation.

Every tool answers with a short JSON object. Business refusals (unknown order, not eligible,
wrong amount, already refunded) are answers with a ``reason``, not exceptions and not tool
errors, so the model can explain them. An exception inside a tool is a tool error
(``turnfleet.tool_errors``): the tool answers ``tool_error_output(...)`` and telemetry counts it.

**A refund is made at most once per order, ever.** The refund is recorded under the order
(``keys.order_refund(order_id)``) with ``SET NX`` and appended to the refund ledger
(``keys.REFUND_LEDGER``) in the same Lua script — ``turnfleet.side_effects.claim``, the
mechanism under the public ``turnfleet.once``, with the Desk's own record keys and shapes: of any number of turns asking at once, on any
workers, exactly one refunds; the others get that refund back as their answer
(``"already_refunded": true`` with its id, amount and time), and a retried attempt of the
refunding turn gets it back flagged ``"replayed": true``. ``check_refund_eligibility`` reads
the same record, so an already refunded order is answered "not eligible: already refunded"
before the model even tries. The record is part of the ledger: nothing expires or purges it.

**One escalation ticket per conversation**, the same way (``keys.conversation_escalation``):
a later ask in the conversation, from any turn, gets the open ticket back.

Redis failures are not turned into text for the model (the SDK's default): they propagate as
``ToolUnavailable``, the attempt fails and the turn is retried — safely, because of the
once-only records above. (The SDK wraps any other exception from a tool in ``UserError``,
which reads as a deterministic failure; an ``AgentsException`` subclass passes through as
itself.)
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal, InvalidOperation
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from agents import RunContextWrapper, custom_span, function_tool
from agents.exceptions import AgentsException
from redis.asyncio import Redis
from redis.exceptions import RedisError

from turnfleet import keys
from turnfleet.models import utcnow
from turnfleet.side_effects import claim, record_once  # noqa: F401 - record_once: tests import it here
from turnfleet.tool_errors import tool_error_output
from turnfleet.context import TurnContext
from turnfleet.workers.orderbook import (
    Order,
    OrderBook,
    OrderNotFound,
    find_order,
    load_order_book,
    normalize_order_id,
)

log = structlog.get_logger(__name__)

def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _short_hash(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length].upper()


def refund_id(turn_id: str, order_id: str) -> str:
    """Deterministic per turn and order, so a replayed refund carries the same id (and the
    turns racing for one order each propose their own id; the stored one is the winner's)."""
    return f"RF-{_short_hash(f'{turn_id}:{order_id}', 10)}"


def ticket_id(turn_id: str) -> str:
    """Deterministic per turn, so a retried escalation reports the same ticket."""
    return f"ESC-{_short_hash(turn_id, 8)}"


class ToolUnavailable(AgentsException):
    """A tool could not reach what it depends on (Redis): transient, the turn should be retried.

    The original error is the ``__cause__``.
    """


def tool_failure(ctx: RunContextWrapper[Any], error: Exception) -> str:
    """Redis/network failures fail the attempt (to be retried); bad input goes back to the model."""
    if isinstance(error, RedisError | OSError):
        name = getattr(ctx, "tool_name", "tool")
        raise ToolUnavailable(f"{name} failed: {type(error).__name__}: {error}") from error
    name = getattr(ctx, "tool_name", "tool")
    log.warning("tool.failed", tool=name, error_type=type(error).__name__)
    return tool_error_output(name, error)


async def _about_order(
    ctx: RunContextWrapper[TurnContext],
    order_id: str,
    answer: Callable[[OrderBook, Order], Awaitable[dict[str, Any]]],
) -> str:
    """Answer about one of the customer's orders; another customer's order is not found."""
    book = load_order_book()
    try:
        order = await find_order(book, ctx.context.redis, order_id, ctx.context.customer_id)
    except OrderNotFound as error:
        return _dumps({"order_id": error.order_id, "found": False, "reason": str(error)})
    return _dumps({**await answer(book, order), "currency": book.currency})


async def refund_of(redis: Redis, order_id: str) -> dict[str, Any] | None:
    """The refund made for an order, if any (``keys.order_refund``)."""
    stored = await redis.get(keys.order_refund(order_id))
    return json.loads(stored) if stored else None


def already_refunded(refund: dict[str, Any]) -> dict[str, Any]:
    """How a tool tells the model an order was refunded before: the original refund."""
    return {
        "already_refunded": True,
        "refund_id": refund["refund_id"],
        "amount": refund["amount"],
        "currency": refund["currency"],
        "refunded_at": refund["refunded_at"],
        "reason": f"Order {refund['order_id']} was already refunded: {refund['amount']} "
        f"{refund['currency']} on {refund['refunded_at'][:10]} (refund {refund['refund_id']}).",
    }


def _parse_amount(amount: str) -> Decimal | None:
    cleaned = amount.strip().upper().removeprefix("USD").strip().lstrip("$").replace(",", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() and value > 0 else None


@function_tool(failure_error_function=tool_failure)
async def lookup_order(ctx: RunContextWrapper[TurnContext], order_id: str) -> str:
    """Look up one of the customer's orders: status, items, amount, carrier, ETA or delivery date.

    Args:
        order_id: The order number, e.g. "1042".
    """
    async def summary(book: OrderBook, order: Order) -> dict[str, Any]:
        return {"found": True, **order.summary()}

    return await _about_order(ctx, order_id, summary)


@function_tool(failure_error_function=tool_failure)
async def check_refund_eligibility(ctx: RunContextWrapper[TurnContext], order_id: str) -> str:
    """Check whether one of the customer's orders can be refunded, and for how much.

    Call this before process_refund; refund exactly the amount it returns.

    Args:
        order_id: The order number, e.g. "1042".
    """
    async def eligibility(book: OrderBook, order: Order) -> dict[str, Any]:
        refund = await refund_of(ctx.context.redis, order.order_id)
        # Refunded by another turn: say so. By this turn (a retried attempt): carry on, and
        # process_refund gives the attempt its own refund back ("replayed").
        if refund is not None and refund["turn_id"] != ctx.context.turn_id:
            return {"order_id": order.order_id, "eligible": False, "amount": "0.00",
                    **already_refunded(refund)}
        return book.refund_eligibility(order).as_dict()

    return await _about_order(ctx, order_id, eligibility)


@function_tool(failure_error_function=tool_failure)
async def process_refund(ctx: RunContextWrapper[TurnContext], order_id: str, amount: str) -> str:
    """Refund an eligible order to the customer's original payment method.

    Only call this after check_refund_eligibility said the order is eligible.

    Args:
        order_id: The order number, e.g. "1042".
        amount: The refund in USD with cents, e.g. "89.00"; must equal the eligible amount.
    """
    turn = ctx.context
    book = load_order_book()
    oid = normalize_order_id(order_id)
    try:
        order = await find_order(book, turn.redis, oid, turn.customer_id)
    except OrderNotFound as error:
        return _dumps({"order_id": error.order_id, "refunded": False, "reason": str(error)})
    with custom_span("refund.policy_check", data={"order_id": oid}) as span:
        eligibility = book.refund_eligibility(order)
        span.span_data.data.update(eligible=eligibility.eligible, amount=f"{eligibility.amount:.2f}")
    if not eligibility.eligible:
        return _dumps(
            {"order_id": oid, "refunded": False, "reason": f"Not eligible: {eligibility.reason}"}
        )
    requested = _parse_amount(amount)
    if requested != eligibility.amount:
        return _dumps(
            {
                "order_id": oid,
                "refunded": False,
                "reason": f"The amount {amount!r} does not match the eligible refund of "
                f"{eligibility.amount:.2f}; refund exactly the eligible amount.",
            }
        )
    record = {
        "refund_id": refund_id(turn.turn_id, oid),
        "order_id": oid,
        "amount": f"{eligibility.amount:.2f}",
        "currency": book.currency,
        "customer_id": turn.customer_id,
        "conversation_id": turn.conversation_id,
        "turn_id": turn.turn_id,
        "attempt": turn.attempt,
        # Whole seconds: a fixed length, so an answer quoting it has a fixed token count.
        "refunded_at": utcnow().isoformat(timespec="seconds"),
    }
    entry = {
        name: str(record[name])
        for name in ("refund_id", "turn_id", "order_id", "amount", "currency", "customer_id",
                     "conversation_id", "attempt", "refunded_at")
    }
    # A custom span makes the ledger write its own step in the replay (see README, "Custom spans").
    with custom_span("refund.ledger_write", data={"order_id": oid, "amount": record["amount"]}) as span:
        made = await claim(ctx, "refund", keys.order_refund(oid), record,
                           ledger=keys.REFUND_LEDGER, entry=entry)
        stored, created, ours = made.value, made.created, not made.already
        span.span_data.data.update(refund_id=stored["refund_id"], replayed=made.replayed,
                                   already_refunded=made.already)
    log.info(
        "refund.made" if created else "refund.replayed" if ours else "refund.already_made",
        turn_id=turn.turn_id,
        order_id=oid,
        amount=stored["amount"],
        refund_id=stored["refund_id"],
        refunded_by=stored["turn_id"],
    )
    if not ours:
        return _dumps({"order_id": oid, "refunded": False, **already_refunded(stored)})
    return _dumps(
        {
            "refunded": True,
            "refund_id": stored["refund_id"],
            "order_id": stored["order_id"],
            "amount": stored["amount"],
            "currency": stored["currency"],
            "replayed": not created,
        }
    )


@function_tool(failure_error_function=tool_failure)
async def escalate_to_human(ctx: RunContextWrapper[TurnContext], reason: str) -> str:
    """Open a ticket for the human support team when the customer asks for a person or the
    request can't be solved here. A conversation has one ticket: asking again returns it.

    Args:
        reason: One sentence on what the customer needs, for the human agent.
    """
    turn = ctx.context
    record = {
        "ticket_id": ticket_id(turn.turn_id),
        "reason": reason.strip()[:500],
        "customer_id": turn.customer_id,
        "conversation_id": turn.conversation_id,
        "turn_id": turn.turn_id,
        "attempt": turn.attempt,
    }
    key = keys.conversation_escalation(turn.conversation_id)
    with custom_span("escalation.ticket_write", data={"ticket_id": record["ticket_id"]}) as span:
        made = await claim(ctx, "escalation", key, record)
        stored, created, ours = made.value, made.created, not made.already
        span.span_data.data.update(ticket_id=stored["ticket_id"], replayed=made.replayed,
                                   already_open=made.already)
    log.info(
        "escalation.opened" if created else "escalation.replayed" if ours else "escalation.already_open",
        turn_id=turn.turn_id,
        ticket_id=stored["ticket_id"],
    )
    answer: dict[str, Any] = {
        "ticket_id": stored["ticket_id"],
        "status": "open",
        "queue": "human-support",
        "replayed": made.replayed,
    }
    if not ours:
        answer["already_open"] = True
    return _dumps(answer)


SUPPORT_TOOLS = {
    tool.name: tool
    for tool in (lookup_order, check_refund_eligibility, process_refund, escalate_to_human)
}
