"""Telemetry's Lua scripts (``telemetry/lua/*.lua``), each run for real against the test's own
redis-server through the loader, with the named keys and arguments its module passes.

The modules' own tests (test_telemetry, test_dead_letter, test_find, ...) prove the behaviour
end to end; these pin each script's contract where it lives: what it writes, what it refuses.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from turnfleet import keys
from turnfleet.scripts import load_script
from turnfleet.settings import TelemetrySettings
from turnfleet.telemetry.aggregate import ERASED_SKIPPED, GLOBAL_KEY, PLANNERS, Aggregator
from tests.batches import AttemptBatch
from tests.redis_scan import dump_keys

PACKAGE = "turnfleet.telemetry"
TELEMETRY = Path(__file__).resolve().parent.parent / "telemetry"


def script(name: str, redis):
    return load_script(name, PACKAGE).bind(redis)


def sha(value: str) -> str:
    return hashlib.sha1(value.encode()).hexdigest()


def test_no_telemetry_module_holds_lua_in_a_python_string():
    """Every script is a file: no ``redis.call`` (nor KEYS/ARGV indexing) in telemetry's Python."""
    found = [f"{path.relative_to(TELEMETRY)}:{n}"
             for path in sorted(TELEMETRY.rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"redis\.call\(|\b(KEYS|ARGV)\[", line)]
    assert found == []


# -- aggregate -------------------------------------------------------------------------------


def aggregate_call(redis, entry_id: str, batch: AttemptBatch):
    plan = Aggregator(redis, TelemetrySettings()).plan(entry_id, {"batch": batch.batch_json()})
    return plan, {"keys": {"touched": plan.keys},
                  "args": {"plan": plan.payload, "erased_skipped": ERASED_SKIPPED}}


def counted(batch: AttemptBatch) -> int:
    """Events of the batch the aggregate counts on their own (and deduplicates)."""
    return sum(PLANNERS[e.kind].count is not None for e in batch.events)


async def test_aggregate_applies_a_batch_once_and_a_second_apply_changes_nothing(redis):
    batch = AttemptBatch("t-1").started().agent("Triage").llm("Triage", 100, 10) \
        .tool("Triage", "lookup_order").completed()
    _, call = aggregate_call(redis, "1000-0", batch)
    aggregate = script("aggregate", redis)
    assert await aggregate(**call) == counted(batch) == 3  # llm_end, tool_end, turn_completed
    turn = await redis.hgetall(keys.aggregate("turn", "t-1"))
    assert (turn["input_tokens"], turn["output_tokens"], turn["tool_calls"], turn["status"]) == \
        ("100", "10", "1", "completed")
    once = await dump_keys(redis)
    assert await aggregate(**call) == 0
    assert await dump_keys(redis) == once


async def test_aggregate_skips_an_entry_whose_customer_was_erased_after_it_was_written(redis):
    batch = AttemptBatch("t-1", customer_id="cust-gone").started().agent("A").llm("A", 100, 10).completed()
    _, call = aggregate_call(redis, "1000-0", batch)
    await redis.set(keys.ERASED_SALT, "salt")
    await redis.zadd(keys.ERASED, {sha("salt" + "cust-gone"): 1000})  # erased at the entry's ms
    assert await script("aggregate", redis)(**call) == -1
    assert await redis.hgetall(GLOBAL_KEY) == {ERASED_SKIPPED: "1"}
    assert await redis.exists(keys.aggregate("turn", "t-1"), keys.event_seen("t-1")) == 0
    # Erased before the entry was written: a later turn of the id counts.
    await redis.zadd(keys.ERASED, {sha("salt" + "cust-gone"): 999})
    assert await script("aggregate", redis)(**call) == counted(batch) == 2


# -- dead letter -----------------------------------------------------------------------------


async def test_dead_letter_moves_and_acknowledges_an_entry_delivered_often_enough(redis):
    stream, dead = "tf:test:stream", "tf:test:dead"
    entry_id = await redis.xadd(stream, {"batch": "not json"})
    await redis.xgroup_create(stream, "g", id="0")
    await redis.xreadgroup("g", "c-1", {stream: ">"})
    dead_letter = script("dead_letter", redis)
    call = {"keys": {"stream": stream, "dead_letter": dead, "fleet": "tf:test:fleet"},
            "args": {"group": "g", "entry_id": entry_id, "after": 2, "maxlen": 100,
                     "counter": "dead", "record": ["reason", "malformed", "entry_id", entry_id]}}
    assert await dead_letter(**call) == {"status": 0, "deliveries": 1, "dead_letter_id": None}
    assert await redis.xlen(dead) == 0 and (await redis.xpending(stream, "g"))["pending"] == 1
    await redis.xautoclaim(stream, "g", "c-2", 0)  # a second delivery
    moved = await dead_letter(**call)
    assert (moved["status"], moved["deliveries"]) == (1, 2)
    [(dead_id, fields)] = await redis.xrange(dead)
    assert dead_id == moved["dead_letter_id"]
    assert fields == {"deliveries": "2", "consumer": "c-2", "reason": "malformed", "entry_id": entry_id}
    assert (await redis.xpending(stream, "g"))["pending"] == 0
    assert await redis.hget("tf:test:fleet", "dead") == "1"
    # Already acknowledged: nothing copied or counted again.
    assert await dead_letter(**call) == {"status": -1, "deliveries": 0, "dead_letter_id": None}
    assert await redis.xlen(dead) == 1 and await redis.hget("tf:test:fleet", "dead") == "1"


# -- trim ------------------------------------------------------------------------------------


async def test_trim_keeps_the_unacknowledged_tail_and_counts_a_tail_over_the_limit(redis):
    stream = "tf:test:stream"
    ids = [await redis.xadd(stream, {"n": str(i)}) for i in range(10)]
    trim = script("trim", redis)
    call = {"keys": {"stream": stream, "counter_hash": "tf:test:fleet"},
            "args": {"max_entries": 5, "counter": "over"}}
    assert await trim(**call) == {"trimmed": 0, "length": 10, "min_id": "", "over_limit": 1}  # no group
    await redis.xgroup_create(stream, "g", id="0")
    await redis.xreadgroup("g", "c", {stream: ">"}, count=6)
    await redis.xack(stream, "g", ids[0], ids[1], ids[3])  # ids[2] is still pending
    assert await trim(**call) == {"trimmed": 2, "length": 8, "min_id": ids[2], "over_limit": 1}
    assert [i for i, _ in await redis.xrange(stream)] == ids[2:]
    await redis.xack(stream, "g", ids[2], ids[4], ids[5])  # all delivered acknowledged: ids[6] next
    # MINID is the id right after the last delivered one (ids[5]); it equals ids[6] only when
    # both fell in the same millisecond, so the test names it as the script computes it.
    ms, seq = ids[5].split("-")
    assert await trim(**call) == {"trimmed": 4, "length": 4, "min_id": f"{ms}-{int(seq) + 1}", "over_limit": 0}
    assert [i for i, _ in await redis.xrange(stream)] == ids[6:]
    assert await redis.hget("tf:test:fleet", "over") == "2"


# -- find ------------------------------------------------------------------------------------


async def test_find_intersects_every_filter_with_the_index_and_keeps_the_index_score(redis):
    await redis.zadd("tf:test:index", {"a": 100, "b": 200, "c": 300, "d": 400})
    await redis.zadd("tf:test:tool", {"a": 1, "b": 1, "c": 1})
    await redis.zadd("tf:test:agent", {"b": 5, "c": 5, "d": 5})
    find = script("find", redis)
    named = {"index": "tf:test:index", "scratch": "tf:test:scratch", "union": "tf:test:union"}
    page = {"max_ms": "+inf", "min_ms": "-inf", "offset": 0, "count": 10, "any": 0}
    both = await find(keys={**named, "filters": ["tf:test:tool", "tf:test:agent"]}, args=page)
    assert both == ["c", "300", "b", "200"]
    assert await find(keys={**named, "filters": ["tf:test:agent"]},
                      args={**page, "max_ms": 350, "count": 1}) == ["c", "300"]
    # The first ``any`` filters are alternatives: (tool or x) and agent.
    await redis.zadd("tf:test:x", {"d": 1})
    assert await find(keys={**named, "filters": ["tf:test:tool", "tf:test:x", "tf:test:agent"]},
                      args={**page, "any": 2}) == ["d", "400", "c", "300", "b", "200"]
    assert await redis.exists("tf:test:scratch", "tf:test:union") == 0


# -- raw-text expiry ----------------------------------------------------------------------------


def expire_call(turn_id: str, request: str, result: str) -> dict:
    plan = {"turn_id": turn_id, "at": "2025-03-04T10:00:00+00:00",
            "request": {"sha": sha(request), "new": '{"redacted": "request"}'},
            "result": {"sha": sha(result), "new": '{"redacted": "result"}'},
            "error_shas": [], "errors_new": [], "ticket": None, "memory_session": "", "memory": []}
    return {"keys": {"index": keys.RAW_TEXT, "turn": keys.turn(turn_id), "errors": keys.turn_errors(turn_id),
                     "escalation": keys.conversation_escalation("c-1"), "memory": "tf:test:memory",
                     "memory_meta": "tf:test:meta", "quarantine": keys.turn_quarantine(turn_id)},
            "args": {"plan": json.dumps(plan)}}


async def test_raw_expiry_refuses_a_record_changed_since_it_was_read_and_rewrites_an_unchanged_one(redis):
    expire = script("raw_expire", redis)
    await redis.zadd(keys.RAW_TEXT, {"t-1": 1})
    await redis.hset(keys.turn("t-1"), mapping={"request": '{"text": "raw"}', "result": '{"text": "out"}'})
    call = expire_call("t-1", '{"text": "raw"}', '{"text": "out"}')
    await redis.hset(keys.turn("t-1"), "request", '{"text": "changed meanwhile"}')
    assert await expire(**call) == "changed"
    assert await redis.hgetall(keys.turn("t-1")) == {"request": '{"text": "changed meanwhile"}',
                                                      "result": '{"text": "out"}'}
    assert await redis.zscore(keys.RAW_TEXT, "t-1") == 1
    await redis.hset(keys.turn("t-1"), "request", '{"text": "raw"}')
    assert await expire(**call) == "done"
    assert await redis.hgetall(keys.turn("t-1")) == {"request": '{"redacted": "request"}',
                                                      "result": '{"redacted": "result"}',
                                                      "raw_expired_at": "2025-03-04T10:00:00+00:00"}
    assert await redis.zscore(keys.RAW_TEXT, "t-1") is None
    assert await expire(**call) == "gone"  # out of the index: nothing to do


async def test_raw_backfill_indexes_only_a_finished_unredacted_record_and_the_cursor_moves_only_from_where_read(redis):
    backfill = script("raw_backfill", redis)
    for turn_id, record in (("t-run", {"status": "running"}), ("t-done", {"status": "completed"}),
                            ("t-red", {"status": "failed", "raw_expired_at": "x"})):
        await redis.hset(keys.turn(turn_id), mapping=record)
        await backfill(keys={"index": keys.RAW_TEXT, "turn": keys.turn(turn_id)},
                       args={"turn_id": turn_id, "finished_ms": 7})
    assert await redis.zrange(keys.RAW_TEXT, 0, -1, withscores=True) == [("t-done", 7.0)]
    cursor = script("raw_cursor", redis)
    named = {"cursor": keys.RAW_TEXT_BACKFILL}
    assert await cursor(keys=named, args={"read": "", "new": "42"}) == 1
    assert await cursor(keys=named, args={"read": "", "new": "7"}) == 0  # another pass moved it
    assert await redis.get(keys.RAW_TEXT_BACKFILL) == "42"


# -- alerts and the webhook --------------------------------------------------------------------


async def test_an_alert_fires_once_however_often_it_is_fired(redis):
    fire = script("fire_alert", redis)
    call = {"keys": {"fired": "tf:test:fired", "stream": "tf:test:alerts", "counts": "tf:test:counts"},
            "args": {"alert_id": "al_1", "alert": '{"rule": "r"}', "ttl_s": 60, "maxlen": 100, "rule": "r"}}
    first = await fire(**call)
    assert first is not None and await fire(**call) is None
    assert [(i, f) for i, f in await redis.xrange("tf:test:alerts")] == [(first, {"alert": '{"rule": "r"}'})]
    assert await redis.hgetall("tf:test:counts") == {"r": "1"}
    assert 0 < await redis.ttl("tf:test:fired") <= 60


async def test_the_webhook_ack_counts_an_outcome_once_and_touch_keeps_only_its_own_entries(redis):
    stream = "tf:test:alerts"
    ids = [await redis.xadd(stream, {"alert": "{}"}) for _ in range(3)]
    await redis.xgroup_create(stream, "webhook", id="0")
    await redis.xreadgroup("webhook", "sink-1", {stream: ">"}, count=2)
    await redis.xreadgroup("webhook", "sink-2", {stream: ">"}, count=1)
    ack = script("webhook_ack", redis)
    call = {"keys": {"stream": stream, "stats": "tf:test:stats"},
            "args": {"group": "webhook", "entry_id": ids[0], "outcome": "delivered"}}
    assert [await ack(**call), await ack(**call)] == [1, 0]
    assert await redis.hgetall("tf:test:stats") == {"delivered": "1"}
    touch = script("webhook_touch", redis)
    kept = await touch(keys={"stream": stream}, args={"group": "webhook", "consumer": "sink-1",
                                                      "first": ids[0], "last": ids[2], "count": 3})
    assert kept == [ids[1]]  # ids[0] acknowledged, ids[2] sink-2's


# -- lag and retention ---------------------------------------------------------------------------


async def test_count_after_counts_entries_after_an_id_up_to_the_cap(redis):
    ids = [await redis.xadd("tf:test:stream", {"n": str(i)}) for i in range(1200)]
    count = script("count_after", redis)
    assert await count(keys={"stream": "tf:test:stream"}, args={"start": f"({ids[99]}", "cap": 10_000}) == 1100
    assert await count(keys={"stream": "tf:test:stream"}, args={"start": "-", "cap": 700}) == 700


async def test_purge_deletes_and_unindexes_an_idle_conversation_and_leaves_a_changed_one(redis):
    await redis.zadd("tf:test:convs", {"c-1": 100})
    await redis.zadd("tf:test:facet", {"c-1": 100, "c-2": 100})
    await redis.rpush("tf:test:turns", "t-1")
    # A conversation of ~900 turns (10 keys each): past the ~8000 values Lua's unpack takes at once.
    doomed = [f"tf:test:doomed:{i}" for i in range(9000)]
    await redis.mset({k: "x" for k in doomed})
    purge = script("purge", redis)
    named = {"index": "tf:test:convs", "queue": "tf:test:queue", "turns": "tf:test:turns", "doomed": doomed}
    args = {"conversation_id": "c-1", "cutoff_ms": 100, "turns_read": 1, "unindex": ["tf:test:facet", "c-1"]}
    assert await purge(keys=named, args={**args, "turns_read": 0}) == 0  # a turn was added since
    assert await purge(keys=named, args={**args, "cutoff_ms": 99}) == 0  # a newer event
    assert await redis.exists(*doomed) == len(doomed)
    assert await purge(keys=named, args=args) == 1
    assert await redis.exists(*doomed) == 0
    assert await redis.zrange("tf:test:facet", 0, -1) == ["c-2"]
    assert await redis.zscore("tf:test:convs", "c-1") is None


async def test_the_legacy_memory_snapshot_names_each_turn_of_the_conversation(redis):
    await redis.rpush("tf:test:turns", "t-1", "t-2", "t-3")
    await redis.hset(keys.turn("t-1"), mapping={"memory_base": "0", "status": "completed", "attempts": "1"})
    await redis.set(keys.turn("t-3"), "not a hash")
    await redis.rpush("tf:test:memory", "m1", "m2")
    await redis.hset("tf:test:meta", "created_at", "2025-03-04")
    snapshot = await script("raw_legacy_memory", redis)(
        keys={"turns": "tf:test:turns", "memory": "tf:test:memory", "queue": "tf:test:queue",
              "memory_meta": "tf:test:meta"}, args={"turn_prefix": keys.turn("")})
    assert snapshot == [2, 0, "2025-03-04", "t-1", "0", "completed", "1", "t-2", "", "", "0",
                        "t-3", "", "", "0"]
