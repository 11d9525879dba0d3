"""The Support Desk end to end: real SDK runs, the offline model, real tools on a real Redis.

Each test names a behaviour of the desk (greeting, order status, refunds, escalation, routing,
follow-ups) and asserts the exact tool calls, arguments, handoffs and side effects.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from agents import RunConfig, Runner
from agents.exceptions import UserError
from agents.extensions.memory import RedisSession
from agents.items import HandoffCallItem, HandoffOutputItem, ToolCallItem, ToolCallOutputItem
from agents.result import RunResult
from agents.tool_context import ToolContext
from redis.exceptions import ConnectionError as RedisConnectionError

from turnfleet import keys
from turnfleet.connection import connect
from turnfleet.shell.embedded import free_port
from turnfleet.context import TurnContext
from turnfleet.workers.orderbook import load_order_book
from turnfleet.workers.support_desk import SupportDesk
from turnfleet.workers.tools import ToolUnavailable, process_refund, refund_id, ticket_id


async def run_turn(
    desk: SupportDesk,
    redis: Any,
    text: str,
    *,
    turn_id: str = "t-1",
    customer_id: str = "C-100",
    conversation_id: str = "conv-1",
    agent: str | None = None,
    attempt: int = 1,
    session: RedisSession | None = None,
) -> RunResult:
    context = TurnContext(
        turn_id=turn_id,
        conversation_id=conversation_id,
        customer_id=customer_id,
        attempt=attempt,
        redis=redis,
    )
    return await Runner.run(
        desk.starting_agent(agent),
        text,
        context=context,
        max_turns=10,
        session=session,
        run_config=RunConfig(tracing_disabled=True),
    )


def tool_calls(result: RunResult) -> list[tuple[str, dict[str, Any]]]:
    return [
        (item.raw_item.name, json.loads(item.raw_item.arguments))  # type: ignore[union-attr]
        for item in result.new_items
        if isinstance(item, ToolCallItem)
    ]


def tool_outputs(result: RunResult) -> list[dict[str, Any]]:
    return [
        json.loads(item.output)
        for item in result.new_items
        if isinstance(item, ToolCallOutputItem)
    ]


def handoffs(result: RunResult) -> list[tuple[str, str]]:
    return [
        (item.source_agent.name, item.target_agent.name)
        for item in result.new_items
        if isinstance(item, HandoffOutputItem)
    ]


def session_for(redis: Any, conversation_id: str) -> RedisSession:
    return RedisSession(
        keys.session_id(conversation_id), redis_client=redis, key_prefix=keys.SESSION_PREFIX
    )


# ------------------------------------------------------------------ (a) greeting


async def test_greeting_is_answered_by_triage_with_the_customers_name(desk, redis) -> None:
    result = await run_turn(desk, redis, "Hi, I'm Dana, customer C-100")
    assert result.last_agent.name == "Triage"
    assert tool_calls(result) == [] and handoffs(result) == []
    assert result.final_output.startswith("Hi Dana!")
    assert "How can I help you today?" in result.final_output


# ------------------------------------------------------------------ (b) order status


@pytest.mark.parametrize("text", ["where is order 1042?", "status of my order #1042"])
async def test_order_status_is_handed_to_orders_which_looks_it_up(desk, redis, text) -> None:
    result = await run_turn(desk, redis, text)

    assert result.last_agent.name == "Orders"
    assert handoffs(result) == [("Triage", "Orders")]
    assert any(isinstance(item, HandoffCallItem) for item in result.new_items)
    assert tool_calls(result) == [("lookup_order", {"order_id": "1042"})]
    assert "delivered" in result.final_output
    assert "UPS" in result.final_output and "2025-06-02" in result.final_output


async def test_shipped_order_reports_carrier_and_eta(desk, redis) -> None:
    result = await run_turn(desk, redis, "Where's my package? Order 1043")
    assert tool_outputs(result)[0]["status"] == "shipped"
    assert "has shipped with USPS" in result.final_output
    assert "2025-06-18" in result.final_output


async def test_another_customers_order_is_not_found_on_your_account(desk, redis) -> None:
    result = await run_turn(desk, redis, "where is order 1042?", customer_id="C-101")
    assert tool_outputs(result) == [
        {"order_id": "1042", "found": False, "reason": "Order 1042 was not found on your account."}
    ]
    assert "couldn't find order 1042 on your account" in result.final_output


# ------------------------------------------------------------------ (c) refund


async def test_refund_of_order_1042_refunds_exactly_89_dollars_once(desk, redis) -> None:
    result = await run_turn(desk, redis, "I want a refund for order 1042", turn_id="t-refund")

    assert result.last_agent.name == "Billing"
    assert handoffs(result) == [("Triage", "Billing")]
    assert tool_calls(result) == [
        ("check_refund_eligibility", {"order_id": "1042"}),
        ("process_refund", {"order_id": "1042", "amount": "89.00"}),
    ]
    made = tool_outputs(result)[1]
    assert made == {
        "refunded": True,
        "refund_id": refund_id("t-refund", "1042"),
        "order_id": "1042",
        "amount": "89.00",
        "currency": "USD",
        "replayed": False,
    }
    assert "I've refunded $89.00 for order 1042" in result.final_output

    ledger = await redis.xrange(keys.REFUND_LEDGER)
    assert [fields for _, fields in ledger] == [
        {
            "refund_id": refund_id("t-refund", "1042"),
            "turn_id": "t-refund",
            "order_id": "1042",
            "amount": "89.00",
            "currency": "USD",
            "customer_id": "C-100",
            "conversation_id": "conv-1",
            "attempt": "1",
            "refunded_at": ledger[0][1]["refunded_at"],
        }
    ]
    assert datetime.fromisoformat(ledger[0][1]["refunded_at"]).utcoffset() == timedelta(0)
    stored = json.loads(await redis.get(keys.order_refund("1042")))
    assert stored["amount"] == "89.00" and stored["attempt"] == 1 and stored["turn_id"] == "t-refund"


async def test_retried_turn_refunds_once_and_reports_the_first_refund(desk, redis) -> None:
    first = await run_turn(desk, redis, "refund order 1042", turn_id="t-retry", attempt=1)
    retry = await run_turn(desk, redis, "refund order 1042", turn_id="t-retry", attempt=2)

    assert tool_calls(retry) == tool_calls(first)
    assert tool_outputs(first)[1]["replayed"] is False
    assert tool_outputs(retry)[1]["replayed"] is True
    assert tool_outputs(retry)[1]["refund_id"] == tool_outputs(first)[1]["refund_id"]
    assert "$89.00" in retry.final_output
    ledger = await redis.xrange(keys.REFUND_LEDGER)
    assert len(ledger) == 1
    assert ledger[0][1]["attempt"] == "1"


async def test_a_second_turn_is_told_the_order_was_already_refunded(desk, redis) -> None:
    first = await run_turn(desk, redis, "refund order 1042", turn_id="t-a")
    second = await run_turn(desk, redis, "refund order 1042", turn_id="t-b", conversation_id="conv-2")
    ledger = await redis.xrange(keys.REFUND_LEDGER)
    assert [(f["turn_id"], f["amount"]) for _, f in ledger] == [("t-a", "89.00")]
    made = json.loads(await redis.get(keys.order_refund("1042")))
    assert made["refund_id"] == tool_outputs(first)[1]["refund_id"]
    # The eligibility check already knows: the model never tries process_refund again.
    assert tool_calls(second) == [("check_refund_eligibility", {"order_id": "1042"})]
    check = tool_outputs(second)[0]
    assert check["eligible"] is False and check["already_refunded"] is True
    assert (check["refund_id"], check["amount"], check["refunded_at"]) == (
        made["refund_id"], "89.00", made["refunded_at"])
    assert second.final_output.startswith(
        f"Order 1042 was already refunded: $89.00 on {made['refunded_at'][:10]}, refund "
        f"{made['refund_id']}.")


async def test_process_refund_of_a_refunded_order_answers_the_original_refund(desk, redis) -> None:
    # Whatever the model does (here it skips the eligibility check), the tool refunds once.
    await run_turn(desk, redis, "refund order 1042", turn_id="t-a")
    context = TurnContext("t-other", "conv-2", "C-100", 1, redis)
    arguments = json.dumps({"order_id": "1042", "amount": "89.00"})
    tool_context = ToolContext(
        context=context, tool_name="process_refund", tool_call_id="call-1", tool_arguments=arguments
    )
    answer = json.loads(await process_refund.on_invoke_tool(tool_context, arguments))
    assert answer["refunded"] is False and answer["already_refunded"] is True
    assert answer["refund_id"] == refund_id("t-a", "1042") and answer["amount"] == "89.00"
    assert "error" not in answer and "tool_error" not in answer
    assert await redis.xlen(keys.REFUND_LEDGER) == 1


async def test_process_refund_refuses_an_amount_other_than_the_eligible_one(redis) -> None:
    context = TurnContext("t-x", "conv-1", "C-100", 1, redis)
    arguments = json.dumps({"order_id": "1042", "amount": "100.00"})
    tool_context = ToolContext(
        context=context, tool_name="process_refund", tool_call_id="call-1", tool_arguments=arguments
    )
    answer = json.loads(await process_refund.on_invoke_tool(tool_context, arguments))
    assert answer["refunded"] is False and "89.00" in answer["reason"]
    assert await redis.xlen(keys.REFUND_LEDGER) == 0


# ------------------------------------------------------------------ (d) ineligible refund


@pytest.mark.parametrize(
    ("order_id", "why"),
    [
        ("1054", "outside the 30-day refund window"),
        ("1044", "non-refundable"),
        ("1053", "still processing"),
    ],
)
async def test_ineligible_refund_is_explained_and_nothing_is_refunded(
    desk, redis, order_id, why
) -> None:
    result = await run_turn(desk, redis, f"I want a refund for order {order_id}")

    assert tool_calls(result) == [("check_refund_eligibility", {"order_id": order_id})]
    assert tool_outputs(result)[0]["eligible"] is False
    assert f"order {order_id} isn't eligible for a refund" in result.final_output
    assert why in result.final_output
    assert await redis.xlen(keys.REFUND_LEDGER) == 0
    assert await redis.exists(keys.order_refund(order_id)) == 0


# ------------------------------------------------------------------ (e) escalation


@pytest.mark.parametrize("agent", [None, "Billing", "Orders"])
async def test_escalation_opens_a_ticket_from_whichever_agent_is_current(
    desk, redis, agent
) -> None:
    result = await run_turn(desk, redis, "I want to talk to a human", agent=agent, turn_id="t-esc")

    assert result.last_agent.name == (agent or "Triage")
    ((name, arguments),) = tool_calls(result)
    assert name == "escalate_to_human"
    assert arguments["reason"] == "Customer asked for a human: I want to talk to a human"
    ticket = ticket_id("t-esc")
    assert tool_outputs(result)[0] == {
        "ticket_id": ticket, "status": "open", "queue": "human-support", "replayed": False
    }
    assert ticket in result.final_output
    stored = json.loads(await redis.get(keys.conversation_escalation("conv-1")))
    assert stored["ticket_id"] == ticket and stored["customer_id"] == "C-100"


async def test_retried_escalation_reuses_the_ticket(desk, redis) -> None:
    await run_turn(desk, redis, "speak to a manager", turn_id="t-esc2")
    retry = await run_turn(desk, redis, "speak to a manager", turn_id="t-esc2", attempt=2)
    assert tool_outputs(retry)[0]["replayed"] is True
    assert ticket_id("t-esc2") in retry.final_output


async def test_a_second_escalation_in_the_conversation_gets_the_open_ticket(desk, redis) -> None:
    first = await run_turn(desk, redis, "I want to talk to a human", turn_id="t-e1")
    again = await run_turn(desk, redis, "escalate this to a manager", turn_id="t-e2", agent="Billing")
    other = await run_turn(desk, redis, "I want a person", turn_id="t-e3", conversation_id="conv-9")
    ticket = ticket_id("t-e1")
    assert tool_outputs(first)[0]["ticket_id"] == ticket
    assert tool_outputs(again)[0] == {"ticket_id": ticket, "status": "open", "queue": "human-support",
                                      "replayed": False, "already_open": True}
    assert again.final_output.startswith(f"Your request is already with our human support team under ticket {ticket}")
    assert tool_outputs(other)[0]["ticket_id"] == ticket_id("t-e3")  # another conversation: its own


# ------------------------------------------------------------------ (f) out of scope


async def test_out_of_scope_request_is_declined_politely(desk, redis) -> None:
    result = await run_turn(desk, redis, "what's the weather in Paris?")
    assert result.last_agent.name == "Triage"
    assert tool_calls(result) == [] and handoffs(result) == []
    assert "I can't help with that" in result.final_output
    assert "help with a refund" in result.final_output


# ------------------------------------------------------------------ (g) specialist hands back


async def test_orders_hands_a_refund_back_to_triage_which_routes_it_to_billing(desk, redis) -> None:
    result = await run_turn(desk, redis, "I want a refund for order 1042", agent="Orders")
    assert handoffs(result) == [("Orders", "Triage"), ("Triage", "Billing")]
    assert [name for name, _ in tool_calls(result)] == [
        "check_refund_eligibility",
        "process_refund",
    ]
    assert result.last_agent.name == "Billing"
    assert "$89.00" in result.final_output


async def test_billing_hands_an_unrelated_question_back_to_triage(desk, redis) -> None:
    result = await run_turn(desk, redis, "what's the weather in Paris?", agent="Billing")
    assert handoffs(result) == [("Billing", "Triage")]
    assert result.last_agent.name == "Triage"
    assert "I can't help with that" in result.final_output


async def test_unknown_or_missing_agent_starts_at_triage(desk) -> None:
    assert desk.starting_agent(None).name == "Triage"
    assert desk.starting_agent("Nobody").name == "Triage"
    assert desk.starting_agent("Billing").name == "Billing"
    triage = desk.agents["Triage"]
    assert [h.name for h in triage.handoffs] == ["Billing", "Orders"]  # type: ignore[union-attr]
    assert [t.name for t in desk.agents["Billing"].tools] == [
        "lookup_order", "check_refund_eligibility", "process_refund", "escalate_to_human"
    ]


# ------------------------------------------------------------------ (h), (i) multi-turn


async def test_follow_up_refers_to_the_most_recent_order(desk, redis) -> None:
    session = session_for(redis, "conv-follow")
    status = await run_turn(
        desk, redis, "where is order 1043?", turn_id="t-f1", conversation_id="conv-follow",
        session=session,
    )
    assert status.last_agent.name == "Orders"

    refund = await run_turn(
        desk, redis, "ok, refund it", turn_id="t-f2", conversation_id="conv-follow",
        agent=status.last_agent.name, session=session,
    )
    assert handoffs(refund) == [("Orders", "Triage"), ("Triage", "Billing")]
    assert tool_calls(refund) == [
        ("check_refund_eligibility", {"order_id": "1043"}),
        ("process_refund", {"order_id": "1043", "amount": "24.50"}),
    ]
    assert "$24.50" in refund.final_output

    again = await run_turn(
        desk, redis, "and that order?", turn_id="t-f3", conversation_id="conv-follow",
        agent=refund.last_agent.name, session=session,
    )
    assert tool_calls(again) == [("lookup_order", {"order_id": "1043"})]
    assert again.raw_responses[0].usage.input_tokens_details.cached_tokens > 0


async def test_missing_order_id_is_asked_for_then_the_answer_completes_the_refund(
    desk, redis
) -> None:
    session = session_for(redis, "conv-ask")
    ask = await run_turn(
        desk, redis, "I want a refund", turn_id="t-q1", conversation_id="conv-ask",
        session=session,
    )
    assert tool_calls(ask) == [] and handoffs(ask) == []
    assert "order number" in ask.final_output

    answer = await run_turn(
        desk, redis, "It's 1042", turn_id="t-q2", conversation_id="conv-ask",
        agent=ask.last_agent.name, session=session,
    )
    assert tool_calls(answer) == [
        ("check_refund_eligibility", {"order_id": "1042"}),
        ("process_refund", {"order_id": "1042", "amount": "89.00"}),
    ]


async def test_order_question_without_an_id_asks_for_it(desk, redis) -> None:
    result = await run_turn(desk, redis, "where is my order?")
    assert tool_calls(result) == [] and handoffs(result) == []
    assert result.final_output == "I can check on that. Could you share the order number?"


# ------------------------------------------------------------------ determinism and failures


async def test_same_turn_gives_identical_usage_and_answer(desk, redis) -> None:
    first = await run_turn(desk, redis, "refund order 1042", turn_id="t-d1", conversation_id="c1")
    await redis.flushdb()  # the same state again: order 1042 not refunded yet
    second = await run_turn(desk, redis, "refund order 1042", turn_id="t-d2", conversation_id="c2")
    assert first.context_wrapper.usage == second.context_wrapper.usage
    assert first.context_wrapper.usage.requests == 4
    usage = first.context_wrapper.usage
    assert usage.input_tokens == sum(r.usage.input_tokens for r in first.raw_responses)
    assert usage.output_tokens == sum(r.usage.output_tokens for r in first.raw_responses)


async def test_redis_outage_fails_the_turn_as_retryable_instead_of_answering(desk) -> None:
    dead = connect(f"redis://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(ToolUnavailable) as failure:
            await run_turn(desk, dead, "refund order 1042")
    finally:
        await dead.aclose()
    assert not isinstance(failure.value, UserError)  # UserError reads as deterministic
    assert isinstance(failure.value.__cause__, RedisConnectionError)
    # The eligibility check is the first tool to need Redis (it reads the refund ledger).
    assert str(failure.value).startswith("check_refund_eligibility failed: ConnectionError")


def test_order_book_is_fixed_and_1042_is_eligible_for_89() -> None:
    book = load_order_book()
    assert str(book.as_of) == "2025-06-15" and book.refund_window_days == 30
    order = book.get("#1042", "C-100")
    assert book.refund_eligibility(order).amount == Decimal("89.00")
    assert book.refund_eligibility(book.get("1050", "C-103")).eligible  # exactly 30 days
    assert not book.refund_eligibility(book.get("1052", "C-104")).eligible  # 31 days
