"""Poison entries, the dead-letter stream, trimming and the fault-injection setting, in process.

Consumers run in this event loop against a real Redis; entries are XADDed as the workers
write them (batches from the worker's own hooks, ``tests/batches.py``), the poison too (a NaN
duration the hooks pass through). Garbage entries (not JSON, a cut-off array, a bare ``"x"``
where only the stream's ids matter) are written raw on purpose: no worker writes them, so the
hooks cannot make them. The subprocess versions are the drills in
``tests/drills/test_telemetry_drills.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from structlog.testing import capture_logs

from turnfleet.telemetry.aggregate import Aggregator
from turnfleet.telemetry.consumer import (
    DEAD_LETTERED,
    FaultInjection,
    TelemetryConsumer,
    entry_fault,
    read_dead_letters,
    run_consumer,
)
from turnfleet.telemetry.stats import totals, turn_stats
from turnfleet.telemetry.trim import BACKLOG_OVER_LIMIT, TrimResult, trim_acknowledged
from tests.waiting import until
from tests.batches import TURN_TOKENS, poison_turn, support_turn
from tests.consuming import drain, pending, pick, settings, stream_ids
from turnfleet import keys

WAIT_S = 10.0


async def fleet(redis: Any) -> dict[str, int]:
    raw = await redis.hgetall(keys.GLOBAL_AGGREGATE)
    return {k: int(raw.get(k) or 0) for k in (DEAD_LETTERED, "telemetry_malformed",
                                                BACKLOG_OVER_LIMIT)}


async def read_as(redis: Any, consumer: str, count: int | None = None) -> list:
    reply = await redis.xreadgroup(keys.TELEMETRY_GROUP, consumer, {keys.TELEMETRY_STREAM: ">"},
                                   count=count)
    return list(reply[0][1]) if reply else []


async def deliveries(redis: Any, entry_id: str) -> int:
    [row] = await redis.xpending_range(keys.TELEMETRY_STREAM, keys.TELEMETRY_GROUP, entry_id,
                                       entry_id, 1)
    return row["times_delivered"]


async def wait_until(condition: Any, what: str) -> None:
    """Wait for a Redis-side condition (an observable state, not a guess at timing)."""
    await until(condition, what, WAIT_S)


def test_the_poison_batch_really_makes_the_planner_raise(redis: Any) -> None:
    # The tests below mean something only if the planner chokes on this entry.
    fields = {"turn_id": "t-poison", "batch": poison_turn().batch_json()}
    with pytest.raises(ValueError, match="NaN"):
        Aggregator(redis, settings()).plan("1-0", fields)


# -- poison entries ---------------------------------------------------------------------------


async def test_poison_entry_is_dead_lettered_after_n_deliveries_and_acknowledged(redis: Any) -> None:
    await support_turn("t-1").send(redis)
    poison = poison_turn()
    poison_id = await poison.send(redis)
    await support_turn("t-2").send(redis)

    with capture_logs() as logs:
        assert await drain(redis, dead_letter_after=3) == 3

    failed = [e for e in logs if e["event"] == "telemetry.entry_failed"]
    assert [(e["entry_id"], e["deliveries"], e["stage"]) for e in failed] == [
        (poison_id, 1, "plan"), (poison_id, 2, "plan")]
    [dead_log] = [e for e in logs if e["event"] == "telemetry.dead_lettered"]
    assert (dead_log["entry_id"], dead_log["deliveries"], dead_log["log_level"]) == (poison_id, 3, "error")

    [dead] = await read_dead_letters(redis)
    assert (dead.entry_id, dead.reason, dead.stage, dead.deliveries) == (poison_id, "error", "plan", 3)
    assert dead.error.startswith("ValueError: cannot convert float NaN to integer")
    assert "ValueError" in dead.traceback and dead.consumer == "test-consumer"
    assert dead.fields == {"turn_id": "t-poison", "batch": poison.batch_json()}
    assert (dead.stream, dead.group) == (keys.TELEMETRY_STREAM, keys.TELEMETRY_GROUP)
    assert dead.dead_lettered_at.endswith("+00:00")

    assert await pending(redis) == 0
    assert await fleet(redis) == {DEAD_LETTERED: 1, "telemetry_malformed": 0, BACKLOG_OVER_LIMIT: 0}
    both = {k: 2 * v for k, v in TURN_TOKENS.items()}
    assert pick(await totals(redis), TURN_TOKENS) == both  # the poison counted nothing
    assert await turn_stats(redis, "t-poison") == {}


async def test_poison_entry_does_not_hold_back_the_rest_of_its_batch(redis: Any) -> None:
    await TelemetryConsumer(redis, settings(), name="c").ensure_group()
    await support_turn("t-1").send(redis)
    poison_id = await poison_turn().send(redis)
    await support_turn("t-2").send(redis)
    consumer = TelemetryConsumer(redis, settings(dead_letter_after=5), name="c")
    entries = await read_as(redis, "c")
    assert len(entries) == 3

    assert await consumer.handle(entries) == 2  # the two good ones are acknowledged
    assert [r["message_id"] for r in await redis.xpending_range(
        keys.TELEMETRY_STREAM, keys.TELEMETRY_GROUP, "-", "+", 10)] == [poison_id]
    assert await deliveries(redis, poison_id) == 1
    assert (await totals(redis))["turns_completed"] == 2
    assert consumer.retry_in_s is not None and consumer.retry_in_s <= 0.2
    assert await read_dead_letters(redis) == []


async def test_failing_script_is_isolated_and_the_others_in_the_pipeline_are_counted(redis: Any) -> None:
    # The turn's seen-set key holds a string (clobbered by something else): the aggregate
    # script fails on its first command, on every delivery, before writing anything.
    await redis.set(keys.event_seen("t-clobbered"), "not a set")
    await support_turn("t-1").send(redis)
    bad_id = await support_turn("t-clobbered").send(redis)
    await support_turn("t-2").send(redis)
    with capture_logs() as logs:
        assert await drain(redis, dead_letter_after=2) == 3
    assert [e["entries"] for e in logs if e["event"] == "telemetry.batch_failed"] == [3]
    for good in ("t-1", "t-2"):
        assert pick(await turn_stats(redis, good), TURN_TOKENS) == TURN_TOKENS
    assert (await totals(redis))["turns_completed"] == 2
    [dead] = await read_dead_letters(redis)
    assert (dead.entry_id, dead.stage, dead.deliveries) == (bad_id, "aggregate", 2)
    assert dead.error.startswith("ResponseError: Error running script")
    assert "WRONGTYPE" in dead.error and "EVALSHA" not in dead.error  # not the quoted command
    assert await pending(redis) == 0


async def test_failure_in_the_alert_rules_for_one_entry_does_not_hold_back_the_others(redis: Any) -> None:
    await support_turn("t-1", "c-1").send(redis)
    bad_id = await support_turn("t-2", "c-bad").send(redis)
    await support_turn("t-3", "c-3").send(redis)
    consumer = TelemetryConsumer(redis, settings(dead_letter_after=2), name="c")
    evaluate = consumer.alerts.evaluate

    async def evaluate_with_a_bug(touched: Any) -> Any:
        if "c-bad" in touched.conversations:
            raise KeyError("a rule with a bug")
        return await evaluate(touched)

    consumer.alerts.evaluate = evaluate_with_a_bug  # type: ignore[method-assign]
    assert await consumer.run(burst=True) == 3
    [dead] = await read_dead_letters(redis)
    assert (dead.entry_id, dead.stage, dead.deliveries) == (bad_id, "alerts", 2)
    assert dead.error == "KeyError: 'a rule with a bug'"
    # Its aggregate was stored on the first delivery and not again on the second.
    assert (await totals(redis))["turns_completed"] == 3
    assert pick(await turn_stats(redis, "t-2"), TURN_TOKENS) == TURN_TOKENS
    assert await pending(redis) == 0


async def test_redis_outage_fails_the_batch_without_dead_lettering_anything(
    redis: Any, redis_server: Any
) -> None:
    await TelemetryConsumer(redis, settings(), name="c").ensure_group()
    await support_turn("t-1").send(redis)
    await support_turn("t-2").send(redis)
    consumer = TelemetryConsumer(redis, settings(dead_letter_after=1), name="c")
    entries = await read_as(redis, "c")
    redis_server.stop()  # graceful: the AOF keeps the pending entries
    with pytest.raises(RedisConnectionError):
        await consumer.handle(entries)
    redis_server.start()
    assert await pending(redis) == 2
    assert await read_dead_letters(redis) == []
    assert await drain(redis, name="c") == 2  # its own pending list, on restart
    assert (await totals(redis))["turns_completed"] == 2
    assert await read_dead_letters(redis) == []


def test_script_errors_are_the_entrys_fault_unless_they_report_a_server_state() -> None:
    script = "Error running script (call to f_0): @user_script:9: "
    assert entry_fault(ResponseError(script + "ERR value is not an integer or out of range"))
    assert not entry_fault(ResponseError(script + "-OOM command not allowed when used memory"))
    assert not entry_fault(ResponseError(script + "-READONLY You can't write against a replica"))
    assert not entry_fault(ResponseError("NOGROUP No such key 'tf:telemetry'"))
    assert not entry_fault(RedisConnectionError("Connection refused"))
    assert entry_fault(ValueError("invalid literal for int()"))


# -- malformed entries --------------------------------------------------------------------------


async def test_malformed_entry_is_counted_acknowledged_and_copied_to_the_dead_letter_stream(
    redis: Any,
) -> None:
    garbage_id = await redis.xadd(keys.TELEMETRY_STREAM, {"turn_id": "t-x", "batch": "{not json"})
    await support_turn("t-1").send(redis)
    assert await drain(redis, dead_letter_after=5) == 2  # no retries: malformed is final
    [dead] = await read_dead_letters(redis)
    assert (dead.entry_id, dead.reason, dead.stage, dead.deliveries) == (garbage_id, "malformed", "parse", 1)
    assert "Invalid JSON" in dead.error and dead.traceback == ""
    assert dead.fields == {"turn_id": "t-x", "batch": "{not json"}
    assert await fleet(redis) == {DEAD_LETTERED: 1, "telemetry_malformed": 1, BACKLOG_OVER_LIMIT: 0}
    assert await pending(redis) == 0


async def test_entry_two_consumers_race_on_is_dead_lettered_once(redis: Any) -> None:
    await TelemetryConsumer(redis, settings(), name="a").ensure_group()
    await redis.xadd(keys.TELEMETRY_STREAM, {"batch": "[1, 2"})
    entries = await read_as(redis, "a")  # a reads it, stalls...
    await redis.xclaim(keys.TELEMETRY_STREAM, keys.TELEMETRY_GROUP, "b", 0,  # ...b takes it over
                       [entries[0][0]])
    b = TelemetryConsumer(redis, settings(), name="b")
    a = TelemetryConsumer(redis, settings(), name="a")
    assert await b.handle(entries) == 1
    assert await a.handle(entries) == 1  # a wakes up and handles it too: nothing is pending now
    assert len(await read_dead_letters(redis)) == 1
    assert await fleet(redis) == {DEAD_LETTERED: 1, "telemetry_malformed": 1, BACKLOG_OVER_LIMIT: 0}


async def test_read_dead_letters_pages_oldest_first(redis: Any) -> None:
    for i in range(5):
        await redis.xadd(keys.TELEMETRY_STREAM, {"turn_id": f"t-{i}", "batch": "nope"})
    await drain(redis)
    first = await read_dead_letters(redis, count=2)
    rest = await read_dead_letters(redis, start=f"({first[-1].id}")
    assert [d.fields["turn_id"] for d in first + rest] == [f"t-{i}" for i in range(5)]


# -- trimming -------------------------------------------------------------------------------------


async def test_trim_drops_only_what_every_group_acknowledged(redis: Any) -> None:
    ids = [await support_turn(f"t-{i}").send(redis) for i in range(6)]
    await redis.xgroup_create(keys.TELEMETRY_STREAM, "archive", id="0")
    await drain(redis)  # the telemetry group acknowledges all six
    archived = await redis.xreadgroup("archive", "arch-1", {keys.TELEMETRY_STREAM: ">"}, count=3)
    await redis.xack(keys.TELEMETRY_STREAM, "archive", ids[0])  # ids[1], ids[2]: pending

    result = await trim_acknowledged(redis, max_entries=100)
    assert (result.trimmed, result.length, result.min_id, result.over_limit) == (1, 5, ids[1], False)
    assert await stream_ids(redis) == ids[1:]

    assert len(archived[0][1]) == 3
    await redis.xack(keys.TELEMETRY_STREAM, "archive", ids[1], ids[2])
    result = await trim_acknowledged(redis, max_entries=100)
    # Nothing pending in "archive" now; it still needs what it has not been delivered.
    assert (result.trimmed, await stream_ids(redis)) == (2, ids[3:])


async def test_trim_never_drops_a_pending_or_undelivered_entry(redis: Any) -> None:
    await TelemetryConsumer(redis, settings(), name="c").ensure_group()
    ids = [await support_turn(f"t-{i}").send(redis) for i in range(4)]
    await read_as(redis, "dead", count=2)  # a consumer that died holding ids[0], ids[1]
    result = await trim_acknowledged(redis, max_entries=100)
    assert (result.trimmed, await stream_ids(redis)) == (0, ids)
    await redis.xack(keys.TELEMETRY_STREAM, keys.TELEMETRY_GROUP, ids[0])
    await trim_acknowledged(redis, max_entries=100)
    assert await stream_ids(redis) == ids[1:]  # ids[1] pending, ids[2:] never delivered


async def test_trim_leaves_a_stream_without_groups_whole(redis: Any) -> None:
    assert await trim_acknowledged(redis, max_entries=1) == TrimResult(0, 0, None, False)
    ids = [await support_turn(f"t-{i}").send(redis) for i in range(3)]
    result = await trim_acknowledged(redis, max_entries=100)
    assert (result.trimmed, result.min_id, await stream_ids(redis)) == (0, None, ids)


async def test_trim_compares_ids_past_two_to_the_53(redis: Any) -> None:
    top = "5-18446744073709551615"
    for entry_id in ("5-9007199254740993", top, "6-0"):
        await redis.xadd(keys.TELEMETRY_STREAM, {"batch": "x"}, id=entry_id)
    await redis.xgroup_create(keys.TELEMETRY_STREAM, "g", id=top)
    result = await trim_acknowledged(redis, max_entries=100)
    assert (result.min_id, await stream_ids(redis)) == ("6-0", ["6-0"])


async def test_backlog_over_the_limit_is_counted_and_logged_never_trimmed(redis: Any) -> None:
    consumer = TelemetryConsumer(redis, settings(telemetry_max_entries=3), name="c")
    await consumer.ensure_group()
    ids = [await support_turn(f"t-{i}").send(redis) for i in range(5)]
    await read_as(redis, "slow", count=1)
    with capture_logs() as logs:
        result = await consumer.trim()
    assert (result.length, result.over_limit) == (5, True)
    assert await stream_ids(redis) == ids
    [warning] = [e for e in logs if e["event"] == "telemetry.backlog_over_limit"]
    assert (warning["backlog"], warning["limit"], warning["oldest_needed"]) == (5, 3, ids[0])
    assert (await fleet(redis))[BACKLOG_OVER_LIMIT] == 1


async def test_burst_run_trims_to_the_unacknowledged_tail(redis: Any, redis_url: str) -> None:
    for i in range(2):
        await support_turn(f"t-{i}").send(redis)
    assert await run_consumer(settings(), redis_url, burst=True) == 2
    assert await stream_ids(redis) == []  # all acknowledged: all dropped

    ids = [await support_turn(f"t-{i}").send(redis) for i in range(2, 5)]
    await read_as(redis, "slow", count=1)  # ids[0] pending with a stalled consumer (< 30 s idle)
    assert await run_consumer(settings(), redis_url, burst=True) == 2
    assert await stream_ids(redis) == ids  # the tail from the oldest unacknowledged entry

    assert await run_consumer(settings(claim_idle_ms=0), redis_url, burst=True) == 1
    assert await stream_ids(redis) == []
    assert (await totals(redis))["turns_completed"] == 5


async def test_long_running_consumer_trims_periodically(redis: Any, redis_url: str) -> None:
    task = asyncio.create_task(run_consumer(settings(), redis_url, trim_every_s=0.05))
    try:
        for i in range(3):
            await support_turn(f"t-{i}").send(redis)

        async def aggregated_and_trimmed() -> bool:
            figures = await redis.hgetall(keys.GLOBAL_AGGREGATE)
            return (figures.get("turns_completed") == "3"
                    and await redis.xlen(keys.TELEMETRY_STREAM) == 0)

        await wait_until(aggregated_and_trimmed, "the three turns to be aggregated and trimmed")
        assert await pending(redis) == 0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- fault injection ------------------------------------------------------------------------------


def test_fault_injection_is_off_by_default_and_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TURNFLEET_FAULT_CRASH_BEFORE_ACK", raising=False)
    assert FaultInjection().crash_before_ack is None
    monkeypatch.setenv("TURNFLEET_FAULT_CRASH_BEFORE_ACK", "3")
    assert FaultInjection().crash_before_ack == 3
    monkeypatch.setenv("TURNFLEET_FAULT_CRASH_BEFORE_ACK", "0")
    with pytest.raises(ValueError):
        FaultInjection()

