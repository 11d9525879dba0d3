"""What a worker sends Redis per turn (issue 19): the commands, counted by ``INFO
commandstats`` around a real burst worker draining real turns. Counts, never timings: each
round trip costs the worker CPU (redis-py packing, a socket write, a read), so the ones a
change removes must stay removed."""

from __future__ import annotations

from typing import Any

from tests.processes import run_burst
from turnfleet import keys


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


async def test_a_job_this_lane_runs_is_not_claimed_again_at_every_poll(redis_url, redis):
    """The job of a running turn stays in arq's queue until it ends, so every poll meanwhile
    reads it again; arq asks Redis whether it may start it (and is told no). The worker knows
    it runs it: it asks nothing, and claims nothing."""
    import asyncio

    from arq import func
    from arq.connections import ArqRedis
    from turnfleet.workers.supervisor import TurnWorker

    async def job(ctx: dict) -> None:
        await asyncio.Event().wait()  # started, then cancelled at the end

    pool = ArqRedis.from_url(redis_url)
    worker = TurnWorker(functions=[func(job, name="job")], redis_pool=pool, queue_name="arq:queue:rt-test", burst=True,
                        handle_signals=False, max_jobs=5)
    running = asyncio.get_running_loop().create_future()  # a job of this lane, still running
    worker.tasks["t-running"] = running  # type: ignore[assignment]
    await redis.zadd("arq:queue:rt-test", {"t-running": 1, "t-other": 2})
    before = await _commandstats(redis)
    try:
        await worker.start_jobs([b"t-running"])
        asked = (await _commandstats(redis)).get("evalsha", 0) - before.get("evalsha", 0)
        assert asked == 0
        assert not await redis.exists("arq:in-progress:t-running")
        assert worker.job_counter == 0
        # Another job of the queue is claimed as before (its in-progress key set).
        await worker.start_jobs([b"t-other"])
        assert await redis.exists("arq:in-progress:t-other")
    finally:
        running.cancel()
        for task in worker.tasks.values():
            task.cancel()
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        await pool.aclose()


async def _monitored(redis: Any, producer: Any, fleet_env: dict[str, str], tmp_path: Any, conversation_id: str,
                     key_part: str) -> tuple[str, list[tuple[str, str]]]:
    """One turn run by a burst worker under MONITOR: (turn id, [(who, command)] of the commands
    naming ``key_part``); who is ``lua`` for a command a script ran, else how the client
    is connected."""
    import asyncio

    turn_id = await producer.enqueue_turn(conversation_id=conversation_id, customer_id="C-100",
                                          text="Where is order 1043?")
    seen: list[tuple[str, str]] = []
    ready = asyncio.Event()

    async def watch() -> None:
        async with redis.monitor() as m:
            ready.set()
            async for cmd in m.listen():
                if key_part in cmd["command"]:
                    seen.append((cmd.get("client_type") or "", cmd["command"].split()[0].upper()))

    monitor = asyncio.create_task(watch())
    await ready.wait()
    try:
        await asyncio.to_thread(run_burst, "worker", {**fleet_env, "TURNFLEET_TRACE_SAMPLE_RATE": "1.0"}, tmp_path)
        assert (await producer.result(turn_id)).status == "completed"
    finally:
        monitor.cancel()
        await asyncio.gather(monitor, return_exceptions=True)
    return turn_id, seen


async def test_a_completed_turns_trace_is_written_by_the_finish_script(producer, redis, fleet_env, tmp_path):
    """The kept trace record goes to Redis inside the finish script, with the result: no
    MULTI/RPUSH/EXPIRE/EXEC of its own (MONITOR shows each command and who sent it: a
    script's commands come from ``lua``)."""
    turn_id, seen = await _monitored(redis, producer, fleet_env, tmp_path, "conv-rt-trace", keys.trace(""))
    assert len(await redis.lrange(keys.trace(turn_id), 0, -1)) == 1
    writes = [s for s in seen if s[1] in ("RPUSH", "EXPIRE")]
    assert writes and all(who == "lua" for who, _ in writes), writes


async def test_a_turn_reads_its_memory_in_start_not_in_a_read_of_its_own(producer, redis, fleet_env, tmp_path):
    """``START`` returns the conversation memory's items with the request; the run's session
    reads them from there. The check job reads the memory before the turn in its batch's
    read script (``read_checks.lua``): no read of the memory from outside a script is left."""
    cid = "conv-rt-memory"
    _turn_id, seen = await _monitored(redis, producer, fleet_env, tmp_path, cid, keys.session_messages(cid))
    reads = [who for who, cmd in seen if cmd == "LRANGE"]
    assert reads.count("lua") >= 1  # START's
    assert [who for who in reads if who != "lua"] == [], seen


async def test_a_finished_turns_arq_job_is_cleaned_up_by_the_finish_script(producer, redis, fleet_env, tmp_path):
    """arq's clean-up of a job that returned (its job, retry and in-progress keys deleted, out
    of its queue) is done by the finish script with the result: not in a transaction of its
    own after the job returns."""
    turn_id, seen = await _monitored(redis, producer, fleet_env, tmp_path, "conv-rt-arq", keys.ARQ_JOB_PREFIX + "t_")
    deletes = [who for who, cmd in seen if cmd == "DEL"]
    assert deletes == ["lua"], seen
    assert not await redis.exists(keys.ARQ_JOB_PREFIX + turn_id, keys.ARQ_RETRY_PREFIX + turn_id,
                                  keys.ARQ_IN_PROGRESS_PREFIX + turn_id)
    assert await redis.zscore(keys.ARQ_QUEUE, turn_id) is None


async def test_a_check_jobs_arq_clean_up_is_done_by_its_write(producer, redis, fleet_env, tmp_path):
    """The same for the turn's check job: its write (``write_checks.lua``) cleans it up."""
    turn_id, seen = await _monitored(redis, producer, fleet_env, tmp_path, "conv-rt-checks",
                                     keys.ARQ_JOB_PREFIX + keys.checks_job_id(""))
    assert await redis.exists(keys.turn_checks(turn_id))
    deletes = [who for who, cmd in seen if cmd == "DEL"]
    assert deletes == ["lua"], seen
    job_id = keys.checks_job_id(turn_id)
    assert not await redis.exists(keys.ARQ_JOB_PREFIX + job_id, keys.ARQ_IN_PROGRESS_PREFIX + job_id)
    assert await redis.zscore(keys.CHECKS_QUEUE, job_id) is None


async def test_a_check_job_is_claimed_with_its_lease_not_cut_to_it_afterwards(redis_url, redis):
    """A checks lane's claim sets arq's in-progress key to one lease (``turn_lease_s``) itself:
    the check job does not cut arq's job timeout down to a lease in a round trip of its own
    first (and a worker killed right after the claim holds the job one lease, not
    ``job_timeout`` + 10 s). A turn lane's claim keeps arq's timeout (``START`` sets its lease)."""
    import asyncio

    from arq import func
    from arq.connections import ArqRedis

    from tests.worker_runtime import runtime
    from turnfleet.workers.isolation import CLAIM_LEASES
    from turnfleet.workers.model import OfflineModel
    from turnfleet.workers.supervisor import TurnWorker

    async def job(ctx: dict) -> None:
        await asyncio.Event().wait()

    pool = ArqRedis.from_url(redis_url)
    ctx = runtime(redis, OfflineModel(), turn_lease_s=7.0)
    lanes = {
        "checks": TurnWorker(functions=[func(job, name="job")], redis_pool=pool, queue_name="arq:queue:c-test",
                             handle_signals=False, max_jobs=2, job_timeout=300, ctx={**ctx, CLAIM_LEASES: True}),
        "turns": TurnWorker(functions=[func(job, name="job")], redis_pool=pool, queue_name="arq:queue:t-test",
                            handle_signals=False, max_jobs=2, job_timeout=300, ctx=dict(ctx)),
    }
    await redis.zadd("arq:queue:c-test", {"checks/t-1": 1})
    await redis.zadd("arq:queue:t-test", {"t-1": 1})
    try:
        await lanes["checks"].start_jobs([b"checks/t-1"])
        await lanes["turns"].start_jobs([b"t-1"])
        assert 0 < await redis.pttl("arq:in-progress:checks/t-1") <= 7000
        assert await redis.pttl("arq:in-progress:t-1") > 300_000
    finally:
        for worker in lanes.values():
            for task in worker.tasks.values():
                task.cancel()
            await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        await pool.aclose()
