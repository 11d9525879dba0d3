"""A conversation belongs to one workflow, its first turn's (issue 16, routing's first step).

A turn naming another workflow (``agent``) in that conversation is refused at every edge —
Python API, batch, HTTP (422 naming ``agent``), CLI (exit 2) — and writes nothing. Real Redis,
the real HTTP app under uvicorn, the real CLI in a subprocess.
"""

from __future__ import annotations

import pytest

from turnfleet import keys, registry
from turnfleet.producer import TurnValidationError
from turnfleet.models import DEFAULT_WORKFLOW
from turnfleet.queue import ConversationWorkflowError, TurnQueue
from turnfleet.producer.api import BulkEnqueueError
from tests.processes import tf
from tests.redis_scan import dump_keys
from tests.test_http import KEY_A, assert_error, auth, make_settings, serving, turn


@pytest.fixture(autouse=True)
async def helpdesk_known(redis):
    """it-helpdesk as a worker serving it registers it (unknown workflows are refused first)."""
    await registry.register(redis, [registry.Registration("it-helpdesk", "f-1")], "w-test")


async def test_the_first_turn_binds_the_conversation_and_another_workflow_is_refused(producer, redis):
    first = await producer.enqueue_turn(conversation_id="c-1", customer_id="C-100", text="hi", agent="it-helpdesk")
    assert await redis.hget(keys.conversation_state("c-1"), "workflow") == "it-helpdesk"
    before = await dump_keys(redis)
    with pytest.raises(TurnValidationError) as caught:
        await producer.enqueue_turn(conversation_id="c-1", customer_id="C-100", text="refund 1047")
    assert caught.value.errors == [{"field": "agent", "message": (
        "conversation 'c-1' belongs to workflow 'it-helpdesk' (a conversation keeps the workflow of its first turn)")}]
    assert await dump_keys(redis) == before  # nothing written
    # The same workflow goes on; a repeat of the first turn is still that turn.
    await producer.enqueue_turn(conversation_id="c-1", customer_id="C-100", text="more", agent="it-helpdesk")
    assert await producer.enqueue_turn(conversation_id="c-1", customer_id="C-100", text="hi",
                                       agent="it-helpdesk", turn_id=first) == first
    assert await redis.llen(keys.conversation_turns("c-1")) == 2


async def test_a_conversation_from_before_workflows_belongs_to_the_built_in_one(producer, redis):
    # As this release's predecessor left it: an owner, no workflow field.
    await redis.hset(keys.conversation_state("c-old"), "customer_id", "C-100")
    with pytest.raises(TurnValidationError, match="belongs to workflow 'support-desk'"):
        await producer.enqueue_turn(conversation_id="c-old", customer_id="C-100", text="hi", agent="it-helpdesk")
    await producer.enqueue_turn(conversation_id="c-old", customer_id="C-100", text="hi")
    assert await TurnQueue(redis).conversation_workflow("c-old") == DEFAULT_WORKFLOW


async def test_the_queue_itself_raises_naming_the_conversations_workflow(redis, producer):
    await producer.enqueue_turn(conversation_id="c-2", customer_id="C-100", text="hi")
    req = producer.validate({"conversation_id": "c-2", "customer_id": "C-100", "text": "x", "agent": "it-helpdesk"})
    with pytest.raises(ConversationWorkflowError) as caught:
        await TurnQueue(redis).enqueue(req)
    assert (caught.value.conversation_id, caught.value.workflow) == ("c-2", DEFAULT_WORKFLOW)


async def test_a_batch_refuses_only_the_turn_of_another_workflow(producer, redis):
    turns = [
        {"conversation_id": "c-3", "customer_id": "C-100", "text": "a", "agent": "it-helpdesk"},
        {"conversation_id": "c-3", "customer_id": "C-100", "text": "b"},  # same chunk, other workflow
        {"conversation_id": "c-4", "customer_id": "C-100", "text": "c"},
    ]
    results = await producer.enqueue_batch(turns)
    assert [(r.status, r.error) for r in results] == [("enqueued", None), ("rejected", "validation"), ("enqueued", None)]
    assert [e["field"] for e in results[1].errors] == ["agent"]
    with pytest.raises(BulkEnqueueError) as caught:
        await producer.enqueue_turns([{"conversation_id": "c-3", "customer_id": "C-100", "text": "d"}])
    assert [r.errors[0]["field"] for r in caught.value.results] == ["agent"]
    assert await redis.llen(keys.conversation_turns("c-3")) == 1


async def test_http_answers_422_naming_agent(redis_url, redis):
    async with serving(make_settings(), redis_url) as (_app, api):
        await _http_refuses(api, redis)


async def _http_refuses(api, redis):
    assert (await api.post("/v1/turns", json=turn("c-h", "C-100", agent="it-helpdesk"), headers=auth(KEY_A))).status_code == 202
    refused = await api.post("/v1/turns", json=turn("c-h", "C-100"), headers=auth(KEY_A))
    body = assert_error(refused, 422, "validation")
    assert [e["field"] for e in body["errors"]] == ["agent"]
    assert await redis.llen(keys.conversation_turns("c-h")) == 1


async def test_the_cli_exits_2_naming_agent(fleet_env):
    assert tf("enqueue", "--conversation", "c-cli", "--customer", "C-100", "--agent", "it-helpdesk", "hi",
              env=fleet_env).returncode == 0
    refused = tf("enqueue", "--conversation", "c-cli", "--customer", "C-100", "hello", env=fleet_env)
    assert refused.returncode == 2, refused.stderr
    assert "agent:" in refused.stderr and "belongs to workflow 'it-helpdesk'" in refused.stderr
    assert "Traceback" not in refused.stderr
