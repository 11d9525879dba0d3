"""Workflow versions (issue 16): every turn records the workflow and version that ran it, and
telemetry splits by both (``stats --by workflow | version``, ``find --workflow/--version``,
``/metrics``, the console).

The fleet scenario runs real burst workers of ``tests/apps/versioned.py`` twice, with Triage's
instructions changed in between (a new fingerprint, so a new version), and a real consumer.
The other tests feed the consumer batches written by the worker's own hooks
(``tests/batches.py``), with and without the entry fields a worker of this version writes.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from turnfleet import keys, registry
from turnfleet.queue import TurnQueue
from turnfleet.telemetry.find import find_conversations
from turnfleet.telemetry.metrics import VERSIONS_PER_WORKFLOW, exposition
from turnfleet.telemetry.stats import stats, turn_stats
from tests.apps import versioned
from tests.batches import T0, TURN_TOKENS, AttemptBatch, support_turn
from tests.consuming import drain
from tests.processes import run_burst, tf
from tests.test_http_read import C100, OPERATOR, as_json, auth, serve

NEW_TRIAGE = ("You are the front desk. Send billing questions to Billing and order questions "
              "to Orders; answer anything else yourself, briefly.")
FIGURES = ("turns_completed", "turns_failed", "attempts_failed", "llm_calls", "input_tokens",
           "output_tokens", "total_tokens", "cost_usd", "latency_count")


def cli_json(env: dict[str, str], *args: str) -> Any:
    proc = tf(*args, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def by_subject(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["subject"]: row for row in rows}


async def test_a_changed_instruction_is_a_new_version_with_its_own_figures(
    redis, producer, fleet_env, tmp_path
):
    v1, v2 = versioned.build(), versioned.build(NEW_TRIAGE)
    label1, label2 = v1.version_label(), v2.version_label()
    assert label1 != label2 and label1.startswith("1.0@")  # same declared version, new fingerprint
    await registry.register(redis, [registry.Registration(versioned.NAME, v1.fingerprint(), "1.0")], "w-reg")
    env = {**fleet_env, "TURNFLEET_APP": "tests.apps.versioned:app"}

    first = [await producer.enqueue_turn(conversation_id=f"c-v1-{i}", customer_id="C-100",
                                         text=text, agent=versioned.NAME)
             for i, text in enumerate(["Where is order 1042?", "I was charged twice for order 1042"])]
    run_burst("worker", env, tmp_path, "v1")
    second = await producer.enqueue_turn(conversation_id="c-v2", customer_id="C-100",
                                         text="Where is order 1042?", agent=versioned.NAME)
    run_burst("worker", {**env, versioned.INSTRUCTIONS_ENV: NEW_TRIAGE}, tmp_path, "v2")

    # Each result says which workflow and version ran it.
    queue = TurnQueue(redis)
    results = {t: await queue.get(t) for t in [*first, second]}
    assert {t: (r.status, r.workflow, r.version) for t, r in results.items()} == {
        first[0]: ("completed", "desk-v", label1), first[1]: ("completed", "desk-v", label1),
        second: ("completed", "desk-v", label2)}
    shown = cli_json(fleet_env, "result", second)
    assert (shown["workflow"], shown["version"]) == ("desk-v", label2)

    await drain(redis)
    rows = cli_json(fleet_env, "stats", "--by", "version")["rows"]
    mine = {(r["workflow"], r["version"]): r for r in rows if r["workflow"] == "desk-v"}
    assert set(mine) == {("desk-v", label1), ("desk-v", label2)}
    tokens = {label: sum(results[t].usage.total_tokens for t in turns)
              for label, turns in ((label1, first), (label2, [second]))}
    assert {label: (r["turns_completed"], r["total_tokens"]) for (_, label), r in mine.items()} == {
        label1: (2, tokens[label1]), label2: (1, tokens[label2])}
    assert all(r["subject"] == keys.version_subject("desk-v", r["version"]) for r in mine.values())
    [workflow_row] = [r for r in cli_json(fleet_env, "stats", "--by", "workflow")["rows"]
                      if r["workflow"] == "desk-v"]
    for figure in ("turns_completed", "total_tokens", "llm_calls", "latency_count"):
        assert workflow_row[figure] == sum(r[figure] for r in mine.values()), figure
    assert workflow_row["cost_usd"] == sum(r["cost_usd"] for r in mine.values())

    # A redelivered batch (the same entry written again) counts nothing twice.
    [(_, fields)] = [e for e in await redis.xrange(keys.TELEMETRY_STREAM) if e[1]["turn_id"] == second]
    assert (fields["workflow"], fields["version"]) == ("desk-v", label2)
    await redis.xadd(keys.TELEMETRY_STREAM, fields)
    await drain(redis)
    again = {(r["workflow"], r["version"]): r for r in await stats(redis, "version")}
    assert {k: again[k] for k in mine} == mine

    # The turn's figures, its replay, and find name them too.
    assert pick(await turn_stats(redis, second), "workflow", "version") == ("desk-v", label2)
    replay = cli_json(fleet_env, "turn", second)
    assert (replay["turn"]["workflow"], replay["turn"]["version"]) == ("desk-v", label2)
    assert (replay["telemetry"]["workflow"], replay["telemetry"]["version"]) == ("desk-v", label2)
    found = cli_json(fleet_env, "find", "--workflow", "desk-v", "--version", label2)
    assert [(r["conversation_id"], r["workflows"], r["versions"]) for r in found] == [
        ("c-v2", ["desk-v"], [label2])]
    assert sorted(r["conversation_id"] for r in await find_conversations(redis, workflow="desk-v")) == [
        "c-v1-0", "c-v1-1", "c-v2"]
    assert await find_conversations(redis, workflow="support-desk") == []


def pick(row: dict[str, Any], *fields: str) -> tuple[Any, ...]:
    return tuple(row.get(f) for f in fields)


async def send(redis: Any, batch: AttemptBatch, **fields: str) -> str:
    """The batch as a worker of this version writes it: entry fields beside ``v``."""
    return await redis.xadd(keys.TELEMETRY_STREAM, {"turn_id": batch.turn_id, "v": "1", **fields,
                                                     "batch": batch.batch_json()})


async def test_each_version_is_counted_once_and_adds_up_to_its_workflow(redis):
    await send(redis, support_turn("t-1", "c-1"), workflow="desk-v", version="1.0@aaaa")
    await send(redis, support_turn("t-2", "c-2"), workflow="desk-v", version="1.0@bbbb")
    entry = await send(redis, support_turn("t-3", "c-3"), workflow="desk-v", version="1.0@bbbb")
    await send(redis, support_turn("t-4", "c-4"), workflow="other", version="1.0@bbbb")
    await drain(redis)
    [(_, fields)] = await redis.xrange(keys.TELEMETRY_STREAM, entry, entry)
    await redis.xadd(keys.TELEMETRY_STREAM, fields)  # re-sent: nothing counts twice
    await drain(redis)

    versions = by_subject(await stats(redis, "version"))
    assert {s: (r["workflow"], r["version"], r["turns_completed"], r["total_tokens"])
            for s, r in versions.items()} == {
        "desk-v/1.0@aaaa": ("desk-v", "1.0@aaaa", 1, TURN_TOKENS["total_tokens"]),
        "desk-v/1.0@bbbb": ("desk-v", "1.0@bbbb", 2, 2 * TURN_TOKENS["total_tokens"]),
        # The same label in another workflow is another version.
        "other/1.0@bbbb": ("other", "1.0@bbbb", 1, TURN_TOKENS["total_tokens"]),
    }
    workflows = by_subject(await stats(redis, "workflow"))
    assert set(workflows) == {"desk-v", "other"}
    for figure in FIGURES:
        assert workflows["desk-v"][figure] == (versions["desk-v/1.0@aaaa"][figure]
                                               + versions["desk-v/1.0@bbbb"][figure]), figure
    assert workflows["desk-v"]["workflow"] == "desk-v"
    # Figures not split by version are no figure (None), not a misleading 0.
    assert (versions["desk-v/1.0@aaaa"]["tool_calls"], workflows["desk-v"]["handoffs"]) == (None, None)

    async def found(**filters: str) -> list[str]:
        return sorted(r["conversation_id"] for r in await find_conversations(redis, **filters))

    assert await found(workflow="desk-v") == ["c-1", "c-2", "c-3"]  # any of its versions
    assert await found(version="1.0@bbbb") == ["c-2", "c-3", "c-4"]  # that label, any workflow
    assert await found(workflow="desk-v", version="1.0@bbbb") == ["c-2", "c-3"]
    assert await found(workflow="desk-v", version="1.0@bbbb", tool="lookup_order") == ["c-2", "c-3"]
    assert await found(workflow="nope") == [] and await found(version="0@0") == []


async def test_telemetry_without_the_fields_counts_under_unknown(redis):
    """Entries written before workers named what ran them (or by an older worker during a
    rolling deploy) are counted under workflow and version ``unknown``, never guessed; an
    attempt that ended before its workflow was found is its workflow's version ``unknown``."""
    await support_turn("t-old", "c-old").send(redis)  # no workflow, no version: the old format
    await send(redis, AttemptBatch("t-lost", "c-lost").failed("WorkerLost", "gone"), workflow="desk-v")
    await send(redis, support_turn("t-bad", "c-bad"), workflow="not a name!", version="x")
    await drain(redis)
    versions = by_subject(await stats(redis, "version"))
    assert {s: (r["turns_completed"], r["turns_failed"]) for s, r in versions.items()} == {
        "unknown/unknown": (2, 0), "desk-v/unknown": (0, 1)}
    assert {s: r["turns_completed"] + r["turns_failed"]
            for s, r in by_subject(await stats(redis, "workflow")).items()} == {"unknown": 2, "desk-v": 1}
    assert pick(await turn_stats(redis, "t-old"), "workflow", "version") == ("unknown", "unknown")
    # Nothing to find by: unknown is no facet.
    assert await find_conversations(redis, workflow="unknown") == []
    assert [r["conversation_id"] for r in await find_conversations(redis, workflow="desk-v")] == ["c-lost"]


async def test_an_old_result_names_its_requests_workflow_and_a_queued_turn_its_own(redis, producer):
    queued = await producer.enqueue_turn(conversation_id="c-q", customer_id="C-100", text="hi")
    got = await TurnQueue(redis).get(queued)
    assert (got.status, got.workflow, got.version) == ("queued", "support-desk", None)
    # A result written before results named them: no workflow or version in its JSON.
    record = await redis.hgetall(keys.turn(queued))
    old = got.model_dump(mode="json", exclude={"workflow", "version"}) | {"status": "completed"}
    assert "workflow" not in json.dumps(old)
    await redis.hset(keys.turn(queued), mapping={"status": "completed", "result": json.dumps(old)})
    done = await TurnQueue(redis).get(queued)
    assert (done.status, done.workflow, done.version) == ("completed", "support-desk", None)
    assert record["request"]  # the request it was read from


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


async def test_metrics_split_by_workflow_and_by_the_latest_versions(redis):
    labels = [f"1.{i}@v{i}" for i in range(VERSIONS_PER_WORKFLOW + 1)]
    for i, label in enumerate(labels):  # the last one sent is the newest
        batch = support_turn(f"t-{i}", f"c-{i}", at=T0 + timedelta(minutes=i))
        await send(redis, batch, workflow="desk-v", version=label)
    await send(redis, AttemptBatch("t-f", "c-f").started().agent("Triage").llm("Triage", 10, 2)
               .failed(terminal=False), workflow="desk-v", version=labels[-1])
    await drain(redis)
    got = samples(await exposition(redis, 30))
    n = len(labels)
    assert got[("turnfleet_turns_by_workflow_total", (("status", "completed"), ("workflow", "desk-v")))] == n
    assert got[("turnfleet_attempts_failed_by_workflow_total", (("workflow", "desk-v"),))] == 1
    assert got[("turnfleet_tokens_by_workflow_total", (("kind", "input"), ("workflow", "desk-v")))] == (
        n * TURN_TOKENS["input_tokens"] + 10)
    assert ("turnfleet_cost_by_workflow_usd_total", (("workflow", "desk-v"),)) in got
    exported = {dict(k[1])["version"] for k in got if k[0] == "turnfleet_turns_by_version_total"}
    assert exported == set(labels[1:])  # the oldest version is no longer exported
    assert got[("turnfleet_turns_by_version_total",
                (("status", "completed"), ("version", labels[-1]), ("workflow", "desk-v")))] == 1
    assert got[("turnfleet_attempts_failed_by_version_total",
                (("version", labels[-1]), ("workflow", "desk-v")))] == 1
    assert len(await stats(redis, "version")) == n  # stats has every one


async def test_http_stats_by_workflow_and_version_are_for_operator_keys(redis, redis_url):
    await send(redis, support_turn("t-1", "c-1"), workflow="desk-v", version="1.0@aaaa")
    await drain(redis)
    async with serve(redis_url) as http:
        for by in ("workflow", "version"):
            r = await http.get("/v1/stats", params={"by": by}, headers=auth(OPERATOR))
            assert r.status_code == 200 and r.json()["rows"] == as_json(await stats(redis, by))
            # Per-workflow figures mix every customer's: a customer key may not read them.
            forbidden = await http.get("/v1/stats", params={"by": by}, headers=auth(C100))
            assert forbidden.status_code == 403 and forbidden.json()["error"] == "forbidden"
        r = await http.get("/v1/find", params={"workflow": "desk-v", "version": "1.0@aaaa"},
                           headers=auth(OPERATOR))
        assert [row["conversation_id"] for row in r.json()] == ["c-1"]
        r = await http.get("/v1/find", params={"workflow": "desk-v", "version": "1.0@bbbb"},
                           headers=auth(OPERATOR))
        assert r.json() == []
