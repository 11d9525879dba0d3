"""Drills 6 and 7 (telemetry half) and trimming: real processes, real crashes, real turns.

Turns are enqueued with the producer and run by a real ``turnfleet worker --burst``; the
telemetry stream they leave is consumed by real ``turnfleet telemetry --burst`` processes
(``turnfleet.shell.fleet.FleetProcess``). A crash between aggregating and acknowledging is the
consumer's documented fault injection (``TURNFLEET_FAULT_CRASH_BEFORE_ACK``): the process
ends with ``os._exit(137)`` right after storing an aggregate, before ``XACK``, as SIGKILL
would leave it. Tests wait on process exits and on Redis state (``XPENDING``, stream
entries), never on a sleep. Each ends with the audit (``tests/drills/audit.py``) over the
real turns and an empty pending list.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from turnfleet.producer import Producer
from turnfleet.telemetry.consumer import DEAD_LETTERED, read_dead_letters
from turnfleet.telemetry.stats import totals
from turnfleet.telemetry.trim import BACKLOG_OVER_LIMIT
from tests.drills.audit import audit
from tests.batches import poison_turn
from tests.consuming import stream_ids
from turnfleet import keys
from turnfleet.shell.fleet import FleetProcess

EXIT_TIMEOUT_S = 60
KILLED = 137  # FAULT_EXIT_CODE: what the fault injection exits with, as a SIGKILL reports

TURNS = [
    ("conv-dana", "C-100", "Hi, I'm Dana Whitfield, customer C-100."),
    ("conv-dana", "C-100", "Where is order 1043?"),
    ("conv-priya", "C-102", "I'd like a refund for order 1047, the headphones stopped working."),
    ("conv-priya", "C-102", "Thanks, bye"),
    ("conv-omar", "C-101", "What's the status of order 1053?"),
    ("conv-omar", "C-101", "I want to talk to a human, please."),
]


async def real_turns(redis: Any, env: dict[str, str], tmp_path: Path, tag: str,
                     turns: list[tuple[str, str, str]] = TURNS) -> list[str]:
    """Enqueue ``turns`` and let a real burst worker run them: one telemetry entry each (the Desk
    without its checks, whose entries these drills do not count)."""
    async with Producer(redis=redis) as producer:
        ids = await producer.enqueue_turns(
            [{"conversation_id": f"{c}-{tag}", "customer_id": cust, "text": text}
             for c, cust, text in turns])
    worker = FleetProcess(f"worker-{tag}", ["worker", "--burst"],
                          {**env, "TURNFLEET_APP": "tests.apps.checked_desk:unchecked"},
                          tmp_path / f"worker-{tag}.log").start()
    assert worker.wait(EXIT_TIMEOUT_S) == 0, worker.output()[-3000:]
    return ids


def telemetry(env: dict[str, str], tmp_path: Path, run: str, **settings: str) -> FleetProcess:
    """A ``turnfleet telemetry --burst`` process, started and waited for (bounded)."""
    proc = FleetProcess(run, ["telemetry", "--burst"], {**env, **settings},
                        tmp_path / f"{run}.log").start()
    proc.wait(EXIT_TIMEOUT_S)
    return proc


def events(proc: FleetProcess, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``proc`` whose event is ``name``."""
    out = []
    for line in proc.output().splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == name:
                out.append(entry)
    return out


async def pending_by_consumer(redis: Any) -> dict[str, int]:
    rows = await redis.xpending_range(keys.TELEMETRY_STREAM, keys.TELEMETRY_GROUP, "-", "+", 1000)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["consumer"]] = counts.get(row["consumer"], 0) + 1
    return counts


async def fleet_counter(redis: Any, field: str) -> int:
    return int(await redis.hget(keys.GLOBAL_AGGREGATE, field) or 0)


async def assert_settled(redis: Any, turn_ids: list[str]) -> None:
    """The drills' ending: the audit holds, nothing is pending, the stream is trimmed."""
    report = await audit(redis, turn_ids)
    assert report.statuses() == {"completed": len(turn_ids)}
    assert report.telemetry["turns_completed"] == len(turn_ids)
    assert (await redis.xpending(keys.TELEMETRY_STREAM, keys.TELEMETRY_GROUP))["pending"] == 0
    assert await redis.xlen(keys.TELEMETRY_STREAM) == 0


# -- drill 6: the consumer dies between aggregating and acknowledging -------------------------------


async def test_drill6_consumer_killed_before_ack_restarts_under_its_name_and_counts_nothing_twice(
    redis, fleet_env, tmp_path
):
    turn_ids = await real_turns(redis, fleet_env, tmp_path, "6a")
    assert await redis.xlen(keys.TELEMETRY_STREAM) == len(turn_ids)

    # Batches of 2; the process dies right after storing the first batch's aggregate.
    crashed = telemetry(fleet_env, tmp_path, "telemetry-crash", TURNFLEET_CONSUMER_NAME="tele-a",
                        TURNFLEET_BATCH_SIZE="2", TURNFLEET_FAULT_CRASH_BEFORE_ACK="1")
    assert crashed.process.returncode == KILLED, crashed.output()[-3000:]
    assert len(events(crashed, "telemetry.fault_injected")) == 1
    assert await pending_by_consumer(redis) == {"tele-a": 2}
    assert (await totals(redis))["turns_completed"] == 2  # stored before the crash

    # Restarted under the same name, it reads its own pending list first (no claim: the
    # default claim_idle_ms is 30 s, and the entries are younger).
    restarted = telemetry(fleet_env, tmp_path, "telemetry-restart",
                          TURNFLEET_CONSUMER_NAME="tele-a", TURNFLEET_BATCH_SIZE="2")
    assert restarted.process.returncode == 0, restarted.output()[-3000:]
    assert events(restarted, "telemetry.claimed") == []
    await assert_settled(redis, turn_ids)


async def test_drill6_second_consumer_claims_a_dead_consumers_entries_and_counts_nothing_twice(
    redis, fleet_env, tmp_path
):
    turn_ids = await real_turns(redis, fleet_env, tmp_path, "6b")

    # The first batch (2 entries) is acknowledged; the process dies after storing the second's.
    crashed = telemetry(fleet_env, tmp_path, "telemetry-crash", TURNFLEET_CONSUMER_NAME="tele-b",
                        TURNFLEET_BATCH_SIZE="2", TURNFLEET_FAULT_CRASH_BEFORE_ACK="3")
    assert crashed.process.returncode == KILLED, crashed.output()[-3000:]
    assert await pending_by_consumer(redis) == {"tele-b": 2}
    assert (await totals(redis))["turns_completed"] == 4

    survivor = telemetry(fleet_env, tmp_path, "telemetry-survivor",
                         TURNFLEET_CONSUMER_NAME="tele-c", TURNFLEET_CLAIM_IDLE_MS="1")
    assert survivor.process.returncode == 0, survivor.output()[-3000:]
    claimed = events(survivor, "telemetry.claimed")
    assert [(e["consumer"], e["entries"]) for e in claimed] == [("tele-c", 2)]
    await assert_settled(redis, turn_ids)


# -- drill 7 (telemetry half): a poison entry and a malformed one -----------------------------------


async def test_drill7_poison_and_malformed_entries_are_dead_lettered_and_everything_else_flows(
    redis, fleet_env, tmp_path
):
    # Raw XADDs around the real turns' entries: the poison first (valid JSON and events, but
    # a turn duration the planner cannot bucket), the malformed one last (raw on purpose: no
    # worker writes a cut-off array, so the hooks cannot build it).
    poison = {"turn_id": "poison-1", "batch": poison_turn("poison-1").batch_json()}
    poison_id = await redis.xadd(keys.TELEMETRY_STREAM, poison)
    turn_ids = await real_turns(redis, fleet_env, tmp_path, "7")
    garbage = {"turn_id": "garbage-1", "batch": '[{"kind": "llm_end", "usage": {"input_tok'}
    garbage_id = await redis.xadd(keys.TELEMETRY_STREAM, garbage)

    run = telemetry(fleet_env, tmp_path, "telemetry", TURNFLEET_DEAD_LETTER_AFTER="3",
                    TURNFLEET_BATCH_SIZE="4")
    assert run.process.returncode == 0, run.output()[-3000:]

    failed = [(e["entry_id"], e["deliveries"]) for e in events(run, "telemetry.entry_failed")]
    assert failed == [(poison_id, 1), (poison_id, 2)]
    assert [e["entry_id"] for e in events(run, "telemetry.dead_lettered")] == [poison_id]
    dead = {d.entry_id: d for d in await read_dead_letters(redis)}
    assert set(dead) == {poison_id, garbage_id}
    assert (dead[poison_id].reason, dead[poison_id].stage, dead[poison_id].deliveries) == (
        "error", "plan", 3)
    assert dead[poison_id].error.startswith("ValueError") and dead[poison_id].fields == poison
    assert (dead[garbage_id].reason, dead[garbage_id].deliveries) == ("malformed", 1)
    assert dead[garbage_id].fields == garbage
    assert await fleet_counter(redis, DEAD_LETTERED) == 2
    assert await fleet_counter(redis, "telemetry_malformed") == 1
    await assert_settled(redis, turn_ids)


# -- trimming ---------------------------------------------------------------------------------------


async def test_stream_is_trimmed_to_the_unacknowledged_tail_and_a_pending_entry_is_never_trimmed(
    redis, fleet_env, tmp_path
):
    first = await real_turns(redis, fleet_env, tmp_path, "t1", TURNS[:3])
    run = telemetry(fleet_env, tmp_path, "telemetry-1")
    assert run.process.returncode == 0, run.output()[-3000:]
    assert await stream_ids(redis) == []  # every entry acknowledged: every entry dropped
    assert (await totals(redis))["turns_completed"] == 3

    second = await real_turns(redis, fleet_env, tmp_path, "t2", TURNS[3:])
    tail = await stream_ids(redis)
    assert len(tail) == 3
    # A consumer reads the oldest new entry and stalls: it is pending, under 30 s idle.
    reply = await redis.xreadgroup(keys.TELEMETRY_GROUP, "stalled", {keys.TELEMETRY_STREAM: ">"},
                                   count=1)
    assert reply[0][1][0][0] == tail[0]
    run = telemetry(fleet_env, tmp_path, "telemetry-2", TURNFLEET_TELEMETRY_MAX_ENTRIES="2")
    assert run.process.returncode == 0, run.output()[-3000:]
    assert await pending_by_consumer(redis) == {"stalled": 1}
    assert await stream_ids(redis) == tail  # from the pending entry on, nothing dropped
    # The tail (3) is over the limit (2): counted and logged, not trimmed into.
    [over] = events(run, "telemetry.backlog_over_limit")
    assert (over["backlog"], over["limit"], over["oldest_needed"]) == (3, 2, tail[0])
    assert await fleet_counter(redis, BACKLOG_OVER_LIMIT) == 1

    survivor = telemetry(fleet_env, tmp_path, "telemetry-3", TURNFLEET_CLAIM_IDLE_MS="1")
    assert survivor.process.returncode == 0, survivor.output()[-3000:]
    await assert_settled(redis, first + second)
