"""``turnfleet.once`` (issue 16): a team's tool makes its side effect once per turn, or once per
business key, atomically with a ledger entry; the replay shows what a retried attempt got back.

A real worker subprocess runs ``tests/apps/once_app.py`` on the tests' model server, which is
made to fail the model call that follows the tool (a 500, the client not retrying): the
turn's second attempt calls the tool again and gets the first attempt's ticket back.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys

import pytest

from tests.apps.once_app import LEDGER, workflow
from tests.llm_server import llm_server  # noqa: F401 - the fixture
from tests.processes import start_burst
from turnfleet import Once, OnceError, TurnContext, idempotency_key, keys, once, registry
from turnfleet.erasure import forget
from turnfleet.queue import TurnQueue
from turnfleet.telemetry.replay import turn_replay


def tools_in(tree: list[dict]) -> list[dict]:
    found, todo = [], list(tree)
    while todo:
        node = todo.pop(0)
        found += [node] if node["kind"] == "tool" else []
        todo[:0] = node["children"]
    return found


async def test_a_retried_turn_gets_its_once_value_back_once_in_the_ledger_and_the_replay_says_replayed(
        producer, redis, fleet_env, tmp_path, llm_server):  # noqa: F811 - the fixture
    server = llm_server()
    env = server.worker_env(fleet_env, TURNFLEET_APP="tests.apps.once_app:workflow",
                            TURNFLEET_MODEL_MAX_RETRIES="0", TURNFLEET_RETRY_DELAY_S="0.05",
                            # Results and arguments kept out of telemetry; attempt 2's tree
                            # comes from its events (unsampled), attempt 1's from its spans
                            # (a failed attempt is kept whatever the rate).
                            TURNFLEET_TRACE_INCLUDE_SENSITIVE_DATA="false",
                            TURNFLEET_TRACE_SAMPLE_RATE="0")
    await registry.register(redis, [registry.Registration(workflow.name, workflow.fingerprint())], "test")
    turn_id = await producer.enqueue_turn(conversation_id="c-once", customer_id="C-100",
                                          text="I want to talk to a human, please.", agent=workflow.name)
    server.hold()
    worker = start_burst("worker", env, tmp_path, "worker")
    await server.wait_held(1)  # attempt 1 asks what to do
    server.release()
    server.hold()  # it calls the tool; the model call after it waits here
    await server.wait_for(lambda s: s.counts["ok"] == 1 and s.held == 1, 30)
    server.inject("500", times=1)
    server.release()
    assert await asyncio.to_thread(worker.wait, 120) == 0, worker.output()[-3000:]

    done = await TurnQueue(redis).get(turn_id)
    assert (done.status, done.attempts, server.counts["500"]) == ("completed", 2, 1)
    (call,) = done.tool_calls
    answer = json.loads(call.output)
    assert answer["replayed"] is True and answer["filed_in_attempt"] == 1  # the first attempt's ticket
    stored = json.loads(await redis.hget(keys.turn_once(turn_id), "ticket"))
    assert stored["value"] == {k: answer[k] for k in ("ticket_id", "reason", "filed_in_attempt")}
    (entry,) = await redis.xrange(keys.once_ledger(LEDGER))
    assert entry[1]["turn_id"] == turn_id and json.loads(entry[1]["value"]) == stored["value"]
    assert entry[1]["idempotency_key"] == answer["idempotency_key"]

    replay = await turn_replay(redis, turn_id)
    first, second = replay["attempts"]
    assert (first["status"], first["source"], second["status"], second["source"]) == (
        "failed", "trace", "completed", "events")
    (made,) = tools_in(first["tree"])
    (again,) = tools_in(second["tree"])
    assert made["detail"]["once"] == {"created": True, "replayed": False, "already": False}
    assert again["detail"]["once"] == {"created": False, "replayed": True, "already": False}
    assert again["detail"]["outcome"] == "replayed" and "outcome" not in made["detail"]
    assert "result" not in again["detail"] and "result" not in made["detail"]  # data kept out
    once_spans = [n for n in made["children"] if n["kind"] == "custom" and n["name"] == "once:ticket"]
    assert once_spans and once_spans[0]["detail"]["data"]["created"] is True

    # Erasure: the turn's once records go with it (they carry customer data); the ledger stays.
    await forget(redis, customer_id="C-100")
    assert not await redis.exists(keys.turn_once(turn_id))
    assert await redis.xlen(keys.once_ledger(LEDGER)) == 1


def turn(redis, turn_id: str, attempt: int = 1, workflow_name: str = "once-desk") -> TurnContext:
    return TurnContext(turn_id, f"c-{turn_id}", "C-100", attempt, redis, workflow=workflow_name)


async def test_two_turns_racing_on_one_key_make_it_once_and_the_other_gets_it_back_already(redis):
    a, b = turn(redis, "t-a"), turn(redis, "t-b")
    made = await asyncio.gather(*(once(t, "reset", {"by": t.turn_id}, key="acct-7", ledger="resets")
                                  for t in (a, b)))
    assert sorted(m.created for m in made) == [False, True]
    winner, loser = sorted(made, key=lambda m: not m.created)
    assert (loser.already, loser.replayed, loser.value, loser.made_by_turn) == (
        True, False, winner.value, winner.made_by_turn)
    assert loser.idempotency_key == winner.idempotency_key  # per key, whichever turn asks
    assert idempotency_key(turn(redis, "t-z"), "reset", key="acct-7") == winner.idempotency_key
    assert await redis.xlen(keys.once_ledger("resets")) == 1
    retry = await once(turn(redis, winner.made_by_turn, attempt=2), "reset", {"by": "a retry"},
                       key="acct-7", ledger="resets")
    assert (retry.replayed, retry.already, retry.value) == (True, False, winner.value)
    other_workflow = await once(turn(redis, "t-c", workflow_name="elsewhere"), "reset", {"by": "t-c"}, key="acct-7")
    assert other_workflow.created
    # The business key is not in any key name (it may be personal); records are in the ledger.
    names = [k async for k in redis.scan_iter()]
    assert not [k for k in names if "acct-7" in k]
    assert all(k.startswith(keys.LEDGER_PREFIX) for k in names)
    assert await redis.xlen(keys.once_ledger("resets")) == 1


async def test_once_per_turn_is_per_name_and_a_retry_gets_the_first_value(redis):
    first = await once(turn(redis, "t-1"), "mail", {"n": 1})
    again = await once(turn(redis, "t-1", attempt=2), "mail", {"n": 2})
    other = await once(turn(redis, "t-1"), "sms", {"n": 3})
    assert (first.created, again.replayed, again.value, other.created) == (True, True, {"n": 1}, True)
    assert first.idempotency_key == again.idempotency_key != other.idempotency_key
    assert idempotency_key(turn(redis, "t-1"), "mail") == first.idempotency_key  # known before
    assert isinstance(first, Once) and first.made_by_turn == "t-1"


@pytest.mark.parametrize("call, message", [
    (dict(name="a b", value=1), "name 'a b' must be"),
    (dict(name="x", value=1, ledger="tf:refunds"), "ledger 'tf:refunds' must be"),
    (dict(name="x", value=1, ledger=""), "ledger '' must be"),
    (dict(name="x", value={1, 2}), "value must be JSON"),
    (dict(name="x", value=math.nan), "value must be JSON"),
    (dict(name="x", value=1, key=""), "key must be a non-empty string"),
    (dict(name="x", value=1, entry={"a": "b"}), "entry must be a non-empty mapping"),
])
async def test_a_bad_once_call_is_a_clear_error_and_writes_nothing(redis, call, message):
    with pytest.raises(OnceError, match=message):
        await once(turn(redis, "t-1"), **call)
    assert await redis.dbsize() == 0


async def test_once_needs_the_turns_context(redis):
    with pytest.raises(OnceError, match="ctx must be the tool's RunContextWrapper"):
        await once(object(), "x", 1)


def test_importing_the_once_api_does_not_load_the_sdk():
    code = ("import sys; from turnfleet import TurnContext, once, Once, OnceError, idempotency_key; "
            "assert 'agents' not in sys.modules, 'agents loaded'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
