"""The example app (``examples/it_helpdesk``), a second workflow that is not customer support,
through the whole fleet on unchanged code paths (issue 16, "what it must show" 1, 2 and 5).

Real worker and telemetry subprocesses serving ``--app examples.it_helpdesk:app``, the real
CLI, a real Redis per test; where a model call must be held, the local OpenAI-compatible
server (``tests/llm_server.py``) answering with the helpdesk's own script.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

from examples.it_helpdesk import app as helpdesk
from examples.it_helpdesk.script import HELPDESK_SCRIPT
from turnfleet import keys, registry
from turnfleet.producer import Producer
from turnfleet.queue import TurnQueue
from turnfleet.shell.fleet import FleetProcess
from turnfleet.telemetry.alert_reads import read_alerts
from turnfleet.telemetry.stats import conversation_stats
from tests.drills.test_worker_drills import drill_env, fleet, polling  # noqa: F401 - the fixture
from tests.llm_server import llm_server  # noqa: F401 - the fixture
from tests.processes import run_burst, start_burst, tf, until_or_exit
from tests.redis_scan import find_mentions
from tests.test_observability import dump_telemetry_keys
from tests.test_otlp import Receiver

APP = "examples.it_helpdesk:app"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "it_helpdesk"
RESET_LEDGER = f"{keys.LEDGER_PREFIX}it-password-resets"
RESET_DONE = "Done: the password of jane.doe is reset (reset PR-"


def nodes(tree: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(kind, name) of every node of a replay tree, depth first."""
    out: list[tuple[str, str]] = []
    for node in tree:
        out.append((node["kind"], node["name"]))
        out += nodes(node["children"])
    return out


def tool_nodes(tree: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    found = []
    for node in tree:
        if node["kind"] == "tool" and node["name"] == name:
            found.append(node)
        found += tool_nodes(node["children"], name)
    return found


async def helpdesk_known(redis) -> None:
    """it-helpdesk as a worker serving it registers it (the edges refuse an unknown workflow)."""
    await registry.register(redis, [registry.Registration(helpdesk.name, helpdesk.fingerprint(), helpdesk.version)],
                            "w-register")


def test_the_example_imports_only_turnfleet_and_the_agents_sdk():
    """What a team would write: no turnfleet internals (``turnfleet.workers`` ...)."""
    imported = set()
    for path in EXAMPLE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module)
    assert {m for m in imported if m.split(".")[0] in ("turnfleet", "agents")} == {"turnfleet", "agents"}
    assert all(m.split(".")[0] in ("turnfleet", "agents", "__future__", "hashlib", "json", "pathlib", "typing")
               for m in imported), imported


# -- a. enqueue --agent it-helpdesk → its own pool → result → telemetry → replay ---------------


async def test_a_helpdesk_conversation_runs_end_to_end_in_its_own_pool(
    redis, fleet_env, tmp_path, llm_server  # noqa: F811
):
    server = llm_server(script=HELPDESK_SCRIPT)
    env = server.worker_env(fleet_env, TURNFLEET_APP=APP, TURNFLEET_WORKER_NAME="helpdesk-1")
    pool = FleetProcess("helpdesk-1", ["worker"], env, tmp_path / "helpdesk-1.log").start()
    try:
        # Registered by the worker itself (before its first heartbeat): the CLI's edge knows it.
        await until_or_exit(lambda: redis.zscore(keys.WORKERS, "helpdesk-1"), "the pool's heartbeat", proc=pool)
        turns = []
        for text in ("Hi, I forgot my password. My username is jane.doe.", "And is bob.smith's account active?"):
            enqueued = tf("enqueue", "--agent", "it-helpdesk", "--conversation", "it-1", "--customer", "C-100",
                          text, env=fleet_env)
            assert enqueued.returncode == 0, enqueued.stderr
            turns.append(enqueued.stdout.strip())
        async with Producer(redis=redis) as producer:
            first, second = [await producer.wait(t, timeout_s=30) for t in turns]
    finally:
        assert pool.stop() == 0, pool.output()[-3000:]
    assert (first.status, first.worker, first.agents) == ("completed", "helpdesk-1", ["Helpdesk", "Accounts"])
    assert [c.tool for c in first.tool_calls] == ["reset_password"]
    assert first.final_output.startswith(RESET_DONE)
    # The conversation stands at Accounts: the next turn starts there.
    assert (second.status, second.agents, [c.tool for c in second.tool_calls]) == (
        "completed", ["Accounts"], ["lookup_account"])
    assert second.final_output.startswith("Bob Smith's account (bob.smith) is active")
    # Nothing of it went through the built-in Support Desk's queue.
    assert await redis.zcard(keys.ARQ_QUEUE) == 0

    run_burst("telemetry", fleet_env, tmp_path)
    served = server.usage_served()
    totals = await conversation_stats(redis, "it-1")
    assert {k: totals[k] for k in ("turns_completed", "llm_calls", "tool_calls", "handoffs", "input_tokens",
                                   "output_tokens", "cached_tokens")} == {
        "turns_completed": 2, "llm_calls": served["requests"], "tool_calls": 2, "handoffs": 1,
        "input_tokens": served["input_tokens"], "output_tokens": served["output_tokens"],
        "cached_tokens": served["cached_tokens"]}
    assert served["requests"] == 5  # handoff, reset, answer; lookup, answer
    assert totals["cost_usd"] > 0
    # By workflow and by version: the turns are the helpdesk's, at the version its pool runs.
    label = helpdesk.version_label()
    assert {(r.workflow, r.version) for r in (first, second)} == {("it-helpdesk", label)}
    tokens = served["input_tokens"] + served["output_tokens"]
    for by, subject in (("workflow", ("it-helpdesk", None)), ("version", ("it-helpdesk", label))):
        stats = tf("stats", "--by", by, "--json", env=fleet_env)
        assert stats.returncode == 0, stats.stderr
        [row] = [r for r in json.loads(stats.stdout)["rows"] if r["workflow"] == "it-helpdesk"]
        assert (row["workflow"], row.get("version"), row["turns_completed"], row["total_tokens"]) == (
            *subject, 2, tokens), by

    replayed = tf("conversation", "it-1", "--json", env=fleet_env)
    assert replayed.returncode == 0, replayed.stderr
    replay = json.loads(replayed.stdout)
    trees = [t["attempts"][-1]["tree"] for t in replay["turns"]]
    assert [(k, n) for k, n in nodes(trees[0]) if k in ("agent", "tool", "handoff")] == [
        ("agent", "Helpdesk"), ("handoff", "Helpdesk → Accounts"), ("agent", "Accounts"), ("tool", "reset_password")]
    assert [(k, n) for k, n in nodes(trees[1]) if k in ("agent", "tool")] == [
        ("agent", "Accounts"), ("tool", "lookup_account")]


# -- b. two apps in two pools at once ---------------------------------------------------------


async def test_the_desk_and_the_helpdesk_in_two_pools_each_serve_only_their_own_turns(
    redis, producer, fleet_env, tmp_path
):
    """tests/test_routing.py proves routing on a copy of the Desk; here, the example app beside
    the built-in Desk: every turn is served by its own pool, and a conversation's next turn waits
    for its own pool while the other one runs and takes nothing of it."""
    await helpdesk_known(redis)
    pools = {"it-helpdesk": {**fleet_env, "TURNFLEET_APP": APP, "TURNFLEET_WORKER_NAME": "pool-it"},
             "support-desk": {**fleet_env, "TURNFLEET_WORKER_NAME": "pool-desk"}}

    async def enqueue(desk_text: str, it_text: str) -> dict[str, str]:
        return {await producer.enqueue_turn(conversation_id="desk-1", customer_id="C-100", text=desk_text):
                "support-desk",
                await producer.enqueue_turn(conversation_id="it-1", customer_id="C-100", text=it_text,
                                            agent="it-helpdesk"): "it-helpdesk"}

    first = await enqueue("Where is order 1042?", "I forgot my password: jane.doe")
    running = [start_burst("worker", env, tmp_path, f"{name}-1") for name, env in pools.items()]
    for proc in running:
        assert proc.wait(120) == 0, proc.output()[-3000:]
    queue = TurnQueue(redis)
    done = {t: await queue.get(t) for t in first}
    assert {t: (r.status, r.worker) for t, r in done.items()} == {
        t: ("completed", "pool-it" if w == "it-helpdesk" else "pool-desk") for t, w in first.items()}

    second = await enqueue("And order 1043?", "Is bob.smith locked?")
    run_burst("worker", pools["support-desk"], tmp_path, "support-desk-2")  # the Desk's pool alone
    [desk_turn] = [t for t, w in second.items() if w == "support-desk"]
    [it_turn] = [t for t, w in second.items() if w == "it-helpdesk"]
    assert ((await queue.get(desk_turn)).status, (await queue.get(desk_turn)).worker) == ("completed", "pool-desk")
    left = await queue.get(it_turn)
    assert (left.status, left.attempts) == ("queued", 0)
    assert await redis.zscore(keys.workflow_queue("it-helpdesk"), it_turn) is not None
    run_burst("worker", pools["it-helpdesk"], tmp_path, "it-helpdesk-2")
    done = await queue.get(it_turn)
    assert (done.status, done.worker, done.agents) == ("completed", "pool-it", ["Accounts"])
    assert "bob.smith" in done.final_output


# -- c. reset_password under a worker SIGKILL mid-turn: once ----------------------------------


async def test_a_password_is_reset_once_when_its_worker_is_killed_after_the_tool_ran(
    redis, fleet_env, tmp_path, fleet, llm_server  # noqa: F811
):
    server = llm_server(script=HELPDESK_SCRIPT)
    server.hold(after_tool="reset_password")  # the model call after the reset: the tool has run
    env = drill_env(fleet_env, server, TURNFLEET_APP=APP)
    a, b = fleet.worker(env, "it-a"), fleet.worker(env, "it-b")
    await polling(redis, "it-a", "it-b")
    async with Producer(redis=redis) as producer:
        turn = await producer.enqueue_turn(conversation_id="it-kill", customer_id="C-100",
                                           text="I'm locked out, please reset jane.doe", agent="it-helpdesk")
        await server.wait_held(1, timeout=30)
        assert len(await redis.xrange(RESET_LEDGER)) == 1  # the reset happened, on attempt 1
        holder = await redis.hget(keys.turn(turn), "worker")
        victim, survivor = (a, "it-b") if holder == "it-a" else (b, "it-a")
        victim.kill()  # SIGKILL mid-turn, after the side effect
        server.release()
        result = await producer.wait(turn, timeout_s=30)
    assert (result.status, result.attempts, result.worker) == ("completed", 2, survivor)
    assert [(e.attempt, e.error_type) for e in result.errors] == [(1, "WorkerLost")]
    [entry] = [fields for _id, fields in await redis.xrange(RESET_LEDGER)]  # exactly one reset
    assert result.final_output.startswith(RESET_DONE)
    assert f"(reset {entry['reset_id']})" in result.final_output  # attempt 2 answers attempt 1's reset
    [call] = result.tool_calls
    assert (call.tool, json.loads(call.output)["replayed"]) == ("reset_password", True)

    for proc in fleet.procs:
        if proc.running():
            assert proc.stop() == 0, proc.output()[-3000:]
    run_burst("telemetry", fleet_env, tmp_path)
    replay = json.loads(tf("turn", turn, "--json", env=fleet_env).stdout)
    last = replay["attempts"][-1]
    assert last["attempt"] == 2
    [node] = tool_nodes(last["tree"], "reset_password")
    assert node["detail"]["outcome"] == "replayed"
    assert node["detail"]["once"] == {"created": False, "replayed": True, "already": False}


# -- d. the unchanged paths: redaction, alerts, OTLP, erasure ---------------------------------


async def test_a_helpdesk_conversation_with_an_email_is_redacted_alerted_exported_and_forgotten(
    redis, redis_url, producer, fleet_env, tmp_path
):
    email = "jane.doe@acme.example"
    await helpdesk_known(redis)
    with Receiver() as receiver:
        env = {**fleet_env, "TURNFLEET_APP": APP, "TURNFLEET_OTLP_ENDPOINT": receiver.endpoint,
               "TURNFLEET_ALERT_CONVERSATION_COST_USD": "0.000001"}
        turn = await producer.enqueue_turn(conversation_id="it-pii", customer_id="C-100", agent="it-helpdesk",
                                           text=f"Hi, I forgot my password, my e-mail is {email}")
        worker = run_burst("worker", env, tmp_path)
        result = await producer.result(turn)
        assert result.status == "completed" and result.final_output.startswith(RESET_DONE)
        assert email in result.tool_calls[0].arguments  # the turn's own record keeps the words
        telemetry = run_burst("telemetry", env, tmp_path)
        spans = receiver.wait_for_spans(1)
    dumped = await dump_telemetry_keys(redis)
    assert "[REDACTED:email]" in dumped[keys.trace(turn)]
    replay = tf("conversation", "it-pii", "--json", env=fleet_env)
    assert "[REDACTED:email]" in replay.stdout and "reset_password" in replay.stdout
    alerts = [a for _i, a in await read_alerts(redis) if a.conversation_id == "it-pii"]
    assert [a.rule for a in alerts] == ["conversation_cost"]
    assert any(s["name"] == "reset_password" or "reset_password" in json.dumps(s["attributes"]) for s in spans)
    everything = "\n".join([*dumped.values(), replay.stdout, worker.output(), telemetry.output(),
                            json.dumps(spans), *(a.model_dump_json() for a in alerts)])
    assert email not in everything

    forgot = tf("forget", "--conversation", "it-pii", env=fleet_env)
    assert forgot.returncode == 0, forgot.stderr
    assert tf("conversation", "it-pii", env=fleet_env).returncode == 1
    assert await find_mentions([redis_url], [email, "it-pii"], except_prefixes=[keys.LEDGER_PREFIX]) == []
