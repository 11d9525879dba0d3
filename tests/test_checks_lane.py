"""The checks lane takes many check jobs per poll and runs them as one batch (issue 19;
workers/checks_lane.py, workers/check_job.py): a real lane (``Lanes``' own, on the real arq
``Worker`` class of the fleet) over real finished Desk turns, real Redis. Counts of what it
sends Redis (``INFO commandstats``), never timings."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.worker import Worker, get_kwargs
from redis.asyncio import Redis

from tests.test_check_job import DESK_CHECKS, check_entries, finished_turn, stored_checks
from tests.test_worker_round_trips import _commandstats
from tests.worker_runtime import runtime
from turnfleet import keys
from turnfleet.checks import check, failed, passed
from turnfleet.models import DEFAULT_WORKFLOW
from turnfleet.workers.check_job import READ_CHECKS, WRITE_CHECKS, run_turn_checks
from turnfleet.workers.checks_lane import CLAIM_CHECKS
from turnfleet.workers.isolation import Lanes
from turnfleet.workers.model import OfflineModel
from turnfleet.workers.settings import WorkerSettings
from turnfleet.workers.supervisor import TurnWorker
from turnfleet.workflow import App


@pytest.fixture
async def pool(redis_url: str) -> AsyncIterator[ArqRedis]:
    arq_pool = ArqRedis.from_url(redis_url)
    try:
        yield arq_pool
    finally:
        await arq_pool.aclose()


def checks_lane(pool: ArqRedis, ctx: dict[str, Any], check_jobs: int = 10) -> Worker:
    """The built-in workflow's checks lane as ``Lanes`` builds it, its runtime ``ctx``'s."""
    kwargs = {**get_kwargs(WorkerSettings), "redis_pool": pool, "handle_signals": False, "ctx": {}}
    lanes = Lanes(TurnWorker, kwargs, burst=False, checked=(DEFAULT_WORKFLOW,), check_jobs=check_jobs)
    [lane] = lanes.checks_lanes
    lane.ctx.update(ctx)
    return lane


async def one_poll(lane: Worker) -> None:
    """One poll of the lane, and whatever it started run to its end."""
    await lane._poll_iteration()
    await asyncio.gather(*lane.tasks.values())


async def desk_turns(redis: Redis, producer: Any, n: int, app: App | None = None) -> tuple[dict[str, Any], list[str]]:
    """``n`` real Desk turns, each of its own conversation, finished with their check jobs queued."""
    ctx, ids = None, []
    for i in range(n):
        ctx, turn_id = await finished_turn(redis, producer, app, conversation_id=f"c-lane-{i}")
        ids.append(turn_id)
    assert ctx is not None
    assert len(await redis.zrange(keys.CHECKS_QUEUE, 0, -1)) == n
    return ctx, ids


async def test_one_poll_runs_every_due_check_job_in_three_script_calls_whatever_their_number(
        redis, producer, pool):
    ctx, ids = await desk_turns(redis, producer, 5)
    lane = checks_lane(pool, ctx)
    for script in (CLAIM_CHECKS, READ_CHECKS, WRITE_CHECKS):
        await redis.script_load(script.body)  # a first call's NOSCRIPT retry is no round trip of the batch
    before = await _commandstats(redis)
    await one_poll(lane)
    sent = {k: v - before.get(k, 0) for k, v in (await _commandstats(redis)).items()}
    # One claim (poll + claim + arq's run_job for all), one read, one write (with arq's clean-up).
    assert sent.get("evalsha", 0) + sent.get("eval", 0) == 3, sent
    assert sent.get("exec", 0) == 0 and sent.get("watch", 0) == 0  # no arq transaction per job
    for turn_id in ids:
        assert list(await stored_checks(redis, turn_id)) == DESK_CHECKS
        assert len(await check_entries(redis, turn_id)) == 1
        job_id = keys.checks_job_id(turn_id)
        assert not await redis.exists(keys.ARQ_JOB_PREFIX + job_id, keys.ARQ_IN_PROGRESS_PREFIX + job_id,
                                      keys.ARQ_RETRY_PREFIX + job_id)
    assert await redis.zcard(keys.CHECKS_QUEUE) == 0
    assert lane.job_counter == 0


async def test_a_poll_takes_no_more_jobs_than_the_lanes_free_slots(redis, producer, pool):
    ctx, ids = await desk_turns(redis, producer, 3)
    lane = checks_lane(pool, ctx, check_jobs=2)
    await one_poll(lane)
    written = [t for t in ids if await redis.exists(keys.turn_checks(t))]
    assert len(written) == 2
    assert await redis.zcard(keys.CHECKS_QUEUE) == 1
    await one_poll(lane)
    assert all([await redis.exists(keys.turn_checks(t)) for t in ids])


async def test_each_turn_of_a_batch_keeps_its_own_outcome_erased_expired_written_already(redis, producer, pool):
    ctx, (erased, expired, plain, done) = await desk_turns(redis, producer, 4)
    assert await run_turn_checks(ctx, done, "c-lane-3") == "written"  # an earlier run wrote these
    first = await redis.get(keys.turn_checks(done))
    await redis.zadd(keys.CHECKS_QUEUE, {keys.checks_job_id(done): 1})  # ...and its job is taken again
    await redis.delete(keys.turn(erased))
    await redis.hset(keys.turn(expired), "raw_expired_at", "2026-01-01T00:00:00+00:00")
    await one_poll(checks_lane(pool, ctx))
    assert not await redis.exists(keys.turn_checks(erased))
    assert await check_entries(redis, erased) == []
    assert {o["outcome"] for o in (await stored_checks(redis, expired)).values()} == {"inputs_expired"}
    assert {o["outcome"] for o in (await stored_checks(redis, plain)).values()} == {"not_applicable"}  # judged
    assert await redis.get(keys.turn_checks(done)) == first
    assert len(await check_entries(redis, done)) == 1  # written once
    assert await redis.zcard(keys.CHECKS_QUEUE) == 0


async def test_non_blocking_checks_run_on_the_loop_and_the_others_in_a_thread_of_the_checks(redis, producer):
    ran_in: dict[str, str] = {}

    @check("pure", blocking=False)
    def pure(turn):
        ran_in["pure"] = threading.current_thread().name
        return passed()

    @check("team")
    def team(turn):
        ran_in["team"] = threading.current_thread().name
        return passed()

    desk = runtime(redis, OfflineModel())["runtime"].app.workflows[0]
    for checks in ((pure,), (team,)):
        app = App([dataclasses.replace(desk, checks=checks)])
        ctx, turn_id = await finished_turn(redis, producer, app, conversation_id=f"c-{checks[0].name}")
        assert await run_turn_checks(ctx, turn_id, f"c-{checks[0].name}") == "written"
    assert ran_in["pure"] == threading.current_thread().name  # the loop's: no thread hop
    assert ran_in["team"].startswith("turnfleet-checks")  # a pool of the checks' own, not the SDK tools'


async def test_a_blocking_check_does_not_hold_the_batchs_other_turns(redis, producer, pool):
    """Blocking checks run one thread per turn: the first turn's check waits for the second
    turn's to have run (one thread for the whole batch, in order, would wait it out)."""
    second_ran = threading.Event()

    @check("waits_for_the_other")
    def waits(turn):
        if turn.conversation_id == "c-lane-1":
            second_ran.set()
            return passed()
        return passed() if second_ran.wait(30) else failed("the batch's other turn never ran meanwhile")

    desk = runtime(redis, OfflineModel())["runtime"].app.workflows[0]
    ctx, ids = await desk_turns(redis, producer, 2, App([dataclasses.replace(desk, checks=(waits,))]))
    await one_poll(checks_lane(pool, ctx))
    for turn_id in ids:
        assert (await stored_checks(redis, turn_id))["waits_for_the_other"]["outcome"] == "passed"


async def test_a_drained_batch_releases_its_claims_and_leaves_its_jobs_queued(redis, producer, pool):
    entered, release = threading.Event(), threading.Event()

    @check("held")
    def held(turn):
        entered.set()
        release.wait(30)
        return passed()

    desk = runtime(redis, OfflineModel())["runtime"].app.workflows[0]
    ctx, [turn_id] = await desk_turns(redis, producer, 1, App([dataclasses.replace(desk, checks=(held,))]))
    lane = checks_lane(pool, ctx)
    await lane._poll_iteration()
    [batch] = lane.tasks.values()
    job_id = keys.checks_job_id(turn_id)
    try:
        assert await asyncio.to_thread(entered.wait, 30)
        assert await redis.exists(keys.ARQ_IN_PROGRESS_PREFIX + job_id)
        batch.cancel()  # the drain's grace is over
        with pytest.raises(asyncio.CancelledError):
            await batch
    finally:
        release.set()
    assert not await redis.exists(keys.ARQ_IN_PROGRESS_PREFIX + job_id)  # any worker may take it now
    assert await redis.zscore(keys.CHECKS_QUEUE, job_id) is not None
    assert not await redis.exists(keys.turn_checks(turn_id))
    assert lane.job_counter == 0


async def test_a_job_taken_more_than_max_tries_times_is_dead_lettered_and_cleaned_up(redis, producer, pool, capsys):
    ctx, [turn_id] = await desk_turns(redis, producer, 1)
    lane = checks_lane(pool, ctx)
    job_id = keys.checks_job_id(turn_id)
    await redis.set(keys.ARQ_RETRY_PREFIX + job_id, lane.max_tries)  # its workers were lost that often
    await one_poll(lane)
    assert "checks.dead_lettered" in capsys.readouterr().out
    assert not await redis.exists(keys.turn_checks(turn_id))
    assert not await redis.exists(keys.ARQ_JOB_PREFIX + job_id, keys.ARQ_RETRY_PREFIX + job_id,
                                  keys.ARQ_IN_PROGRESS_PREFIX + job_id)
    assert await redis.zcard(keys.CHECKS_QUEUE) == 0
    assert lane.jobs_failed == 0  # a dead letter is an outcome of the job, not a worker failure


async def test_a_job_of_a_newer_format_is_left_for_a_newer_worker_its_try_undone(redis, producer, pool):
    ctx, [turn_id] = await desk_turns(redis, producer, 1)
    job_id = keys.checks_job_id(turn_id)
    job = json.loads(await redis.get(keys.ARQ_JOB_PREFIX + job_id))
    await redis.set(keys.ARQ_JOB_PREFIX + job_id, json.dumps({**job, "v": 99}))
    await one_poll(checks_lane(pool, ctx))
    assert not await redis.exists(keys.turn_checks(turn_id))
    assert await redis.exists(keys.ARQ_JOB_PREFIX + job_id)
    assert not await redis.exists(keys.ARQ_IN_PROGRESS_PREFIX + job_id)
    assert int(await redis.get(keys.ARQ_RETRY_PREFIX + job_id)) == 0
    assert await redis.zscore(keys.CHECKS_QUEUE, job_id) > 1


async def test_a_batchs_check_events_are_what_the_event_models_write(redis, producer):
    """The batch builds its ``check`` events as plain JSON (cheaper than the models): field for
    field what ``events.batch_json`` of ``events.event`` writes, so the consumer reads the same
    entry (a judge's model and usage on the envelope included)."""
    from turnfleet import events
    from turnfleet.models import TokenUsage
    from turnfleet.workers.check_job import CheckJob, _telemetry_batch, _Turn

    ctx, turn_id = await finished_turn(redis, producer)
    record = await producer.result(turn_id)
    usage = TokenUsage(requests=1, input_tokens=120, output_tokens=9)
    outcomes = [
        {"check": "a", "money_path": True, "passed": True, "reason": "", "applicable": True, "duration_us": 12.5,
         "error": None, "outcome": "passed"},
        {"check": "judge", "money_path": False, "passed": False, "reason": "score 0.2", "applicable": True,
         "duration_us": 0.0, "error": "APIError", "outcome": "failed", "model": "m-1",
         "usage": usage.model_dump(mode="json"), "score": 0.2},
    ]
    turn = _Turn(CheckJob(turn_id, "c-1"), record=record, outcomes=outcomes)
    ts = "2026-11-30T12:00:00.123456Z"
    expected = events.batch_json([
        events.event(events.CheckDetail(check=o["check"], outcome=o["outcome"], money_path=o["money_path"],
                                        reason=o["reason"] or None, error=o["error"], duration_us=o["duration_us"]),
                     turn_id=turn_id, attempt=0, seq=seq, conversation_id="c-1", customer_id="C-100",
                     event_id=events.check_event_id(turn_id, o["check"]), model=o.get("model"),
                     usage=usage if o.get("usage") else None, ts=ts)
        for seq, o in enumerate(outcomes)])
    assert _telemetry_batch(turn, ts) == expected
    assert [e.usage for e in events.parse_events(_telemetry_batch(turn, ts))] == [None, usage]


class _BrokenRedactor:
    """A redactor with a bug: the batch raises what no check job expects."""

    def text(self, value: str) -> str:
        raise ValueError("redactor bug")


async def test_a_batch_that_raises_puts_its_jobs_back_and_the_lane_goes_on(redis, producer, pool, capsys):
    ctx, [turn_id] = await desk_turns(redis, producer, 1)
    ctx["runtime"].redactor = _BrokenRedactor()
    lane = checks_lane(pool, ctx)
    job_id = keys.checks_job_id(turn_id)
    await one_poll(lane)  # the batch's error is not the poll loop's
    assert "checks.batch_failed" in capsys.readouterr().out
    assert not await redis.exists(keys.turn_checks(turn_id))
    assert not await redis.exists(keys.ARQ_IN_PROGRESS_PREFIX + job_id)
    assert await redis.zscore(keys.CHECKS_QUEUE, job_id) > 0  # back, due a retry delay later
    assert lane.jobs_failed == 1
    ctx["runtime"].redactor = None
    await redis.zadd(keys.CHECKS_QUEUE, {job_id: 1})  # due now: the next poll writes it
    await one_poll(lane)
    assert list(await stored_checks(redis, turn_id)) == DESK_CHECKS
