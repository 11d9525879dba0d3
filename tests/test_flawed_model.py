"""The flawed offline model (issue 17, "The demo tells the story"): ``turnfleet-offline-flawed``
runs the Desk on its script with one planted mistake — on some refund turns of a customer with
several eligible orders it checks and refunds another of their orders, for that order's right
amount. No tool guard stops it; ``refund_order_named_by_customer`` does.

Real Desk turns through the job path (real SDK, real tools, real Redis), each on fresh copies
of the customer's orders (``copy_orders``: a refund is once per order, ever), so the same
requests give the same figures on every run; one turn through a real worker subprocess.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from tests.processes import run_burst
from tests.test_call_model import written_events
from tests.worker_runtime import runtime
from turnfleet import keys
from turnfleet.checks import FinishedTurn, run_checks
from turnfleet.events import EventKind
from turnfleet.queue import TurnQueue
from turnfleet.settings import DEFAULT_PRICES, WorkerProcessSettings
from turnfleet.workers.job import run_turn
from turnfleet.workers.llm import (
    FLAWED_OFFLINE_MODEL,
    OFFLINE_MODEL,
    WorkerModels,
    make_model,
    runs_offline,
)
from turnfleet.workers.model import OfflineModel
from turnfleet.workers.orderbook import copy_orders, load_order_book
from turnfleet.workers.support_desk import support_desk_workflow
from turnfleet.workers.support_desk_script import (
    SUPPORT_DESK_FLAWED_SCRIPT,
    SUPPORT_DESK_SCRIPT,
    flawed_turn,
    other_eligible_order,
)
from tests.apps.scripted import HELPDESK_SCRIPT

NAMED_CHECK = "refund_order_named_by_customer"
ORDERS_OF = {"C-100": ["1042", "1043", "1044", "1053", "1054"], "C-102": ["1047", "1048"],
             "C-103": ["1049", "1050"]}

# (customer, the packaged order they name, how they ask); request i runs on copy run i + 1, so
# "1042" is named as "1042" + f"{i + 1:04d}".
REQUESTS = [
    ("C-100", "1042", "Please refund order {}"),
    ("C-100", "1042", "I want a refund for order {}"),
    ("C-100", "1043", "Please refund order {}"),
    ("C-100", "1043", "Can I get my money back for order {}?"),
    ("C-103", "1049", "I need a refund on order {}"),
    ("C-103", "1049", "Could you refund order {}?"),
    ("C-103", "1050", "Please reimburse me for order {}"),
    ("C-103", "1050", "I want a refund for order {}"),
    ("C-102", "1047", "Refund order {}"),  # one eligible order only: nothing else to refund
]

# The turns the flawed model gets wrong, and the packaged order it refunds instead. Request 8's
# message is one the flaw picks, but C-102 has no other eligible order (1048 was cancelled).
FLAWED = {1: "1043", 3: "1042", 6: "1049"}
FLAW_PICKS_BUT_NOTHING_ELSE = 8


def copy_of(order: str, index: int) -> str:
    return f"{order}{index + 1:04d}"


async def desk_turns(redis: Any, producer: Any, model_name: str) -> list[tuple[FinishedTurn, Any]]:
    """Every request as one real Desk turn on the offline model named ``model_name`` (built
    as the worker builds it), with its FinishedTurn and its record."""
    settings = WorkerProcessSettings(model_name=model_name)
    ctx = runtime(redis, make_model(settings), model_name=model_name)
    done = []
    for index, (customer, order, ask) in enumerate(REQUESTS):
        renamed = await copy_orders(redis, ORDERS_OF[customer])
        assert renamed[order] == copy_of(order, index)
        conversation = f"conv-{index}"
        turn_id = await producer.enqueue_turn(conversation_id=conversation, customer_id=customer,
                                              text=ask.format(renamed[order]))
        assert await run_turn(ctx, turn_id, conversation) == "completed"
        base = int(await redis.hget(keys.turn(turn_id), "memory_base") or 0)
        assert base == 0  # a conversation of one turn: nothing earlier
        record = await producer.result(turn_id)
        done.append((FinishedTurn.from_result(record, []), record))
    return done


def money_calls(record: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(c.tool, json.loads(c.arguments)) for c in record.tool_calls]


def expected_calls(order: str) -> list[tuple[str, dict[str, Any]]]:
    amount = f"{load_order_book().orders[order[:4]].amount:.2f}"
    return [("check_refund_eligibility", {"order_id": order}),
            ("process_refund", {"order_id": order, "amount": amount})]


async def test_flawed_model_refunds_an_order_not_named_on_exactly_the_expected_turns(redis, producer):
    desk = support_desk_workflow(OfflineModel())
    for index, (finished, record) in enumerate(await desk_turns(redis, producer, FLAWED_OFFLINE_MODEL)):
        named = copy_of(REQUESTS[index][1], index)
        refunded = copy_of(FLAWED[index], index) if index in FLAWED else named
        # The planted mistake goes through every guard: checked eligible, refunded exactly.
        assert money_calls(record) == expected_calls(refunded), index
        [refund] = [c for c in finished.tool_calls if c.tool == "process_refund"]
        assert refund.result_object["refunded"] is True
        assert Decimal(refund.result_object["amount"]) == load_order_book().orders[refunded[:4]].amount
        outcomes = {o.check: o for o in run_checks(desk, finished)}
        named_check = outcomes.pop(NAMED_CHECK)
        if index in FLAWED:
            assert not named_check.passed
            assert named_check.reason == (f"refunded order {refunded}, which the customer never "
                                          f"named (named: {named})")
            # ... and the customer is told the order they named was refunded (the complaint).
            assert record.final_output.startswith(
                f"I've refunded ${refund.result_object['amount']} for order {named} (refund ")
        else:
            assert named_check.passed and named_check.applicable, named_check
        assert all(o.passed for o in outcomes.values()), (index, outcomes)  # only the one check trips


async def test_plain_offline_model_refunds_the_named_order_on_every_turn(redis, producer):
    desk = support_desk_workflow(OfflineModel())
    for index, (finished, record) in enumerate(await desk_turns(redis, producer, OFFLINE_MODEL)):
        named = copy_of(REQUESTS[index][1], index)
        assert money_calls(record) == expected_calls(named), index
        assert all(o.passed for o in run_checks(desk, finished)), index


def test_the_flaw_picks_turns_by_their_message_and_is_data_over_the_desks_script():
    picked = {i for i, (_, order, ask) in enumerate(REQUESTS) if flawed_turn(ask.format(copy_of(order, i)))}
    assert picked == {*FLAWED, FLAW_PICKS_BUT_NOTHING_ELSE}
    assert other_eligible_order(copy_of("1047", 8)) is None  # so request 8 refunds what was named
    assert [other_eligible_order(o) for o in ("1042", "1043", "1049", "10500007", "1045")] == [
        "1043", "1042", "1050", "10490007", None]
    # Only the refund intent differs; the rules and every other intent are the Desk's.
    assert SUPPORT_DESK_FLAWED_SCRIPT.rules == SUPPORT_DESK_SCRIPT.rules
    differ = [a.name for a, b in zip(SUPPORT_DESK_SCRIPT.intents, SUPPORT_DESK_FLAWED_SCRIPT.intents) if a != b]
    assert differ == ["refund"]


def test_the_flawed_model_name_runs_offline_on_the_flawed_desk_script_priced_like_the_offline_model():
    flawed = WorkerProcessSettings(model_name=FLAWED_OFFLINE_MODEL)
    assert runs_offline(flawed)
    model = make_model(flawed)
    assert isinstance(model, OfflineModel)
    assert (model.model_name, model.script) == (FLAWED_OFFLINE_MODEL, SUPPORT_DESK_FLAWED_SCRIPT)
    assert make_model(WorkerProcessSettings()).script is SUPPORT_DESK_SCRIPT
    # By name, per workflow: the Desk's script gets its flawed variant; another script runs as is.
    plain = WorkerProcessSettings()
    assert WorkerModels(plain, script=SUPPORT_DESK_SCRIPT).get_model(FLAWED_OFFLINE_MODEL).script \
        is SUPPORT_DESK_FLAWED_SCRIPT
    assert WorkerModels(flawed, script=HELPDESK_SCRIPT).worker_model.script is HELPDESK_SCRIPT
    assert not runs_offline(flawed.model_copy(update={"model_base_url": "http://127.0.0.1:9/v1"}))
    assert DEFAULT_PRICES[FLAWED_OFFLINE_MODEL] == DEFAULT_PRICES[OFFLINE_MODEL]


@pytest.mark.parametrize("model_name, refunded", [(FLAWED_OFFLINE_MODEL, "1043"), (OFFLINE_MODEL, "1042")])
async def test_a_worker_started_on_the_flawed_model_runs_it(redis, producer, fleet_env, tmp_path,
                                                            model_name, refunded):
    text = "Please refund order 1042"
    assert flawed_turn(text)  # a message the flaw picks
    turn_id = await producer.enqueue_turn(conversation_id="c-1", customer_id="C-100", text=text)
    run_burst("worker", {**fleet_env, "TURNFLEET_MODEL_NAME": model_name}, tmp_path)
    done = await TurnQueue(redis).get(turn_id)
    assert done.status == "completed", done.error_message
    assert money_calls(done) == expected_calls(refunded)
    models = {e.model for e in await written_events(redis) if e.kind == EventKind.llm_end}
    assert models == {model_name}
