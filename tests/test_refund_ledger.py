"""An order is refunded at most once, ever, and one conversation opens one ticket.

Real worker processes race for one order; later asks, in other conversations, are answered
with the original refund, and the replay says "already refunded" (an answer, not an error).
"""

from __future__ import annotations

import json

from turnfleet.producer import Producer
from tests.drills.audit import audit
from tests.processes import tf
from tests.processes import run_burst, start_burst
from turnfleet import keys

REFUND_1047 = "I'd like a refund for order 1047, the headphones stopped working."


async def _order_records(redis) -> list[str]:
    return [k async for k in redis.scan_iter(match=keys.order_refund("*"))]


async def test_conversations_racing_on_two_workers_refund_an_order_once(redis, fleet_env, tmp_path):
    async with Producer(redis=redis) as producer:
        ids = await producer.enqueue_turns([
            {"conversation_id": f"c-race-{n}", "customer_id": "C-102", "text": REFUND_1047}
            for n in range(8)
        ])
        workers = [start_burst("worker", {**fleet_env, "TURNFLEET_WORKER_NAME": f"w{n}"}, tmp_path,
                               f"worker-{n}") for n in (1, 2)]
        for w in workers:
            assert w.wait(120) == 0, w.output()[-3000:]
        results = [await producer.result(t) for t in ids]

    assert [r.status for r in results] == ["completed"] * 8
    ledger = await redis.xrange(keys.REFUND_LEDGER)
    assert len(ledger) == 1, ledger
    assert await _order_records(redis) == [keys.order_refund("1047")]
    record = json.loads(await redis.get(keys.order_refund("1047")))
    assert ledger[0][1]["refund_id"] == record["refund_id"] and record["amount"] == "229.00"

    winners = [r for r in results if r.turn_id == record["turn_id"]]
    assert len(winners) == 1 and f"I've refunded $229.00 for order 1047 (refund {record['refund_id']})" \
        in winners[0].final_output
    for loser in (r for r in results if r.turn_id != record["turn_id"]):
        answers = [json.loads(c.output) for c in loser.tool_calls]
        assert answers[-1]["already_refunded"] is True, answers
        assert answers[-1]["refund_id"] == record["refund_id"]
        assert loser.final_output.startswith(
            f"Order 1047 was already refunded: $229.00 on {record['refunded_at'][:10]}, "
            f"refund {record['refund_id']}.")

    run_burst("telemetry", fleet_env, tmp_path)
    report = await audit(redis, ids)  # also: no order twice in the ledger
    assert report.telemetry["tool_errors"] == 0  # "already refunded" is an answer, not an error


async def test_a_later_ask_is_answered_with_the_original_refund_and_replayed_as_such(
    redis, fleet_env, tmp_path
):
    async with Producer(redis=redis) as producer:
        first = await producer.enqueue_turn(conversation_id="c-first", customer_id="C-102",
                                            text=REFUND_1047, turn_id="t-first")
        run_burst("worker", fleet_env, tmp_path, name="worker-1")
        # Later, another conversation of the customer asks again.
        later = await producer.enqueue_turn(conversation_id="c-later", customer_id="C-102",
                                            text="Refund order 1047 please", turn_id="t-later")
        human = [await producer.enqueue_turn(conversation_id="c-later", customer_id="C-102", text=text)
                 for text in ("I want to talk to a human", "Please escalate this to a manager")]
        run_burst("worker", fleet_env, tmp_path, name="worker-2")
        made, again = await producer.result(first), await producer.result(later)
        tickets = [await producer.result(t) for t in human]

    assert json.loads(made.tool_calls[-1].output)["refunded"] is True
    refund = json.loads(await redis.get(keys.order_refund("1047")))
    # The eligibility check answers with the original refund: the model does not try again.
    answer = json.loads(again.tool_calls[-1].output)
    assert [c.tool for c in again.tool_calls] == ["check_refund_eligibility"]
    assert answer["already_refunded"] is True and answer["eligible"] is False
    assert (answer["refund_id"], answer["amount"], answer["refunded_at"]) == (
        refund["refund_id"], "229.00", refund["refunded_at"])
    assert "error" not in answer
    assert again.final_output.startswith(
        f"Order 1047 was already refunded: $229.00 on {refund['refunded_at'][:10]}, "
        f"refund {refund['refund_id']}.")
    assert await redis.xlen(keys.REFUND_LEDGER) == 1

    # Asking for a person twice in the conversation: one ticket, the second ask gets it back.
    opened, reused = (json.loads(t.tool_calls[-1].output) for t in tickets)
    assert reused["ticket_id"] == opened["ticket_id"] and reused["already_open"] is True
    assert opened["ticket_id"] in tickets[1].final_output
    stored = json.loads(await redis.get(keys.conversation_escalation("c-later")))
    assert stored["ticket_id"] == opened["ticket_id"] and stored["turn_id"] == human[0]

    run_burst("telemetry", fleet_env, tmp_path)
    replay = tf("turn", "t-later", env=fleet_env)
    assert replay.returncode == 0, replay.stderr
    assert "Tool check_refund_eligibility" in replay.stdout
    assert "[already refunded]" in replay.stdout and "✗" not in replay.stdout
    data = json.loads(tf("turn", "t-later", "--json", env=fleet_env).stdout)
    [tool] = [n for a in data["attempts"] for agent in a["tree"] for n in agent["children"]
              if n["kind"] == "tool"]
    assert (tool["detail"]["outcome"], tool["error"]) == ("already refunded", None)
    assert data["telemetry"]["tool_errors"] == 0
    result = tf("result", "t-later", env=fleet_env)
    assert "[already refunded]" in result.stdout
