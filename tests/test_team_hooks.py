"""A team's own hooks keep their SDK meaning (issue 16): ``Workflow(hooks=RunHooks)`` is called
for every callback after turnfleet's telemetry hooks, ``Agent(hooks=AgentHooks)`` as the SDK
calls it, and a hook that raises fails the attempt as it would fail ``Runner.run`` — with
turnfleet's events of the attempt still written. A worker's real startup, its job in this
process, real Redis."""

from __future__ import annotations

from tests.apps.hooked_app import agent_hooks, run_hooks
from turnfleet.producer import Producer
from turnfleet.queue import TurnQueue
from turnfleet.telemetry.replay import turn_replay
from turnfleet.workers.job import run_turn
from turnfleet.workers.settings import shutdown, startup
from tests.consuming import drain


async def run_one(redis, redis_url, monkeypatch, conversation: str) -> str:
    monkeypatch.setenv("TURNFLEET_APP", "tests.apps.hooked_app:workflow")
    monkeypatch.setenv("TURNFLEET_MAX_ATTEMPTS", "1")
    ctx = {"redis_url": redis_url}
    await startup(ctx)
    try:
        turn_id = await Producer(redis=redis).enqueue_turn(
            conversation_id=conversation, customer_id="C-100", text="Where is order 1042?", agent="hooked-desk")
        await run_turn(ctx, turn_id, conversation)
    finally:
        await shutdown(ctx)
    return turn_id


async def test_a_workflows_run_hooks_and_agent_hooks_are_called_beside_turnfleets(redis, redis_url, monkeypatch):
    run_hooks.calls.clear()
    run_hooks.fail_on = None
    agent_hooks.calls.clear()
    turn_id = await run_one(redis, redis_url, monkeypatch, "c-hooks")
    assert (await TurnQueue(redis).get(turn_id)).status == "completed"
    assert run_hooks.calls == [
        ("on_agent_start", "Orders"), ("on_llm_end", "Orders"), ("on_tool_start", f"lookup_order:{turn_id}"),
        ("on_tool_end", "lookup_order"), ("on_llm_end", "Orders"), ("on_agent_end", "Orders")]
    assert agent_hooks.calls == ["start:Orders", "tool_end:lookup_order"]
    await drain(redis)
    replay = await turn_replay(redis, turn_id)

    def tools(nodes):
        for node in nodes:
            yield from ([node["name"]] if node["kind"] == "tool" else [])
            yield from tools(node.get("children", []))

    # turnfleet's own hooks recorded the run as before: the tool is in the replay.
    assert list(tools(n for a in replay["attempts"] for n in a["tree"])) == ["lookup_order"]


async def test_a_team_hook_that_raises_fails_the_attempt_as_in_the_sdk(redis, redis_url, monkeypatch):
    run_hooks.calls.clear()
    run_hooks.fail_on = "on_tool_end"
    try:
        turn_id = await run_one(redis, redis_url, monkeypatch, "c-hooks-bad")
    finally:
        run_hooks.fail_on = None
    record = await TurnQueue(redis).get(turn_id)
    assert record.status == "failed"
    assert "the team's on_tool_end hook failed" in (record.error_message or "")
