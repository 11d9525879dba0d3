"""Routing (issue 16): a workflow's turns go only to workers that serve it.

Each workflow has its own arq queues (``arq:queue`` / ``arq:queue:isolated`` for the built-in
``support-desk``, ``arq:queue:wf:W`` / ``arq:queue:isolated:wf:W`` for W); every script that
writes a job (enqueue, finish's wake of the next turn, the reconciler, START's isolated
handover) writes it into the queue of the conversation's own workflow. Real Redis, real worker
subprocesses (two pools: ``tests/apps/desk_copy.py``'s ``desk-b`` and the built-in Desk).
"""

from __future__ import annotations

import json

from turnfleet import heartbeat, keys, registry
from turnfleet.models import TurnResult
from turnfleet.queue import Lane, Outcome, TurnQueue
from turnfleet.telemetry.metrics import snapshot
from turnfleet.workers.reconcile import reconcile
from tests.apps.desk_copy import workflow as desk_b
from tests.processes import run_burst, start_burst, tf

APP = "tests.apps.desk_copy:app"
DESK_B_QUEUE = "arq:queue:wf:desk-b"  # literal: the names are part of the promise
DESK_B_ISOLATED = "arq:queue:isolated:wf:desk-b"
T0 = "2025-01-01T00:00:00+00:00"


async def known_desk_b(redis) -> None:
    """desk-b as a worker serving it registers it (the edges refuse an unknown workflow)."""
    await registry.register(redis, [registry.Registration("desk-b", desk_b.fingerprint(), "1.0")], "w-register")


async def queued_in(redis, turn_id: str) -> list[str]:
    """The arq queues that hold ``turn_id``."""
    found = []
    for queue in (keys.ARQ_QUEUE, keys.ISOLATED_QUEUE, DESK_B_QUEUE, DESK_B_ISOLATED):
        if await redis.zscore(queue, turn_id) is not None:
            found.append(queue)
    return found


def test_queue_names():
    assert (keys.workflow_queue("support-desk"), keys.workflow_isolated_queue("support-desk")) == (
        "arq:queue", "arq:queue:isolated")
    assert (keys.workflow_queue("desk-b"), keys.workflow_isolated_queue("desk-b")) == (DESK_B_QUEUE, DESK_B_ISOLATED)


async def test_each_workflows_turns_are_queued_in_its_own_queue(redis, producer):
    await known_desk_b(redis)
    built_in = await producer.enqueue_turn(conversation_id="c-a", customer_id="C-100", text="hi")
    ours = await producer.enqueue_turn(conversation_id="c-b", customer_id="C-100", text="hi", agent="desk-b")
    many = await producer.enqueue_turns([
        {"conversation_id": "c-b2", "customer_id": "C-100", "text": "hi", "agent": "desk-b"},
        {"conversation_id": "c-a2", "customer_id": "C-100", "text": "hi"},
    ])
    assert await queued_in(redis, built_in) == ["arq:queue"]
    assert await queued_in(redis, ours) == [DESK_B_QUEUE]
    assert [await queued_in(redis, t) for t in many] == [[DESK_B_QUEUE], ["arq:queue"]]


def result(turn_id: str, conversation_id: str, worker: str) -> TurnResult:
    return TurnResult(turn_id=turn_id, conversation_id=conversation_id, customer_id="C-100",
                      status="completed", final_output="done", attempts=1, worker=worker)


async def test_the_next_turn_is_routed_from_the_conversation_not_the_finishing_worker(redis, producer):
    """FINISH wakes the next turn into the queue of the conversation's workflow, whatever
    worker finishes (an old worker of the other pool during a deploy: it passes no workflow)."""
    await known_desk_b(redis)
    first = await producer.enqueue_turn(conversation_id="c-b", customer_id="C-100", text="1", agent="desk-b")
    second = await producer.enqueue_turn(conversation_id="c-b", customer_id="C-100", text="2", agent="desk-b")
    queue = TurnQueue(redis)
    run = await queue.start(first, "c-b", "support-desk-worker", T0)
    assert await queue.finish(result(first, "c-b", "support-desk-worker"), None, fence=run.attempt) is Outcome.WRITTEN
    assert await queued_in(redis, second) == [DESK_B_QUEUE]
    # A conversation recorded before workflows existed (no ``workflow`` field) is the built-in one's.
    a1 = await producer.enqueue_turn(conversation_id="c-old", customer_id="C-100", text="1")
    a2 = await producer.enqueue_turn(conversation_id="c-old", customer_id="C-100", text="2")
    await redis.hdel(keys.conversation_state("c-old"), "workflow")
    run = await queue.start(a1, "c-old", "w", T0)
    await queue.finish(result(a1, "c-old", "w"), None, fence=run.attempt)
    assert await queued_in(redis, a2) == ["arq:queue"]


async def test_the_reconciler_rewrites_a_lost_job_into_its_workflows_queue(redis, producer):
    await known_desk_b(redis)
    ours = await producer.enqueue_turn(conversation_id="c-b", customer_id="C-100", text="1", agent="desk-b")
    built_in = await producer.enqueue_turn(conversation_id="c-a", customer_id="C-100", text="1")
    for turn in (ours, built_in):  # the jobs are lost (an AOF that lost its last second)
        await redis.delete(keys.ARQ_JOB_PREFIX + turn)
        for queue in (keys.ARQ_QUEUE, DESK_B_QUEUE):
            await redis.zrem(queue, turn)
    report = await reconcile(redis)
    assert sorted(report.woken()) == sorted([ours, built_in])
    assert await queued_in(redis, ours) == [DESK_B_QUEUE]
    assert await queued_in(redis, built_in) == ["arq:queue"]
    assert json.loads(await redis.get(keys.ARQ_JOB_PREFIX + ours))["a"] == [ours, "c-b"]
    # A job waiting in its workflow's queue (either lane) is healthy: nothing is rewritten.
    await redis.zrem(DESK_B_QUEUE, ours)
    await redis.zadd(DESK_B_ISOLATED, {ours: 1})
    assert (await TurnQueue(redis).reconcile_conversation("c-b")).action == "ok"
    assert await queued_in(redis, ours) == [DESK_B_ISOLATED]


async def test_a_suspect_moves_to_its_own_workflows_isolated_lane(redis, producer):
    await known_desk_b(redis)
    turn = await producer.enqueue_turn(conversation_id="c-b", customer_id="C-100", text="1", agent="desk-b")
    queue = TurnQueue(redis)
    await queue.start(turn, "c-b", "w1", T0, lane=Lane.SHARED)  # w1 dies with it
    assert (await queue.start(turn, "c-b", "w2", T0, lane=Lane.SHARED)).status == "isolate"
    assert await queued_in(redis, turn) == [DESK_B_ISOLATED]
    waiting, serve, lane = await queue.isolated_lanes("w2", False, workflows=("support-desk", "desk-b"))
    assert (waiting, serve, lane) == (1, True, 1)  # desk-b's isolated lane is the one to open


async def test_two_pools_each_serve_only_their_own_workflow(redis, producer, fleet_env, tmp_path):
    """Two apps in two worker pools at once: every turn, first and next, is served by its own
    pool, and neither pool takes a turn of the other's workflow."""
    await known_desk_b(redis)
    turns: dict[str, str] = {}  # turn id -> workflow
    for i in range(3):
        for agent, conv in (("desk-b", f"b-{i}"), (None, f"a-{i}")):
            for text in ("Where is order 1042?", "And order 1043?"):
                turn = await producer.enqueue_turn(conversation_id=conv, customer_id="C-100", text=text, agent=agent)
                turns[turn] = agent or "support-desk"
    pool_b = start_burst("worker", {**fleet_env, "TURNFLEET_APP": APP, "TURNFLEET_WORKER_NAME": "pool-b"},
                         tmp_path, "pool-b")
    pool_a = start_burst("worker", {**fleet_env, "TURNFLEET_WORKER_NAME": "pool-a"}, tmp_path, "pool-a")
    for proc in (pool_b, pool_a):
        assert proc.wait(120) == 0, proc.output()[-3000:]
    queue = TurnQueue(redis)
    served = {t: (await queue.get(t)) for t in turns}
    assert {t: (r.status, r.worker) for t, r in served.items()} == {
        t: ("completed", "pool-b" if w == "desk-b" else "pool-a") for t, w in turns.items()}
    assert all("UnknownWorkflow" not in (r.error_type or "") for r in served.values())


async def test_a_turn_no_live_worker_serves_stays_queued_and_is_said(redis, producer, fleet_env, tmp_path):
    await known_desk_b(redis)
    turn = await producer.enqueue_turn(conversation_id="c-b", customer_id="C-100", text="hi", agent="desk-b")
    run_burst("worker", fleet_env, tmp_path, "built-in")  # serves support-desk only: takes nothing of it
    assert (await TurnQueue(redis).get(turn)).status == "queued"
    assert await queued_in(redis, turn) == [DESK_B_QUEUE]
    assert await heartbeat.unserved(redis, 15) == {"desk-b": 1}
    assert (await snapshot(redis, 15)).queue_depth == 1  # /metrics counts every workflow's queue
    note = "turns of desk-b are waiting: no worker serves it (1 queued)"
    assert heartbeat.unserved_notes({"desk-b": 1}) == [note]
    health = tf("health", "--role", "worker", env=fleet_env)
    assert note in health.stderr
    stats = tf("stats", "--json", env=fleet_env)
    assert json.loads(stats.stdout)["totals"]["unserved_workflows"] == {"desk-b": 1}
    assert note in tf("stats", env=fleet_env).stdout
    # A live worker serving desk-b (its beat says so): nothing is said any more.
    await heartbeat.beat(redis, "worker", "pool-b", 0, ["desk-b"])
    assert await heartbeat.unserved(redis, 15) == {}
    # ... and one that serves it runs the turn.
    run_burst("worker", {**fleet_env, "TURNFLEET_APP": APP, "TURNFLEET_WORKER_NAME": "pool-b"}, tmp_path, "pool-b")
    assert (await TurnQueue(redis).get(turn)).worker == "pool-b"


async def test_one_worker_serves_each_workflow_of_its_app_from_its_own_queue(redis, producer, fleet_env, tmp_path):
    await known_desk_b(redis)
    ours = await producer.enqueue_turn(conversation_id="c-b", customer_id="C-100", text="Where is order 1042?",
                                       agent="desk-b")
    built_in = await producer.enqueue_turn(conversation_id="c-a", customer_id="C-100", text="Where is order 1042?")
    env = {**fleet_env, "TURNFLEET_APP": "tests.apps.desk_copy:with_builtin", "TURNFLEET_WORKER_NAME": "both",
           "TURNFLEET_MAX_JOBS": "1"}
    run_burst("worker", env, tmp_path, "both")
    queue = TurnQueue(redis)
    assert [((r := await queue.get(t)).status, r.worker) for t in (ours, built_in)] == [("completed", "both")] * 2


async def test_a_job_an_older_process_left_in_the_builtin_queue_moves_to_its_workflows_queue(
        redis, producer, fleet_env, tmp_path):
    """Before routing every job went to ``arq:queue``: a built-in worker meeting a desk-b turn
    there moves it to desk-b's queue (no attempt counted, arq's try undone) instead of ending it
    UnknownWorkflow, and a desk-b worker then runs it."""
    await known_desk_b(redis)
    turn = await producer.enqueue_turn(conversation_id="c-b", customer_id="C-100", text="Where is order 1042?",
                                       agent="desk-b")
    score = await redis.zscore(DESK_B_QUEUE, turn)
    await redis.zrem(DESK_B_QUEUE, turn)
    await redis.zadd(keys.ARQ_QUEUE, {turn: score})  # where an older producer put it
    run_burst("worker", {**fleet_env, "TURNFLEET_WORKER_NAME": "built-in"}, tmp_path, "built-in")
    record = await TurnQueue(redis).get(turn)
    assert (record.status, record.attempts, record.errors) == ("queued", 0, [])
    assert await queued_in(redis, turn) == [DESK_B_QUEUE]
    assert await redis.zscore(DESK_B_QUEUE, turn) == score  # its due time kept
    assert await redis.exists(keys.ARQ_JOB_PREFIX + turn) == 1  # the job itself is kept for its new queue
    assert int(await redis.get(keys.ARQ_RETRY_PREFIX + turn) or 0) == 0  # the built-in worker's claim undone
    run_burst("worker", {**fleet_env, "TURNFLEET_APP": APP, "TURNFLEET_WORKER_NAME": "pool-b"}, tmp_path, "pool-b")
    record = await TurnQueue(redis).get(turn)
    assert (record.status, record.attempts, record.worker) == ("completed", 1, "pool-b")
