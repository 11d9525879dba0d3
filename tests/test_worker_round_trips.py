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
    the worker claims it with one script call (``workers/lua/claim_jobs.lua``), for the turn's
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
    await redis.zadd("arq:queue:rt-test", {"t-running": 1})
    # A real job (payload and all): it runs, and waits, holding its claim.
    assert await pool.enqueue_job("job", _job_id="t-other", _queue_name="arq:queue:rt-test") is not None
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
                     key_part: str, unless: str = "\0") -> tuple[str, list[tuple[str, str]]]:
    """One turn run by a burst worker under MONITOR: (turn id, [(who, command)] of the commands
    naming ``key_part`` (and not ``unless``); who is ``lua`` for a command a script ran, else
    how the client is connected."""
    import asyncio

    turn_id = await producer.enqueue_turn(conversation_id=conversation_id, customer_id="C-100",
                                          text="Where is order 1043?")
    seen: list[tuple[str, str]] = []
    ready = asyncio.Event()

    async def watch() -> None:
        async with redis.monitor() as m:
            ready.set()
            async for cmd in m.listen():
                if key_part in cmd["command"] and unless not in cmd["command"]:
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
    # Real jobs (payload and all): they run, and wait, holding their claim.
    assert await pool.enqueue_job("job", _job_id="checks/t-1", _queue_name="arq:queue:c-test") is not None
    assert await pool.enqueue_job("job", _job_id="t-1", _queue_name="arq:queue:t-test") is not None
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


async def test_a_poll_reads_claims_and_starts_its_jobs_in_one_script_call(producer, redis, fleet_env, tmp_path):
    """arq reads its queue (ZRANGEBYSCORE), claims each job (EXISTS, ZSCORE, PSETEX) and starts
    it in a transaction of its own (GET job, INCR try, EXPIRE try): the worker does all of it
    in one script call a poll (``workers/lua/claim_jobs.lua``), for turns and check jobs alike."""
    _turn_id, seen = await _monitored(redis, producer, fleet_env, tmp_path, "conv-rt-claim", "arq:",
                                      unless=":health-check")  # arq's own health key: not the claim's
    claim = ("ZRANGEBYSCORE", "EXISTS", "ZSCORE", "PSETEX", "GET", "INCRBY", "INCR", "EXPIRE")
    assert ("lua", "INCRBY") in seen or ("lua", "INCR") in seen, seen  # the claim ran, in a script
    assert ("lua", "ZRANGEBYSCORE") in seen, seen
    assert [(who, cmd) for who, cmd in seen if who != "lua" and cmd in claim] == []


async def test_a_claimed_job_keeps_arqs_tries_abort_and_expiry(redis_url, redis):
    """What arq's ``run_job`` decides from its first transaction, the claim script's answers
    decide the same way: a job retried counts its tries up to ``max_tries`` (then fails
    without running), a job asked to abort before it started does not run, and a queued job
    whose key expired is dropped without running."""
    import json

    from arq import Retry, func
    from arq.connections import ArqRedis
    from turnfleet.workers.supervisor import TurnWorker

    runs: list[tuple[str, int]] = []

    async def flaky(ctx: dict) -> None:
        runs.append(("flaky", ctx["job_try"]))
        raise Retry(defer=0)

    async def plain(ctx: dict) -> None:
        runs.append(("plain", ctx["job_try"]))

    codec = {"job_serializer": lambda d: json.dumps(d).encode(), "job_deserializer": json.loads}
    pool = ArqRedis.from_url(redis_url)
    pool.job_serializer, pool.job_deserializer = codec["job_serializer"], codec["job_deserializer"]
    queue = "arq:queue:semantics"
    try:
        for job_id, fn in (("j-flaky", "flaky"), ("j-plain", "plain"), ("j-aborted", "plain")):
            assert await pool.enqueue_job(fn, _job_id=job_id, _queue_name=queue) is not None
        await redis.zadd("arq:abort", {"j-aborted": 1})
        await redis.zadd(queue, {"j-expired": 1})  # in the queue, its job key gone
        worker = TurnWorker(functions=[func(flaky, name="flaky"), func(plain, name="plain")], redis_pool=pool,
                            queue_name=queue, burst=True, handle_signals=False, max_jobs=5, max_tries=3,
                            poll_delay=0.01, allow_abort_jobs=True, keep_result=0, **codec)
        await worker.main()
        assert sorted(runs) == [("flaky", 1), ("flaky", 2), ("flaky", 3), ("plain", 1)]
        assert await redis.zcard(queue) == 0
        assert worker.jobs_failed == 3  # tries exceeded, aborted, expired
        assert not await redis.exists("arq:in-progress:j-flaky", "arq:retry:j-flaky", "arq:job:j-flaky")
    finally:
        await pool.aclose()


async def test_a_turns_memory_is_written_by_the_finish_script_not_a_call_of_its_own(producer, redis, fleet_env,
                                                                                     tmp_path):
    """The items a run adds to the conversation memory are appended by the finish script,
    with the result (fenced alike): the worker's scripts naming the memory are ``START``
    (its read) and ``FINISH`` (its write), not a memory script of their own between them."""
    cid = "conv-rt-memory-write"
    turn_id, seen = await _monitored(redis, producer, fleet_env, tmp_path, cid, keys.session_messages(cid))
    assert ("lua", "RPUSH") in seen, seen
    # The script calls that ran (a call refused with NOSCRIPT, sent again, runs no command).
    ran = [cmd for i, (who, cmd) in enumerate(seen) if who != "lua" and cmd in ("EVALSHA", "EVAL")
           and seen[i + 1:i + 2] and seen[i + 1][0] == "lua"]
    assert len(ran) == 2, seen  # START, FINISH
    assert int(await redis.hget(keys.turn(turn_id), "memory_end")) == await redis.llen(keys.session_messages(cid)) > 0


def test_the_worker_runs_on_uvloop():
    """``turnfleet worker`` runs its loop on uvloop (a dependency except on Windows): the
    loop's own share of a turn's many round trips and task switches costs less there."""
    import asyncio

    import uvloop

    from turnfleet.workers.supervisor import event_loop_factory

    factory = event_loop_factory()
    assert factory is uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)
