"""The workflow registry (``turnfleet/registry.py``): workers register what they serve; a
turn for a workflow no worker ever served is refused at every edge, naming ``agent``.

Real Redis, the real HTTP app under uvicorn, the real CLI in a subprocess.
"""

from __future__ import annotations

import pytest

from turnfleet import keys, registry
from turnfleet.producer import TurnValidationError
from tests.processes import tf
from tests.redis_scan import dump_keys
from tests.test_http import KEY_A, assert_error, auth, make_settings, serving, turn

UNKNOWN = "unknown workflow 'billing-bot': no worker has served it (known: support-desk)"


async def test_registration_keeps_each_version_and_when_it_was_first_seen(redis):
    await registry.register(redis, [registry.Registration("it-helpdesk", "f-1", "1.0")], "w-1")
    first = (await registry.versions(redis, "it-helpdesk"))[0]["first_seen"]
    await registry.register(redis, [registry.Registration("it-helpdesk", "f-1", "1.0")], "w-2")
    await registry.register(redis, [registry.Registration("it-helpdesk", "f-2", "1.1")], "w-3")
    rows = await registry.versions(redis, "it-helpdesk")
    assert [(r["fingerprint"], r["version"], r["worker"]) for r in rows] == [("f-1", "1.0", "w-2"), ("f-2", "1.1", "w-3")]
    assert rows[0]["first_seen"] == first and rows[0]["last_seen"] >= first
    known = await registry.workflows(redis)
    assert known["it-helpdesk"]["fingerprint"] == "f-2" and known["support-desk"]["builtin"] is True
    assert await registry.unknown(redis, ["it-helpdesk", "support-desk", "nope"]) == {"nope"}


async def test_an_unknown_workflow_is_refused_by_the_python_api_and_writes_nothing(producer, redis):
    before = await dump_keys(redis)
    with pytest.raises(TurnValidationError) as caught:
        await producer.enqueue_turn(conversation_id="c-1", customer_id="C-100", text="hi", agent="billing-bot")
    assert caught.value.errors == [{"field": "agent", "message": UNKNOWN}]
    with pytest.raises(TurnValidationError) as bulk:
        await producer.enqueue_turns([{"conversation_id": "c-1", "customer_id": "C-100", "text": "a"},
                                      {"conversation_id": "c-2", "customer_id": "C-100", "text": "b",
                                       "agent": "billing-bot"}])
    assert bulk.value.errors == [{"field": "agent", "message": UNKNOWN, "index": 1}]
    results = await producer.enqueue_batch([{"conversation_id": "c-3", "customer_id": "C-100", "text": "c",
                                             "agent": "billing-bot"}])
    assert [(r.status, r.errors) for r in results] == [("rejected", [{"field": "agent", "message": UNKNOWN}])]
    assert await dump_keys(redis) == before
    # Once a worker has served it, the same turn is taken.
    await registry.register(redis, [registry.Registration("billing-bot", "f-1")], "w-1")
    assert await producer.enqueue_turn(conversation_id="c-1", customer_id="C-100", text="hi", agent="billing-bot")


async def test_http_answers_422_naming_agent_for_an_unknown_workflow(redis_url, redis):
    async with serving(make_settings(), redis_url) as (_app, api):
        one = await api.post("/v1/turns", json=turn("c-h", "C-100", agent="billing-bot"), headers=auth(KEY_A))
        body = assert_error(one, 422, "validation")
        assert body["errors"] == [{"field": "agent", "message": UNKNOWN}]
        batch = await api.post("/v1/turns:batch", json={"turns": [turn("c-h", "C-100", agent="billing-bot"),
                                                                   turn("c-i", "C-100")]}, headers=auth(KEY_A))
        assert [r["status"] for r in batch.json()["results"]] == [422, 202]
    assert await redis.exists(keys.conversation_state("c-h")) == 0


def test_the_cli_exits_2_for_an_unknown_workflow(fleet_env):
    refused = tf("enqueue", "--conversation", "c-cli", "--customer", "C-100", "--agent", "billing-bot", "hi",
                 env=fleet_env)
    assert refused.returncode == 2, refused.stderr
    assert "agent: unknown workflow 'billing-bot'" in refused.stderr and "Traceback" not in refused.stderr
