"""A tool that raises inside a real worker is a tool error, counted once everywhere; business
answers ("not found", "not eligible") are not errors.

The worker reads an order book (``TURNFLEET_ORDER_BOOK``) with one malformed order: a delivered
order without a delivery date, on which the refund policy raises. Nothing is patched.
"""

from __future__ import annotations

import json
from pathlib import Path

from turnfleet.producer import Producer
from turnfleet.telemetry.metrics import exposition
from turnfleet.telemetry.find import find_conversations
from turnfleet.telemetry.stats import conversation_stats, totals
from tests.processes import run_burst
from tests.test_metrics import parse, value
from turnfleet.tool_errors import tool_error_of
from turnfleet.workers import orderbook

MALFORMED = {"order_id": "9001", "customer_id": "C-100", "customer_name": "Dana Whitfield",
             "items": ["Trail map"], "amount": "12.00", "status": "delivered", "carrier": "UPS",
             "eta": None, "delivered_on": None, "refundable": True}


async def test_a_tool_that_raises_is_counted_once_and_business_answers_are_not(
    redis, fleet_env, tmp_path
):
    book = json.loads((Path(orderbook.__file__).parent / "data" / orderbook.DATA_FILE).read_text())
    book["orders"].append(MALFORMED)
    path = tmp_path / "orders.json"
    path.write_text(json.dumps(book))
    env = {**fleet_env, "TURNFLEET_ORDER_BOOK": str(path)}

    async with Producer(redis=redis) as producer:
        broken = await producer.enqueue_turn(conversation_id="c-broken", customer_id="C-100",
                                             text="I want a refund for order 9001")
        answers = [await producer.enqueue_turn(conversation_id=f"c-{name}", customer_id="C-100", text=text)
                   for name, text in (("unknown", "Where is order 4242?"),
                                      ("ineligible", "I want a refund for order 1044"),
                                      ("lookup", "Where is order 9001?"))]
        run_burst("worker", env, tmp_path)
        result = await producer.result(broken)
        business = [await producer.result(t) for t in answers]
    assert result.status == "completed"

    before = parse((await exposition(redis, 15)).decode())
    run_burst("telemetry", env, tmp_path)
    after = parse((await exposition(redis, 15)).decode())

    assert (await totals(redis))["tool_errors"] == 1
    assert (await conversation_stats(redis, "c-broken"))["tool_errors"] == 1
    for name in ("unknown", "ineligible", "lookup"):
        assert (await conversation_stats(redis, f"c-{name}"))["tool_errors"] == 0
    assert [r["conversation_id"] for r in await find_conversations(redis, error="ToolError")] == ["c-broken"]
    assert value(after, "turnfleet_tool_errors_total") - value(before, "turnfleet_tool_errors_total") == 1
    # A tool error is no failed turn: nothing for the error-rate alert.
    assert (await totals(redis))["turns_failed"] == 0

    # The tool raised; the model got a tool error and told the customer, the turn completed.
    [call] = result.tool_calls
    assert call.tool == "check_refund_eligibility"
    error = tool_error_of(call.output)
    assert error is not None and "check_refund_eligibility raised ValueError" == error.message
    assert "something went wrong while checking refund eligibility" in result.final_output
    # Business answers carry a reason, not an error; the malformed order still looks up fine.
    for r in business:
        assert r.status == "completed"
        for c in r.tool_calls:
            assert tool_error_of(c.output) is None and "error" not in json.loads(c.output)
    assert json.loads(business[0].tool_calls[0].output)["found"] is False
    assert json.loads(business[1].tool_calls[0].output)["eligible"] is False
