"""A workflow's own prices (``Workflow(prices=...)``, issue 16) cost its calls.

Only workers load the app; they register each workflow's prices, and the telemetry consumer
prices a call in a turn of workflow W by W's table over ``TURNFLEET_PRICES``. Two workflows on
one model: one declares its own price, the other does not. A worker's real startup, its jobs
in this process, a real consumer, real Redis; a bad price is refused at the CLI (exit 2).
"""

from __future__ import annotations

from tests.apps.priced import OWN_PRICE
from tests.apps.scripted import HELPDESK_MODEL
from tests.consuming import drain
from tests.processes import tf
from turnfleet import keys, registry
from turnfleet.producer import Producer
from turnfleet.settings import Price
from turnfleet.workers.job import run_turn
from turnfleet.workers.settings import shutdown, startup

FLEET_PRICE = 1.0  # USD per 1M tokens: the consumer's own table for the same model


async def test_a_workflows_own_prices_cost_its_calls_and_only_its_calls(redis, redis_url, monkeypatch):
    monkeypatch.setenv("TURNFLEET_APP", "tests.apps.priced:app")
    ctx = {"redis_url": redis_url}
    await startup(ctx)
    try:
        producer = Producer(redis=redis)
        turns = {}
        for workflow in ("it-priced", "it-unpriced"):
            conv = f"c-{workflow}"
            turns[workflow] = await producer.enqueue_turn(
                conversation_id=conv, customer_id="C-100", text="Please reset the password of user ana", agent=workflow)
            assert await run_turn(ctx, turns[workflow], conv) == "completed"
    finally:
        await shutdown(ctx)
    assert (await registry.workflow_prices(redis))["it-priced"][HELPDESK_MODEL]["input"] == OWN_PRICE
    await drain(redis, prices={HELPDESK_MODEL: Price(input=FLEET_PRICE, cached_input=FLEET_PRICE, output=FLEET_PRICE)})
    for workflow, usd_per_1m in (("it-priced", OWN_PRICE), ("it-unpriced", FLEET_PRICE)):
        turn = await redis.hgetall(keys.aggregate("turn", turns[workflow]))
        tokens = int(turn["input_tokens"]) + int(turn["output_tokens"])
        assert tokens > 0
        assert int(turn["cost_nusd"]) == tokens * int(usd_per_1m * 1000), workflow
    model = await redis.hgetall(keys.aggregate("model", HELPDESK_MODEL))
    both = sum([int(await redis.hget(keys.aggregate("turn", t), "cost_nusd")) for t in turns.values()])
    assert int(model["cost_nusd"]) == both  # the model's figure is the sum of its calls' own costs


def test_a_bad_price_is_refused_at_worker_start(fleet_env):
    out = tf("worker", "--burst", "--app", "tests.apps.priced:bad", env=fleet_env)
    assert out.returncode == 2, out.stderr
    assert "Workflow 'it-badprice': price of 'tf-helpdesk': input:" in out.stderr
    assert "Traceback" not in out.stderr
