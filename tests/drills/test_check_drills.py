"""The check job under SIGKILL (issue 17): a worker killed while it holds a finished turn's
check job (between the turn's outcome, written by finish.lua, and the check outcomes); another
worker of the pool runs the checks, and each check's outcome is written exactly once.

Real ``turnfleet worker`` subprocesses serving the Desk plus a check that holds on a named
pipe (``tests/apps/checked_desk.py``); leases of 2 s as in the other worker drills.
"""

from __future__ import annotations

import os
from pathlib import Path

from turnfleet.producer import Producer
from tests.drills.test_worker_drills import Fleet, drill_env, fleet, polling  # noqa: F401 - the fixture
from tests.apps.checked_desk import HOLD, STARTED
from tests.processes import until_or_exit
from tests.test_check_job import ENTRIES_PER_TURN, check_entries, stored_checks
from turnfleet import keys
from turnfleet.events import parse_events
from turnfleet.workers.support_desk_checks import SUPPORT_DESK_CHECKS


async def test_a_worker_killed_holding_a_check_job_another_runs_the_checks_once(
        redis, fleet_env, tmp_path: Path, fleet: Fleet):  # noqa: F811
    hold, started = tmp_path / "hold", tmp_path / "started"
    os.mkfifo(hold)  # the held check blocks opening it: no poll
    started.mkdir()
    env = drill_env(fleet_env, TURNFLEET_APP="tests.apps.checked_desk:app", TURNFLEET_MAX_JOBS="1",
                    TURNFLEET_CHECK_JOBS="1", **{HOLD: str(hold), STARTED: str(started)})
    a = fleet.worker(env, "w-a")
    await polling(redis, "w-a")
    async with Producer(redis=redis) as producer:
        first = await producer.enqueue_turn(conversation_id="d1", customer_id="C-100",
                                            text="Please refund order 1042")
        await until_or_exit(lambda: (started / first).exists(), "w-a running the held check", proc=a)
        assert (started / first).read_text() == str(a.process.pid)
        assert (await producer.result(first)).status == "completed"  # the outcome came first
        # The held check takes no turn slot (TURNFLEET_MAX_JOBS=1): the next turn runs meanwhile.
        second = await producer.enqueue_turn(conversation_id="d2", customer_id="C-102", text="Where is order 1047?")
        assert (await producer.wait(second, timeout_s=30)).status == "completed"
        assert not await redis.exists(keys.turn_checks(first))
        a.kill()  # SIGKILL while it holds the check job
        hold.unlink()  # w-b's check finds no pipe and goes on
        b = fleet.worker(env, "w-b")
        for turn_id in (first, second):
            await until_or_exit(lambda t=turn_id: redis.exists(keys.turn_checks(t)), f"{turn_id}'s checks", proc=b)
    assert (started / first).read_text() == str(b.process.pid)  # run again on w-b
    names = [c.name for c in SUPPORT_DESK_CHECKS] + ["held"]
    for turn_id in (first, second):
        outcomes = await stored_checks(redis, turn_id)
        assert list(outcomes) == names
        assert outcomes["held"]["outcome"] == "passed" and outcomes["held"]["reason"] == "released"
        # Exactly once: one entry (once this release's consumer reads them), one event per check.
        entries = await check_entries(redis, turn_id)
        assert len(entries) == ENTRIES_PER_TURN
        for entry in entries:
            assert [e.detail.check for e in parse_events(entry["batch"])] == names
    assert b.stop() == 0, b.output()[-3000:]
