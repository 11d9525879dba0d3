"""A backlog consumed with read-ahead (``TelemetryConsumer.handle``: the next batch is read and
planned while Redis runs this one's script) counts every event once, as the entries counted one
by one would: with an entry counted before, a re-sent copy of an entry of an earlier batch and an
erased subject in later batches, whose shared keys (fleet, customers, model, version) earlier
batches already added to; alerts fire once. And the planner's epoch ms, day and window of an
event are what ``datetime.timestamp`` gives, for any offset."""

from __future__ import annotations

import asyncio

import hashlib
import random
from datetime import datetime, timedelta, timezone
from typing import Any

from turnfleet import keys
from turnfleet.telemetry.aggregate import ERASED_SKIPPED, GLOBAL_KEY, _day, _ms, window_start
from turnfleet.telemetry.consumer import READ_AHEAD_MIN, TelemetryConsumer
from turnfleet.telemetry.stats import turn_stats
from tests.batches import TURN_COST_NUSD, TURN_TOKENS, CheckEntry, failed_turn, support_turn
from tests.consuming import pending, pick, settings
from tests.test_alerts import alerts_of

B = READ_AHEAD_MIN  # entries a read
N = 2 * B + 10  # three batches: B, B, 10
WAIT_S = 10.0  # a read-ahead that never comes fails the test instead of hanging it


async def test_a_backlog_read_ahead_counts_every_event_once(redis: Any) -> None:
    await redis.set(keys.ERASED_SALT, "salt")
    await redis.zadd(keys.ERASED, {hashlib.sha1(b"saltcust-gone").hexdigest(): 10**13})
    turns = [support_turn(f"t-{i}", f"c-{i}", f"cust-{i % 3}") for i in range(N - 4)]
    fields = [{"turn_id": b.turn_id, "batch": b.batch_json()} for b in turns]
    # Batch 2: an entry counted before (its consumer died after storing it) and a re-sent copy
    # of an entry of batch 1; batch 3: an erased customer's turn, a failed turn and checks.
    before = fields[B + 3]
    fields.insert(B + 5, dict(fields[2]))
    fields.insert(2 * B + 2,
                  {"turn_id": "t-gone", "batch": support_turn("t-gone", "c-gone", "cust-gone").batch_json()})
    fields.append({"turn_id": "t-f", "batch": failed_turn("t-f").batch_json()})
    fields.append(CheckEntry("t-1", "c-1", "cust-1").check("refund_ok", "failed", money_path=True)
                  .check("tone", "passed").fields())
    assert len(fields) == N
    ids = [await redis.xadd(keys.TELEMETRY_STREAM, f) for f in fields]
    consumer = TelemetryConsumer(redis, settings(batch_size=B), name="ahead")
    await consumer.aggregator.aggregate(ids[fields.index(before)], before)

    steps: list[tuple[str, int]] = []  # what the consumer did, in order
    apply, prepare = consumer.aggregator.apply, consumer._prepare
    planned = asyncio.Event()  # a batch was planned since the last apply began

    async def applying(plans: Any) -> list[int]:
        steps.append(("apply", len(plans)))
        planned.clear()
        try:
            return await apply(plans)
        finally:
            if len(plans) == B:  # a full batch: the next one is planned before it returns
                # (the script may be done first: wait, so the order says what overlapped)
                await asyncio.wait_for(planned.wait(), WAIT_S)
            steps.append(("applied", len(plans)))

    def preparing(entries: Any) -> Any:
        steps.append(("plan", len(entries)))
        planned.set()
        return prepare(entries)

    consumer.aggregator.apply = applying  # type: ignore[method-assign]
    consumer._prepare = preparing  # type: ignore[method-assign]
    assert await consumer.run(burst=True) == N
    # Each next batch is planned while the one before is applied; batches apply in order.
    assert steps == [("plan", B), ("apply", B), ("plan", B), ("applied", B),
                     ("apply", B), ("plan", 10), ("applied", B), ("apply", 10), ("applied", 10)]
    assert await pending(redis) == 0

    counted = N - 4  # the support turns, once each (not the re-sent copy, nor the erased one)
    fleet = await redis.hgetall(GLOBAL_KEY)
    assert (fleet["turns_completed"], fleet["turns_failed"]) == (str(counted), "1")
    assert fleet["input_tokens"] == str(counted * TURN_TOKENS["input_tokens"] + 10)
    assert fleet["llm_calls"] == str(counted * TURN_TOKENS["llm_calls"] + 1)
    assert fleet["cost_nusd"] == str(counted * TURN_COST_NUSD + 7_200)  # the failed turn: 7 200 n$
    assert (fleet["checks_failed"], fleet["checks_passed"], fleet[ERASED_SKIPPED]) == ("1", "1", "1")
    for c in range(3):
        customer = await redis.hgetall(keys.aggregate("customer", f"cust-{c}"))
        n = len(range(c, N - 4, 3))
        assert (customer["turns_completed"], customer["input_tokens"]) == (str(n), str(n * 820))
    for turn in ("t-2", f"t-{B + 2}", f"t-{N - 5}"):
        assert pick(await turn_stats(redis, turn), TURN_TOKENS) == TURN_TOKENS
    assert await redis.exists(keys.aggregate("turn", "t-gone"), keys.event_seen("t-gone")) == 0
    samples = keys.latency_samples("turn", keys.GLOBAL_SUBJECT, "total")
    assert await redis.llen(samples) == counted + 1
    assert len(await alerts_of(redis, "turn_failed")) == 1
    assert len(await alerts_of(redis, "check_failed")) == 1


def test_an_events_ms_day_and_window_are_what_timestamp_gives_for_any_offset() -> None:
    rng = random.Random(19)
    zones = [timezone.utc, timezone(timedelta(hours=-5)), timezone(timedelta(hours=5, minutes=30)),
             timezone(timedelta(hours=14)), None]
    times = [datetime(2025, 12, 31, 23, 59, 59, 999_999, tzinfo=timezone(timedelta(hours=-1))),
             datetime(2026, 1, 1, 0, 0, 0, 3000, tzinfo=timezone(timedelta(hours=1))),
             datetime(1999, 12, 31, 23, 59, 59, 999_500)]
    for _ in range(5000):
        times.append(datetime(rng.randint(1971, 2099), rng.randint(1, 12), rng.randint(1, 28),
                              rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59),
                              rng.choice([0, 1000, 3000, 999_999, rng.randint(0, 999_999)]),
                              tzinfo=rng.choice(zones)))
    for ts in times:
        utc = ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)
        epoch = utc.timestamp()
        assert (_ms(ts), _day(ts), window_start(ts, 300)) == (
            int(epoch * 1000), utc.date().isoformat(), int(epoch) - int(epoch) % 300), ts
