"""Format versions and skew during a rolling deploy (issue 15 item 5, ``turnfleet.versions``).

Version 1 written the way processes wrote it before versions existed (no version field) must
still read; version 2, written by hand as a newer process would, must be left for a newer
process: the job stays queued, the turn's attempts stay 0, a telemetry entry stays pending
however often it is delivered and is never dead-lettered, and health and /metrics say so.
Real Redis, real worker processes, real consumers.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.batches import AttemptBatch
from tests.processes import run_burst
from tests.test_telemetry import TURN_COST_NUSD, pending, settings, support_turn
from tests.waiting import until
from turnfleet import keys, versions
from turnfleet.models import TurnRequest
from turnfleet.producer import Producer
from turnfleet.queue import NEWER_FUNCTION, UNDECODABLE_FUNCTION, TurnQueue, deserialize_job
from turnfleet.shell.fleet import FleetProcess
from turnfleet.telemetry.consumer import DEAD_LETTERED, TelemetryConsumer
from turnfleet.telemetry.metrics import exposition
from turnfleet.telemetry.stats import totals, turn_stats

WAIT_S = 60.0


async def enqueue(redis: Any, turn_id: str, conversation_id: str, customer_id: str = "cust-v") -> None:
    req = TurnRequest(turn_id=turn_id, conversation_id=conversation_id, customer_id=customer_id,
                      text="Where is my order ORD-1001?")
    assert await TurnQueue(redis).enqueue(req)


async def job_of(redis: Any, turn_id: str) -> dict[str, Any]:
    return json.loads(await redis.get(keys.ARQ_JOB_PREFIX + turn_id))


async def rewrite_job(redis: Any, turn_id: str, **changes: Any) -> dict[str, Any]:
    """The turn's arq job with ``changes`` (a value None removes the field), TTL kept."""
    job = await job_of(redis, turn_id)
    for field, value in changes.items():
        if value is None:
            job.pop(field, None)
        else:
            job[field] = value
    await redis.set(keys.ARQ_JOB_PREFIX + turn_id, json.dumps(job), keepttl=True)
    return job


async def left(redis: Any, kind: versions.Kind) -> int:
    return (await versions.read_left(redis))[kind].count


async def fleet_counters(redis: Any) -> dict[str, int]:
    raw = await redis.hgetall(keys.GLOBAL_AGGREGATE)
    return {k: int(raw.get(k) or 0) for k in (DEAD_LETTERED, "telemetry_malformed")}


# -- what this process writes ------------------------------------------------------------------


async def test_this_process_writes_version_1_of_job_record_and_batch(redis: Any, fleet_env: dict[str, str],
                                                                    tmp_path: Path) -> None:
    await enqueue(redis, "t-w1", "c-w")
    await enqueue(redis, "t-w2", "c-w")  # its job is written by the finish script's wake
    assert (await job_of(redis, "t-w1"))["v"] == versions.JOB == 1
    assert await redis.hget(keys.turn("t-w1"), "v") == str(versions.TURN_RECORD) == "1"
    run_burst("worker", fleet_env, tmp_path)
    for turn_id in ("t-w1", "t-w2"):
        assert await redis.hget(keys.turn(turn_id), "status") == "completed"
        assert await redis.hget(keys.turn(turn_id), "v") == "1"
    entries = await redis.xrange(keys.TELEMETRY_STREAM)
    # (Each turn's check entry, issue 17, is of its own version: workers/check_job.py.)
    turns = [fields for _, fields in entries if fields["v"] != str(versions.BATCH_CHECK)]
    assert [fields["turn_id"] for fields in turns] == ["t-w1", "t-w2"]
    assert {fields["v"] for fields in turns} == {str(versions.BATCH)} == {"1"}


async def test_the_reconciler_writes_a_missing_job_at_version_1(redis: Any) -> None:
    await enqueue(redis, "t-r1", "c-r")
    await redis.delete(keys.ARQ_JOB_PREFIX + "t-r1")
    done = await TurnQueue(redis).reconcile_conversation("c-r")
    assert done.action == "rewoke"
    assert (await job_of(redis, "t-r1"))["v"] == versions.JOB


# -- reading version 1 as written before versions existed ---------------------------------------


async def test_a_job_record_and_batch_without_version_fields_are_read_as_version_1(
        redis: Any, fleet_env: dict[str, str], tmp_path: Path) -> None:
    # As today's processes wrote them: no "v" in the job, the record or the stream entry.
    await enqueue(redis, "t-o1", "c-o")
    await enqueue(redis, "t-o2", "c-o")
    await rewrite_job(redis, "t-o1", v=None)
    for turn_id in ("t-o1", "t-o2"):
        await redis.hdel(keys.turn(turn_id), "v")
    assert "v" not in await job_of(redis, "t-o1")
    run_burst("worker", fleet_env, tmp_path)
    for turn_id in ("t-o1", "t-o2"):
        assert await redis.hget(keys.turn(turn_id), "status") == "completed"
        assert await redis.hget(keys.turn(turn_id), "attempts") == "1"
    await support_turn("t-o3", "c-o2").send(redis)  # XADD turn_id + batch only, no "v"
    assert "v" not in (await redis.xrange(keys.TELEMETRY_STREAM))[-1][1]
    await TelemetryConsumer(redis, settings(), name="v1").run(burst=True)
    assert await pending(redis) == 0
    assert (await totals(redis))["turns_completed"] == 3
    assert await left(redis, versions.Kind.batch) == 0


# -- a newer job or turn record: left queued for a newer worker ----------------------------------


def test_deserialize_job_hands_a_newer_job_to_the_leave_function_whatever_its_shape() -> None:
    newer = {"t": 1, "f": "run_turn_v2", "a": ["t-1", "c-1", {"workflow": "x"}], "k": {"p": 1},
             "et": 1, "v": 2}
    job = deserialize_job(json.dumps(newer).encode())
    assert (job["f"], job["a"]) == (NEWER_FUNCTION, [2])
    # The same shape without a version is undecodable, as before: a version-1 job of another shape.
    assert deserialize_job(json.dumps({**newer, "v": 1}).encode())["f"] == UNDECODABLE_FUNCTION
    assert deserialize_job(json.dumps({**newer, "v": "two"}).encode())["f"] == UNDECODABLE_FUNCTION


@pytest.fixture
def skew_env(fleet_env: dict[str, str]) -> dict[str, str]:
    """A worker that puts a left job back 50 ms later, and whose arq ``max_tries`` is 13
    (1 + 2 × 1 + 10): a leave that counted as an arq try would exhaust it within 14 leaves."""
    return {**fleet_env, "TURNFLEET_RETRY_DELAY_S": "0.05", "TURNFLEET_MAX_ATTEMPTS": "1",
            "TURNFLEET_ISOLATED_LOSSES": "1", "TURNFLEET_WORKER_NAME": "w-old"}


async def test_a_newer_job_and_a_newer_turn_record_are_left_queued_never_failed_or_counted(
        redis: Any, redis_url: str, skew_env: dict[str, str], tmp_path: Path,
        turnfleet_cmd: list[str]) -> None:
    # c-job: its head's job is version 2 (another shape too); c-rec: its head's turn record is
    # version 2, with a request field this process does not know (its START would fail it);
    # c-ok: an ordinary turn, which the same worker runs meanwhile.
    await enqueue(redis, "t-job", "c-job")
    await enqueue(redis, "t-job-next", "c-job")
    newer_job = await rewrite_job(redis, "t-job", v=2, k={"workflow": "support-desk@2"})
    await enqueue(redis, "t-rec", "c-rec")
    request = json.loads(await redis.hget(keys.turn("t-rec"), "request"))
    await redis.hset(keys.turn("t-rec"), mapping={
        "v": 2, "request": json.dumps({**request, "workflow_version": "2"})})
    record_before = await redis.hgetall(keys.turn("t-rec"))
    await enqueue(redis, "t-ok", "c-ok")

    worker = FleetProcess("worker", ["worker"], skew_env, tmp_path / "worker.log").start()
    try:
        leaves = 15  # more than arq's max_tries (13)

        async def both_left_often() -> bool:
            return (await left(redis, versions.Kind.job) >= leaves
                    and await left(redis, versions.Kind.turn) >= leaves)

        await until(both_left_often, "both turns left more often than arq's max_tries", WAIT_S,
                    gave_up=lambda: None if worker.running else "the worker exited")
        async with Producer(redis=redis) as producer:  # waits on the results stream: an event
            done = await producer.wait("t-ok", timeout_s=WAIT_S)
        assert done is not None and done.status == "completed"

        # Health and metrics say so while it happens.
        probe = subprocess.run([*turnfleet_cmd, "health", "--role", "worker"], env=skew_env,
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0, probe.stderr
        [note] = [line for line in probe.stdout.splitlines() if "newer-format" in line]
        assert "waiting for a newer process" in note and "job" in note and "turn" in note
        assert "batch" not in note
        metrics = (await exposition(redis, 15.0)).decode()
        for kind in ("job", "turn"):
            [line] = [x for x in metrics.splitlines()
                      if x.startswith(f'turnfleet_newer_format_left_total{{kind="{kind}"}}')]
            assert float(line.split()[-1]) >= leaves
        assert 'turnfleet_newer_format_left_total{kind="batch"} 0.0' in metrics
    finally:
        worker.stop()

    # The newer job: still there as written, still queued; its turn untouched.
    assert await job_of(redis, "t-job") == newer_job
    assert await redis.zscore(keys.ARQ_QUEUE, "t-job") is not None
    assert await redis.hget(keys.turn("t-job"), "attempts") == "0"
    assert await redis.hget(keys.turn("t-job"), "status") == "queued"
    assert await redis.hget(keys.turn("t-job-next"), "status") == "queued"
    # The newer record: not one field changed, no attempt error; its job still queued.
    assert await redis.hgetall(keys.turn("t-rec")) == record_before
    assert record_before["attempts"] == "0"
    assert await redis.llen(keys.turn_errors("t-rec")) == 0
    assert (await job_of(redis, "t-rec"))["f"] == "run_turn"
    shown = await TurnQueue(redis).get("t-rec")  # what `turnfleet turn` and the HTTP API answer
    assert shown is not None and shown.status == "queued"
    assert "written by a newer turnfleet (turn record format 2" in (shown.error_message or "")
    assert await redis.zscore(keys.ARQ_QUEUE, "t-rec") is not None
    # Nothing of either reached the results or telemetry; the ordinary turn did.
    results = [f["turn_id"] for _, f in await redis.xrange(keys.RESULTS_STREAM)]
    assert results == ["t-ok"]
    assert [f["turn_id"] for _, f in await redis.xrange(keys.TELEMETRY_STREAM)
            if f.get("v") != str(versions.BATCH_CHECK)] == ["t-ok"]
    # Logged once per turn, not at every leave.
    logged = [json.loads(line) for line in worker.output().splitlines()
              if "turn.newer_format_left" in line]
    assert sorted((x["turn_id"], x["kind"]) for x in logged) == [("t-job", "job"), ("t-rec", "turn")]


# -- a newer telemetry batch: pending until a consumer that reads it takes it --------------------


class NewerConsumer(TelemetryConsumer):
    """What a consumer of the next version is, as far as this test needs: it reads the batch
    version after this one's (whose events, here, are ones this code knows)."""

    reads_batch_version = versions.BATCH_READ + 1


async def send_v2(redis: Any, batch: AttemptBatch | str) -> str:
    raw = batch if isinstance(batch, str) else batch.batch_json()
    return await redis.xadd(keys.TELEMETRY_STREAM, {"turn_id": "t-new", "v": str(versions.BATCH_READ + 1),
                                                       "batch": raw})


async def deliveries(redis: Any, entry_id: str) -> int:
    [row] = await redis.xpending_range(keys.TELEMETRY_STREAM, keys.TELEMETRY_GROUP, entry_id, entry_id, 1)
    return row["times_delivered"]


async def test_a_newer_batch_stays_pending_never_dead_lettered_until_a_newer_consumer_counts_it_once(
        redis: Any) -> None:
    await support_turn("t-old", "c-1").send(redis)  # version 1, no "v": counted now
    newer = await send_v2(redis, support_turn("t-new", "c-2"))
    old = TelemetryConsumer(redis, settings(dead_letter_after=2), name="old")
    with capture_logs() as logs:
        for _ in range(4):  # each run re-reads the own pending list: one more delivery each
            old.hold_here()
            await old.run(burst=True)
    assert await deliveries(redis, newer) == 4  # twice past dead_letter_after
    pending_now = await redis.xpending_range(keys.TELEMETRY_STREAM, keys.TELEMETRY_GROUP, "-", "+", 10)
    assert [row["message_id"] for row in pending_now] == [newer]
    assert await redis.xlen(keys.TELEMETRY_DEAD_LETTER) == 0
    assert await fleet_counters(redis) == {DEAD_LETTERED: 0, "telemetry_malformed": 0}
    assert (await totals(redis))["turns_completed"] == 1
    assert await turn_stats(redis, "t-new") == {}
    assert await left(redis, versions.Kind.batch) == 4
    assert [x["entry_id"] for x in logs if x["event"] == "telemetry.newer_format_left"] == [newer]

    note = versions.waiting_note(await versions.read_left(redis))
    assert note is not None and "batch (left 4 times" in note
    assert 'turnfleet_newer_format_left_total{kind="batch"} 4.0' in (await exposition(redis, 15.0)).decode()

    # A consumer that reads version 2 claims it and counts it, exactly once.
    for _ in range(2):
        await NewerConsumer(redis, settings(claim_idle_ms=0), name="new").run(burst=True)
    assert await pending(redis) == 0
    row = await turn_stats(redis, "t-new")
    assert row["turns_completed"] == 1 and row["cost_usd"] == TURN_COST_NUSD / 10**9
    assert (await totals(redis))["turns_completed"] == 2
    assert await redis.xlen(keys.TELEMETRY_DEAD_LETTER) == 0


async def test_an_unknown_event_kind_is_left_in_a_newer_batch_and_malformed_in_a_version_1_batch(
        redis: Any) -> None:
    events = json.loads(support_turn("t-k", "c-k").batch_json())
    events.append({**events[-1], "event_id": "t-k:1:99", "seq": 99, "kind": "judge_scored",
                   "detail": {"score": 0.9}})
    raw = json.dumps(events)
    v1 = await redis.xadd(keys.TELEMETRY_STREAM, {"turn_id": "t-k", "batch": raw})
    v2 = await send_v2(redis, raw)
    await TelemetryConsumer(redis, settings(dead_letter_after=2), name="old").run(burst=True)
    # Version 1 with a kind it does not know: malformed and dead-lettered, as before (a writer
    # that adds a kind writes a newer batch version). Version 2: left pending, untouched.
    [dead] = await redis.xrange(keys.TELEMETRY_DEAD_LETTER)
    assert (dead[1]["entry_id"], dead[1]["reason"]) == (v1, "malformed")
    pending_now = await redis.xpending_range(keys.TELEMETRY_STREAM, keys.TELEMETRY_GROUP, "-", "+", 10)
    assert [row["message_id"] for row in pending_now] == [v2]
    assert await left(redis, versions.Kind.batch) == 1


async def test_a_version_field_that_is_no_version_makes_the_entry_malformed(redis: Any) -> None:
    await redis.xadd(keys.TELEMETRY_STREAM, {"turn_id": "t-x", "v": "two",
                                             "batch": support_turn("t-x").batch_json()})
    await TelemetryConsumer(redis, settings(), name="c").run(burst=True)
    assert await pending(redis) == 0
    assert await fleet_counters(redis) == {DEAD_LETTERED: 1, "telemetry_malformed": 1}


# -- the version rules ----------------------------------------------------------------------------


def test_version_of_reads_absent_as_1_and_refuses_what_is_no_version() -> None:
    assert [versions.version_of(x) for x in (None, "1", b"2", 3, "12")] == [1, 1, 2, 3, 12]
    assert [versions.version_of(x) for x in ("0", 0, -1, "x", True, 1.5, "", "١")] == [None] * 8


def test_health_says_nothing_once_the_last_leave_is_past_the_window() -> None:
    now = 1_000_000_000
    recent = versions.Left(versions.Kind.job, 3, now - 1000)
    old = versions.Left(versions.Kind.batch, 9, now - int(versions.WAITING_WINDOW_S * 1000) - 1)
    note = versions.waiting_note({versions.Kind.job: recent, versions.Kind.batch: old}, now)
    assert note is not None and "job (left 3 times" in note and "batch" not in note
    assert versions.waiting_note({versions.Kind.batch: old}, now) is None
