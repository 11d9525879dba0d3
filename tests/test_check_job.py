"""Checks on every finished turn, exactly once (issue 17; workers/check_job.py, finish.lua).

The Desk on the flawed offline model through a real worker at trace sample rate 0: each
turn's stored outcomes and its one ``check`` entry on the telemetry stream, with the exact
turns the money-path check fails; the follow-up job written with the result (and only for a
workflow with checks, and once); a second run of the job writing nothing; inputs gone giving
``inputs_expired``; a job failing on Redis retried, then dead-lettered.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from arq import Retry
from redis.asyncio import Redis

from tests.processes import run_burst
from tests.test_flawed_model import FLAWED, NAMED_CHECK, ORDERS_OF, REQUESTS, copy_of
from tests.worker_runtime import runtime
from turnfleet import keys, versions
from turnfleet.checks import check, failed
from turnfleet.events import EventKind, parse_events
from turnfleet.queue import CHECKS_FUNCTION, FinishExtras, Outcome, TurnQueue
from turnfleet.redaction import Redactor
from turnfleet.workers.check_job import CHECK_JOB_TRIES, run_turn_checks
from turnfleet.workers.job import run_turn
from turnfleet.workers.llm import FLAWED_OFFLINE_MODEL
from turnfleet.workers.model import OfflineModel
from turnfleet.workers.orderbook import copy_orders
from turnfleet.workers.support_desk_checks import SUPPORT_DESK_CHECKS
from turnfleet.workflow import App

DESK_CHECKS = [c.name for c in SUPPORT_DESK_CHECKS]
ENTRIES_PER_TURN = 1  # a turn's check entries on the telemetry stream: all its checks in one


async def check_entries(redis: Redis, turn_id: str | None = None) -> list[dict[str, Any]]:
    """The telemetry stream's check entries (batch version BATCH_CHECK), of one turn or all."""
    return [f for _, f in await redis.xrange(keys.TELEMETRY_STREAM)
            if f["v"] == str(versions.BATCH_CHECK) and turn_id in (None, f["turn_id"])]


async def stored_checks(redis: Redis, turn_id: str) -> dict[str, dict[str, Any]]:
    raw = await redis.get(keys.turn_checks(turn_id))
    assert raw is not None, f"no check outcomes stored for {turn_id}"
    return {o["check"]: o for o in json.loads(raw)}


async def checks_queued(redis: Redis) -> list[str]:
    return list(await redis.zrange(keys.CHECKS_QUEUE, 0, -1))


async def test_flawed_desk_turns_through_a_worker_at_sample_rate_0_get_their_checks_once(
        redis, producer, fleet_env, tmp_path):
    turn_ids = []
    for index, (customer, order, ask) in enumerate(REQUESTS):
        renamed = await copy_orders(redis, ORDERS_OF[customer])
        turn_ids.append(await producer.enqueue_turn(conversation_id=f"conv-{index}", customer_id=customer,
                                                    text=ask.format(renamed[order])))
    run_burst("worker", {**fleet_env, "TURNFLEET_MODEL_NAME": FLAWED_OFFLINE_MODEL,
                         "TURNFLEET_TRACE_SAMPLE_RATE": "0"}, tmp_path)

    failed = {}
    for index, turn_id in enumerate(turn_ids):
        assert await redis.hget(keys.turn(turn_id), "status") == "completed"
        assert not await redis.exists(keys.trace(turn_id))  # rate 0: no spans kept, checks ran anyway
        outcomes = await stored_checks(redis, turn_id)
        assert list(outcomes) == DESK_CHECKS
        named = outcomes.pop(NAMED_CHECK)
        if named["outcome"] == "failed":
            failed[index] = named["reason"]
        else:
            assert named["outcome"] == "passed", (index, named)
        assert {o["outcome"] for o in outcomes.values()} <= {"passed", "not_applicable"}, (index, outcomes)
        # One entry per turn, one check event per check, with the stored outcome.
        entries = await check_entries(redis, turn_id)
        assert len(entries) == ENTRIES_PER_TURN
        if not entries:
            continue
        [entry] = entries
        assert (entry["workflow"], entry["version"]) == (
            (await producer.result(turn_id)).workflow, (await producer.result(turn_id)).version)
        found = parse_events(entry["batch"])
        assert [(e.kind, e.attempt, e.event_id, e.detail.check) for e in found] == [
            (EventKind.check, 0, f"{turn_id}:check:{name}", name) for name in DESK_CHECKS]
        assert {e.detail.check: e.detail.outcome for e in found}[NAMED_CHECK] == named["outcome"]
    assert failed == {
        i: f"refunded order {copy_of(FLAWED[i], i)}, which the customer never named (named: {copy_of(REQUESTS[i][1], i)})"
        for i in FLAWED}
    assert len(await check_entries(redis)) == ENTRIES_PER_TURN * len(REQUESTS)
    assert await checks_queued(redis) == []  # every check job served and gone


async def finished_turn(redis: Redis, producer: Any, app: App | None = None, text: str = "Please refund order 1042",
                        conversation_id: str = "c-1") -> tuple[dict[str, Any], str]:
    """One real Desk turn run in this process (its check job left queued); (ctx, turn id)."""
    ctx = runtime(redis, OfflineModel())
    if app is not None:
        ctx["runtime"].app = app
    turn_id = await producer.enqueue_turn(conversation_id=conversation_id, customer_id="C-100", text=text)
    assert await run_turn(ctx, turn_id, conversation_id) == "completed"
    return ctx, turn_id


async def test_the_check_job_is_written_with_the_result_and_a_duplicate_finish_writes_no_second(redis, producer):
    ctx, turn_id = await finished_turn(redis, producer)
    job_key = keys.ARQ_JOB_PREFIX + keys.checks_job_id(turn_id)
    job = json.loads(await redis.get(job_key))
    assert (job["f"], job["a"], job["k"], job["v"], job["t"]) == (CHECKS_FUNCTION, [turn_id, "c-1"], {}, 1, 1)
    assert await checks_queued(redis) == [f"checks/{turn_id}"]
    # The same finish again (a retried write whose reply was lost): nothing new written.
    record = await producer.result(turn_id)
    again = await TurnQueue(redis).finish(record, None, extras=FinishExtras(checks=True))
    assert again is Outcome.DUPLICATE
    assert json.loads(await redis.get(job_key)) == job
    assert await checks_queued(redis) == [f"checks/{turn_id}"]


async def test_a_workflow_without_checks_gets_no_check_job(redis, producer):
    desk = runtime(redis, OfflineModel())["runtime"].app.workflows[0]
    assert desk.checks  # the Desk has checks; the same workflow without them:
    _ctx, turn_id = await finished_turn(redis, producer, App([dataclasses.replace(desk, checks=())]))
    assert await redis.hget(keys.turn(turn_id), "status") == "completed"
    assert not await redis.exists(keys.ARQ_JOB_PREFIX + keys.checks_job_id(turn_id))
    assert await checks_queued(redis) == []


async def test_a_second_run_of_the_check_job_writes_nothing(redis, producer):
    ctx, turn_id = await finished_turn(redis, producer)
    job_ctx = {**ctx, "job_id": keys.checks_job_id(turn_id), "job_try": 1}
    assert await run_turn_checks(job_ctx, turn_id, "c-1") == "written"
    first = await redis.get(keys.turn_checks(turn_id))
    # A worker that died after the write: the job runs again, finds the outcomes, writes nothing.
    assert await run_turn_checks({**job_ctx, "job_try": 2}, turn_id, "c-1") == "already"
    assert await redis.get(keys.turn_checks(turn_id)) == first
    assert len(await check_entries(redis, turn_id)) == 1
    outcomes = await stored_checks(redis, turn_id)
    assert {n: o["outcome"] for n, o in outcomes.items()} == {
        "refund_amount_matches_eligibility": "passed", NAMED_CHECK: "passed",
        "no_refund_without_eligibility_check": "passed", "escalated_when_asked_for_a_person": "not_applicable"}
    assert outcomes["escalated_when_asked_for_a_person"]["reason"] == "not applicable: the customer did not ask for a person"


async def test_a_turn_whose_raw_text_expired_gets_inputs_expired_never_a_failure(redis, producer):
    ctx, turn_id = await finished_turn(redis, producer)
    await redis.hset(keys.turn(turn_id), "raw_expired_at", "2026-01-01T00:00:00+00:00")
    assert await run_turn_checks(ctx, turn_id, "c-1") == "written"
    outcomes = await stored_checks(redis, turn_id)
    assert {o["outcome"] for o in outcomes.values()} == {"inputs_expired"}
    assert {o["reason"] for o in outcomes.values()} == {"the turn's raw text expired (TURNFLEET_RAW_RETENTION_S)"}
    [entry] = await check_entries(redis, turn_id)
    assert {e.detail.outcome for e in parse_events(entry["batch"])} == {"inputs_expired"}


async def test_a_second_turn_whose_earlier_memory_is_gone_gets_inputs_expired(redis, producer):
    ctx, first = await finished_turn(redis, producer, text="Where is my order 1042?")
    _ctx, second = await finished_turn(redis, producer)  # the same conversation: memory_base > 0
    assert int(await redis.hget(keys.turn(second), "memory_base")) > 0
    await redis.delete(keys.session_messages("c-1"))  # the memory expired (session TTL) or was erased
    assert await run_turn_checks(ctx, second, "c-1") == "written"
    assert {o["outcome"] for o in (await stored_checks(redis, second)).values()} == {"inputs_expired"}
    assert await run_turn_checks(ctx, first, "c-1") == "written"  # needs no earlier memory
    assert (await stored_checks(redis, first))[NAMED_CHECK]["outcome"] == "not_applicable"


async def test_a_turn_erased_before_its_check_job_ran_gets_nothing_written(redis, producer):
    ctx, turn_id = await finished_turn(redis, producer)
    await redis.delete(keys.turn(turn_id))
    assert await run_turn_checks(ctx, turn_id, "c-1") == "gone"
    assert not await redis.exists(keys.turn_checks(turn_id))
    assert await check_entries(redis) == []


async def test_a_check_job_failing_on_redis_is_retried_then_dead_lettered_the_turn_untouched(
        redis, producer, capsys):
    ctx, turn_id = await finished_turn(redis, producer)
    before = await redis.hgetall(keys.turn(turn_id))
    down = Redis(port=1, decode_responses=True, socket_connect_timeout=1)  # nothing listens there
    rt = dataclasses.replace(ctx["runtime"], redis=down, queue=TurnQueue(down))
    try:
        with pytest.raises(Retry):
            await run_turn_checks({"runtime": rt, "job_try": 1}, turn_id, "c-1")
        assert await run_turn_checks({"runtime": rt, "job_try": CHECK_JOB_TRIES}, turn_id, "c-1") == "dead-lettered"
    finally:
        await down.aclose()
    assert "checks.dead_lettered" in capsys.readouterr().out
    assert await redis.hgetall(keys.turn(turn_id)) == before
    assert not await redis.exists(keys.turn_checks(turn_id))


async def test_reasons_are_redacted_with_the_workflows_patterns_and_clipped(redis, producer):
    @check("leaky")
    def leaky(turn):
        return failed(f"customer jane.doe@example.com said ACCT-778899 on {turn.turn_id} " + "x" * 600)

    desk = runtime(redis, OfflineModel())["runtime"].app.workflows[0]
    ctx, turn_id = await finished_turn(redis, producer, App([dataclasses.replace(desk, checks=(leaky,))]))
    ctx["runtime"].redactor = Redactor(patterns=[r"ACCT-\d+"])  # a workflow's pattern, as startup unions them
    assert await run_turn_checks(ctx, turn_id, "c-1") == "written"
    reason = (await stored_checks(redis, turn_id))["leaky"]["reason"]
    assert reason.startswith(f"customer [REDACTED:email] said [REDACTED:custom] on {turn_id} xxx")
    assert len(reason) == 500
    [entry] = await check_entries(redis, turn_id)
    [event] = parse_events(entry["batch"])
    assert (event.detail.outcome, event.detail.reason) == ("failed", reason)
