"""The producer API: validation at the edge, idempotent enqueue, one job per conversation head."""

from __future__ import annotations

import pytest

from turnfleet.producer import Producer, TurnValidationError
from turnfleet import keys
from turnfleet.models import TurnResult
from turnfleet.queue import ConversationOwnershipError, TurnQueue
from turnfleet.settings import ProducerSettings


@pytest.fixture
async def producer(redis):
    p = Producer(redis=redis, settings=ProducerSettings(max_text_chars=100))
    yield p


BAD_INPUTS = [
    ({"text": "   "}, "text", "must not be empty"),
    ({"text": "x" * 101}, "text", "the limit is 100"),
    ({"conversation_id": "has space"}, "conversation_id", "characters outside"),
    ({"conversation_id": "a{b}"}, "conversation_id", "characters outside"),
    ({"customer_id": "c" * 129}, "customer_id", "129 characters"),
    ({"turn_id": ""}, "turn_id", "must not be empty"),
    ({"metadata": {"k": 1}}, "metadata", "flat str→str"),
    ({"metadata": {"k": {"nested": "x"}}}, "metadata", "flat str→str"),
    ({"metadata": {f"k{i}": "v" for i in range(33)}}, "metadata", "the limit is 32"),
    ({"metadata": {"k": "v" * 5000}}, "metadata", "bytes; the limit is 4096"),
]


@pytest.mark.parametrize("override,field,message", BAD_INPUTS)
async def test_bad_input_is_rejected_and_nothing_is_written(producer, redis, override, field, message):
    turn = {"conversation_id": "c-1", "customer_id": "C-100", "text": "hello", **override}
    with pytest.raises(TurnValidationError) as info:
        await producer.enqueue_turn(**turn)
    assert info.value.errors[0]["field"] == field
    assert message in info.value.errors[0]["message"]
    assert await redis.dbsize() == 0


async def test_bulk_with_one_bad_item_enqueues_nothing(producer, redis):
    turns = [
        {"conversation_id": "c-1", "customer_id": "C-100", "text": "one"},
        {"conversation_id": "c-1", "customer_id": "C-100", "text": ""},
        {"conversation_id": "c 2", "customer_id": "C-100", "text": "three"},
    ]
    with pytest.raises(TurnValidationError) as info:
        await producer.enqueue_turns(turns)
    assert [(e["index"], e["field"]) for e in info.value.errors] == [(1, "text"), (2, "conversation_id")]
    assert await redis.dbsize() == 0


async def test_same_turn_id_twice_makes_one_job(producer, redis):
    first = await producer.enqueue_turn(conversation_id="c-1", customer_id="C-100", text="hi", turn_id="t-1")
    second = await producer.enqueue_turn(conversation_id="c-1", customer_id="C-100", text="hi", turn_id="t-1")
    assert first == second == "t-1"
    assert await redis.zrange(keys.ARQ_QUEUE, 0, -1) == ["t-1"]
    assert await redis.lrange(keys.conversation_queue("c-1"), 0, -1) == ["t-1"]
    assert await redis.lrange(keys.conversation_turns("c-1"), 0, -1) == ["t-1"]


async def test_same_turn_id_after_the_result_is_written_is_still_one_turn(producer, redis):
    await producer.enqueue_turn(conversation_id="c-1", customer_id="C-100", text="hi", turn_id="t-1")
    queue = TurnQueue(redis)
    decision = await queue.start("t-1", "c-1", "w", "now")
    assert decision.attempt == 1
    await queue.finish(
        TurnResult(turn_id="t-1", conversation_id="c-1", customer_id="C-100", status="completed",
                   final_output="hello"),
        telemetry_batch=None,
    )
    # arq's job keys are gone by now (arq forgets ids); our record is not.
    await redis.delete(keys.ARQ_JOB_PREFIX + "t-1")
    await redis.zrem(keys.ARQ_QUEUE, "t-1")
    again = await producer.enqueue_turn(conversation_id="c-1", customer_id="C-100", text="hi", turn_id="t-1")
    assert again == "t-1"
    assert await redis.zcard(keys.ARQ_QUEUE) == 0
    assert await redis.llen(keys.conversation_turns("c-1")) == 1
    result = await producer.result("t-1")
    assert result is not None and result.status == "completed" and result.final_output == "hello"


async def test_only_the_head_of_a_conversation_has_a_job_and_finishing_wakes_the_next(producer, redis):
    ids = await producer.enqueue_turns(
        [{"conversation_id": "c-1", "customer_id": "C-100", "text": f"turn {i}"} for i in range(3)]
        + [{"conversation_id": "c-2", "customer_id": "C-100", "text": "other"}]
    )
    assert set(await redis.zrange(keys.ARQ_QUEUE, 0, -1)) == {ids[0], ids[3]}
    queue = TurnQueue(redis)
    assert (await queue.start(ids[1], "c-1", "w", "now")).status == "not-head"
    assert (await queue.start(ids[0], "c-1", "w", "now")).attempt == 1
    await redis.zrem(keys.ARQ_QUEUE, ids[0])  # arq removes a job it finished
    await queue.finish(
        TurnResult(turn_id=ids[0], conversation_id="c-1", customer_id="C-100", status="failed"), None
    )
    assert set(await redis.zrange(keys.ARQ_QUEUE, 0, -1)) == {ids[1], ids[3]}
    assert await redis.get(keys.conversation_active("c-1")) == ids[1]
    # Finishing twice (a duplicate run) changes nothing.
    assert not await queue.finish(
        TurnResult(turn_id=ids[0], conversation_id="c-1", customer_id="C-100", status="completed"), None
    )
    assert await redis.lrange(keys.conversation_queue("c-1"), 0, -1) == ids[1:3]


async def test_a_conversation_belongs_to_one_customer(producer, redis):
    await producer.enqueue_turn(conversation_id="c-1", customer_id="C-100", text="hi")
    with pytest.raises(ConversationOwnershipError):
        await producer.enqueue_turn(conversation_id="c-1", customer_id="C-200", text="hi")
    assert await redis.llen(keys.conversation_turns("c-1")) == 1


async def test_wait_returns_when_the_result_is_written(producer, redis):
    import asyncio

    turn_id = await producer.enqueue_turn(conversation_id="c-1", customer_id="C-100", text="hi")
    waiter = asyncio.create_task(producer.wait(turn_id, timeout_s=30))
    queue = TurnQueue(redis)
    await queue.start(turn_id, "c-1", "w", "now")
    await queue.finish(
        TurnResult(turn_id=turn_id, conversation_id="c-1", customer_id="C-100", status="completed",
                   final_output="done"), None
    )
    result = await asyncio.wait_for(waiter, 30)
    assert result is not None and result.final_output == "done"


async def test_a_customer_over_its_daily_budget_gets_a_typed_error_and_nothing_is_enqueued(redis):
    from turnfleet.producer import BudgetExceeded
    from turnfleet import budget

    producer = Producer(redis=redis, settings=ProducerSettings(budgets={"C-100": 0.01}))
    await producer.enqueue_turn(conversation_id="c-1", customer_id="C-100", text="under budget")
    # Telemetry's customer-day aggregate says $0.012 spent today (integer nano-dollars).
    await redis.hset(keys.aggregate_day("customer", "C-100", budget.today()), "cost_nusd", 12_000_000)
    with pytest.raises(BudgetExceeded) as info:
        await producer.enqueue_turn(conversation_id="c-1", customer_id="C-100", text="over budget")
    status = info.value.status
    assert (status.limit_usd, status.spent_usd, status.day) == (0.01, 0.012, budget.today())
    assert status.resets_at == budget.resets_at() and status.resets_at.hour == 0
    assert await redis.llen(keys.conversation_turns("c-1")) == 1
    with pytest.raises(BudgetExceeded):
        await producer.enqueue_turns([{"conversation_id": "c-2", "customer_id": "C-100", "text": "x"}])
    # Customers without a limit are not affected.
    assert await producer.enqueue_turn(conversation_id="c-3", customer_id="C-200", text="fine")


async def test_bulk_enqueue_across_script_chunks_answers_each_turn_in_order(producer, redis):
    from turnfleet.models import TurnRequest
    from turnfleet.queue import ENQUEUE_MANY_CHUNK

    n = ENQUEUE_MANY_CHUNK * 2 + 50
    reqs = [TurnRequest(turn_id=f"t-{i}", conversation_id=f"c-{i % 300}", customer_id="C-100", text="hi")
            for i in range(n)]
    queue = TurnQueue(redis)
    known = {3, ENQUEUE_MANY_CHUNK + 7, n - 1}
    for i in known:
        assert await queue.enqueue(reqs[i]) == 1
    await redis.hset(keys.conversation_state("c-299"), "customer_id", "C-999")  # someone else's
    answers = await queue.enqueue_many(reqs)
    assert len(answers) == n
    for i, a in enumerate(answers):
        expected = 0 if i in known else -1 if i % 300 == 299 else 1
        assert a == expected, (i, a)
    # One job per conversation that got a turn (its head), the rest wait in their queues.
    assert await redis.zcard(keys.ARQ_QUEUE) == 299
    assert await redis.llen(keys.conversation_queue("c-0")) == 2


# -- wrong types, repeats and per-item results (issue 12, item 6) ------------------------

WRONG_TYPES = [
    ({"metadata": ["channel", "chat"]}, "metadata"),
    ({"metadata": [("channel", "chat")]}, "metadata"),
    ({"metadata": "channel=chat"}, "metadata"),
    ({"metadata": {"channel": "\ud800"}}, "metadata"),
    ({"metadata": {"\udcff": "x"}}, "metadata"),
    ({"text": "refund \ud800"}, "text"),
    ({"text": b"bytes"}, "text"),
    ({"text": 42}, "text"),
    ({"conversation_id": 42}, "conversation_id"),
    ({"customer_id": ["C-100"]}, "customer_id"),
    ({"turn_id": b"t-1"}, "turn_id"),
    ({"turn_id": "t-\ud800"}, "turn_id"),
    ({"agent": 1.5}, "agent"),
    ({"trace": [1]}, "trace"),
]


@pytest.mark.parametrize("override,field", WRONG_TYPES)
async def test_wrong_types_raise_turn_validation_error_naming_the_field(producer, redis, override, field):
    turn = {"conversation_id": "c-1", "customer_id": "C-100", "text": "hello", **override}
    with pytest.raises(TurnValidationError) as info:
        await producer.enqueue_turn(**turn)
    assert [e["field"] for e in info.value.errors] == [field]
    with pytest.raises(TurnValidationError) as bulk:
        await producer.enqueue_turns([{"conversation_id": "c-1", "customer_id": "C-100", "text": "ok"}, turn])
    assert [(e["index"], e["field"]) for e in bulk.value.errors] == [(1, field)]
    assert await redis.dbsize() == 0


async def test_bulk_items_that_are_not_mappings_are_named_by_index(producer, redis):
    good = {"conversation_id": "c-1", "customer_id": "C-100", "text": "ok"}
    with pytest.raises(TurnValidationError) as info:
        await producer.enqueue_turns([good, "not a turn", None, ["conversation_id", "c-1"]])
    assert [(e["index"], e["field"]) for e in info.value.errors] == [(1, "turn"), (2, "turn"), (3, "turn")]
    for turns in (None, 42):
        with pytest.raises(TurnValidationError) as whole:
            await producer.enqueue_turns(turns)
        assert whole.value.errors[0]["field"] == "turns"
    assert await redis.dbsize() == 0


async def test_same_turn_id_with_different_content_is_refused(producer, redis):
    from turnfleet.producer import TurnIdReused

    base = {"conversation_id": "c-1", "customer_id": "C-100", "turn_id": "t-1"}
    assert await producer.enqueue_turn(**base, text="refund order 1042") == "t-1"
    assert await producer.enqueue_turn(**base, text="refund order 1042") == "t-1"  # a retry: the same turn
    for other in ({"text": "refund order 1047"}, {"metadata": {"channel": "chat"}}, {"trace": False},
                  {"conversation_id": "c-2"}):
        with pytest.raises(TurnIdReused) as info:
            await producer.enqueue_turn(**{**base, "text": "refund order 1042", **other})
        assert isinstance(info.value, TurnValidationError)
        assert info.value.errors == [{"field": "turn_id", "message": "already used for a different request"}]
    stored = await producer.queue.get_request("t-1")
    assert stored is not None and stored.text == "refund order 1042"
    assert await redis.llen(keys.conversation_turns("c-1")) == 1
    assert not await redis.exists(keys.conversation_turns("c-2"))


async def test_bulk_with_a_conversation_of_another_customer_says_which_turns_were_enqueued(producer, redis):
    from turnfleet.producer import BulkEnqueueError

    await producer.enqueue_turn(conversation_id="c-taken", customer_id="C-200", text="mine", turn_id="x-0")
    turns = [
        {"conversation_id": "c-1", "customer_id": "C-100", "text": "one", "turn_id": "b-1"},
        {"conversation_id": "c-taken", "customer_id": "C-100", "text": "two", "turn_id": "b-2"},
        {"conversation_id": "c-3", "customer_id": "C-100", "text": "three"},
        {"conversation_id": "c-taken", "customer_id": "C-200", "text": "other", "turn_id": "x-0"},
    ]
    with pytest.raises(BulkEnqueueError) as info:
        await producer.enqueue_turns(turns)
    assert isinstance(info.value, ConversationOwnershipError)  # what this call raised before
    results = info.value.results
    assert [(r.index, r.status, r.error) for r in results] == [
        (0, "enqueued", None), (1, "rejected", "conflict"), (2, "enqueued", None), (3, "rejected", "validation")]
    assert results[0].turn_id == "b-1" and results[2].turn_id and results[2].turn_status == "queued"
    assert "c-taken" in results[1].message and results[3].errors == [
        {"field": "turn_id", "message": "already used for a different request"}]
    assert await redis.lrange(keys.conversation_turns("c-1"), 0, -1) == ["b-1"]
    assert await redis.lrange(keys.conversation_turns("c-3"), 0, -1) == [results[2].turn_id]
    assert await redis.lrange(keys.conversation_turns("c-taken"), 0, -1) == ["x-0"]


async def test_enqueue_batch_judges_each_turn_on_its_own(redis):
    from turnfleet.producer import EnqueueResult
    from turnfleet import budget

    producer = Producer(redis=redis, settings=ProducerSettings(budgets={"C-300": 0.01}))
    await redis.hset(keys.aggregate_day("customer", "C-300", budget.today()), "cost_nusd", 12_000_000)
    await producer.enqueue_turn(conversation_id="c-taken", customer_id="C-200", text="mine")
    results = await producer.enqueue_batch([
        {"conversation_id": "c-1", "customer_id": "C-100", "text": "one", "turn_id": "b-1"},
        {"conversation_id": "c-1", "customer_id": "C-100", "text": ""},
        "not a turn",
        {"conversation_id": "c-taken", "customer_id": "C-100", "text": "two"},
        {"conversation_id": "c-2", "customer_id": "C-300", "text": "over budget"},
        {"conversation_id": "c-1", "customer_id": "C-100", "text": "one", "turn_id": "b-1"},
    ])
    assert all(isinstance(r, EnqueueResult) for r in results)
    assert [(r.index, r.status, r.error) for r in results] == [
        (0, "enqueued", None), (1, "rejected", "validation"), (2, "rejected", "validation"),
        (3, "rejected", "conflict"), (4, "rejected", "budget_exceeded"), (5, "existing", None)]
    assert results[1].errors == [{"field": "text", "message": "must not be empty"}]
    assert results[2].errors == [{"field": "turn", "message": "must be a mapping of fields (a dict)"}]
    assert results[4].budget is not None and results[4].budget.limit_usd == 0.01
    assert results[5].turn_id == "b-1" and results[5].ok
    assert await redis.lrange(keys.conversation_turns("c-1"), 0, -1) == ["b-1"]
    assert not await redis.exists(keys.conversation_turns("c-2"))
