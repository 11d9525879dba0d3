"""The queue's, memory's and tools' Lua scripts (turnfleet/lua/, workers/lua/), run against
the test's own redis-server: what each writes, and the replies read by name."""

from __future__ import annotations

import json
from typing import Any

from arq.jobs import Job

from turnfleet import keys
from turnfleet.connection import RAW
from turnfleet.models import TurnRequest
from turnfleet.queue import (
    ENQUEUE_MANY_CHUNK,
    JOB_FUNCTION,
    START,
    ConversationOwnershipError,
    ROUTING,
    Outcome,
    TurnQueue,
    deserialize_job,
)
from turnfleet.workers.memory import APPEND
from turnfleet.workers.tools import record_once

from tests.test_queue_fencing import result


def request(turn_id: str, conversation_id: str = "c-1", customer_id: str = "C-100") -> TurnRequest:
    return TurnRequest(turn_id=turn_id, conversation_id=conversation_id, customer_id=customer_id,
                       text=f"text of {turn_id}")


async def arq_job(redis, turn_id: str) -> Any:
    """The turn's arq job as arq itself reads it (our deserializer, as the worker runs it)."""
    return await Job(turn_id, redis, _queue_name=keys.ARQ_QUEUE, _deserializer=deserialize_job).info()


async def snapshot(redis) -> dict[bytes, bytes]:
    """Every key and its serialized value."""
    names = await redis.execute_command("KEYS", "*", **RAW)
    return {k: await redis.execute_command("DUMP", k, **RAW) for k in names}


async def test_finish_wakes_the_next_turn_with_an_arq_job_arq_decodes(redis):
    queue = TurnQueue(redis)
    assert await queue.enqueue(request("t-1")) and await queue.enqueue(request("t-2"))
    assert await arq_job(redis, "t-2") is None  # only the head has a job
    started = await queue.start("t-1", "c-1", "w1", "2025-01-01T00:00:00+00:00")
    assert await queue.finish(result("t-1"), None, fence=started.attempt) is Outcome.WRITTEN
    job = await arq_job(redis, "t-2")
    assert (job.function, job.args, job.kwargs, job.job_try) == (JOB_FUNCTION, ["t-2", "c-1"], {}, 1)
    assert job.score == await redis.zscore(keys.ARQ_QUEUE, "t-2")  # queued under the turn id
    assert await redis.get(keys.conversation_active("c-1")) == "t-2"


async def test_reconcile_rewrites_a_missing_job_in_the_same_layout(redis):
    queue = TurnQueue(redis)
    await queue.enqueue(request("t-1"))
    written = json.loads(await redis.get(keys.ARQ_JOB_PREFIX + "t-1"))
    await redis.delete(keys.ARQ_JOB_PREFIX + "t-1")
    await redis.zrem(keys.ARQ_QUEUE, "t-1")
    repaired = await queue.reconcile_conversation("c-1")
    assert (repaired.action, repaired.turn_id, repaired.dropped) == ("rewoke", "t-1", 0)
    rewritten = json.loads(await redis.get(keys.ARQ_JOB_PREFIX + "t-1"))
    assert rewritten.keys() == written.keys()
    assert {**rewritten, "et": 0} == {**written, "et": 0}
    job = await arq_job(redis, "t-1")
    assert (job.function, job.args) == (JOB_FUNCTION, ["t-1", "c-1"])
    # The pipelined path reads the same reply by name.
    [again] = await queue.reconcile_many(["c-1"])
    assert (again.action, again.turn_id, again.dropped, again.error) == ("ok", "t-1", 0, None)


def start_keys(turn_id: str, conversation_id: str) -> dict[str, str]:
    return {"turn": keys.turn(turn_id), "conv_queue": keys.conversation_queue(conversation_id),
            "turn_errors": keys.turn_errors(turn_id), "in_progress": keys.ARQ_IN_PROGRESS_PREFIX + turn_id,
            "conv_state": keys.conversation_state(conversation_id),
            "session_messages": keys.session_messages(conversation_id),
            "quarantine": keys.turn_quarantine(turn_id), "arq_queue": keys.ARQ_QUEUE,
            "isolated_queue": keys.ISOLATED_QUEUE, "source_queue": keys.ARQ_QUEUE,
            "arq_retry": keys.ARQ_RETRY_PREFIX + turn_id}


def start_args(turn_id: str) -> dict[str, Any]:
    return {"turn_id": turn_id, "worker": "w1", "started_at": "2025-01-01T00:00:00+00:00", "lease_ms": 0,
            "now_iso": "2025-01-01T00:00:00+00:00", "lane": "plain", "isolated_losses": 1, "now_ms": 1,
            "record_version": 1, **ROUTING, "served": ""}


async def test_start_answers_by_name_whether_it_runs_or_not(redis):
    queue = TurnQueue(redis)
    req = request("t-1")
    await queue.enqueue(req)
    await queue.enqueue(request("t-2"))
    await redis.rpush(keys.session_messages("c-1"), "{}", "{}")
    start = START.bind(redis)
    ran = await start.raw(redis, keys=start_keys("t-1", "c-1"), args=start_args("t-1"))
    assert ran == {"attempt": 1, "status": b"running", "request": req.model_dump_json().encode(),
                   "current_agent": b"", "memory_length": 2, "memory_base": 2, "customer_id": b"C-100",
                   "corrupt": b"", "spared": 0, "memory": [b"{}", b"{}"]}
    waiting = await start.raw(redis, keys=start_keys("t-2", "c-1"), args=start_args("t-2"))
    assert (waiting["attempt"], waiting["status"]) == (0, b"not-head")
    assert waiting.keys() == ran.keys()


async def test_a_fenced_finish_writes_nothing(redis):
    queue = TurnQueue(redis)
    await queue.enqueue(request("t-1"))
    await queue.enqueue(request("t-2"))
    stale = await queue.start("t-1", "c-1", "w1", "2025-01-01T00:00:00+00:00", lease_s=2)
    current = await queue.start("t-1", "c-1", "w2", "2025-01-01T00:00:05+00:00", lease_s=2)
    before = await snapshot(redis)
    assert await queue.finish(result("t-1"), '[{"stale": true}]', fence=stale.attempt) is Outcome.FENCED
    assert await snapshot(redis) == before
    assert await queue.finish(result("t-1"), None, fence=current.attempt) is Outcome.WRITTEN
    assert await snapshot(redis) != before


async def test_enqueue_many_answers_as_enqueue_per_turn(redis):
    reqs = [request("t-1"), request("t-1"), request("t-2", customer_id="C-200"), request("t-3", "c-2")]
    # Past one script call: the answers of every chunk, in order.
    reqs += [request(f"t-bulk-{i}", f"c-bulk-{i}") for i in range(ENQUEUE_MANY_CHUNK)]
    queue = TurnQueue(redis)
    one_by_one = []
    for req in reqs:
        try:
            one_by_one.append(int(await queue.enqueue(req)))
        except ConversationOwnershipError:
            one_by_one.append(-1)
    stored = await snapshot(redis)
    await redis.flushdb()
    assert await queue.enqueue_many(reqs) == one_by_one
    assert one_by_one[:4] == [1, 0, -1, 1]
    # The same keys, each holding the same (arq jobs and indexes carry the enqueue time).
    assert (await snapshot(redis)).keys() == stored.keys()
    for turn_id, conversation_id in (("t-1", "c-1"), ("t-3", "c-2"), ("t-bulk-7", "c-bulk-7")):
        assert await redis.hgetall(keys.turn(turn_id)) == {
            "request": next(r for r in reqs if r.turn_id == turn_id).model_dump_json(), "status": "queued",
            "attempts": "0", "conversation_id": conversation_id, "customer_id": "C-100", "v": "1"}
        assert (await arq_job(redis, turn_id)).args == [turn_id, conversation_id]
    assert await redis.hget(keys.COUNTERS, "turns_enqueued") == str(len(reqs) - 2)


async def test_memory_append_writes_only_for_the_running_attempt(redis):
    queue = TurnQueue(redis)
    await queue.enqueue(request("t-1"))
    stale = await queue.start("t-1", "c-1", "w1", "2025-01-01T00:00:00+00:00")
    current = await queue.start("t-1", "c-1", "w2", "2025-01-01T00:00:01+00:00")
    append = APPEND.bind(redis)
    meta = f"{keys.SESSION_PREFIX}:{keys.session_id('c-1')}"
    named = {"messages": keys.session_messages("c-1"), "meta": meta, "turn": keys.turn("t-1")}

    def args(attempt: object, *items: str) -> dict[str, Any]:
        return {"attempt": attempt, "ttl_s": "", "now": 7, "session_id": "s", "items": list(items)}

    assert await append(keys=named, args=args(stale.attempt, '{"a":1}')) == -1
    assert (await redis.exists(keys.session_messages("c-1"), meta)) == 0
    assert await append(keys=named, args=args(current.attempt, '{"a":1}', '{"b":2}')) == 2
    assert await append(keys=named, args=args("", '{"c":3}')) == 3  # unfenced: tools, tests
    assert await redis.lrange(keys.session_messages("c-1"), 0, -1) == ['{"a":1}', '{"b":2}', '{"c":3}']
    assert await redis.hgetall(meta) == {"session_id": "s", "updated_at": "7", "created_at": "7"}


async def test_record_once_stores_the_first_record_and_its_ledger_entry_only(redis):
    first = await record_once(redis, "tf:test:once", {"n": 1}, stream="tf:test:ledger", entry={"n": "1"})
    second = await record_once(redis, "tf:test:once", {"n": 2}, stream="tf:test:ledger", entry={"n": "2"})
    assert (first, second) == ((True, {"n": 1}), (False, {"n": 1}))
    assert [fields for _, fields in await redis.xrange("tf:test:ledger")] == [{"n": "1"}]
    assert await record_once(redis, "tf:test:alone", {"n": 3}) == (True, {"n": 3})  # no stream
    assert await redis.xlen("tf:test:ledger") == 1
