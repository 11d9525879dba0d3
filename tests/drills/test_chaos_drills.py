"""Drills 5 and 8: Redis killed under load, and a soak with workers killed at random.

Both end with the audit (tests/drills/audit.py): one outcome per turn, telemetry totals equal
to the model usage of finished attempts, no refund twice.
"""

from __future__ import annotations

import random
from pathlib import Path

from turnfleet.producer import Producer
from turnfleet.telemetry.consumer import caught_up
from tests.drills.audit import audit
from turnfleet import keys
from turnfleet.shell.fleet import FleetProcess

TEXTS = ["Hello", "Where is order 1043?", "I want a refund for order 1042",
         "What's the weather like?", "I want to talk to a human"]


def drill_env(fleet_env: dict[str, str]) -> dict[str, str]:
    return {**fleet_env, "TURNFLEET_TURN_LEASE_S": "2", "TURNFLEET_POLL_DELAY_S": "0.01",
            "TURNFLEET_RETRY_DELAY_S": "0.05", "TURNFLEET_MAX_ATTEMPTS": "5",
            "TURNFLEET_RECONCILE_EVERY_S": "1", "TURNFLEET_CLAIM_IDLE_MS": "1000",
            "TURNFLEET_BLOCK_MS": "200"}


async def wait_all_done(redis, turn_ids: list[str], procs: list[FleetProcess], timeout_s: float = 120) -> None:
    """Follow the results stream until every turn has ended (an event, not a sleep)."""
    import time

    pending, last = set(turn_ids), "0-0"
    deadline = time.monotonic() + timeout_s
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} turns did not end; " + "".join(
            p.output()[-1500:] for p in procs)
        entries = await redis.xread({keys.RESULTS_STREAM: last}, block=500, count=1000)
        for _s, items in entries or []:
            for entry_id, fields in items:
                last = entry_id
                pending.discard(fields.get("turn_id"))


async def wait_telemetry(redis, procs: list[FleetProcess], timeout_s: float = 60) -> None:
    from tests.waiting import until

    try:
        await until(lambda: caught_up(redis), "telemetry to catch up", timeout_s)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {procs[0].output()[-2000:]}") from None


async def test_drill_5_redis_killed_and_restarted_under_load(redis_server, redis, fleet_env, tmp_path: Path):
    env = drill_env(fleet_env)
    procs = [FleetProcess("telemetry", ["telemetry"], env, tmp_path / "telemetry.log").start()]
    procs += [FleetProcess(f"w{i}", ["worker"], {**env, "TURNFLEET_WORKER_NAME": f"w{i}"},
                           tmp_path / f"w{i}.log").start() for i in (1, 2)]
    try:
        async with Producer(redis=redis) as producer:
            ids = await producer.enqueue_turns(
                [{"conversation_id": f"conv-{c}", "customer_id": "C-100", "text": TEXTS[(c + t) % len(TEXTS)]}
                 for c in range(100) for t in range(3)])
        # Kill Redis while turns are in flight; AOF brings back every acknowledged write.
        await redis.xread({keys.RESULTS_STREAM: "0-0"}, block=30_000, count=1)  # some turns ended
        redis_server.kill()
        redis_server.start()
        await redis.connection_pool.disconnect()
        await wait_all_done(redis, ids, procs)
        await wait_telemetry(redis, procs)
        assert all(p.running() for p in procs), "a process died instead of reconnecting"
        report = await audit(redis, ids)
        assert report.statuses()["completed"] == 300
    finally:
        for p in procs:
            p.stop()


async def test_drill_8_soak_with_workers_killed_at_random(redis, fleet_env, tmp_path: Path):
    rng = random.Random(8)
    env = drill_env(fleet_env)
    telemetry = FleetProcess("telemetry", ["telemetry"], env, tmp_path / "telemetry.log").start()
    workers = {i: FleetProcess(f"w{i}", ["worker"], {**env, "TURNFLEET_WORKER_NAME": f"w{i}-0"},
                               tmp_path / f"w{i}-0.log").start() for i in (1, 2)}
    try:
        async with Producer(redis=redis) as producer:
            ids = await producer.enqueue_turns(
                [{"conversation_id": f"soak-{c}", "customer_id": f"C-10{c % 5}",
                  "text": TEXTS[rng.randrange(len(TEXTS))]}
                 for c in range(500) for _t in range(3)])
        last = "0-0"
        for kill in range(5):
            # Let some more turns finish, then SIGKILL a random worker and start a new one.
            target = (kill + 1) * 150
            done = await redis.xlen(keys.RESULTS_STREAM)
            while done < target:
                entries = await redis.xread({keys.RESULTS_STREAM: last}, block=10_000, count=1000)
                for _s, items in entries or []:
                    last = items[-1][0]
                    done += len(items)
                if not entries:
                    break
            victim = rng.choice(sorted(workers))
            workers[victim].kill()
            workers[victim] = FleetProcess(
                f"w{victim}", ["worker"], {**env, "TURNFLEET_WORKER_NAME": f"w{victim}-{kill + 1}"},
                tmp_path / f"w{victim}-{kill + 1}.log").start()
        await wait_all_done(redis, ids, [telemetry, *workers.values()], timeout_s=240)
        await wait_telemetry(redis, [telemetry])
        report = await audit(redis, ids)
        assert sum(report.statuses().values()) == 1500
        failed = {t: [(e.attempt, e.error_type, e.message[:200]) for e in r.errors]
                  for t, r in report.results.items() if r.status == "failed"}
        assert report.statuses()["failed"] == 0, f"failed turns and their attempts' errors: {failed}"
    finally:
        telemetry.stop()
        for w in workers.values():
            w.stop()
