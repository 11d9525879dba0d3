"""Drills 1, 2, 3 and 7 (job half): workers that die, stop, meet poison turns and garbage.

Real ``turnfleet worker`` subprocesses (the supervised arq worker a deployment runs), a real
Redis per test and, where a model call must be held while the test acts, the local
OpenAI-compatible server (``tests/llm_server.py``) with its hold gate. Every drill waits on
events — a held model request, a process exit, the results stream, a key, a log line the
worker writes when it begins to drain — and ends with the audit (``tests/drills/audit.py``).

Leases are 2 s here (``TURNFLEET_TURN_LEASE_S``), so a killed worker's turn is taken over
within about 2 s; the reconciler runs only where a drill asks for it.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from turnfleet.producer import Producer
from tests.drills.audit import audit
from tests.llm_server import LLMServer, llm_server  # noqa: F401 - the fixture
from tests.processes import run_burst, until_or_exit
from turnfleet import keys
from turnfleet.shell.fleet import FleetProcess
from turnfleet.queue import UNDECODABLE_FUNCTION, deserialize_job
from turnfleet.workers.reconcile import reconcile

LEASE_S = 2.0
MODEL = "gpt-4o-mini"


def drill_env(env: dict[str, str], server: LLMServer | None = None, **extra: str) -> dict[str, str]:
    out = {
        **env,
        "TURNFLEET_TURN_LEASE_S": str(LEASE_S),
        "TURNFLEET_RETRY_DELAY_S": "0.05",
        "TURNFLEET_RECONCILE_EVERY_S": "3600",  # only the reconciler drill runs it often
        **extra,
    }
    if server is not None:
        out.update({
            "TURNFLEET_MODEL_BASE_URL": server.url,
            "TURNFLEET_MODEL_NAME": MODEL,
            "TURNFLEET_MODEL_API_KEY": "sk-test-dummy",
            "TURNFLEET_MODEL_TIMEOUT_S": "60",  # a held request must outlast the drill's steps
            "TURNFLEET_MODEL_MAX_RETRIES": "0",
        })
    return out


class Fleet:
    """Worker subprocesses of one test; whatever is still running at the end is killed."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[FleetProcess] = []

    def worker(self, env: dict[str, str], name: str, *, burst: bool = False) -> FleetProcess:
        args = ["worker", "--burst"] if burst else ["worker"]
        proc = FleetProcess(name, args, {**env, "TURNFLEET_WORKER_NAME": name},
                            self.tmp_path / f"{name}.log").start()
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            proc.kill()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.kill_all()


async def exited(proc: FleetProcess, timeout: float = 60) -> int:
    """The process's exit status, waited for without blocking the event loop."""
    return await asyncio.to_thread(proc.wait, timeout)


async def polling(redis, *names: str) -> None:
    """Until each named worker has written its heartbeat: its poll loop starts right after."""
    for name in names:
        await until_or_exit(lambda n=name: redis.zscore(keys.WORKERS, n), f"{name}'s heartbeat")


def logged(proc: FleetProcess, event: str) -> bool:
    return f'"event": "{event}"' in proc.output()


async def finish_audit(redis, fleet_env: dict[str, str], tmp_path: Path, turn_ids: list[str]):
    run_burst("telemetry", fleet_env, tmp_path, name=f"telemetry-{len(turn_ids)}")
    return await audit(redis, turn_ids)


# -- Drill 1: SIGKILL a worker mid-turn ----------------------------------------------------


async def test_drill1_a_killed_workers_turn_completes_on_another_worker_within_the_lease(
    redis, fleet_env, tmp_path, fleet, llm_server  # noqa: F811
):
    server = llm_server()
    server.hold(match="order 1047")
    env = drill_env(fleet_env, server)
    a, b = fleet.worker(env, "w-a"), fleet.worker(env, "w-b")
    await polling(redis, "w-a", "w-b")
    async with Producer(redis=redis) as producer:
        turn_id = await producer.enqueue_turn(
            conversation_id="d1", customer_id="C-102",
            text="I'd like a refund for order 1047, the headphones stopped working.")
        await server.wait_held(1, timeout=20)
        holder = await redis.hget(keys.turn(turn_id), "worker")
        victim, survivor = (a, "w-b") if holder == "w-a" else (b, "w-a")
        # The running turn holds a lease, not arq's job_timeout + 10 s in-progress key.
        assert 0 < await redis.pttl(keys.ARQ_IN_PROGRESS_PREFIX + turn_id) <= LEASE_S * 1000
        killed_at = datetime.now(timezone.utc)
        victim.kill()  # SIGKILL: no clean-up of any kind
        server.release()
        result = await producer.wait(turn_id, timeout_s=30)

    assert result.status == "completed" and "$229.00" in result.final_output
    assert result.attempts == 2 and result.worker == survivor
    assert [(e.attempt, e.error_type) for e in result.errors] == [(1, "WorkerLost")]
    # Taken over once the lease lapsed (≤ 2 s after the kill) plus a poll: not after arq's 160 s.
    takeover_s = (result.started_at - killed_at).total_seconds()
    assert takeover_s <= LEASE_S + 1.0, takeover_s
    for proc in fleet.procs:
        if proc.running():
            assert proc.stop() == 0, proc.output()[-3000:]
    report = await finish_audit(redis, fleet_env, tmp_path, [turn_id])
    assert report.statuses() == {"completed": 1}
    assert len(await redis.xrange(keys.REFUND_LEDGER)) == 1


# -- Drill 2: SIGTERM with turns in flight --------------------------------------------------


async def test_drill2_sigterm_drains_turns_in_flight_and_takes_no_new_ones(
    redis, fleet_env, tmp_path, fleet, llm_server  # noqa: F811
):
    server = llm_server()
    server.hold(match="(held)")
    env = drill_env(fleet_env, server, TURNFLEET_DRAIN_GRACE_S="30")
    a = fleet.worker(env, "w-a")
    async with Producer(redis=redis) as producer:
        held = await producer.enqueue_turns([
            {"conversation_id": "d2-a", "customer_id": "C-100", "text": "Where is order 1043? (held)"},
            {"conversation_id": "d2-b", "customer_id": "C-101", "text": "Hello there (held)"},
        ])
        await server.wait_held(2, timeout=30)
        a.process.terminate()  # SIGTERM
        await until_or_exit(lambda: logged(a, "worker.draining"), "the drain to begin", proc=a)
        later = await producer.enqueue_turn(conversation_id="d2-c", customer_id="C-100", text="Hi, I'm Dana.")
        server.release()
        assert await exited(a, 40) == 0, a.output()[-3000:]
        drained = [await producer.result(t) for t in held]
        assert [(r.status, r.attempts, r.worker) for r in drained] == [("completed", 1, "w-a")] * 2
        waiting = await producer.result(later)
        assert (waiting.status, waiting.attempts) == ("queued", 0)  # not taken while draining
        assert logged(a, "worker.drained")

        assert await exited(fleet.worker(env, "w-b", burst=True), 60) == 0
        done = await producer.result(later)
        assert (done.status, done.attempts, done.worker) == ("completed", 1, "w-b")
    report = await finish_audit(redis, fleet_env, tmp_path, [*held, later])
    assert report.statuses() == {"completed": 3}


async def test_drill2_a_turn_longer_than_the_drain_grace_is_requeued_and_completes_elsewhere(
    redis, fleet_env, tmp_path, fleet, llm_server  # noqa: F811
):
    server = llm_server()
    server.hold(match="order 1043")
    env = drill_env(fleet_env, server)
    a = fleet.worker({**env, "TURNFLEET_DRAIN_GRACE_S": "0.5"}, "w-a")
    async with Producer(redis=redis) as producer:
        turn_id = await producer.enqueue_turn(conversation_id="d2-d", customer_id="C-100",
                                              text="Where is order 1043?")
        await server.wait_held(1, timeout=30)
        a.process.terminate()  # SIGTERM: the held turn cannot finish within 0.5 s
        assert await exited(a, 30) == 0, a.output()[-3000:]
        assert logged(a, "worker.drain_grace_over")
        requeued = await producer.result(turn_id)
        assert (requeued.status, requeued.attempts) == ("queued", 1)  # not lost, not stuck running
        assert [(e.attempt, e.error_type) for e in requeued.errors] == [(1, "WorkerStopped")]
        assert await redis.zscore(keys.ARQ_QUEUE, turn_id) is not None
        assert not await redis.exists(keys.ARQ_IN_PROGRESS_PREFIX + turn_id)

        server.release()
        assert await exited(fleet.worker(env, "w-b", burst=True), 60) == 0
        result = await producer.result(turn_id)
    assert (result.status, result.attempts, result.worker) == ("completed", 2, "w-b")
    assert [e.error_type for e in result.errors] == ["WorkerStopped"]
    await finish_audit(redis, fleet_env, tmp_path, [turn_id])


# -- Drill 3: a turn that kills its worker every time ---------------------------------------


async def test_drill3_a_turn_that_kills_every_worker_fails_worker_lost_after_one_isolated_run(
    redis, fleet_env, tmp_path, fleet, llm_server  # noqa: F811
):
    # The poison: whenever this turn's model request arrives, its worker dies (SIGKILL).
    server = llm_server()
    server.hold(match="order 1099")
    env = drill_env(fleet_env, server, TURNFLEET_MAX_ATTEMPTS="3")
    async with Producer(redis=redis) as producer:
        poison, after = await producer.enqueue_turns([
            {"conversation_id": "d3", "customer_id": "C-100", "text": "Where is order 1099?"},
            {"conversation_id": "d3", "customer_id": "C-100", "text": "Thanks, bye"},
        ])
        worker = fleet.worker(env, "w-1")
        # Life 1 beside (possibly) other turns; life 2 alone, in the isolated lane.
        for life, lane in ((1, "shared"), (2, "isolated")):
            await server.wait_held(1, timeout=30)
            assert await redis.hget(keys.turn(poison), "attempts") == str(life)
            assert await redis.hget(keys.turn(poison), "lane") == lane
            worker.kill()
            server.release()  # answer the dead worker's request (to no one), then hold again
            await server.wait_for(lambda s: s.held == 0)
            server.hold(match="order 1099")
            # The next worker boots while the dead one's lease runs out.
            worker = fleet.worker(env, f"w-{life + 1}")
        other = await producer.enqueue_turn(conversation_id="d3-other", customer_id="C-101",
                                            text="Where is order 1045?")
        failed = await producer.wait(poison, timeout_s=30)
        followed = await producer.wait(after, timeout_s=30)
        bystander = await producer.wait(other, timeout_s=30)
    assert worker.stop() == 0, worker.output()[-3000:]

    assert failed.status == "failed" and failed.error_type == "WorkerLost"
    assert failed.attempts == 2 and "ran alone" in failed.error_message
    assert [(e.attempt, e.error_type) for e in failed.errors] == [
        (1, "WorkerLost"), (2, "WorkerLost"), (2, "WorkerLost")]
    assert (followed.status, followed.worker) == ("completed", "w-3")
    assert bystander.status == "completed", bystander.model_dump_json(indent=1)
    report = await finish_audit(redis, fleet_env, tmp_path, [poison, after, other])
    assert report.statuses() == {"completed": 2, "failed": 1}


# -- Drill 3b: a poison turn among 50 innocent slow turns fails alone -----------------------

POISON = "order 1099"


async def _poison_among_innocents(redis, fleet_env, tmp_path, fleet, server: LLMServer, take_down: str):
    """One poison turn among 50 innocent slow turns on two workers. Whenever the poison's
    model request arrives, the drill takes its worker down (``kill``: SIGKILL, as a tool's
    ``os._exit`` or the OOM killer would; ``hang``: SIGSTOP, an event loop that runs nothing,
    as a CPU-bound tool makes it) and starts a replacement, as a supervisor would, until the
    poison has ended. Returns the turns, the take-downs and the results."""
    server.hold(match=POISON)
    env = drill_env(fleet_env, server, TURNFLEET_MAX_ATTEMPTS="2")
    live = {name: fleet.worker(env, name) for name in ("w-1", "w-2")}
    await polling(redis, *live)
    hung = []
    downs: list[dict] = []
    async with Producer(redis=redis) as producer:
        innocents = await producer.enqueue_turns([
            {"conversation_id": f"p-{i}", "customer_id": "C-100",
             "text": "Where is order 1043?" if i % 2 else "Hello there"} for i in range(25)])
        poison = await producer.enqueue_turn(conversation_id="p-poison", customer_id="C-101",
                                             text=f"Where is {POISON}?")
        innocents += await producer.enqueue_turns([
            {"conversation_id": f"p-{i}", "customer_id": "C-100",
             "text": "Where is order 1043?" if i % 2 else "Hello there"} for i in range(25, 50)])

        async def poison_held_or_ended() -> bool:
            return server.held > 0 or await redis.hget(keys.turn(poison), "status") == "failed"

        while True:
            await until_or_exit(poison_held_or_ended, "the poison's model request, or its end", timeout=120)
            if server.held == 0:
                break
            holder, lane = await redis.hmget(keys.turn(poison), "worker", "lane")
            beside = 0
            for t in innocents:
                if await redis.hmget(keys.turn(t), "status", "worker") == ["running", holder]:
                    beside += 1
            downs.append({"worker": holder, "lane": lane, "beside": beside})
            victim = live.pop(holder)
            if take_down == "kill":
                victim.kill()
            else:
                victim.process.send_signal(signal.SIGSTOP)
                hung.append(victim)
            # Answer the request (to no one, or to a process that runs nothing), hold again.
            server.release()
            await server.wait_for(lambda s: s.held == 0)
            server.hold(match=POISON)
            name = f"w-{len(downs) + 2}"
            live[name] = fleet.worker(env, name)
        results = {t: await producer.wait(t, timeout_s=120) for t in [poison, *innocents]}
    for proc in hung:  # the hung loops run again: everything they still try is fenced out
        proc.process.send_signal(signal.SIGCONT)
    for proc in live.values():
        assert proc.stop() == 0, proc.output()[-3000:]
    for proc in hung:
        # A job a hung worker had claimed but not begun was taken over (the new workers' first
        # reconcile pass cut its claim to a lease) and finished elsewhere: arq, finding the job
        # gone when the loop runs again, counts it failed ("expired"): exit status 1, no crash.
        assert proc.stop() in (0, 1) and "Traceback" not in proc.output(), proc.output()[-3000:]
    return poison, innocents, downs, results, hung


def _assert_poison_failed_alone(poison, innocents, downs, results):
    # At most two processes lost to the poison: the one it shared, the one it ran alone on.
    assert len(downs) <= 2, downs
    assert [d["lane"] for d in downs] == ["shared", "isolated"], downs
    assert downs[0]["beside"] >= 1, downs  # it did share its worker with innocent turns...
    assert downs[1]["beside"] == 0, downs  # ...and ran alone the second time
    failed = results[poison]
    assert (failed.status, failed.error_type) == ("failed", "WorkerLost"), failed.model_dump_json(indent=1)
    assert [e.error_type for e in failed.errors] == ["WorkerLost"] * 3
    suspects = 0
    for t in innocents:
        r = results[t]
        lost = sum(e.error_type == "WorkerLost" for e in r.errors)
        assert r.status == "completed", r.model_dump_json(indent=1)
        assert lost <= 1, r.model_dump_json(indent=1)  # lost at most once, beside the poison
        assert r.attempts - lost == 1, r.model_dump_json(indent=1)  # one ordinary attempt each
        suspects += lost
    assert suspects >= 1
    return suspects


async def test_drill3b_a_poison_turn_among_50_slow_turns_fails_alone_and_kills_at_most_two_workers(
    redis, fleet_env, tmp_path, fleet, llm_server  # noqa: F811
):
    server = llm_server(latency=0.3)
    poison, innocents, downs, results, _ = await _poison_among_innocents(
        redis, fleet_env, tmp_path, fleet, server, "kill")
    suspects = _assert_poison_failed_alone(poison, innocents, downs, results)
    print(f"worker losses to the poison: {len(downs)} {downs}; innocent suspects run alone: {suspects}")
    report = await finish_audit(redis, fleet_env, tmp_path, [poison, *innocents])
    assert report.statuses() == {"completed": 50, "failed": 1}
    # The turn_failed alert names the poison turn, with its own error type.
    alerts = [json.loads(f["alert"]) for _, f in await redis.xrange(keys.ALERTS_STREAM)]
    assert [(a["turn_id"], a["figures"]["error_type"]) for a in alerts
            if a["rule"] == "turn_failed"] == [(poison, "WorkerLost")], alerts


async def test_drill3c_a_turn_that_hangs_its_worker_fails_alone_and_the_hung_workers_write_nothing(
    redis, fleet_env, tmp_path, fleet, llm_server  # noqa: F811
):
    server = llm_server(latency=0.3)
    poison, innocents, downs, results, hung = await _poison_among_innocents(
        redis, fleet_env, tmp_path, fleet, server, "hang")
    _assert_poison_failed_alone(poison, innocents, downs, results)
    # The attempts each hung worker still ran when its loop woke up were refused (fenced).
    for proc in hung:
        assert logged(proc, "turn.result_dropped"), proc.output()[-3000:]
    # The hung workers' attempts ran on after SIGCONT and were refused: one outcome per turn.
    report = await finish_audit(redis, fleet_env, tmp_path, [poison, *innocents])
    assert report.statuses() == {"completed": 50, "failed": 1}


# -- Drill 7 (job half): an undecodable job payload ------------------------------------------


def test_an_undecodable_payload_decodes_into_a_job_that_records_the_failure():
    for raw in (b"\x00\x9f garbage", b"[1, 2]", b'{"f": "os.system", "a": ["rm -rf /"], "k": {}, "t": 1, "et": 1}',
                b'{"f": "run_turn", "a": ["t-1"], "k": {}, "t": 1, "et": 1}'):
        job = deserialize_job(raw)
        assert job["f"] == UNDECODABLE_FUNCTION and isinstance(job["a"][0], str), raw
    good = {"f": "run_turn", "a": ["t-1", "c-1"], "k": {}, "t": 1, "et": 1}
    assert deserialize_job(json.dumps(good).encode()) == good


async def test_drill7_an_undecodable_job_fails_its_turn_and_everything_else_flows(
    redis, fleet_env, tmp_path
):
    async with Producer(redis=redis) as producer:
        bad, after, other = await producer.enqueue_turns([
            {"conversation_id": "d7", "customer_id": "C-100", "text": "Where is order 1043?"},
            {"conversation_id": "d7", "customer_id": "C-100", "text": "Hello there"},
            {"conversation_id": "d7-other", "customer_id": "C-101", "text": "Where is order 1045?"},
        ])
        # Someone with write access to Redis overwrites the job with bytes that are no job.
        await redis.execute_command("SET", keys.ARQ_JOB_PREFIX + bad, b"\x80\x04\x95 not a job at all")
        run_burst("worker", drill_env(fleet_env), tmp_path)
        results = {t: await producer.result(t) for t in (bad, after, other)}

    failed = results[bad]
    assert failed.status == "failed" and failed.error_type == "UndecodableJob"
    assert "could not be decoded" in failed.error_message and failed.attempts == 1
    assert results[after].status == "completed" and results[other].status == "completed"
    # Not retried: arq dropped the job once the turn's failure was recorded.
    assert not await redis.exists(keys.ARQ_JOB_PREFIX + bad)
    assert await redis.zscore(keys.ARQ_QUEUE, bad) is None
    report = await finish_audit(redis, fleet_env, tmp_path, [bad, after, other])
    assert report.telemetry["turns_failed"] == 1


# -- The reconciler ------------------------------------------------------------------------


async def test_the_reconciler_rewakes_conversations_left_without_a_job(redis, fleet_env, tmp_path):
    async with Producer(redis=redis) as producer:
        lost_job, no_marker, behind, healthy = await producer.enqueue_turns([
            {"conversation_id": "r-1", "customer_id": "C-100", "text": "Where is order 1042?"},
            {"conversation_id": "r-2", "customer_id": "C-100", "text": "Hello there"},
            {"conversation_id": "r-2", "customer_id": "C-100", "text": "Where is order 1043?"},
            {"conversation_id": "r-3", "customer_id": "C-101", "text": "Where is order 1045?"},
        ])
        # A job deleted by hand (or expired, or failed by arq)...
        await redis.delete(keys.ARQ_JOB_PREFIX + lost_job)
        await redis.zrem(keys.ARQ_QUEUE, lost_job)
        # ...and queued turns whose conversation lost its active marker and job.
        await redis.delete(keys.conversation_active("r-2"), keys.ARQ_JOB_PREFIX + no_marker)
        await redis.zrem(keys.ARQ_QUEUE, no_marker)
        # An in-progress key a worker killed between arq's claim and START left behind.
        await redis.psetex(keys.ARQ_IN_PROGRESS_PREFIX + healthy, 190_000, "1")

        first, second = await asyncio.gather(reconcile(redis, lease_s=LEASE_S), reconcile(redis, lease_s=LEASE_S))
        repairs = sorted((r.conversation_id, r.action, r.turn_id) for r in first.repaired + second.repaired)
        assert repairs == [("r-1", "rewoke", lost_job), ("r-2", "woke", no_marker)]  # each once
        assert first.actions["clamped"] + second.actions["clamped"] == 1
        assert 0 < await redis.pttl(keys.ARQ_IN_PROGRESS_PREFIX + healthy) <= LEASE_S * 1000
        again = await reconcile(redis, lease_s=LEASE_S)
        assert again.repaired == [] and again.actions == {"ok": 3}  # idempotent
        assert await redis.get(keys.conversation_active("r-2")) == no_marker
        assert set(await redis.zrange(keys.ARQ_QUEUE, 0, -1)) == {lost_job, no_marker, healthy}

        run_burst("worker", drill_env(fleet_env), tmp_path)
        results = [await producer.result(t) for t in (lost_job, no_marker, behind, healthy)]
    assert [r.status for r in results] == ["completed"] * 4
    await finish_audit(redis, fleet_env, tmp_path, [lost_job, no_marker, behind, healthy])


async def test_a_worker_reconciles_on_its_own(redis, fleet_env, tmp_path, fleet):
    async with Producer(redis=redis) as producer:
        turn_id = await producer.enqueue_turn(conversation_id="r-9", customer_id="C-100", text="Hello there")
        await redis.delete(keys.ARQ_JOB_PREFIX + turn_id)
        await redis.zrem(keys.ARQ_QUEUE, turn_id)
        worker = fleet.worker(drill_env(fleet_env, TURNFLEET_RECONCILE_EVERY_S="0.5"), "w-r")
        result = await producer.wait(turn_id, timeout_s=30)
    assert result.status == "completed"
    assert worker.stop() == 0
    assert logged(worker, "reconcile.repaired")
    await finish_audit(redis, fleet_env, tmp_path, [turn_id])


# -- Redis restarts --------------------------------------------------------------------------


async def test_a_worker_survives_a_redis_restart(redis, redis_server, fleet_env, tmp_path, fleet):
    worker = fleet.worker(drill_env(fleet_env), "w-s")
    async with Producer(redis=redis) as producer:
        before = await producer.enqueue_turn(conversation_id="s-1", customer_id="C-100", text="Hello there")
        assert (await producer.wait(before, timeout_s=30)).status == "completed"
        # Down until the worker has noticed (arq's poll loop ends: the supervisor takes over),
        # then back on the same port with its data (SIGTERM flushed the AOF).
        await asyncio.to_thread(redis_server.stop)
        await until_or_exit(lambda: logged(worker, "worker.redis_lost"), "the worker to notice", proc=worker)
        await asyncio.to_thread(redis_server.start)

        async def answers() -> bool:
            try:
                return bool(await redis.ping())
            except RedisConnectionError:
                return False

        await until_or_exit(answers, "Redis to answer again")
        after = await producer.enqueue_turn(conversation_id="s-2", customer_id="C-100", text="Where is order 1043?")
        result = await producer.wait(after, timeout_s=40)
    assert result.status == "completed" and result.worker == "w-s"
    assert worker.stop() == 0, worker.output()[-3000:]
    await finish_audit(redis, fleet_env, tmp_path, [before, after])
