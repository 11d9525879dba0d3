"""The offline model: its decisions, its documented usage, its ids and its generation spans;
and a workflow's own script (not the Desk's) driving it.

Runs use the real SDK (``Runner.run``) and the real Support Desk agents (or a test's own agent
and tool); no model, tool or SDK piece is replaced.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import pytest
from agents import Agent, RunConfig, Runner, function_tool
from agents.handoffs import handoff
from agents.tracing.span_data import GenerationSpanData

from tests.tracing import Collector
from turnfleet.connection import connect
from turnfleet.context import TurnContext
from turnfleet.workers.model import (
    DEFAULT_MODEL_NAME,
    HandoffOption,
    OfflineModel,
    decide,
)
from turnfleet.offline_script import Conversation, Intent, Rule, Script
from tests.apps.scripted import HELPDESK_SCRIPT, RESET
from turnfleet.workers.support_desk_script import SUPPORT_DESK_SCRIPT, order_ids_in

TRIAGE_HANDOFFS = [
    HandoffOption("transfer_to_billing", "Billing"),
    HandoffOption("transfer_to_orders", "Orders"),
]
SPECIALIST_HANDOFFS = [HandoffOption("transfer_to_triage", "Triage")]
TRIAGE_TOOLS = ["escalate_to_human"]
BILLING_TOOLS = ["lookup_order", "check_refund_eligibility", "process_refund", "escalate_to_human"]
ORDERS_TOOLS = ["lookup_order", "escalate_to_human"]
NO_TRACING = RunConfig(tracing_disabled=True)


def user(text: str) -> dict[str, Any]:
    return {"content": text, "role": "user"}


def assistant(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "id": "msg_1",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def call(name: str, call_id: str, **arguments: Any) -> dict[str, Any]:
    return {
        "type": "function_call",
        "name": name,
        "call_id": call_id,
        "arguments": json.dumps(arguments),
    }


def output(call_id: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": json.dumps(value)}


# ------------------------------------------------------------------ decisions (pure function)


@pytest.mark.parametrize(
    "text",
    ["Hi, I'm Dana, customer C-100", "hello! my name is dana", "Good morning, this is Dana"],
)
def test_greeting_is_answered_by_triage_with_the_name(text: str) -> None:
    decision = decide(text, TRIAGE_TOOLS, TRIAGE_HANDOFFS)
    assert decision.kind == "message" and decision.intent == "greeting"
    assert decision.text.startswith("Hi Dana!")
    assert "How can I help" in decision.text


def test_greeting_without_a_name_still_greets() -> None:
    decision = decide("hey there", TRIAGE_TOOLS, TRIAGE_HANDOFFS)
    assert decision.text.startswith("Hi there!")


@pytest.mark.parametrize(
    "text",
    [
        "where is order 1042?",
        "Status of my order #1042",
        "Can you track order number 1042 please",
        "WHEN WILL 1042 ARRIVE",
        "has order 1042 shipped yet?",
    ],
)
def test_order_status_phrasings_route_to_orders(text: str) -> None:
    decision = decide(text, TRIAGE_TOOLS, TRIAGE_HANDOFFS)
    assert (decision.kind, decision.name, decision.intent) == (
        "handoff",
        "transfer_to_orders",
        "order_status",
    )
    at_orders = decide(text, ORDERS_TOOLS, SPECIALIST_HANDOFFS)
    assert (at_orders.kind, at_orders.name, at_orders.arguments) == (
        "tool_call",
        "lookup_order",
        {"order_id": "1042"},
    )


@pytest.mark.parametrize(
    "text",
    [
        "I want a refund for order 1042",
        "can I get my money back for #1042?",
        "I'd like to return my order 1042",
        "REFUND 1042",
    ],
)
def test_refund_phrasings_route_to_billing(text: str) -> None:
    decision = decide(text, TRIAGE_TOOLS, TRIAGE_HANDOFFS)
    assert (decision.kind, decision.name) == ("handoff", "transfer_to_billing")
    at_billing = decide(text, BILLING_TOOLS, SPECIALIST_HANDOFFS)
    assert (at_billing.name, at_billing.arguments) == (
        "check_refund_eligibility",
        {"order_id": "1042"},
    )


def test_billing_refunds_the_eligible_amount_after_the_check() -> None:
    items = [
        user("refund order 1042"),
        call("check_refund_eligibility", "c1", order_id="1042"),
        output("c1", {"order_id": "1042", "eligible": True, "amount": "89.00", "reason": "ok"}),
    ]
    decision = decide(items, BILLING_TOOLS, SPECIALIST_HANDOFFS)
    assert (decision.name, decision.arguments) == (
        "process_refund",
        {"order_id": "1042", "amount": "89.00"},
    )


@pytest.mark.parametrize(
    "text",
    ["I want to talk to a human", "Escalate this please", "let me speak to a manager",
     "can I chat with a real person?"],
)
def test_escalation_phrasings_call_escalate_from_any_agent(text: str) -> None:
    for tools, handoffs in [
        (TRIAGE_TOOLS, TRIAGE_HANDOFFS),
        (BILLING_TOOLS, SPECIALIST_HANDOFFS),
        (ORDERS_TOOLS, SPECIALIST_HANDOFFS),
    ]:
        decision = decide(text, tools, handoffs)
        assert (decision.kind, decision.name) == ("tool_call", "escalate_to_human")
        assert decision.arguments["reason"].startswith("Customer asked for a human")


def test_out_of_scope_is_declined_politely() -> None:
    decision = decide("what's the weather in Paris?", TRIAGE_TOOLS, TRIAGE_HANDOFFS)
    assert decision.kind == "message" and decision.intent == "out_of_scope"
    assert "can't help with that" in decision.text
    assert "refund" in decision.text


def test_specialist_hands_what_it_cannot_do_back_to_triage() -> None:
    assert decide("I want a refund for 1042", ORDERS_TOOLS, SPECIALIST_HANDOFFS).name == (
        "transfer_to_triage"
    )
    assert decide("what's the weather?", BILLING_TOOLS, SPECIALIST_HANDOFFS).name == (
        "transfer_to_triage"
    )


def test_references_use_the_most_recent_order_in_the_history() -> None:
    history = [
        user("where is order 1043?"),
        call("lookup_order", "c1", order_id="1043"),
        output("c1", {"found": True, "order_id": "1043", "status": "shipped"}),
        assistant("Order 1043 has shipped with USPS and is expected to arrive on 2025-06-18."),
    ]
    refund = decide([*history, user("refund it")], BILLING_TOOLS, SPECIALIST_HANDOFFS)
    assert refund.arguments == {"order_id": "1043"}
    status = decide(
        [user("refund 1042"), assistant("Done."), *history, user("and that order?")],
        ORDERS_TOOLS,
        SPECIALIST_HANDOFFS,
    )
    assert (status.name, status.arguments) == ("lookup_order", {"order_id": "1043"})


def test_missing_order_id_is_asked_for_and_the_answer_continues_the_request() -> None:
    ask = decide("I want a refund", TRIAGE_TOOLS, TRIAGE_HANDOFFS)
    assert ask.kind == "message" and "order number" in ask.text
    answer = decide(
        [user("I want a refund"), assistant(ask.text), user("It's 1042")],
        TRIAGE_TOOLS,
        TRIAGE_HANDOFFS,
    )
    assert (answer.kind, answer.name, answer.intent) == ("handoff", "transfer_to_billing", "refund")


def test_order_ids_are_not_confused_with_customer_ids_dates_or_amounts() -> None:
    assert order_ids_in("Hi, I'm Dana, customer C-100") == []
    assert order_ids_in("delivered on 2025-06-02 for $89.00, ticket ESC-1A2B3C4D") == []
    assert order_ids_in("order #1042 and 1043") == ["1042", "1043"]


def test_handoff_is_never_repeated_to_the_same_agent_in_one_turn() -> None:
    items = [
        user("I want a refund for 1042"),
        call("transfer_to_billing", "h1"),
        output("h1", {"assistant": "Billing"}),
        call("transfer_to_triage", "h2"),
        output("h2", {"assistant": "Triage"}),
    ]
    assert Conversation.read(items).handed_to == ["Billing", "Triage"]
    decision = decide(items, TRIAGE_TOOLS, TRIAGE_HANDOFFS)
    assert decision.kind == "message"


# ------------------------------------------------------------------ runs through the SDK


def turn_context(turn_id: str = "t-1", customer_id: str = "C-100", redis=None) -> TurnContext:
    # Without ``redis``, runs must call no tool that touches Redis; the client never connects.
    return TurnContext(
        turn_id=turn_id,
        conversation_id="conv-1",
        customer_id=customer_id,
        attempt=1,
        redis=redis or connect("redis://127.0.0.1:1"),
    )


def chars_of_tools(agent: Any) -> int:
    """Name + description + canonical JSON of the parameters, per the model's docstring."""
    total = 0
    for tool in agent.tools:
        total += len(tool.name) + len(tool.description)
        total += len(json.dumps(tool.params_json_schema, sort_keys=True, separators=(",", ":")))
    for target in agent.handoffs:
        h = handoff(target)
        total += len(h.tool_name) + len(h.tool_description)
        total += len(json.dumps(h.input_json_schema, sort_keys=True, separators=(",", ":")))
    return total


async def test_usage_equals_the_documented_formula_for_one_call(desk) -> None:
    text = "Hi, I'm Dana, customer C-100"
    triage = desk.starting_agent(None)
    result = await Runner.run(triage, text, context=turn_context(), run_config=NO_TRACING)

    assert len(result.raw_responses) == 1
    final = result.final_output
    input_chars = len(triage.instructions) + len(f"user: {text}") + chars_of_tools(triage)
    usage = result.raw_responses[0].usage
    assert usage.requests == 1
    assert usage.input_tokens == math.ceil(input_chars / 4)
    assert usage.output_tokens == math.ceil(len(final) / 4)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0  # first turn: nothing cached
    assert usage.output_tokens_details.reasoning_tokens == 0


async def test_same_input_gives_identical_output_ids_and_usage(desk) -> None:
    runs = [
        await Runner.run(
            desk.starting_agent(None),
            "where is order 1043?",
            context=turn_context(),
            run_config=NO_TRACING,
        )
        for _ in range(2)
    ]
    first, second = (
        [([o.model_dump() for o in r.output], r.usage, r.response_id) for r in run.raw_responses]
        for run in runs
    )
    assert first == second
    assert runs[0].final_output == runs[1].final_output
    assert runs[0].context_wrapper.usage == runs[1].context_wrapper.usage


async def test_context_usage_is_the_sum_of_the_raw_responses(desk) -> None:
    result = await Runner.run(
        desk.starting_agent(None), "where is order 1042?", context=turn_context(),
        run_config=NO_TRACING,
    )
    assert len(result.raw_responses) == 3  # Triage hands off, Orders looks up, Orders answers
    total = result.context_wrapper.usage
    raw = [r.usage for r in result.raw_responses]
    assert total.requests == sum(u.requests for u in raw) == 3
    assert total.input_tokens == sum(u.input_tokens for u in raw)
    assert total.output_tokens == sum(u.output_tokens for u in raw)
    assert total.input_tokens_details.cached_tokens == sum(
        u.input_tokens_details.cached_tokens for u in raw
    )


async def test_cached_tokens_are_the_earlier_turns(desk) -> None:
    history = [user("Hi, I'm Dana"), assistant("Hi Dana! How can I help?")]
    result = await Runner.run(
        desk.starting_agent(None),
        [*history, user("what's the weather?")],
        context=turn_context(),
        run_config=NO_TRACING,
    )
    history_chars = len("user: Hi, I'm Dana") + len("assistant: Hi Dana! How can I help?")
    usage = result.raw_responses[0].usage
    assert usage.input_tokens_details.cached_tokens == history_chars // 4
    assert usage.input_tokens_details.cached_tokens < usage.input_tokens


async def test_call_ids_are_unique_within_a_run_and_stable_across_runs(desk, redis) -> None:
    async def call_ids() -> list[str]:
        # The eligibility check reads the refund ledger: a real Redis.
        result = await Runner.run(
            desk.starting_agent("Orders"), "I want a refund for order 1053",
            context=turn_context(redis=redis), run_config=NO_TRACING,
        )
        return [
            item.raw_item.call_id
            for item in result.new_items
            if getattr(item.raw_item, "type", "") == "function_call"
        ]

    first = await call_ids()
    assert len(first) == 3  # transfer_to_triage, transfer_to_billing, check_refund_eligibility
    assert len(set(first)) == len(first)
    assert first == await call_ids()


async def test_streamed_run_gives_the_same_answer_and_usage(desk) -> None:
    text = "where is order 1042?"
    plain = await Runner.run(
        desk.starting_agent(None), text, context=turn_context(), run_config=NO_TRACING
    )
    streamed = Runner.run_streamed(
        desk.starting_agent(None), text, context=turn_context(), run_config=NO_TRACING
    )
    async for _ in streamed.stream_events():
        pass
    assert streamed.final_output == plain.final_output
    assert streamed.last_agent.name == "Orders"
    assert streamed.context_wrapper.usage.input_tokens == plain.context_wrapper.usage.input_tokens
    assert streamed.context_wrapper.usage.output_tokens == plain.context_wrapper.usage.output_tokens
    assert [type(i).__name__ for i in streamed.new_items] == [
        type(i).__name__ for i in plain.new_items
    ]


# ------------------------------------------------------------------ generation spans




def generations(collector: Collector) -> list[GenerationSpanData]:
    return [s.span_data for s in collector.spans if isinstance(s.span_data, GenerationSpanData)]


async def test_generation_spans_carry_model_and_usage(desk, collector: Collector) -> None:
    result = await Runner.run(
        desk.starting_agent(None),
        "where is order 1042?",
        context=turn_context(),
        run_config=RunConfig(tracing_disabled=False, trace_include_sensitive_data=True),
    )
    spans = generations(collector)
    assert len(spans) == len(result.raw_responses) == 3
    for data, response in zip(spans, result.raw_responses, strict=True):
        assert data.model == DEFAULT_MODEL_NAME
        assert data.model_config["provider"] == "turnfleet-offline"
        assert data.usage["input_tokens"] == response.usage.input_tokens
        assert data.usage["output_tokens"] == response.usage.output_tokens
        assert data.usage["input_tokens_details"]["cached_tokens"] == 0
        assert data.input[0]["role"] == "system"
        assert data.output[0]["type"] in ("function_call", "message")
    assert spans[0].output[0]["name"] == "transfer_to_orders"
    json.dumps([s.export() for s in spans])  # exporters can serialise them


async def test_generation_spans_omit_data_without_sensitive_data(desk, collector) -> None:
    await Runner.run(
        desk.starting_agent(None),
        "Hi, I'm Dana",
        context=turn_context(),
        run_config=RunConfig(tracing_disabled=False, trace_include_sensitive_data=False),
    )
    (span,) = generations(collector)
    assert span.input is None and span.output is None
    assert span.usage["input_tokens"] > 0 and span.model == DEFAULT_MODEL_NAME


async def test_no_spans_when_tracing_is_disabled(desk, collector) -> None:
    await Runner.run(
        desk.starting_agent(None), "Hi", context=turn_context(), run_config=NO_TRACING
    )
    assert generations(collector) == []



# ------------------------------------------------------------------ a workflow's own script

# The helpdesk script lives with the app that serves it (tests/apps/scripted.py).


def helpdesk(calls: list[dict[str, Any]]) -> Agent[Any]:
    """A one-agent workflow that is not the Desk: its own tool, its own script."""

    @function_tool
    def reset_password(username: str, notify: bool) -> str:
        """Reset an account's password and return a temporary one."""
        calls.append({"username": username, "notify": notify})
        return json.dumps({"reset": True, "temporary": f"tmp-{username}"})

    return Agent(
        name="Helpdesk",
        instructions="You are the IT helpdesk. Reset passwords with reset_password.",
        tools=[reset_password],
        model=OfflineModel(script=HELPDESK_SCRIPT),
    )


async def test_a_workflows_own_script_calls_its_own_tool_and_answers_its_text() -> None:
    calls: list[dict[str, Any]] = []
    agent = helpdesk(calls)
    text = "I forgot my password, user dana.w"
    result = await Runner.run(agent, text, run_config=NO_TRACING)

    assert calls == [{"username": "dana.w", "notify": True}]  # the scripted arguments
    assert result.final_output == "Done: dana.w can log in with tmp-dana.w now."
    first, second = result.raw_responses
    (call_item,) = first.output
    arguments = '{"username":"dana.w","notify":true}'
    assert (call_item.name, call_item.arguments) == (RESET, arguments)

    # Usage as the model's docstring says, on this agent's own text.
    tool_output = json.dumps({"reset": True, "temporary": "tmp-dana.w"})
    asked = len(agent.instructions) + len(f"user: {text}") + chars_of_tools(agent)
    answered = asked + len(f"{RESET}({arguments})") + len(tool_output)
    assert (first.usage.input_tokens, first.usage.output_tokens) == (
        math.ceil(asked / 4), math.ceil(len(RESET + arguments) / 4))
    assert (second.usage.input_tokens, second.usage.output_tokens) == (
        math.ceil(answered / 4), math.ceil(len(result.final_output) / 4))
    assert [u.usage.input_tokens_details.cached_tokens for u in result.raw_responses] == [0, 0]
    assert result.context_wrapper.usage.requests == 2


async def test_a_script_asks_for_its_slot_and_answers_what_it_does_not_know() -> None:
    calls: list[dict[str, Any]] = []
    agent = helpdesk(calls)
    asked = await Runner.run(agent, "please reset my password", run_config=NO_TRACING)
    other = await Runner.run(agent, "where is order 1042?", run_config=NO_TRACING)
    assert (asked.final_output, other.final_output) == (
        "Which username is it?", "I reset passwords; tell me the username.")
    assert calls == []  # nothing of the Desk's script leaks into another workflow's agent


async def test_a_scripts_route_words_hand_the_turn_to_the_agent_holding_the_tool() -> None:
    calls: list[dict[str, Any]] = []
    accounts = helpdesk(calls).clone(name="Accounts")
    front = Agent(name="Front", instructions="You route IT requests.", handoffs=[accounts],
                  model=accounts.model)
    accounts.handoffs = [front]

    routed = await Runner.run(front, "I forgot my password, user dana.w", run_config=NO_TRACING)
    assert [r.output[0].name for r in routed.raw_responses[:2]] == ["transfer_to_accounts", RESET]
    assert (routed.last_agent.name, routed.final_output) == (
        "Accounts", "Done: dana.w can log in with tmp-dana.w now.")
    assert calls == [{"username": "dana.w", "notify": True}]

    # The specialist hands what it does not hold a tool for back to its front desk (``home``).
    back = await Runner.run(accounts, "hello there", run_config=NO_TRACING)
    assert (back.last_agent.name, back.final_output) == (
        "Front", "I reset passwords; tell me the username.")


def test_a_script_naming_an_intent_it_does_not_define_is_refused() -> None:
    with pytest.raises(ValueError, match="resett"):
        Script(rules=(Rule("resett", r"reset"),), intents=(Intent("other", reply="x"),),
               fallback="other")


def test_scripts_import_without_the_agents_sdk() -> None:
    code = ("import sys, turnfleet.workers.support_desk_script; "
            "from turnfleet import Script, Rule, FollowUp, Intent, Step, Call, Outcome, Slot, Facts; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('agents', 'openai')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_team_writes_its_script_with_names_from_turnfleet_alone() -> None:
    import turnfleet
    from turnfleet import offline_script

    for name in ("Script", "Rule", "FollowUp", "Intent", "Step", "Call", "Outcome", "Slot", "Facts"):
        assert getattr(turnfleet, name) is getattr(offline_script, name)
        assert name in turnfleet.__all__
    assert isinstance(SUPPORT_DESK_SCRIPT, turnfleet.Script)
