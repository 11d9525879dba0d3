"""Retention (telemetry/retention.py): idle finished conversations are forgotten whole, busy or
recent ones are left, fleet totals stay, and nothing of a purged conversation remains."""

from __future__ import annotations

import json
import time

import pytest
from pydantic import ValidationError

from turnfleet.producer import Producer
from turnfleet.telemetry.consumer import run_consumer
from turnfleet.telemetry.retention import Retention
from tests.worker_runtime import runtime
from turnfleet import keys
from turnfleet.settings import TelemetrySettings
from turnfleet.workers.job import run_turn
from turnfleet.workers.model import OfflineModel

TEXTS = ["Where is order 1043?", "I want a refund for order 1042", "Please escalate to a human"]
DAY_MS = 86_400_000


async def _run_conversations(redis, redis_url, convs: dict[str, list[str]]) -> dict[str, list[str]]:
    producer = Producer(redis=redis)
    ctx = runtime(redis, OfflineModel())
    ids: dict[str, list[str]] = {}
    for conv, texts in convs.items():
        for text in texts:
            tid = await producer.enqueue_turn(conversation_id=conv, customer_id="C-100", text=text)
            assert await run_turn(ctx, tid, conv) == "completed"
            ids.setdefault(conv, []).append(tid)
    await run_consumer(TelemetrySettings(block_ms=50), redis_url, burst=True)
    return ids


async def _all_keys(redis) -> set[str]:
    return {k async for k in redis.scan_iter(count=1000)}


async def test_an_idle_conversation_is_purged_whole_and_fleet_totals_stay(redis, redis_url):
    ids = await _run_conversations(redis, redis_url, {"conv-old": TEXTS, "conv-keep": TEXTS[:1]})
    # A record once found corrupt was moved aside by the worker: it goes with its turn.
    await redis.set(keys.turn_quarantine(ids["conv-old"][0]), "garbage")
    fleet_before = await redis.hgetall(keys.GLOBAL_AGGREGATE)
    customer_before = await redis.hgetall(keys.aggregate("customer", "C-100"))
    before = await _all_keys(redis)
    # conv-keep had an event "just now" (relative to the pass), conv-old a day ago: make it so.
    now = int(time.time() * 1000) + DAY_MS
    await redis.zadd(keys.aggregate_index("conversation"), {"conv-keep": now})
    result = await Retention(redis, retention_s=3600).purge(now_ms=now)
    assert (result.conversations, result.turns) == (1, 3)

    after = await _all_keys(redis)
    gone = before - after
    # Nothing that names the purged conversation or its turns is left, in keys or indexes.
    old_turns = ids["conv-old"]
    assert not [k for k in after if "conv-old" in k or any(t in k for t in old_turns)]
    assert keys.turn(old_turns[0]) in gone and keys.session_messages("conv-old") in gone
    for index in [keys.CONVERSATIONS, keys.customer_conversations("C-100"),
                  keys.aggregate_index("conversation"), keys.facet_conversations("tool", "lookup_order")]:
        assert await redis.zscore(index, "conv-old") is None, index
        assert await redis.zscore(index, "conv-keep") is not None, index
    for t in old_turns:
        assert await redis.zscore(keys.aggregate_index("turn"), t) is None
    # The kept conversation is whole; fleet and customer totals are not touched.
    assert await Producer(redis=redis).result(ids["conv-keep"][0]) is not None
    assert await redis.hgetall(keys.GLOBAL_AGGREGATE) == fleet_before
    assert await redis.hgetall(keys.aggregate("customer", "C-100")) == customer_before
    # The refund happened once and its ledger entry is a business record: it stays.
    assert len(await redis.xrange(keys.REFUND_LEDGER)) == 1


async def test_a_conversation_with_a_turn_waiting_is_left(redis, redis_url):
    await _run_conversations(redis, redis_url, {"conv-busy": TEXTS[:1]})
    waiting = await Producer(redis=redis).enqueue_turn(conversation_id="conv-busy", customer_id="C-100",
                                                       text="Hello again")
    result = await Retention(redis, retention_s=3600).purge(now_ms=int(time.time() * 1000) + DAY_MS)
    assert (result.conversations, result.skipped) == (0, 1)
    assert (await Producer(redis=redis).result(waiting)).status == "queued"


async def test_a_purged_conversation_id_starts_afresh(redis, redis_url):
    ids = await _run_conversations(redis, redis_url, {"conv-again": TEXTS[:1]})
    await Retention(redis, retention_s=3600).purge(now_ms=int(time.time() * 1000) + DAY_MS)
    assert await Producer(redis=redis).result(ids["conv-again"][0]) is None
    fresh = await _run_conversations(redis, redis_url, {"conv-again": ["Hello"]})
    assert await redis.lrange(keys.conversation_turns("conv-again"), 0, -1) == fresh["conv-again"]


def test_retention_shorter_than_the_dedupe_memory_is_refused():
    with pytest.raises(ValidationError, match="seen_ttl_s"):
        TelemetrySettings(retention_s=3600)
    assert TelemetrySettings(retention_s=3600, seen_ttl_s=3600).retention_s == 3600


async def test_a_purged_conversation_leaves_its_refund_and_the_order_stays_refunded(redis, redis_url):
    ask = "I want a refund for order 1042"
    ids = await _run_conversations(redis, redis_url, {"conv-refund": [ask]})
    ledger = await redis.xrange(keys.REFUND_LEDGER)
    assert len(ledger) == 1
    now = int(time.time() * 1000) + DAY_MS
    assert (await Retention(redis, retention_s=3600).purge(now_ms=now)).conversations == 1
    assert await Producer(redis=redis).result(ids["conv-refund"][0]) is None  # forgotten

    # Asked again after the purge, in a conversation of the same id: no second refund.
    again = await _run_conversations(redis, redis_url, {"conv-refund": [ask]})
    assert await redis.xrange(keys.REFUND_LEDGER) == ledger  # the ledger entry stays, alone
    result = await Producer(redis=redis).result(again["conv-refund"][0])
    assert result.final_output.startswith(
        f"Order 1042 was already refunded: $89.00 on {ledger[0][1]['refunded_at'][:10]}, "
        f"refund {ledger[0][1]['refund_id']}.")
    record = json.loads(await redis.get(keys.order_refund("1042")))
    assert (record["refund_id"], record["turn_id"]) == (ledger[0][1]["refund_id"], ids["conv-refund"][0])
