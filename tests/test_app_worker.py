"""``turnfleet worker --app module:attr`` (issue 16): a worker serves the workflows of an app,
registers them, and runs each turn in its own workflow's agents.

Real worker subprocesses (``--burst``) on the test's Redis; the app is a real module
(``tests/apps/desk_copy.py``).
"""

from __future__ import annotations

import pytest

from turnfleet import keys, registry
from turnfleet.queue import TurnQueue
from tests.apps.desk_copy import workflow as desk_b
from tests.processes import run_burst, tf

APP = "tests.apps.desk_copy:app"


async def test_a_worker_serves_its_apps_workflows_and_registers_them(producer, redis, fleet_env, tmp_path):
    env = {**fleet_env, "TURNFLEET_APP": APP}
    run_burst("worker", env, tmp_path, "register")  # an empty queue: it only starts and registers
    [row] = await registry.versions(redis, "desk-b")
    assert (row["fingerprint"], row["version"]) == (desk_b.fingerprint(), "1.0")
    ours = await producer.enqueue_turn(conversation_id="c-b", customer_id="C-100",
                                       text="Where is order 1042?", agent="desk-b")
    other = await producer.enqueue_turn(conversation_id="c-d", customer_id="C-100", text="Where is order 1042?")
    run_burst("worker", env, tmp_path, "serve")
    queue = TurnQueue(redis)
    done = await queue.get(ours)
    assert (done.status, done.agents) == ("completed", ["Triage", "Orders"])
    assert "1042" in done.final_output
    # A worker never takes a turn of a workflow it does not serve (routing: tests/test_routing.py).
    left = await queue.get(other)
    assert (left.status, left.attempts) == ("queued", 0)


@pytest.mark.parametrize("spec, message", [
    ("tests.apps.desk_copy", "expected module:attribute"),
    ("tests.apps.nowhere:app", "no module named 'tests.apps.nowhere'"),
    ("tests.apps.desk_copy:nothing", "has no attribute 'nothing'"),
])
def test_a_bad_app_is_one_line_and_exit_2(fleet_env, spec, message):
    proc = tf("worker", "--burst", "--app", spec, env=fleet_env)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


async def test_the_built_in_app_registers_the_support_desk(redis, fleet_env, tmp_path):
    run_burst("worker", fleet_env, tmp_path)
    assert [r["name"] for r in await registry.versions(redis, "support-desk")] == ["support-desk"]
    assert await redis.hexists(keys.WORKFLOWS, "support-desk")
