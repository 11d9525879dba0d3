"""Each model call is attributed to the model that made it (issue 16, "Models").

Two agents of one Support Desk run on two differently priced models (two ``OfflineModel``
instances with their own names) and one turn hands off from one to the other: real SDK
``Runner`` and hooks in ``run_turn``, real telemetry consumer, real Redis. What each call
cost is checked against the model's own generation spans (the model reports its name and
usage there, independently of the hooks).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import openai
import pytest
from agents import Agent, OpenAIChatCompletionsModel, OpenAIResponsesModel
from arq import Retry

from tests.consuming import drain
from tests.worker_runtime import FlakyModel, runtime
from turnfleet import keys
from turnfleet.events import EventKind, TelemetryEvent, parse_events
from turnfleet.producer import Producer
from turnfleet.settings import Price
from turnfleet.telemetry.stats import stats
from turnfleet.workers.hooks import model_name_of
from turnfleet.workers.job import run_turn
from turnfleet.workers.model import OfflineModel
from turnfleet.workers.support_desk import ORDERS, TRIAGE

FRONT, BACK, DEFAULT = "tf-front", "tf-back", "turnfleet-offline"
# Every token of a model at one price, so a call's cost is its tokens × the price.
NUSD_PER_TOKEN = {FRONT: 1_000, BACK: 3_000}  # 1 and 3 USD per 1M tokens
PRICES = {m: Price(input=n / 1000, cached_input=n / 1000, output=n / 1000)
          for m, n in NUSD_PER_TOKEN.items()}


def two_model_desk(redis: Any, back: OfflineModel) -> dict[str, Any]:
    """A worker runtime whose Triage runs on ``tf-front`` and Orders on ``back``; the
    worker's default model (``TURNFLEET_MODEL_NAME``) is neither."""
    ctx = runtime(redis, OfflineModel(model_name=FRONT), model_name=DEFAULT)
    ctx["runtime"].app.get("support-desk").agents[ORDERS].model = back
    return ctx


async def written_events(redis: Any) -> list[TelemetryEvent]:
    """The events the worker wrote, every batch of the telemetry stream in order."""
    return [e for _, fields in await redis.xrange(keys.TELEMETRY_STREAM)
            for e in parse_events(fields["batch"])]


# A provider-routed name (LiteLLM's ``litellm/<provider>/<model>``) is priced by the provider's
# own model name: ``tf-back``'s price.
ROUTED_BACK = f"litellm/anthropic/{BACK}"


@pytest.mark.parametrize("back", [BACK, ROUTED_BACK])
async def test_each_call_is_costed_at_its_own_models_price(redis, collector, back):
    producer = Producer(redis=redis)
    turn_id = await producer.enqueue_turn(conversation_id="conv-m", customer_id="C-100",
                                          text="Where is order 1042?")
    ctx = two_model_desk(redis, OfflineModel(model_name=back))
    nusd_per_token = {FRONT: NUSD_PER_TOKEN[FRONT], back: NUSD_PER_TOKEN[BACK]}  # either name
    assert await run_turn(ctx, turn_id, "conv-m") == "completed"

    # What each model did, as the models themselves report it in their generation spans.
    spent: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for span in collector.spans:
        data = span.span_data
        if data.type == "generation":
            spent[data.model]["llm_calls"] += 1
            spent[data.model]["input_tokens"] += data.usage["input_tokens"]
            spent[data.model]["output_tokens"] += data.usage["output_tokens"]
    assert sorted(spent) == sorted([back, FRONT])  # Triage routed, Orders looked up and answered
    assert spent[FRONT]["llm_calls"] == 1 and spent[back]["llm_calls"] == 2

    events = await written_events(redis)
    calls = [(e.agent, e.model) for e in events if e.kind == EventKind.llm_end]
    assert calls == [(TRIAGE, FRONT), (ORDERS, back), (ORDERS, back)]
    turn_level = {e.kind: e.model for e in events if e.kind in (EventKind.turn_started,
                                                                 EventKind.turn_completed)}
    assert turn_level == {EventKind.turn_started: FRONT, EventKind.turn_completed: back}

    await drain(redis, prices=PRICES)
    expected_cost = {m: (s["input_tokens"] + s["output_tokens"]) * nusd_per_token[m]
                     for m, s in spent.items()}
    rows = {row["model"]: row for row in await stats(redis, "model")}
    assert sorted(rows) == sorted([back, FRONT])  # nothing counted against the worker's default
    for model, figures in spent.items():
        assert {k: rows[model][k] for k in figures} == figures
        raw = await redis.hgetall(keys.aggregate("model", model))
        assert int(raw["cost_nusd"]) == expected_cost[model]
        assert "cost_unknown_calls" not in raw or int(raw["cost_unknown_calls"]) == 0
    turn = await redis.hgetall(keys.aggregate("turn", turn_id))
    assert int(turn["cost_nusd"]) == sum(expected_cost.values())
    assert turn["models"] == f'["{FRONT}", "{back}"]' and turn["model"] == back


async def test_a_failed_call_is_counted_against_the_model_that_made_it(redis):
    producer = Producer(redis=redis)
    turn_id = await producer.enqueue_turn(conversation_id="conv-f", customer_id="C-100",
                                          text="Where is order 1042?")
    back = FlakyModel(fail_on=1)  # Orders' first call fails (Triage is on another model)
    back.model_name = BACK
    with pytest.raises(Retry):
        await run_turn(two_model_desk(redis, back), turn_id, "conv-f")

    await drain(redis, prices=PRICES)
    rows = {row["model"]: row for row in await stats(redis, "model")}
    assert sorted(rows) == [BACK, FRONT]
    assert (rows[BACK]["errors"], rows[BACK]["errors_by_type"]) == (1, {"ConnectionError": 1})
    assert rows[FRONT]["errors"] == 0 and rows[FRONT]["llm_calls"] == 1


def test_the_model_of_a_call_is_the_agents_own_else_the_runs_default():
    client = openai.AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="unused")

    class Unnamed(OfflineModel):
        def __init__(self) -> None:
            super().__init__(model_name="")

    cases = {
        "gpt-4o-mini": "gpt-4o-mini",  # Agent(model="...")
        None: DEFAULT,  # no model of its own: the run's default
        OfflineModel(model_name=FRONT): FRONT,
        OpenAIChatCompletionsModel(model="gpt-4o", openai_client=client): "gpt-4o",
        OpenAIResponsesModel(model="gpt-5-nano", openai_client=client): "gpt-5-nano",
        Unnamed(): "Unnamed",  # a Model naming nothing: counted as unpriced, not as another
    }
    for model, name in cases.items():
        assert model_name_of(Agent(name="A", model=model).model, DEFAULT) == name
