"""Fencing: an attempt's outcome is written only while it is the turn's running attempt.

The queue scripts against a real Redis, then the job itself in this process (the real SDK,
the offline model) with a model that lets another worker take the turn over mid-run.
"""

from __future__ import annotations

import asyncio
from typing import Any

from turnfleet.producer import Producer
from turnfleet import keys
from turnfleet.models import AttemptError, TurnResult
from turnfleet.queue import CORRUPT_TURN_RECORD, FinishExtras, Lane, Outcome, TurnQueue
from turnfleet.workers.job import STALE, run_turn
from turnfleet.workers.model import OfflineModel
from tests.worker_runtime import runtime


def result(turn_id: str, conversation_id: str = "c-1", status: str = "completed", attempts: int = 1) -> TurnResult:
    return TurnResult(turn_id=turn_id, conversation_id=conversation_id, customer_id="C-100",
                      status=status, final_output=f"answer of attempt {attempts}", attempts=attempts)


async def two_turns(redis) -> tuple[TurnQueue, str, str]:
    producer = Producer(redis=redis)
    first = await producer.enqueue_turn(conversation_id="c-1", customer_id="C-100", text="hi", turn_id="t-1")
    second = await producer.enqueue_turn(conversation_id="c-1", customer_id="C-100", text="again", turn_id="t-2")
    return TurnQueue(redis), first, second


async def test_a_stale_attempt_cannot_finish_a_turn_a_newer_attempt_owns(redis):
    queue, first, second = await two_turns(redis)
    stale = await queue.start(first, "c-1", "w1", "2025-01-01T00:00:00+00:00", lease_s=2)
    # w1 stalls past its lease; w2 claims the job and starts attempt 2.
    current = await queue.start(first, "c-1", "w2", "2025-01-01T00:00:05+00:00", lease_s=2)
    assert (stale.attempt, current.attempt) == (1, 2)

    assert await queue.finish(result(first, attempts=1), '[{"stale": true}]', fence=stale.attempt) is Outcome.FENCED
    assert await queue.record_attempt_failure(
        first, AttemptError(attempt=1, error_type="ConnectionError", message="late"), "[]", fence=stale.attempt
    ) is Outcome.FENCED
    # Nothing of the stale attempt landed: no result, no telemetry, no advance, no error.
    record = await redis.hgetall(keys.turn(first))
    assert record["status"] == "running" and record["attempts"] == "2" and record["worker"] == "w2"
    assert "result" not in record
    assert await redis.xlen(keys.RESULTS_STREAM) == 0
    assert await redis.xlen(keys.TELEMETRY_STREAM) == 0
    assert await redis.get(keys.conversation_active("c-1")) == first
    assert await redis.lrange(keys.conversation_queue("c-1"), 0, -1) == [first, second]
    # The attempt w1 lost is on record, as lost (no usage: nothing of it was recorded).
    assert [(e.attempt, e.error_type, e.usage) for e in await queue.errors(first)] == [(1, "WorkerLost", None)]

    assert await queue.finish(result(first, attempts=2), None, fence=current.attempt) is Outcome.WRITTEN
    assert (await queue.get(first)).final_output == "answer of attempt 2"
    assert await redis.get(keys.conversation_active("c-1")) == second
    # The stale attempt still cannot write once the turn ended.
    assert await queue.finish(result(first, attempts=1), None, fence=stale.attempt) is Outcome.DUPLICATE


async def test_a_duplicate_finish_is_a_no_op(redis):
    queue, first, second = await two_turns(redis)
    attempt = (await queue.start(first, "c-1", "w1", "2025-01-01T00:00:00+00:00")).attempt
    assert await queue.finish(result(first), "[]", fence=attempt) is Outcome.WRITTEN
    again = await queue.finish(result(first, status="failed"), "[]", fence=attempt)
    assert again is Outcome.DUPLICATE and not again
    assert (await queue.get(first)).status == "completed"
    assert await redis.xlen(keys.RESULTS_STREAM) == 1
    assert await redis.xlen(keys.TELEMETRY_STREAM) == 1
    # The next turn was woken once and is not popped by the duplicate.
    assert await redis.lrange(keys.conversation_queue("c-1"), 0, -1) == [second]
    assert await redis.zrange(keys.ARQ_QUEUE, 0, -1) == [first, second]  # arq removes its own


async def test_an_attempt_that_already_failed_cannot_finish_the_turn(redis):
    queue, first, _ = await two_turns(redis)
    attempt = (await queue.start(first, "c-1", "w1", "2025-01-01T00:00:00+00:00")).attempt
    error = AttemptError(attempt=attempt, error_type="ConnectionError", message="reset")
    assert await queue.record_attempt_failure(first, error, None, fence=attempt) is Outcome.WRITTEN
    # A retried write of the same failure (its reply was lost) does not record it twice.
    assert await queue.record_attempt_failure(first, error, None, fence=attempt) is Outcome.FENCED
    assert await queue.finish(result(first), None, fence=attempt) is Outcome.FENCED
    assert (await queue.get(first)).status == "queued"
    assert len(await queue.errors(first)) == 1


async def test_the_finish_script_writes_the_stored_attempt_errors_then_the_final_error(redis):
    queue, first, _ = await two_turns(redis)
    one = (await queue.start(first, "c-1", "w1", "2025-01-01T00:00:00+00:00")).attempt
    retried = AttemptError(attempt=one, error_type="ConnectionError", message="reset")
    assert await queue.record_attempt_failure(first, retried, None, fence=one) is Outcome.WRITTEN
    two = (await queue.start(first, "c-1", "w1", "2025-01-01T00:00:01+00:00")).attempt
    final = AttemptError(attempt=two, error_type="BadRequestError", message="refused")
    failed = result(first, status="failed", attempts=two)
    # A stale attempt's final error lands nowhere.
    assert await queue.finish(failed, None, fence=one, extras=FinishExtras(final_error=final)) is Outcome.FENCED
    assert "result" not in await redis.hgetall(keys.turn(first))
    assert await queue.finish(failed, None, fence=two, extras=FinishExtras(final_error=final)) is Outcome.WRITTEN
    stored = await queue.get(first)
    assert [(e.attempt, e.error_type, e.message) for e in stored.errors] == [
        (1, "ConnectionError", "reset"), (2, "BadRequestError", "refused")]
    # The attempt errors stay as they were: the final error is the result's only.
    assert [e.error_type for e in await queue.errors(first)] == ["ConnectionError"]


async def test_a_stored_attempt_error_that_is_corrupt_leaves_the_result_readable(redis):
    queue, first, second = await two_turns(redis)
    attempt = (await queue.start(first, "c-1", "w1", "2025-01-01T00:00:00+00:00")).attempt
    kept = AttemptError(attempt=1, error_type="ConnectionError", message="café 😀 reset")
    await redis.rpush(keys.turn_errors(first), "[" * 50_000, '{"attempt": 1}',
                      b'{"attempt":1,"error_type":"\xff","message":"x"}',
                      '{"attempt":1,"error_type":"\\ud800","message":"x"}', kept.model_dump_json())
    assert await queue.finish(result(first), None, fence=attempt) is Outcome.WRITTEN
    stored = await queue.get(first)
    assert (stored.status, stored.error_type) == ("completed", None)
    # The same errors as the stored ones read one by one: corrupt ones shown as such.
    assert [e.error_type for e in stored.errors] == [e.error_type for e in await queue.errors(first)] == [
        CORRUPT_TURN_RECORD] * 4 + ["ConnectionError"]
    assert stored.errors[-1] == kept
    # Attempt errors that are no list at all (written by hand): one unreadable error.
    attempt = (await queue.start(second, "c-1", "w1", "2025-01-01T00:00:01+00:00")).attempt
    await redis.set(keys.turn_errors(second), "not a list")
    assert await queue.finish(result(second), None, fence=attempt) is Outcome.WRITTEN
    assert [e.error_type for e in (await queue.get(second)).errors] == [CORRUPT_TURN_RECORD]


async def test_start_takes_a_lease_that_only_the_running_attempt_renews(redis):
    queue, first, _ = await two_turns(redis)
    in_progress = keys.ARQ_IN_PROGRESS_PREFIX + first
    await redis.psetex(in_progress, 190_000, "1")  # what arq's claim leaves: job_timeout + 10 s
    one = (await queue.start(first, "c-1", "w1", "2025-01-01T00:00:00+00:00", lease_s=2)).attempt
    assert 0 < await redis.pttl(in_progress) <= 2000
    assert await redis.get(in_progress) == "w1#1"
    assert await queue.renew_lease(first, one, "w1", 3)
    assert 2000 < await redis.pttl(in_progress) <= 3000
    two = (await queue.start(first, "c-1", "w2", "2025-01-01T00:00:05+00:00", lease_s=2)).attempt
    assert not await queue.renew_lease(first, one, "w1", 3)  # w1 learns it lost the turn
    assert await redis.get(in_progress) == "w2#2"
    assert await queue.renew_lease(first, two, "w2", 2)


# -- the job: a stale worker drops its result ----------------------------------------------


class TakeoverModel(OfflineModel):
    """The offline model; on its first call another worker ("w2") takes the turn over, as if
    this worker had stalled past its lease. Then it either waits (until cancelled) or answers."""

    def __init__(self, redis, turn_id: str, conversation_id: str, wait: bool) -> None:
        super().__init__()
        self.queue = TurnQueue(redis)
        self.turn_id, self.conversation_id, self.wait = turn_id, conversation_id, wait
        self.taken_over = False
        self.cancelled = False

    async def get_response(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        if not self.taken_over:
            self.taken_over = True
            took = await self.queue.start(self.turn_id, self.conversation_id, "w2", "2025-01-01T00:00:05+00:00")
            assert took.attempt == 2
            if self.wait:
                try:
                    await asyncio.Event().wait()  # a model call that would never end
                except asyncio.CancelledError:
                    self.cancelled = True
                    raise
        return await super().get_response(*args, **kwargs)


async def test_a_worker_that_lost_its_lease_is_cancelled_and_writes_nothing(redis):
    producer = Producer(redis=redis)
    turn_id = await producer.enqueue_turn(conversation_id="c-9", customer_id="C-100", text="Where is order 1042?")
    model = TakeoverModel(redis, turn_id, "c-9", wait=True)
    ctx = runtime(redis, model, worker_name="w1", turn_lease_s=0.3)  # renewed every 0.1 s
    assert await asyncio.wait_for(run_turn(ctx, turn_id, "c-9"), 10) == STALE
    assert model.cancelled  # the renewal noticed the takeover and stopped the run
    assert turn_id in ctx["runtime"].fenced  # arq will leave w2's job and lease alone
    record = await redis.hgetall(keys.turn(turn_id))
    assert (record["status"], record["attempts"], record["worker"]) == ("running", "2", "w2")
    assert await redis.xlen(keys.RESULTS_STREAM) == 0 and await redis.xlen(keys.TELEMETRY_STREAM) == 0
    assert [e.error_type for e in await TurnQueue(redis).errors(turn_id)] == ["WorkerLost"]


async def test_a_stale_worker_that_finishes_its_run_drops_the_result(redis):
    producer = Producer(redis=redis)
    turn_id = await producer.enqueue_turn(conversation_id="c-8", customer_id="C-100", text="Where is order 1042?")
    nxt = await producer.enqueue_turn(conversation_id="c-8", customer_id="C-100", text="Thanks, bye")
    ctx = runtime(redis, TakeoverModel(redis, turn_id, "c-8", wait=False), worker_name="w1", turn_lease_s=60)
    assert await run_turn(ctx, turn_id, "c-8") == STALE
    assert turn_id in ctx["runtime"].fenced
    record = await redis.hgetall(keys.turn(turn_id))
    assert record["status"] == "running" and "result" not in record
    assert await redis.xlen(keys.RESULTS_STREAM) == 0 and await redis.xlen(keys.TELEMETRY_STREAM) == 0
    assert await redis.lrange(keys.conversation_queue("c-8"), 0, -1) == [turn_id, nxt]  # not advanced


# -- Worker losses: suspects run isolated, a turn lost while isolated is poison ------------

T0 = "2025-01-01T00:00:00+00:00"


async def test_a_turn_lost_beside_others_is_handed_to_the_isolated_lane_without_an_attempt(redis):
    queue, first, _ = await two_turns(redis)
    lost = await queue.start(first, "c-1", "w1", T0, lease_s=2, lane=Lane.SHARED)
    assert (lost.attempt, lost.status, lost.spared) == (1, "running", 0)
    # w1 dies; w2's shared lane claims the job (arq set its in-progress key) and meets a suspect.
    await redis.set(keys.ARQ_IN_PROGRESS_PREFIX + first, "1")
    handed = await queue.start(first, "c-1", "w2", T0, lease_s=2, lane=Lane.SHARED)
    assert (handed.attempt, handed.status) == (0, "isolate")
    record = await redis.hgetall(keys.turn(first))
    assert (record["status"], record["attempts"], record["suspect"], record["spared"]) == ("queued", "1", "1", "1")
    assert await redis.zscore(keys.ARQ_QUEUE, first) is None
    assert await redis.zscore(keys.ISOLATED_QUEUE, first) is not None
    assert not await redis.exists(keys.ARQ_IN_PROGRESS_PREFIX + first)  # the isolated lane may claim it
    assert await redis.exists(keys.ARQ_JOB_PREFIX + first)
    # One waiting suspect: the first worker to look serves the isolated lane, the next does not.
    assert await queue.isolated_turn("w8", serving=False) == (1, True)
    assert await queue.isolated_turn("w9", serving=False) == (1, False)
    assert await queue.isolated_turn("w8", serving=False) == (1, True)  # it stays until done
    # The lost attempt is fenced out, and recorded once.
    assert await queue.finish(result(first), None, fence=lost.attempt) is Outcome.FENCED
    assert [e.error_type for e in await queue.errors(first)] == ["WorkerLost"]
    # A shared lane that meets it again (a job the reconciler wrote back) hands it over again.
    assert (await queue.start(first, "c-1", "w3", T0, lane=Lane.SHARED)).status == "isolate"
    alone = await queue.start(first, "c-1", "w3", T0, lease_s=2, lane=Lane.ISOLATED)
    assert (alone.attempt, alone.status, alone.spared) == (2, "running", 1)
    assert await redis.hget(keys.turn(first), "lane") == "isolated"
    assert await queue.isolated_turn("w3", serving=True) == (0, True)  # its turn runs there
    assert await queue.finish(result(first, attempts=2), None, fence=alone.attempt) is Outcome.WRITTEN
    await redis.zrem(keys.ISOLATED_QUEUE, first)  # (arq's clean-up)
    assert await queue.isolated_turn("w3", serving=False) == (0, False)  # nothing waits: it leaves
    assert await redis.zscore(keys.WORKERS_ISOLATING, "w3") is None


async def test_a_turn_lost_while_isolated_is_poison(redis):
    queue, first, _ = await two_turns(redis)
    await queue.start(first, "c-1", "w1", T0, lane=Lane.SHARED)
    assert (await queue.start(first, "c-1", "w2", T0, lane=Lane.SHARED)).status == "isolate"
    await queue.start(first, "c-1", "w2", T0, lane=Lane.ISOLATED)
    # w2 dies while the turn runs alone on it: with one isolated loss allowed, it is poison.
    poison = await queue.start(first, "c-1", "w3", T0, lane=Lane.ISOLATED, isolated_losses=1)
    assert (poison.attempt, poison.status, poison.spared) == (3, "poison", 2)
    assert [e.error_type for e in await queue.errors(first)] == ["WorkerLost", "WorkerLost"]
    assert "while running isolated (1 of 1)" in (await queue.errors(first))[1].message


async def test_with_two_isolated_losses_allowed_a_turn_runs_alone_again_after_the_first(redis):
    queue, first, _ = await two_turns(redis)
    await queue.start(first, "c-1", "w1", T0, lane=Lane.SHARED)
    await queue.start(first, "c-1", "w2", T0, lane=Lane.SHARED)
    await queue.start(first, "c-1", "w2", T0, lane=Lane.ISOLATED, isolated_losses=2)
    again = await queue.start(first, "c-1", "w3", T0, lane=Lane.ISOLATED, isolated_losses=2)
    assert (again.attempt, again.status, again.spared) == (3, "running", 2)
    last = await queue.start(first, "c-1", "w4", T0, lane=Lane.ISOLATED, isolated_losses=2)
    assert (last.attempt, last.status, last.spared) == (4, "poison", 3)


async def test_without_an_isolated_lane_a_lost_attempt_is_an_ordinary_one(redis):
    queue, first, _ = await two_turns(redis)
    await queue.start(first, "c-1", "w1", T0)
    again = await queue.start(first, "c-1", "w2", T0)  # Lane.PLAIN: arq runs the settings directly
    assert (again.attempt, again.status, again.spared) == (2, "running", 0)
    assert await redis.hget(keys.turn(first), "suspect") is None


async def test_the_reconciler_leaves_a_job_in_the_isolated_lane_where_it_is(redis):
    queue, first, _ = await two_turns(redis)
    await queue.start(first, "c-1", "w1", T0, lane=Lane.SHARED)
    await queue.start(first, "c-1", "w2", T0, lane=Lane.SHARED)
    found = await queue.reconcile_conversation("c-1", lease_s=2)
    assert (found.action, found.turn_id) == ("ok", first)
    assert await redis.zscore(keys.ARQ_QUEUE, first) is None  # not queued twice


async def test_the_runs_memory_is_written_with_the_result_or_not_at_all(redis):
    """``FinishExtras.memory_items`` are appended to the conversation memory in the finish
    script, in the SDK's layout, fenced with the result: a stale attempt's finish writes
    neither, the current one writes both, and the record's ``memory_end`` counts them."""
    queue, first, _second = await two_turns(redis)
    stale = await queue.start(first, "c-1", "w1", "2025-01-01T00:00:00+00:00", lease_s=2)
    current = await queue.start(first, "c-1", "w2", "2025-01-01T00:00:05+00:00", lease_s=2)
    items = ['{"role":"user","content":"hi"}', '{"role":"assistant","content":"hello"}']
    extras = FinishExtras(memory_items=items, memory_ttl_s=600)
    messages, meta = keys.session_messages("c-1"), f"{keys.SESSION_PREFIX}:{keys.session_id('c-1')}"

    assert await queue.finish(result(first), None, fence=stale.attempt, extras=extras) is Outcome.FENCED
    assert await redis.llen(messages) == 0 and not await redis.exists(meta)

    assert await queue.finish(result(first, attempts=2), None, fence=current.attempt, extras=extras) is Outcome.WRITTEN
    assert await redis.lrange(messages, 0, -1) == items
    stored_meta = await redis.hgetall(meta)
    assert stored_meta["session_id"] == keys.session_id("c-1") and stored_meta["created_at"] == stored_meta["updated_at"]
    assert 0 < await redis.ttl(messages) <= 600 and 0 < await redis.ttl(meta) <= 600
    record = await redis.hgetall(keys.turn(first))
    assert record["memory_end"] == "2" and record["memory_session"] == stored_meta["created_at"]

    assert await queue.finish(result(first, attempts=2), None, fence=current.attempt, extras=extras) is Outcome.DUPLICATE
    assert await redis.llen(messages) == 2
