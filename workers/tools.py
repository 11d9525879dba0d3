"""The Support Desk's tools: order lookup, refund eligibility, refunds and escalation.

Every tool answers with a short JSON object. Business refusals (unknown order, not eligible,
wrong amount) are answers, not exceptions, so the model can explain them. Side effects happen
once per turn: a refund is recorded under ``keys.refund(turn_id, order_id)`` and appended to
the refund ledger in the same Lua script, and an escalation under ``keys.escalation(turn_id)``;
a retried attempt of the same turn finds the first attempt's record and returns it flagged
``"replayed": true`` instead of acting again.

Redis failures are not turned into text for the model (the SDK's default): they propagate as
``ToolUnavailable``, the attempt fails and the turn is retried — safely, because of the
idempotency above. (The SDK wraps any other exception from a tool in ``UserError``, which reads
as a deterministic failure; an ``AgentsException`` subclass passes through as itself.)
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal, InvalidOperation
from collections.abc import Callable
from typing import Any

import structlog
from agents import RunContextWrapper, custom_span, function_tool
from agents.exceptions import AgentsException
from redis.asyncio import Redis
from redis.exceptions import RedisError

from turnfleet import keys
from workers.context import TurnContext
from workers.orderbook import Order, OrderBook, OrderNotFound, load_order_book, normalize_order_id

log = structlog.get_logger(__name__)

RECORD_ONCE = """
-- KEYS[1]: where the side effect is recorded; KEYS[2] (optional): a stream that gets one
-- entry (ARGV[2..], field/value pairs) the first time only. ARGV[1]: the record (JSON).
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  if KEYS[2] then
    redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
  end
  return {1, ARGV[1]}
end
return {0, redis.call('GET', KEYS[1])}
"""


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _short_hash(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length].upper()


def refund_id(turn_id: str, order_id: str) -> str:
    """Deterministic per turn and order, so a replayed refund carries the same id."""
    return f"RF-{_short_hash(f'{turn_id}:{order_id}', 10)}"


def ticket_id(turn_id: str) -> str:
    """Deterministic per turn, so a retried escalation reports the same ticket."""
    return f"ESC-{_short_hash(turn_id, 8)}"


async def record_once(
    redis: Redis,
    key: str,
    record: dict[str, Any],
    stream: str | None = None,
    entry: dict[str, str] | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Store ``record`` at ``key`` unless something is there; on first store also XADD ``entry``.

    Returns (created, the stored record). One script, so the record and the ledger entry are
    written together or not at all.
    """
    script = redis.register_script(RECORD_ONCE)
    stream_keys = [stream] if stream else []
    args: list[str] = [_dumps(record)]
    for name, value in (entry or {}).items():
        args += [name, value]
    created, stored = await script(keys=[key, *stream_keys], args=args)
    return bool(created), json.loads(stored)


class ToolUnavailable(AgentsException):
    """A tool could not reach what it depends on (Redis): transient, the turn should be retried.

    The original error is the ``__cause__``.
    """


def tool_failure(ctx: RunContextWrapper[Any], error: Exception) -> str:
    """Redis/network failures fail the attempt (to be retried); bad input goes back to the model."""
    if isinstance(error, RedisError | OSError):
        name = getattr(ctx, "tool_name", "tool")
        raise ToolUnavailable(f"{name} failed: {type(error).__name__}: {error}") from error
    log.warning("tool.failed", error_type=type(error).__name__)
    return _dumps({"error": f"The tool failed ({type(error).__name__}). Try again or escalate."})


def _about_order(
    ctx: RunContextWrapper[TurnContext],
    order_id: str,
    answer: Callable[[OrderBook, Order], dict[str, Any]],
) -> str:
    """Answer about one of the customer's orders; another customer's order is not found."""
    book = load_order_book()
    try:
        order = book.get(order_id, ctx.context.customer_id)
    except OrderNotFound as error:
        return _dumps({"order_id": error.order_id, "found": False, "error": str(error)})
    return _dumps({**answer(book, order), "currency": book.currency})


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
    return _about_order(ctx, order_id, lambda book, order: {"found": True, **order.summary()})


@function_tool(failure_error_function=tool_failure)
async def check_refund_eligibility(ctx: RunContextWrapper[TurnContext], order_id: str) -> str:
    """Check whether one of the customer's orders can be refunded, and for how much.

    Call this before process_refund; refund exactly the amount it returns.

    Args:
        order_id: The order number, e.g. "1042".
    """
    return _about_order(
        ctx, order_id, lambda book, order: book.refund_eligibility(order).as_dict()
    )


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
        order = book.get(oid, turn.customer_id)
    except OrderNotFound as error:
        return _dumps({"order_id": error.order_id, "refunded": False, "error": str(error)})
    with custom_span("refund.policy_check", data={"order_id": oid}) as span:
        eligibility = book.refund_eligibility(order)
        span.span_data.data.update(eligible=eligibility.eligible, amount=f"{eligibility.amount:.2f}")
    if not eligibility.eligible:
        return _dumps(
            {"order_id": oid, "refunded": False, "error": f"Not eligible: {eligibility.reason}"}
        )
    requested = _parse_amount(amount)
    if requested != eligibility.amount:
        return _dumps(
            {
                "order_id": oid,
                "refunded": False,
                "error": f"The amount {amount!r} does not match the eligible refund of "
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
    }
    entry = {
        name: str(record[name])
        for name in ("refund_id", "turn_id", "order_id", "amount", "currency", "customer_id",
                     "conversation_id", "attempt")
    }
    # A custom span makes the ledger write its own step in the replay (see README, "Custom spans").
    with custom_span("refund.ledger_write", data={"order_id": oid, "amount": record["amount"]}) as span:
        created, stored = await record_once(
            turn.redis, keys.refund(turn.turn_id, oid), record, keys.REFUND_LEDGER, entry
        )
        span.span_data.data.update(refund_id=stored["refund_id"], replayed=not created)
    log.info(
        "refund.made" if created else "refund.replayed",
        turn_id=turn.turn_id,
        order_id=oid,
        amount=stored["amount"],
        refund_id=stored["refund_id"],
    )
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
    request can't be solved here.

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
    with custom_span("escalation.ticket_write", data={"ticket_id": record["ticket_id"]}) as span:
        created, stored = await record_once(turn.redis, keys.escalation(turn.turn_id), record)
        span.span_data.data.update(replayed=not created)
    log.info(
        "escalation.opened" if created else "escalation.replayed",
        turn_id=turn.turn_id,
        ticket_id=stored["ticket_id"],
    )
    return _dumps(
        {
            "ticket_id": stored["ticket_id"],
            "status": "open",
            "queue": "human-support",
            "replayed": not created,
        }
    )


SUPPORT_TOOLS = {
    tool.name: tool
    for tool in (lookup_order, check_refund_eligibility, process_refund, escalate_to_human)
}
