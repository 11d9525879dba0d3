"""Check results as telemetry (issue 17): counted once, found, alerted, shown, erased.

The check job's entries (batch version 3) are built from the event contract by
``tests.batches.CheckEntry`` exactly as the worker writes them; the turns' own batches are the
hooks'. Real Redis, the real consumer (one that dies before it acknowledges, another that claims
its entries), the CLI as a subprocess, the HTTP app served for real.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.batches import T0, TURN_COST_NUSD, TURN_TOKENS, AttemptBatch, CheckEntry, support_turn
from tests.consuming import drain, pending, settings
from tests.processes import tf
from turnfleet import keys, versions
from turnfleet.models import TurnRequest
from turnfleet.queue import TurnQueue
from turnfleet.telemetry.aggregate import window_start
from turnfleet.telemetry.alert_reads import read_alerts
from turnfleet.telemetry.consumer import TelemetryConsumer
from turnfleet.telemetry.metrics import exposition
from turnfleet.telemetry.stats import conversation_stats, stats, totals, turn_stats

WORKFLOW, VERSION = "support-desk", "1.0@f00d"
JUDGE = "turnfleet-offline"  # input 0.40, output 1.60 USD per 1M tokens
CHECKS = ("checks_passed", "checks_failed", "checks_not_applicable", "checks_inputs_expired")


def outcomes(row: dict[str, Any]) -> tuple[int, ...]:
    return tuple(row[f] for f in CHECKS)


async def send_turn(redis: Any, batch: AttemptBatch) -> str:
    """A turn attempt's batch as a worker of ``WORKFLOW`` / ``VERSION`` writes it."""
    return await redis.xadd(keys.TELEMETRY_STREAM, {
        "turn_id": batch.turn_id, versions.FIELD: str(versions.BATCH), "workflow": WORKFLOW,
        "version": VERSION, "batch": batch.batch_json()})


async def enqueue(redis: Any, turn_id: str, conversation_id: str, customer_id: str) -> None:
    req = TurnRequest(turn_id=turn_id, conversation_id=conversation_id, customer_id=customer_id,
                      text="Refund ORD-1001 please")
    assert await TurnQueue(redis).enqueue(req)


def t1_checks(at: Any = T0 + timedelta(hours=1)) -> CheckEntry:
    """t-1's checks: a money-path failure, a pass, one not applicable, an LLM judge's pass."""
    return (CheckEntry("t-1", "c-a", "cust-1", WORKFLOW, VERSION, at=at)
            .check("refund_amount_matches", "failed", money_path=True,
                   reason="refunded 120.00, eligibility said 80.00")
            .check("refunded_order_named", "passed", money_path=True)
            .check("escalation_when_asked", "not_applicable", reason="not applicable: no request for a person")
            .check("tone_judge", "passed", model=JUDGE, input_tokens=1000, output_tokens=100))


def t2_checks(at: Any = T0 + timedelta(hours=1)) -> CheckEntry:
    return (CheckEntry("t-2", "c-b", "cust-2", WORKFLOW, VERSION, at=at)
            .check("refund_amount_matches", "passed", money_path=True)
            .check("refunded_order_named", "inputs_expired", money_path=True))


async def two_turns_with_checks(redis: Any) -> None:
    """t-1 (c-a, cust-1) and t-2 (c-b, cust-2) ran and were judged; nothing drained yet."""
    await enqueue(redis, "t-1", "c-a", "cust-1")
    await enqueue(redis, "t-2", "c-b", "cust-2")
    await send_turn(redis, support_turn("t-1", "c-a", "cust-1"))
    await send_turn(redis, support_turn("t-2", "c-b", "cust-2"))
    await t1_checks().send(redis)
    await t2_checks().send(redis)


# -- 1. counted once ---------------------------------------------------------------------------


async def test_check_results_are_counted_once_per_turn_conversation_version_workflow_check_and_fleet(
        redis: Any) -> None:
    await two_turns_with_checks(redis)
    await t1_checks().send(redis)  # the check job ran again after a crash: a second entry
    # A consumer takes every entry, stores the aggregate and dies before acknowledging.
    dead = TelemetryConsumer(redis, settings(), name="dead")
    await dead.ensure_group()
    [(_, delivered)] = await redis.xreadgroup(keys.TELEMETRY_GROUP, "dead", {keys.TELEMETRY_STREAM: ">"})
    assert len(delivered) == 5
    for entry_id, fields in delivered:
        await dead.aggregator.aggregate(entry_id, fields)
    assert await pending(redis) == 5
    await drain(redis, name="alive", claim_idle_ms=0)  # claims them all and counts them again
    assert await pending(redis) == 0

    t1, t2 = await turn_stats(redis, "t-1"), await turn_stats(redis, "t-2")
    assert outcomes(t1) == (2, 1, 1, 0)
    assert outcomes(t2) == (1, 0, 0, 1)
    # The judge's tokens and cost are apart: the turn keeps exactly its own.
    assert (t1["total_tokens"], t1["llm_calls"], t1["cost_usd"]) == (
        TURN_TOKENS["total_tokens"], 3, TURN_COST_NUSD / 1e9)
    assert t1["check_tokens"] == 0 and t1["check_cost_usd"] == 0
    # Not the turn's activity: attempts, status and its place in the index are the run's.
    assert (t1["attempts"], t1["status"]) == (1, "completed")
    assert await redis.zscore(keys.aggregate_index("turn"), "t-1") < (T0 + timedelta(minutes=1)).timestamp() * 1000
    assert outcomes(await conversation_stats(redis, "c-a")) == (2, 1, 1, 0)

    [version] = [r for r in await stats(redis, "version") if r["subject"] == f"{WORKFLOW}/{VERSION}"]
    [workflow] = [r for r in await stats(redis, "workflow") if r["workflow"] == WORKFLOW]
    for row in (version, workflow):
        assert outcomes(row) == (3, 1, 1, 1)
        assert (row["check_tokens"], row["check_cost_usd"]) == (1100, 0.00056)  # 1000*0.40 + 100*1.60 per 1M
        assert (row["input_tokens"], row["turns_completed"]) == (2 * TURN_TOKENS["input_tokens"], 2)
    fleet = await totals(redis)
    assert outcomes(fleet) == (3, 1, 1, 1)
    assert (fleet["check_tokens"], fleet["total_tokens"], fleet["turns_completed"]) == (
        1100, 2 * TURN_TOKENS["total_tokens"], 2)
    per_check = {c: await redis.hgetall(keys.aggregate("check", f"{WORKFLOW}/{c}"))
                 for c in ("refund_amount_matches", "refunded_order_named", "escalation_when_asked")}
    assert per_check == {
        "refund_amount_matches": {"checks_failed": "1", "checks_passed": "1"},
        "refunded_order_named": {"checks_passed": "1", "checks_inputs_expired": "1"},
        "escalation_when_asked": {"checks_not_applicable": "1"},
    }
    # The facet: only the failed check, only its conversation.
    assert await redis.zrange(keys.facet_conversations("check_failed", "refund_amount_matches"), 0, -1) == ["c-a"]
    assert not await redis.exists(keys.facet_conversations("check_failed", "escalation_when_asked"))
    assert not await redis.exists(keys.facet_conversations("check_failed", "refunded_order_named"))


class FeedbackEraConsumer(TelemetryConsumer):
    """A consumer of the version before checks: it reads batch versions up to 2."""

    reads_batch_version = versions.BATCH_FEEDBACK


async def test_a_consumer_from_before_checks_leaves_their_entry_pending_and_a_current_one_counts_it(
        redis: Any) -> None:
    await t1_checks().send(redis)
    old = FeedbackEraConsumer(redis, settings(dead_letter_after=2), name="old")
    for _ in range(3):
        old.hold_here()
        await old.run(burst=True)
    assert await pending(redis) == 1 and await redis.xlen(keys.TELEMETRY_DEAD_LETTER) == 0
    assert await turn_stats(redis, "t-1") == {}
    await drain(redis, name="current", claim_idle_ms=0)
    assert await pending(redis) == 0
    assert outcomes(await turn_stats(redis, "t-1")) == (2, 1, 1, 0)


# -- 2. find --check-failed ---------------------------------------------------------------------


async def test_find_check_failed_lists_the_conversations_and_names_the_turns(
        redis: Any, redis_url: str, fleet_env: dict[str, str]) -> None:
    from tests.test_http import KEY_A, KEY_OP, auth, make_settings, serving

    # c-a: t-1 failed, t-3 passed, t-4 failed; c-b (another customer): t-2 failed; c-c: t-5 passed.
    for turn_id, conv, cust, outcome in (("t-1", "c-a", "C-100", "failed"), ("t-3", "c-a", "C-100", "passed"),
                                         ("t-4", "c-a", "C-100", "failed"), ("t-2", "c-b", "C-102", "failed"),
                                         ("t-5", "c-c", "C-100", "passed")):
        await enqueue(redis, turn_id, conv, cust)
        await send_turn(redis, support_turn(turn_id, conv, cust))
        await (CheckEntry(turn_id, conv, cust, WORKFLOW, VERSION)
               .check("refund_amount_matches", outcome, money_path=True)
               .check("escalation_when_asked", "not_applicable").send(redis))
    await drain(redis)

    found = tf("find", "--check-failed", "refund_amount_matches", "--json", env=fleet_env)
    assert found.returncode == 0, found.stderr
    assert sorted((r["conversation_id"], r["check_failed_turns"], r["checks_failed_names"])
                  for r in json.loads(found.stdout)) == [
        ("c-a", ["t-1", "t-4"], ["refund_amount_matches"]), ("c-b", ["t-2"], ["refund_amount_matches"])]
    text = tf("find", "--check-failed", "refund_amount_matches", env={**fleet_env, "COLUMNS": "300"})
    assert text.returncode == 0 and "checks" in text.stdout  # the column naming the turns
    assert "t-1," in text.stdout and "t-4" in text.stdout and "t-2" in text.stdout
    # Known, never failed (not applicable every time): nothing found, no error.
    none = tf("find", "--check-failed", "escalation_when_asked", "--json", env=fleet_env)
    assert none.returncode == 0 and json.loads(none.stdout) == []
    for name, says in (("no_such_check", "no check named 'no_such_check' has results"),
                       ("bad name", "outside letters")):
        bad = tf("find", "--check-failed", name, "--json", env=fleet_env)
        assert bad.returncode == 2, bad.stderr
        error = json.loads(bad.stderr)
        assert [e["field"] for e in error["errors"]] == ["check_failed"] and says in bad.stderr
        assert "Traceback" not in bad.stderr

    async with serving(make_settings(), redis_url) as (_, api):
        mine = await api.get("/v1/find", params={"check_failed": "refund_amount_matches"}, headers=auth(KEY_A))
        every = await api.get("/v1/find", params={"check_failed": "refund_amount_matches"}, headers=auth(KEY_OP))
        unknown = await api.get("/v1/find", params={"check_failed": "no_such_check"}, headers=auth(KEY_OP))
    assert mine.status_code == 200, mine.text
    assert [(r["conversation_id"], r["check_failed_turns"]) for r in mine.json()] == [("c-a", ["t-1", "t-4"])]
    assert sorted(r["conversation_id"] for r in every.json()) == ["c-a", "c-b"]
    assert unknown.status_code == 422 and [e["field"] for e in unknown.json()["errors"]] == ["check_failed"]


# -- 3. alerts ------------------------------------------------------------------------------------


async def test_a_failed_money_path_check_alerts_at_once_once_per_turn_and_check(redis: Any) -> None:
    await two_turns_with_checks(redis)
    await drain(redis)
    await t1_checks().send(redis)  # a second run of the check job, counted and evaluated again
    await drain(redis)
    fired = [a for _, a in await read_alerts(redis) if a.rule == "check_failed"]
    assert [(a.subject_kind, a.subject, a.window, a.turn_id, a.conversation_id, a.customer_id, a.severity)
            for a in fired] == [("turn", "t-1", "once:refund_amount_matches", "t-1", "c-a", "cust-1", "critical")]
    [alert] = fired
    assert "refund_amount_matches" in alert.message and "t-1" in alert.message
    assert "120.00" not in alert.message  # the check's reason stays in the replay
    assert alert.figures == {"check": "refund_amount_matches", "workflow": WORKFLOW}
    # A failure that guards no money alerts nothing at once.
    await (CheckEntry("t-2", "c-b", "cust-2", WORKFLOW, VERSION).check("tone_judge", "failed").send(redis))
    await drain(redis)
    assert len([a for _, a in await read_alerts(redis) if a.rule == "check_failed"]) == 1


async def test_the_check_failure_rate_alert_fires_per_workflow_and_check_at_its_rate_and_minimum(
        redis: Any) -> None:
    alerting = {"alert_check_failure_rate": 0.5, "alert_check_failure_min_count": 2,
                "alert_error_rate_window_s": 10**8}  # one window for the whole test

    async def judged(turn_id: str, outcome: str, check: str = "refunded_order_named") -> None:
        await (CheckEntry(turn_id, "c-r", "cust-r", WORKFLOW, VERSION)
               .check(check, outcome).check("escalation_when_asked", "not_applicable").send(redis))
        await drain(redis, **alerting)

    def rate_alerts() -> Any:
        return read_alerts(redis)

    await judged("t-1", "failed")
    await judged("t-2", "passed")
    await judged("t-3", "passed")
    assert [a for _, a in await rate_alerts() if a.rule == "check_failure_rate"] == []  # 1 failure < 2
    await judged("t-4", "failed")  # 2 of 4 judged: 50%
    [alert] = [a for _, a in await rate_alerts() if a.rule == "check_failure_rate"]
    assert (alert.subject, alert.figures["failed"], alert.figures["judged"], alert.figures["failure_rate"]) == (
        f"{WORKFLOW}/refunded_order_named", 2, 4, 0.5)
    await judged("t-4", "failed")  # redelivered / re-run: counted once, fired once
    await judged("t-5", "failed")
    assert len([a for _, a in await rate_alerts() if a.rule == "check_failure_rate"]) == 1
    window = keys.aggregate_window(window_start(T0, 10**8))
    assert await redis.hmget(window, [f"check_runs:{WORKFLOW}/refunded_order_named",
                                      f"check_fails:{WORKFLOW}/refunded_order_named"]) == ["5", "3"]


# -- 4. replay, console, stats, /metrics ---------------------------------------------------------


async def test_the_replay_and_the_console_show_the_turns_checks_a_failure_visibly(
        redis: Any, redis_url: str, fleet_env: dict[str, str]) -> None:
    from tests.test_http import KEY_A, KEY_B, auth, make_settings, serving

    await enqueue(redis, "t-1", "c-a", "C-100")
    await send_turn(redis, support_turn("t-1", "c-a", "C-100"))
    await (CheckEntry("t-1", "c-a", "C-100", WORKFLOW, VERSION)
           .check("refund_amount_matches", "failed", money_path=True, reason="refunded 120.00, eligibility said 80.00")
           .check("escalation_when_asked", "not_applicable", reason="not applicable: no request").send(redis))
    await drain(redis)
    shown = tf("turn", "t-1", "--json", env=fleet_env)
    assert shown.returncode == 0, shown.stderr
    checks = json.loads(shown.stdout)["checks"]
    assert [(c["check"], c["outcome"], c["money_path"], c["reason"]) for c in checks] == [
        ("refund_amount_matches", "failed", True, "refunded 120.00, eligibility said 80.00"),
        ("escalation_when_asked", "not_applicable", False, "not applicable: no request")]
    text = tf("turn", "t-1", env=fleet_env)
    assert text.returncode == 0
    assert "check FAILED refund_amount_matches (money path): refunded 120.00" in text.stdout
    async with serving(make_settings(), redis_url) as (_, api):
        data = (await api.get("/v1/turns/t-1/replay", headers=auth(KEY_A))).json()
        page = (await api.get("/console/conversations/c-a", headers=auth(KEY_A))).text
        other = await api.get("/console/conversations/c-a", headers=auth(KEY_B))
    assert [c["outcome"] for c in data["checks"]] == ["failed", "not_applicable"]
    assert page.count('class="check-item failed"') == 1 and page.count('class="check-item not_applicable"') == 1
    assert "refund_amount_matches" in page and "eligibility said 80.00" in page
    assert other.status_code == 404 and "refund_amount_matches" not in other.text


async def test_stats_by_workflow_and_version_and_metrics_show_check_counts(
        redis: Any, fleet_env: dict[str, str]) -> None:
    await two_turns_with_checks(redis)
    await drain(redis)
    text = (await exposition(redis, worker_max_age_s=15)).decode()
    samples = {tuple(sorted(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) if family.name == "turnfleet_checks"
               for s in family.samples}
    seen = {(dict(k)["check"], dict(k)["outcome"]): v for k, v in samples.items() if v}
    assert seen == {("refund_amount_matches", "failed"): 1, ("refund_amount_matches", "passed"): 1,
                    ("refunded_order_named", "passed"): 1, ("refunded_order_named", "inputs_expired"): 1,
                    ("escalation_when_asked", "not_applicable"): 1, ("tone_judge", "passed"): 1}
    assert {dict(k)["workflow"] for k in samples} == {WORKFLOW}
    for by in ("workflow", "version"):
        out = tf("stats", "--by", by, env=fleet_env)
        assert out.returncode == 0, out.stderr
        assert "chk ok" in out.stdout  # then "chk fail"
        [row] = [line for line in out.stdout.splitlines() if line.strip().startswith(WORKFLOW)]
        assert row.split()[-2:] == ["3", "1"]
