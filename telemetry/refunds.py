"""Every refund, for the console's money view: "which refund was wrong and why".

A refund is a ``process_refund`` tool call. The cheapest honest source is what telemetry and the
queue already keep, read in this order:

1. the ``tool`` facet zset of ``process_refund`` (``keys.facet_conversations``): the
   conversations that called it, newest last event first (for a customer key, intersected with
   its customers' conversation zsets server side, ``find_page``), at most ``MAX_CONVERSATIONS``;
2. each such conversation's turn records (``TurnQueue.get``): their tool calls, in order, with
   arguments and outputs as the tools returned them. A refund's eligibility amount is the
   latest ``check_refund_eligibility`` answer for the same order before it, in the same turn or
   an earlier turn of the conversation;
3. each refunding turn's check outcomes (``keys.turn_checks``): the money-path checks that
   failed on it are the refund's anomalies (``checks`` says whether the turn was judged yet).

Nothing is written. A conversation whose turn records are gone (``turnfleet forget``) has no
rows. The view answers what the calls said; the refund ledger stays the record of money paid.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

from redis.asyncio import Redis

from turnfleet import keys
from turnfleet.auth import Principal
from turnfleet.queue import TurnQueue
from turnfleet.telemetry.find import find_page
from turnfleet.telemetry.replay import turn_checks

PROCESS_REFUND = "process_refund"  # the Support Desk's tools (workers/support_desk_script.py)
CHECK_REFUND = "check_refund_eligibility"
MAX_CONVERSATIONS = 500
SORTS = ("when", "amount", "eligibility", "customer", "order", "conversation")


def _json(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _decimal(value: Any) -> Decimal | None:
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return number if number.is_finite() else None


def _iso(when: datetime | None) -> str | None:
    return when.astimezone(timezone.utc).isoformat() if when else None


async def refund_conversations(redis: Redis, who: Principal, customer: str | None = None) -> list[str]:
    """The conversations that called ``process_refund`` and the key may see, newest first."""
    index = keys.facet_conversations("tool", PROCESS_REFUND)
    if customer is not None and not who.may(customer):
        return []
    mine = [customer] if customer else None if who.operator else sorted(who.customers)
    if mine is None:
        return list(await redis.zrevrange(index, 0, MAX_CONVERSATIONS - 1))
    found: list[tuple[str, float]] = []
    for c in mine:
        found += await find_page(redis, [keys.customer_conversations(c)], index, "+inf", "-inf",
                                 0, MAX_CONVERSATIONS)
    found.sort(key=lambda f: f[1], reverse=True)
    return [cid for cid, _ in found[:MAX_CONVERSATIONS]]


async def conversation_refunds(redis: Redis, conversation_id: str) -> list[dict[str, Any]]:
    """The refunds of one conversation, in call order (module docstring)."""
    queue = TurnQueue(redis)
    eligibility: dict[str, dict[str, Any]] = {}  # order -> the latest eligibility answer
    rows: list[dict[str, Any]] = []
    for turn_id in await queue.conversation_turn_ids(conversation_id):
        turn = await queue.get(turn_id)
        if turn is None:
            continue
        refunds_here = []
        for call in turn.tool_calls:
            args, out = _json(call.arguments), _json(call.output)
            order = str(args.get("order_id") or out.get("order_id") or "")
            if call.tool == CHECK_REFUND and order:
                eligibility[order] = out
            elif call.tool == PROCESS_REFUND:
                judged = eligibility.get(order)
                amount = _decimal(args.get("amount"))
                allowed = _decimal(judged.get("amount")) if judged else None
                refunds_here.append({
                    "refund_id": out.get("refund_id"),
                    "order_id": order or None,
                    "amount": args.get("amount"),
                    "refunded": out.get("refunded") if "refunded" in out else None,
                    "currency": out.get("currency") or (judged or {}).get("currency"),
                    "eligibility_amount": judged.get("amount") if judged else None,
                    "eligible": judged.get("eligible") if judged else None,
                    "amount_matches": (amount == allowed) if amount is not None and allowed is not None else None,
                    "turn_id": turn.turn_id,
                    "conversation_id": turn.conversation_id,
                    "customer_id": turn.customer_id,
                    "at": _iso(turn.finished_at or turn.started_at or turn.enqueued_at),
                })
        if refunds_here:
            checks = await turn_checks(redis, turn_id)
            anomalies = [{"check": c["check"], "reason": c.get("reason")} for c in checks
                         if c["outcome"] == "failed" and c.get("money_path")]
            for r in refunds_here:
                r.update(checks=bool(checks), anomalies=anomalies)
            rows += refunds_here
    return rows


async def refunds(redis: Redis, who: Principal, *, customer: str | None = None,
                  order: str | None = None, anomalies_only: bool = False, sort: str = "when",
                  descending: bool = True) -> list[dict[str, Any]]:
    """Every refund the key may see (module docstring), filtered and sorted: ``customer``,
    ``order`` (exact order id), ``anomalies_only`` (a failed money-path check on its turn);
    ``sort`` one of ``SORTS`` (``when``: the turn's end), rows without the sorted value last."""
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {', '.join(SORTS)}, not {sort!r}")
    rows: list[dict[str, Any]] = []
    for cid in await refund_conversations(redis, who, customer):
        rows += await conversation_refunds(redis, cid)
    rows = [r for r in rows if who.may(r["customer_id"])
            and (not customer or r["customer_id"] == customer)
            and (not order or r["order_id"] == order)
            and (not anomalies_only or r["anomalies"])]
    field = {"when": "at", "amount": "amount", "eligibility": "eligibility_amount",
             "customer": "customer_id", "order": "order_id", "conversation": "conversation_id"}[sort]

    def value(row: dict[str, Any]) -> Any:
        v = row[field]
        return _decimal(v) if sort in ("amount", "eligibility") else v

    known = [r for r in rows if value(r) is not None]
    known.sort(key=lambda r: (value(r), r["at"] or "", r["turn_id"]), reverse=descending)
    return known + [r for r in rows if value(r) is None]
