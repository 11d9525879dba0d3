"""What a worker sends Redis per turn (issue 19): the commands, counted by ``INFO
commandstats`` around a real burst worker draining real turns. Counts, never timings: each
round trip costs the worker CPU (redis-py packing, a socket write, a read), so the ones a
change removes must stay removed."""

from __future__ import annotations

from typing import Any

from tests.processes import run_burst


async def _commandstats(redis: Any) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def _burst_commands(producer: Any, redis: Any, fleet_env: dict[str, str], tmp_path: Any,
                          n: int = 3) -> tuple[dict[str, int], list[Any]]:
    ids = [await producer.enqueue_turn(conversation_id=f"conv-rt-{i}", customer_id="C-100",
                                       text="Where is order 1043?") for i in range(n)]
    before = await _commandstats(redis)
    run_burst("worker", {**fleet_env, "TURNFLEET_TRACE_SAMPLE_RATE": "1.0"}, tmp_path)
    after = await _commandstats(redis)
    results = [await producer.result(t) for t in ids]
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}, results


async def test_a_job_is_claimed_in_one_script_call_not_arqs_watch_transaction(producer, redis, fleet_env, tmp_path):
    """arq claims a job with WATCH, EXISTS, ZSCORE, MULTI, PSETEX, EXEC (four round trips);
    the worker claims it with one script call (``workers/lua/claim_job.lua``), for the turn's
    job and its check job alike."""
    sent, results = await _burst_commands(producer, redis, fleet_env, tmp_path)
    assert [r.status for r in results] == ["completed"] * 3
    # (commandstats counts the commands a script runs too: no WATCH is the mark of arq's claim)
    assert sent.get("watch", 0) == 0
    assert sent.get("unwatch", 0) == 0
