"""Conversation memory (workers/memory.py): the SDK's layout, fenced writes, pooled connections."""

from __future__ import annotations

from agents.extensions.memory import RedisSession

from turnfleet import keys
from turnfleet.workers.memory import ConversationMemory, MemoryFenced

USER = {"role": "user", "content": "Where is order 1043?"}
ANSWER = {"role": "assistant", "content": "It has shipped."}


async def test_items_round_trip_and_read_the_same_through_the_sdks_redis_session(redis):
    memory = ConversationMemory(redis, "conv-m")
    await memory.add_items([USER])
    await memory.add_items([ANSWER])
    assert await memory.get_items() == [USER, ANSWER]
    assert await memory.get_items(limit=1) == [ANSWER]
    sdk = RedisSession(keys.session_id("conv-m"), redis_client=redis, key_prefix=keys.SESSION_PREFIX)
    assert await sdk.get_items() == [USER, ANSWER]
    assert await memory.pop_item() == ANSWER
    await memory.clear_session()
    assert await memory.get_items() == [] and await memory.pop_item() is None


async def test_a_stale_attempt_cannot_write_memory(redis):
    # Attempt 2 owns the turn (attempt 1's worker stalled past its lease).
    await redis.hset(keys.turn("t-1"), mapping={"status": "running", "attempts": 2})
    current = ConversationMemory(redis, "conv-f", turn_id="t-1", attempt=2)
    stale = ConversationMemory(redis, "conv-f", turn_id="t-1", attempt=1)
    await current.add_items([USER])
    try:
        await stale.add_items([ANSWER])
        raise AssertionError("the stale write was accepted")
    except MemoryFenced:
        pass
    try:
        await stale.truncate(0)
        raise AssertionError("the stale roll-back was accepted")
    except MemoryFenced:
        pass
    assert await current.get_items() == [USER]
    # Once the turn has ended, no attempt writes its memory any more.
    await redis.hset(keys.turn("t-1"), "status", "completed")
    try:
        await current.add_items([ANSWER])
        raise AssertionError("a write after the turn ended was accepted")
    except MemoryFenced:
        pass
    assert await current.length() == 1


async def test_truncate_drops_only_what_is_past_the_base(redis):
    await redis.hset(keys.turn("t-2"), mapping={"status": "running", "attempts": 1})
    memory = ConversationMemory(redis, "conv-t", turn_id="t-2", attempt=1)
    await memory.add_items([USER, ANSWER, USER])
    assert await memory.truncate(3) == 0
    assert await memory.truncate(1) == 2
    assert await memory.get_items() == [USER]
    assert await memory.truncate(0) == 1  # back to an empty history (LTRIM 0 -1 would keep all)
    assert await memory.get_items() == []


async def test_ttl_applies_to_both_keys(redis):
    memory = ConversationMemory(redis, "conv-ttl", ttl_s=60)
    await memory.add_items([USER])
    assert 0 < await redis.ttl(keys.session_messages("conv-ttl")) <= 60
    assert 0 < await redis.ttl(f"{keys.SESSION_PREFIX}:{keys.session_id('conv-ttl')}") <= 60


async def test_writes_reuse_pooled_connections(redis):
    # The SDK's RedisSession opened a new connection per write on redis-py 5 (see the module
    # docstring); this one borrows from the client's pool like any command.
    memory = ConversationMemory(redis, "conv-p")
    await memory.add_items([USER])  # the pool has its connection now
    before = (await redis.info("stats"))["total_connections_received"]
    for _ in range(20):
        await memory.add_items([USER])
        await memory.get_items()
    after = (await redis.info("stats"))["total_connections_received"]
    assert after == before


async def test_a_buffered_run_writes_once_at_flush_and_reads_its_own_items(redis):
    await redis.hset(keys.turn("t-b"), mapping={"status": "running", "attempts": 1})
    await ConversationMemory(redis, "conv-b").add_items([USER])  # an earlier turn
    memory = ConversationMemory(redis, "conv-b", turn_id="t-b", attempt=1, buffered=True)
    await memory.add_items([USER])
    await memory.add_items([ANSWER])
    assert await memory.length() == 1  # nothing written yet
    assert await memory.get_items() == [USER, USER, ANSWER]
    assert await memory.get_items(limit=2) == [USER, ANSWER]
    assert await memory.get_items(limit=3) == [USER, USER, ANSWER]
    assert await memory.pop_item() == ANSWER
    assert await memory.flush() == 1
    assert await ConversationMemory(redis, "conv-b").get_items() == [USER, USER]
    assert await memory.flush() == 0  # nothing pending: no write


async def test_a_buffered_stale_attempt_is_refused_at_flush(redis):
    await redis.hset(keys.turn("t-s"), mapping={"status": "running", "attempts": 2})
    memory = ConversationMemory(redis, "conv-s", turn_id="t-s", attempt=1, buffered=True)
    await memory.add_items([USER])
    try:
        await memory.flush()
        raise AssertionError("the stale flush was accepted")
    except MemoryFenced:
        pass
    assert await memory.length() == 0
