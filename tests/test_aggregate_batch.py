"""A batch of telemetry entries applied at once (``Aggregator.apply``: their ops merged per key
and field, lua/aggregate_batch.lua) writes exactly what the per-entry script (lua/aggregate.lua)
writes entry by entry, and keeps counting every event once when the batch holds an entry
counted before, the same event twice, or an erased subject (it then goes entry by entry)."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from redis.asyncio import Redis

from turnfleet import keys
from turnfleet.events import FeedbackDetail, batch_json, event
from turnfleet.settings import TelemetrySettings
from turnfleet.telemetry.aggregate import AGGREGATE, ERASED_SKIPPED, GLOBAL_KEY, Aggregator, EntryPlan
from turnfleet.telemetry.stats import turn_stats
from tests.batches import T0, TURN_TOKENS, AttemptBatch, CheckEntry, failed_turn, support_turn
from tests.consuming import drain, pick
from tests.redis_scan import dump_keys


def entries() -> list[tuple[str, dict[str, str]]]:
    """Entries whose ops overlap on every kind of key: two customers' turns (shared customer,
    day, fleet, model, version hashes), a turn failing once then completing in the same batch
    (its status, attempts), a turn failing twice (its error fields), a tool error, a guardrail, checks (one failed, an LLM
    judge's), a feedback, and a turn on another day."""
    version = {"workflow": "support-desk", "version": "1.0@f00d"}
    retry = AttemptBatch("t-2", "c-2", "cust-1", attempt=1).started().agent("Triage") \
        .llm("Triage", 50, 5).failed(error_type="RateLimitError", terminal=False)
    retried = AttemptBatch("t-2", "c-2", "cust-1", attempt=2, at=T0 + timedelta(seconds=3)) \
        .started().agent("Triage").llm("Triage", 70, 7, duration_ms=33.3) \
        .tool("Triage", "lookup_order", error="no such order").guardrail("pii", "Triage") \
        .completed(duration_ms=2500.25)
    feedback = event(FeedbackDetail(feedback_id="f-1", score=-1, source="customer", comment="no"),
                     turn_id="t-1", attempt=0, seq=0, conversation_id="c-1", customer_id="cust-1",
                     event_id="f-1", ts=T0 + timedelta(seconds=9))
    batches: list[dict[str, str]] = [
        {**version, "batch": support_turn("t-1").batch_json()},
        {**version, "batch": retry.batch_json()},
        {**version, "batch": retried.batch_json()},
        {**version, "batch": support_turn("t-3", "c-3", "cust-2", duration_ms=12.5).batch_json()},
        {"batch": failed_turn("t-4", at_s=86400).batch_json()},  # another day, version unknown
        # Two failures of one turn: its error fields are the last one's.
        {**version, "batch": failed_turn("t-5").batch_json().replace("ModelError", "RateLimitError")
         .replace("turn_failed", "attempt_failed")},
        {**version, "batch": failed_turn("t-5", at_s=5, attempt=2).batch_json()},
        CheckEntry("t-1").check("refund_ok", "failed", money_path=True, reason="over limit")
        .check("tone", "passed", model="turnfleet-offline", input_tokens=30, output_tokens=3)
        .check("na", "not_applicable").fields(),
        {"v": "2", **version, "batch": batch_json([feedback])},
    ]
    return [(f"{1000 + i}-0", fields) for i, fields in enumerate(batches)]


def aggregator(redis: Redis) -> Aggregator:
    return Aggregator(redis, TelemetrySettings())


async def one_by_one(redis: Redis, plans: list[EntryPlan]) -> list[int]:
    """Each plan through the per-entry script, as before batches were merged."""
    script = AGGREGATE.bind(redis)
    return [int(await script(keys={"touched": p.keys},
                             args={"plan": p.payload, "erased_skipped": ERASED_SKIPPED}))
            for p in plans]


def _value(text: str) -> Any:
    try:
        return round(float(text), 6)  # float sums may differ in the last bits by order
    except ValueError:
        return text


async def state(redis: Redis) -> dict[str, Any]:
    """Every key, its value (hash fields as a dict, numbers rounded) and whether it expires."""
    out = {}
    for key, text in (await dump_keys(redis)).items():
        value = json.loads(text)
        if isinstance(value, dict):
            value = {f: _value(v) for f, v in value.items()}
        out[key] = (value, await redis.ttl(key) > 0)
    return out


async def applied_at_once_as_one_by_one(redis, agg, plans) -> dict[str, str]:
    """Apply ``plans`` one by one, then (Redis emptied) as one batch: the same state and counts;
    the fleet's hash after."""
    assert await one_by_one(redis, plans) == [p.counted for p in plans]
    expected = await state(redis)
    await redis.flushdb()

    assert await agg.apply(plans) == [p.counted for p in plans]
    assert await state(redis) == expected
    return await redis.hgetall(GLOBAL_KEY)


async def test_a_batch_applied_at_once_writes_what_its_entries_write_one_by_one(redis):
    agg = aggregator(redis)
    plans = [agg.plan(entry_id, fields) for entry_id, fields in entries()]
    fleet = await applied_at_once_as_one_by_one(redis, agg, plans)
    assert (fleet["turns_completed"], fleet["turns_failed"], fleet["attempts_failed"]) == ("3", "2", "2")
    assert (await redis.hgetall(keys.aggregate("turn", "t-2")))["status"] == "completed"
    assert (await redis.hgetall(keys.aggregate("turn", "t-5")))["error_type"] == "ModelError"


async def test_a_batch_applied_twice_counts_once(redis):
    agg = aggregator(redis)
    plans = [agg.plan(entry_id, fields) for entry_id, fields in entries()]
    await agg.apply(plans)
    once = await state(redis)
    again = [agg.plan(entry_id, fields) for entry_id, fields in entries()]  # redelivered
    assert await agg.apply(again) == [0] * len(again)
    assert await state(redis) == once


async def test_an_entry_counted_before_in_a_batch_counts_once_and_the_others_count(redis):
    # Both entries add to the same customer, fleet, model and version fields: merged blindly,
    # the first (already counted: a redelivery) would count twice.
    agg = aggregator(redis)
    first, second = (agg.plan(f"{1000 + i}-0", {"batch": support_turn(t, c).batch_json()})
                     for i, (t, c) in enumerate((("t-1", "c-1"), ("t-2", "c-2"))))
    await agg.apply([first])
    assert await agg.apply([first, second]) == [0, second.counted]
    fleet = await redis.hgetall(GLOBAL_KEY)
    customer = await redis.hgetall(keys.aggregate("customer", "cust-1"))
    assert fleet["turns_completed"] == customer["turns_completed"] == "2"
    assert fleet["input_tokens"] == customer["input_tokens"] == "1640"  # 2 × 820
    assert fleet["cost_nusd"] == "860000"  # 2 × 430 000 n$


async def test_the_same_events_twice_in_one_batch_count_once(redis):
    # A re-sent entry (same events, another stream id) in the batch of the first.
    agg = aggregator(redis)
    fields = {"batch": support_turn("t-1").batch_json()}
    first, resent = agg.plan("1000-0", fields), agg.plan("1001-0", fields)
    assert await agg.apply([first, resent]) == [first.counted, 0]
    fleet = await redis.hgetall(GLOBAL_KEY)
    assert (fleet["turns_completed"], fleet["input_tokens"], fleet["llm_calls"]) == ("1", "820", "3")
    assert await redis.llen(keys.latency_samples("turn", keys.GLOBAL_SUBJECT, "total")) == 1


async def test_a_resent_entry_with_more_events_counts_only_the_new_ones(redis):
    agg = aggregator(redis)
    partial = AttemptBatch("t-1").started().agent("Triage").llm("Triage", 100, 10)
    await agg.apply([agg.plan("1000-0", {"batch": partial.batch_json()})])
    whole = partial.tool("Triage", "lookup_order").completed()  # the same events and two more
    other = agg.plan("1002-0", {"batch": support_turn("t-2", "c-2").batch_json()})
    assert await agg.apply([agg.plan("1001-0", {"batch": whole.batch_json()}), other]) == [2, other.counted]
    fleet = await redis.hgetall(GLOBAL_KEY)
    assert (fleet["llm_calls"], fleet["tool_calls"], fleet["turns_completed"]) == ("4", "2", "2")
    assert fleet["input_tokens"] == str(100 + 820)


async def test_an_erased_entry_in_a_batch_is_skipped_and_the_others_count(redis):
    await redis.set(keys.ERASED_SALT, "salt")
    await redis.zadd(keys.ERASED, {hashlib.sha1(b"saltcust-gone").hexdigest(): 1000})
    agg = aggregator(redis)
    gone = agg.plan("1000-0", {"batch": support_turn("t-1", "c-1", "cust-gone").batch_json()})
    kept = agg.plan("1000-1", {"batch": support_turn("t-2", "c-2", "cust-2").batch_json()})
    assert await agg.apply([gone, kept]) == [-1, kept.counted]
    assert (gone.skipped, kept.skipped) == (True, False)
    assert await redis.exists(keys.aggregate("turn", "t-1"), keys.event_seen("t-1")) == 0
    fleet = await redis.hgetall(GLOBAL_KEY)
    assert (fleet["turns_completed"], fleet[ERASED_SKIPPED]) == ("1", "1")


async def test_a_key_of_another_type_fails_only_its_entry_and_the_rest_of_the_batch_counts(redis):
    # The batch would push onto the clobbered list after the dedupe marks and counters of
    # every entry: had it started, its failure would leave the other entries marked counted
    # without their samples and their places among the slowest turns.
    bad_tool = keys.latency_samples("tool", "bad_tool", "call")
    await redis.set(bad_tool, "not a list")
    await AttemptBatch("t-bad", "c-bad").started().agent("Triage").tool("Triage", "bad_tool") \
        .completed().send(redis)
    for turn, conversation in (("t-1", "c-1"), ("t-2", "c-2")):
        await support_turn(turn, conversation).send(redis)
    assert await drain(redis, dead_letter_after=1) == 3
    for good in ("t-1", "t-2"):
        assert pick(await turn_stats(redis, good), TURN_TOKENS) == TURN_TOKENS
        assert await redis.zscore(keys.SLOWEST_TURNS, good) == 1000.0
    samples = keys.latency_samples("model", "turnfleet-offline", "call")
    assert await redis.llen(samples) == 6  # 3 calls a turn
    assert await redis.get(bad_tool) == "not a list"


async def test_a_counter_that_is_no_number_fails_only_its_entry_and_the_rest_of_the_batch_counts(redis):
    await redis.hset(keys.aggregate("conversation", "c-bad"), "input_tokens", "lots")
    for turn, conversation in (("t-1", "c-1"), ("t-bad", "c-bad"), ("t-2", "c-2")):
        await support_turn(turn, conversation).send(redis)
    assert await drain(redis, dead_letter_after=1) == 3
    for good in ("t-1", "t-2"):
        assert pick(await turn_stats(redis, good), TURN_TOKENS) == TURN_TOKENS
    # (The bad entry itself fails in the per-entry script after its dedupe marks, as before
    # batches: its retry counts nothing more.)


async def test_an_entry_with_a_figure_redis_refuses_is_not_merged_and_the_rest_counts(redis):
    # A model call's duration NaN: HINCRBYFLOAT refuses it, after the dedupe marks and counters
    # of a merged batch; the entries go one by one instead.
    await support_turn("t-1", "c-1").send(redis)
    await AttemptBatch("t-nan", "c-nan").started().agent("Triage") \
        .llm("Triage", 10, 1, duration_ms=float("nan")).send(redis)
    await support_turn("t-2", "c-2").send(redis)
    assert await drain(redis, dead_letter_after=1) == 3
    for good in ("t-1", "t-2"):
        assert pick(await turn_stats(redis, good), TURN_TOKENS) == TURN_TOKENS
        assert await redis.zscore(keys.SLOWEST_TURNS, good) == 1000.0
    assert await redis.llen(keys.latency_samples("turn", keys.GLOBAL_SUBJECT, "total")) == 2


# -- exact sums of a merged batch (the batch path sums an entry's writes in one pass, then
# merges entries per key: a slip in either shows as a wrong figure here) ----------------------


async def test_two_entries_of_one_batch_on_the_same_conversation_sum_exactly(redis):
    # Two turns of one conversation and customer in one batch: the conversation hash is an own
    # key of both entries, the customer, day, model, version and fleet hashes shared.
    agg = aggregator(redis)
    version = {"workflow": "support-desk", "version": "1.0"}
    plans = [agg.plan("1000-0", {**version, "batch": support_turn("t-1", duration_ms=1000.0).batch_json()}),
             agg.plan("1000-1", {**version, "batch": support_turn("t-2", duration_ms=250.5).batch_json()})]
    assert await agg.apply(plans) == [p.counted for p in plans]
    day = T0.date().isoformat()
    conversation = await redis.hgetall(keys.aggregate("conversation", "c-1"))
    version_hash = await redis.hgetall(keys.aggregate("version", "support-desk/1.0"))
    customer_day = await redis.hgetall(keys.aggregate_day("customer", "cust-1", day))
    model = await redis.hgetall(keys.aggregate("model", "turnfleet-offline"))
    for h in (conversation, version_hash, customer_day, await redis.hgetall(GLOBAL_KEY)):
        assert (h["input_tokens"], h["cached_tokens"], h["llm_calls"]) == ("1640", "600", "6")
        assert (h["cost_nusd"], h["turns_completed"], h["latency_count"]) == ("860000", "2", "2")
        assert float(h["latency_ms_sum"]) == 1250.5
    assert (conversation["tool_calls"], conversation["handoffs"]) == ("2", "2")
    assert float(conversation["tool_ms_sum"]) == 15.0  # 2 × 7.5
    assert float(conversation["llm_ms_sum"]) == 600.0  # 6 calls × 100
    assert float(conversation["latency_ms_max"]) == 1000.0
    assert (customer_day["model_calls:turnfleet-offline"],
            customer_day["model_cost_nusd:turnfleet-offline"]) == ("6", "860000")
    assert (model["llm_calls"], model["output_tokens"]) == ("6", "240")
    assert "tool_calls" not in version_hash  # not a split counter
    for turn in ("t-1", "t-2"):  # each turn's own hash: one turn's figures
        h = await redis.hgetall(keys.aggregate("turn", turn))
        assert (h["input_tokens"], h["turns_completed"], h["cost_nusd"]) == ("820", "1", "430000")
    histogram = await redis.hgetall(keys.HIST_TURN_LATENCY)
    assert (histogram["count"], histogram["le_1000"], histogram.get("le_250")) == ("2", "1", None)
    assert histogram["le_500"] == "1" and float(histogram["sum"]) == 1250.5
    assert await redis.smembers(keys.event_seen("t-1")) == {e.event_id for e in support_turn("t-1").events
                                                          if e.kind.value in ("llm_end", "tool_end",
                                                                              "handoff", "turn_completed")}
    assert await redis.hget(keys.aggregate("conversation", "c-1"), "first_event_ms") == str(
        int(T0.timestamp() * 1000) + 1)


async def test_an_entry_applied_before_in_the_middle_of_a_batch_counts_once(redis):
    # Same conversation, customer and fleet for all three: merged blindly the middle one (a
    # redelivery) would count twice.
    agg = aggregator(redis)
    first, again, third = (agg.plan(f"{1000 + i}-0", {"batch": support_turn(t).batch_json()})
                           for i, t in enumerate(("t-1", "t-2", "t-3")))
    await agg.apply([again])
    assert await agg.apply([first, again, third]) == [first.counted, 0, third.counted]
    for key in (keys.aggregate("conversation", "c-1"), keys.aggregate("customer", "cust-1"), GLOBAL_KEY):
        h = await redis.hgetall(key)
        assert (h["turns_completed"], h["input_tokens"], h["cost_nusd"]) == ("3", "2460", "1290000")
    assert await redis.llen(keys.latency_samples("turn", keys.GLOBAL_SUBJECT, "total")) == 3


async def test_an_erased_subject_mid_batch_is_skipped_and_the_entries_around_it_sum_exactly(redis):
    await redis.set(keys.ERASED_SALT, "salt")
    await redis.zadd(keys.ERASED, {hashlib.sha1(b"saltc-gone").hexdigest(): 1000})
    agg = aggregator(redis)
    plans = [agg.plan("1000-0", {"batch": support_turn("t-1", "c-1").batch_json()}),
             agg.plan("1000-1", {"batch": support_turn("t-gone", "c-gone").batch_json()}),
             agg.plan("1000-2", {"batch": support_turn("t-3", "c-3").batch_json()})]
    assert await agg.apply(plans) == [plans[0].counted, -1, plans[2].counted]
    assert [p.skipped for p in plans] == [False, True, False]
    assert await redis.exists(keys.aggregate("conversation", "c-gone"), keys.event_seen("t-gone")) == 0
    customer = await redis.hgetall(keys.aggregate("customer", "cust-1"))
    fleet = await redis.hgetall(GLOBAL_KEY)
    assert customer["turns_completed"] == fleet["turns_completed"] == "2"
    assert customer["input_tokens"] == fleet["input_tokens"] == "1640"
    assert fleet[ERASED_SKIPPED] == "1"


async def test_a_malformed_entry_among_good_ones_is_dead_lettered_and_the_others_sum_exactly(redis):
    from turnfleet.telemetry.consumer import read_dead_letters

    await support_turn("t-1").send(redis)
    events = json.loads(support_turn("t-bad").batch_json())
    events[3]["usage"]["input_tokens"] = "lots"  # an llm_end's usage the contract refuses
    bad = await redis.xadd(keys.TELEMETRY_STREAM, {"turn_id": "t-bad", "batch": json.dumps(events)})
    await support_turn("t-2").send(redis)
    assert await drain(redis) == 3
    fleet = await redis.hgetall(GLOBAL_KEY)
    assert (fleet["turns_completed"], fleet["input_tokens"], fleet["cost_nusd"]) == ("2", "1640", "860000")
    assert fleet["telemetry_malformed"] == "1"
    assert await redis.exists(keys.aggregate("turn", "t-bad")) == 0
    [dead] = await read_dead_letters(redis)
    assert (dead.entry_id, dead.reason, dead.stage) == (bad, "malformed", "parse")


# -- a batch planned into one set of sums (what the consumer does: no per-entry sums merged
# afterwards); the sums are what ``apply`` sends only for exactly the entries planned into them --


async def test_a_batch_planned_into_one_set_of_sums_writes_what_its_entries_write_one_by_one(redis):
    agg = aggregator(redis)
    into = agg.sums()
    plans = [agg.plan(entry_id, fields, into) for entry_id, fields in entries()]
    plans.append(agg.plan_malformed("1100-0", into))
    assert all(p.ops is into for p in plans)
    fleet = await applied_at_once_as_one_by_one(redis, agg, plans)
    assert (fleet["turns_completed"], fleet["input_tokens"], fleet["telemetry_malformed"]) == ("3", "1790", "1")


async def test_some_entries_of_a_batch_applied_alone_count_only_themselves(redis):
    # What the consumer does when the batch failed through an entry's fault: each plan alone.
    agg = aggregator(redis)
    into = agg.sums()
    plans = [agg.plan(f"{1000 + i}-0", {"batch": support_turn(t, c).batch_json()}, into)
             for i, (t, c) in enumerate((("t-1", "c-1"), ("t-2", "c-2"), ("t-3", "c-1")))]
    assert await agg.apply([plans[1]]) == [plans[1].counted]
    assert await agg.apply([plans[0], plans[2]]) == [plans[0].counted, plans[2].counted]
    fleet = await redis.hgetall(GLOBAL_KEY)
    assert (fleet["turns_completed"], fleet["input_tokens"], fleet["cost_nusd"]) == ("3", "2460", "1290000")
    conversation = await redis.hgetall(keys.aggregate("conversation", "c-1"))
    assert (conversation["turns_completed"], conversation["input_tokens"]) == ("2", "1640")
    assert (await redis.hgetall(keys.aggregate("conversation", "c-2")))["input_tokens"] == "820"


class _FailingPrices:
    """A price table that cannot price a model call (a planner bug), after the entry's first
    writes are summed."""

    def cost_nusd(self, model: Any, usage: Any) -> int:
        raise RuntimeError("no price")


async def test_an_entry_whose_planning_failed_half_way_leaves_nothing_in_its_batch(redis):
    agg = aggregator(redis)
    agg.workflow_prices["broken"] = _FailingPrices()  # type: ignore[assignment]
    into = agg.sums()
    first = agg.plan("1000-0", {"batch": support_turn("t-1", "c-1").batch_json()}, into)
    bad = AttemptBatch("t-bad", "c-bad", "cust-bad").started().agent("Triage") \
        .tool("Triage", "lookup_order").llm("Triage", 10, 1).completed()
    try:
        agg.plan("1000-1", {"workflow": "broken", "version": "1", "batch": bad.batch_json()}, into)
    except RuntimeError:
        pass
    else:
        raise AssertionError("planning the entry should have failed")
    third = agg.plan("1000-2", {"batch": support_turn("t-3", "c-3").batch_json()}, into)
    assert await agg.apply([first, third]) == [first.counted, third.counted]
    fleet = await redis.hgetall(GLOBAL_KEY)
    assert (fleet["turns_completed"], fleet["tool_calls"], fleet["input_tokens"]) == ("2", "2", "1640")
    assert await redis.exists(keys.aggregate("turn", "t-bad"), keys.aggregate("customer", "cust-bad"),
                              keys.event_seen("t-bad")) == 0


async def test_calls_with_the_same_tokens_cost_by_their_own_price_table(redis):
    # Every call of these turns has the same token counts; a call's cost is remembered per
    # price table, model and tokens, so a workflow's own table, the fleet's, and a workflow's
    # table read again with new prices each cost their own calls.
    from turnfleet.settings import Price
    from turnfleet.telemetry.pricing import PriceTable

    def table(usd_per_1m: float) -> PriceTable:
        return PriceTable({"turnfleet-offline": Price(input=usd_per_1m, cached_input=usd_per_1m,
                                                      output=usd_per_1m)})

    agg = aggregator(redis)
    agg.workflow_prices["w-own"] = table(1.0)
    own = {"workflow": "w-own", "version": "1"}
    into = agg.sums()
    plans = [agg.plan("1000-0", {**own, "batch": support_turn("t-1", "c-1").batch_json()}, into),
             agg.plan("1000-1", {"batch": support_turn("t-2", "c-2").batch_json()}, into)]
    assert await agg.apply(plans) == [p.counted for p in plans]
    agg.workflow_prices["w-own"] = table(2.0)  # a registry read with new prices
    await agg.apply([agg.plan("1001-0", {**own, "batch": support_turn("t-3", "c-3").batch_json()})])
    costs = [await redis.hget(keys.aggregate("turn", t), "cost_nusd") for t in ("t-1", "t-2", "t-3")]
    assert costs == ["940000", "430000", "1880000"]  # 940 tokens at 1 and 2 USD per 1M; the fleet's table


def test_an_events_epoch_time_is_exact_whatever_its_offset():
    # Fixed offsets (pydantic's from JSON, datetime.timezone) are remembered per tzinfo; a zone
    # whose offset changes (daylight saving) is asked each time.
    from datetime import datetime, timezone
    from zoneinfo import ZoneInfo

    from pydantic import TypeAdapter

    from turnfleet.telemetry.aggregate import _epoch_us

    parse = TypeAdapter(datetime).validate_json
    stamps = [parse(b'"2026-03-04T10:00:00.123456+02:00"'), parse(b'"2026-03-04T10:00:00.123456Z"'),
              parse(b'"2026-03-04T10:00:00.123456-05:30"'), parse(b'"2026-03-04T10:00:00.123456+02:00"'),
              datetime(2026, 7, 1, 12, tzinfo=timezone.utc), datetime(2026, 7, 1, 12, tzinfo=ZoneInfo("Europe/Berlin")),
              datetime(2026, 1, 1, 12, tzinfo=ZoneInfo("Europe/Berlin"))]
    for ts in stamps + stamps:
        assert _epoch_us(ts) == round((ts - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds() * 10**6)
    assert _epoch_us(datetime(2026, 3, 4, 8, 0, 0, 123456)) == _epoch_us(stamps[0])  # naive is UTC


async def test_a_batch_onto_hashes_old_and_new_writes_what_its_entries_write_one_by_one(redis):
    # The batch script writes a hash that does not exist yet with one HSET (its increments and
    # max/min fields), one that exists with HINCRBY and HGET + HSET: two batches, the second
    # adding to the first's fleet, customer, conversation and turn hashes and creating others.
    agg = aggregator(redis)
    batch = entries()
    first, second = batch[:4], batch[4:]
    plans = [agg.plan(entry_id, fields) for entry_id, fields in batch]
    assert await one_by_one(redis, plans) == [p.counted for p in plans]
    expected, exact = await state(redis), await dump_keys(redis)
    await redis.flushdb()

    for part in (first, second):
        into = agg.sums()
        part_plans = [agg.plan(entry_id, fields, into) for entry_id, fields in part]
        assert await agg.apply(part_plans) == [p.counted for p in part_plans]
    assert await state(redis) == expected
    written = await dump_keys(redis)
    for turn in ("t-1", "t-2", "t-4", "t-5"):  # old (t-1 then its checks, t-2) and new: each text
        key = keys.aggregate("turn", turn)
        got, want = json.loads(written[key]), json.loads(exact[key])
        assert got.keys() == want.keys()
        for name, value in want.items():  # an integer to the letter; a float sum to its last bits
            assert (got[name] == value) if value.lstrip("-").isdigit() else (_value(got[name]) == _value(value))


def test_an_entrys_workflow_and_version_are_its_own_whatever_was_read_before():
    # RanBy.of remembers what it read per (workflow, version) pair of fields.
    from turnfleet.telemetry.aggregate import RanBy

    reads = [({"workflow": "w", "version": "1"}, ("w", "1")), ({"workflow": "w", "version": "2"}, ("w", "2")),
             ({"workflow": "w"}, ("w", "unknown")), ({"workflow": "v", "version": "1"}, ("v", "1")),
             ({"workflow": b"w", "version": b"3"}, ("w", "3")), ({"workflow": "no name!", "version": "1"},
                                                                   ("unknown", "unknown")),
             ({"version": "1"}, ("unknown", "unknown")), ({"workflow": "w", "version": "x" * 500}, ("w", "unknown"))]
    for _ in range(2):
        for fields, (workflow, version) in reads:
            ran = RanBy.of(fields)
            assert (ran.workflow, ran.version, ran.subject) == (workflow, version, f"{workflow}/{version}")
