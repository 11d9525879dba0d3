"""Feedback linked to turns (issue 17): validated at the edge, redacted, counted once.

Real Redis, a real worker process for the turns, real consumers (one that dies before it
acknowledges, one of the previous batch version).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.consuming import drain, pending, settings
from tests.processes import run_burst, tf
from turnfleet import keys, versions
from turnfleet.models import TurnRequest
from turnfleet.producer import Producer, TurnValidationError, UnknownTurn
from turnfleet.queue import TurnQueue
from turnfleet.telemetry.consumer import TelemetryConsumer
from turnfleet.telemetry.stats import conversation_stats, customer_day_stats, stats, totals, turn_stats

CUSTOMER = "cust-fb"
FEEDBACK = ("feedback_negative", "feedback_positive")


async def enqueue(redis: Any, turn_id: str, conversation_id: str, customer_id: str = CUSTOMER) -> None:
    req = TurnRequest(turn_id=turn_id, conversation_id=conversation_id, customer_id=customer_id,
                      text="Where is my order ORD-1001?")
    assert await TurnQueue(redis).enqueue(req)


async def ran_turns(redis: Any, fleet_env: dict[str, str], tmp_path: Path, **consumer: Any) -> None:
    """Four turns run by a real worker and counted: t-1, t-2 (conversation c-a), t-3 (c-b) of
    ``CUSTOMER``, t-4 (c-c) of another customer."""
    for turn_id, conv, cust in (("t-1", "c-a", CUSTOMER), ("t-2", "c-a", CUSTOMER),
                                ("t-3", "c-b", CUSTOMER), ("t-4", "c-c", "cust-other")):
        await enqueue(redis, turn_id, conv, cust)
    run_burst("worker", fleet_env, tmp_path)
    await drain(redis, **consumer)


def figures(row: dict[str, Any]) -> tuple[int, int]:
    return row["feedback_negative"], row["feedback_positive"]


async def entries(redis: Any) -> list[dict[str, str]]:
    return [fields for _, fields in await redis.xrange(keys.TELEMETRY_STREAM)]


async def test_feedback_is_counted_once_under_redelivery_per_turn_customer_day_version_and_fleet(
        redis: Any, producer: Producer, fleet_env: dict[str, str], tmp_path: Path) -> None:
    await ran_turns(redis, fleet_env, tmp_path)
    first = await producer.feedback("t-1", score=-1, comment="wrong refund", idempotency_key="k-1")
    await producer.feedback("t-2", score=-1, source="operator")
    await producer.feedback("t-3", score=1, source="agent")
    again = await producer.feedback("t-1", score=-1, comment="wrong refund", idempotency_key="k-1")
    assert again.feedback_id == first.feedback_id  # re-sent: the same feedback, a second entry
    written = [f for f in await entries(redis) if f["v"] == str(versions.BATCH_FEEDBACK)]
    assert len(written) == 4
    assert {f["workflow"] for f in written} == {"support-desk"}

    # A consumer takes them all, stores the aggregate and dies before acknowledging.
    dead = TelemetryConsumer(redis, settings(), name="dead")
    await dead.ensure_group()
    [(_, delivered)] = await redis.xreadgroup(keys.TELEMETRY_GROUP, "dead", {keys.TELEMETRY_STREAM: ">"})
    assert len(delivered) == 4
    for entry_id, fields in delivered:
        await dead.aggregator.aggregate(entry_id, fields)
    assert await pending(redis) == 4
    # Another claims them after its death and counts them again: nothing changes.
    await drain(redis, name="alive", claim_idle_ms=0)
    assert await pending(redis) == 0

    assert figures(await turn_stats(redis, "t-1")) == (1, 0)
    assert figures(await turn_stats(redis, "t-2")) == (1, 0)
    assert figures(await turn_stats(redis, "t-3")) == (0, 1)
    assert figures(await turn_stats(redis, "t-4")) == (0, 0)
    assert figures(await conversation_stats(redis, "c-a")) == (2, 0)
    assert figures(await conversation_stats(redis, "c-b")) == (0, 1)
    [customer] = [r for r in await stats(redis, "customer") if r["subject"] == CUSTOMER]
    assert figures(customer) == (2, 1)
    today = datetime.now(timezone.utc).date().isoformat()
    assert figures(await customer_day_stats(redis, CUSTOMER, today)) == (2, 1)
    label = (await producer.result("t-1")).version
    assert label
    [version] = [r for r in await stats(redis, "version") if r["version"] == label]
    assert figures(version) == (2, 1)
    [workflow] = [r for r in await stats(redis, "workflow") if r["workflow"] == "support-desk"]
    assert figures(workflow) == (2, 1)
    fleet = await totals(redis)
    assert figures(fleet) == (2, 1)
    assert fleet["turns_completed"] == 4  # feedback is no turn


async def test_bad_feedback_names_the_field_and_writes_nothing(redis: Any, producer: Producer) -> None:
    await enqueue(redis, "t-1", "c-a")
    before = await redis.xlen(keys.TELEMETRY_STREAM)
    for kwargs, field in (
        ({"score": 0}, "score"), ({"score": 2}, "score"), ({"score": True}, "score"),
        ({"score": "1"}, "score"), ({"score": 1, "source": "robot"}, "source"),
        ({"score": 1, "comment": "x" * 2001}, "comment"), ({"score": 1, "comment": 5}, "comment"),
        ({"score": 1, "comment": "\ud800"}, "comment"), ({"score": 1, "customer_id": "a b"}, "customer_id"),
        ({"score": 1, "idempotency_key": "no spaces"}, "idempotency_key"),
    ):
        with pytest.raises(TurnValidationError) as caught:
            await producer.feedback("t-1", **kwargs)
        assert [e["field"] for e in caught.value.errors] == [field], kwargs
    with pytest.raises(TurnValidationError) as caught:
        await producer.feedback("bad id", score=1)
    assert [e["field"] for e in caught.value.errors] == ["turn_id"]
    with pytest.raises(UnknownTurn):
        await producer.feedback("t-nope", score=1)
    # A customer's call: only its own turns; another's is unknown, as for other reads.
    with pytest.raises(UnknownTurn):
        await producer.feedback("t-1", score=1, customer_id="cust-other")
    assert await redis.xlen(keys.TELEMETRY_STREAM) == before
    mine = await producer.feedback("t-1", score=1, customer_id=CUSTOMER)
    assert mine.customer_id == CUSTOMER and mine.feedback_id.startswith("fb_")
    assert await redis.xlen(keys.TELEMETRY_STREAM) == before + 1


async def test_the_comment_is_redacted_and_clipped_before_it_is_written(redis: Any, producer: Producer) -> None:
    await enqueue(redis, "t-1", "c-a")
    comment = "Refund went to jane.doe@example.com, card 4111 1111 1111 1111. " + "x" * 900
    result = await producer.feedback("t-1", score=-1, comment=comment)
    assert result.comment is not None and len(result.comment) == 500
    assert "jane.doe@example.com" not in result.comment and "4111" not in result.comment
    [entry] = await entries(redis)
    assert "jane.doe" not in entry["batch"] and "4111" not in entry["batch"]
    await drain(redis)
    [kept] = (await redis.hgetall(keys.turn_feedback("t-1"))).values()
    assert json.loads(kept)["comment"] == result.comment


class OlderConsumer(TelemetryConsumer):
    """A consumer of the version before feedback: it reads batch version 1 only."""

    reads_batch_version = 1


async def test_an_older_consumer_leaves_a_feedback_entry_pending_and_a_current_one_counts_it(
        redis: Any, producer: Producer) -> None:
    await enqueue(redis, "t-1", "c-a")
    await producer.feedback("t-1", score=-1)
    old = OlderConsumer(redis, settings(dead_letter_after=2), name="old")
    for _ in range(3):
        old.hold_here()
        await old.run(burst=True)
    assert await pending(redis) == 1
    assert await redis.xlen(keys.TELEMETRY_DEAD_LETTER) == 0
    assert (await totals(redis))["telemetry_malformed"] == 0
    assert await turn_stats(redis, "t-1") == {}  # nothing counted
    await drain(redis, name="current", claim_idle_ms=0)
    assert await pending(redis) == 0
    assert figures(await turn_stats(redis, "t-1")) == (1, 0)


# -- the edges: CLI (a real process) and HTTP (a real server) -------------------------------------


def test_cli_feedback_prints_the_id_and_refuses_bad_input_with_exit_2_and_unknown_turns_with_1(
        fleet_env: dict[str, str], redis_url: str) -> None:
    import asyncio

    from tests.conftest import redis_client

    async def setup() -> None:
        async with redis_client(redis_url) as r:
            await enqueue(r, "t-1", "c-a")

    asyncio.run(setup())
    ok = tf("feedback", "t-1", "--score", "-1", "--comment", "mail me at jane.doe@example.com",
            "--source", "operator", "--json", env=fleet_env)
    assert ok.returncode == 0, ok.stderr
    body = json.loads(ok.stdout)
    assert (body["turn_id"], body["score"], body["source"]) == ("t-1", -1, "operator")
    assert body["feedback_id"].startswith("fb_") and "jane.doe" not in body["comment"]
    for args, field in ((["--score", "0"], "score"), (["--score", "x"], "score"),
                        (["--score", "1", "--source", "robot"], "source"),
                        (["--score", "1", "--comment", "x" * 2001], "comment")):
        bad = tf("feedback", "t-1", *args, "--json", env=fleet_env)
        assert bad.returncode == 2, (args, bad.stderr)
        assert [e["field"] for e in json.loads(bad.stderr)["errors"]] == [field]
    bad_id = tf("feedback", "a b", "--score", "1", env=fleet_env)
    assert bad_id.returncode == 2 and "turn_id" in bad_id.stderr and "Traceback" not in bad_id.stderr
    unknown = tf("feedback", "t-nope", "--score", "1", env=fleet_env)
    assert unknown.returncode == 1 and "no turn 't-nope'" in unknown.stderr

    async def count() -> int:
        async with redis_client(redis_url) as r:
            return await r.xlen(keys.TELEMETRY_STREAM)

    assert asyncio.run(count()) == 1  # only the good one was written


async def test_http_feedback_a_customer_key_for_its_own_turns_only_an_operator_for_any(
        redis: Any, redis_url: str) -> None:
    from tests.test_http import KEY_A, KEY_B, KEY_OP, auth, make_settings, serving

    await enqueue(redis, "t-a", "c-a", "C-100")
    await enqueue(redis, "t-b", "c-b", "C-102")
    async with serving(make_settings(), redis_url) as (_, api):
        mine = await api.post("/v1/turns/t-a/feedback", headers=auth(KEY_A),
                              json={"score": -1, "comment": "wrong amount"})
        assert mine.status_code == 201, mine.text
        assert mine.json()["turn_id"] == "t-a" and mine.json()["source"] == "customer"
        again = await api.post("/v1/turns/t-a/feedback", headers={**auth(KEY_A), "Idempotency-Key": "r-1"},
                               json={"score": -1})
        retry = await api.post("/v1/turns/t-a/feedback", headers={**auth(KEY_A), "Idempotency-Key": "r-1"},
                               json={"score": -1})
        assert again.json()["feedback_id"] == retry.json()["feedback_id"]
        theirs = await api.post("/v1/turns/t-b/feedback", headers=auth(KEY_A), json={"score": 1})
        assert theirs.status_code == 404 and theirs.json()["error"] == "not_found"
        missing = await api.post("/v1/turns/t-nope/feedback", headers=auth(KEY_A), json={"score": 1})
        assert missing.status_code == 404
        assert theirs.json()["message"].replace("t-b", "X") == missing.json()["message"].replace("t-nope", "X")
        assert (await api.post("/v1/turns/t-b/feedback", headers=auth(KEY_B), json={"score": 1})).status_code == 201
        assert (await api.post("/v1/turns/t-b/feedback", headers=auth(KEY_OP),
                               json={"score": 1, "source": "operator"})).status_code == 201
        assert (await api.post("/v1/turns/t-a/feedback", json={"score": 1})).status_code == 401
        for body, field in (({"score": 0}, "score"), ({"score": 1, "source": "x"}, "source"),
                            ({"score": 1, "comment": "x" * 2001}, "comment"), ({}, "score"),
                            ({"score": 1, "extra": 1}, "extra")):
            bad = await api.post("/v1/turns/t-a/feedback", headers=auth(KEY_A), json=body)
            assert bad.status_code == 422, (body, bad.text)
            assert [e["field"] for e in bad.json()["errors"]] == [field]
        assert (await api.post("/v1/turns/t-a/feedback", headers=auth(KEY_A), content=b"[")).status_code == 422
    assert await redis.xlen(keys.TELEMETRY_STREAM) == 5  # the five accepted, nothing else


# -- find, replay, alert, erasure -----------------------------------------------------------------


async def test_find_feedback_negative_lists_exactly_the_turns_given_negative_feedback(
        redis: Any, producer: Producer, fleet_env: dict[str, str], tmp_path: Path) -> None:
    await ran_turns(redis, fleet_env, tmp_path)
    await producer.feedback("t-1", score=-1)
    await producer.feedback("t-3", score=1)
    await producer.feedback("t-4", score=-1)
    await drain(redis)
    found = tf("find", "--feedback", "negative", "--json", env=fleet_env)
    assert found.returncode == 0, found.stderr
    rows = json.loads(found.stdout)
    assert sorted((r["conversation_id"], r["feedback_turns"]) for r in rows) == [
        ("c-a", ["t-1"]), ("c-c", ["t-4"])]
    positive = json.loads(tf("find", "--feedback", "positive", "--json", env=fleet_env).stdout)
    assert [(r["conversation_id"], r["feedback_turns"], r["feedback"]) for r in positive] == [
        ("c-b", ["t-3"], ["positive"])]
    scoped = json.loads(tf("find", "--feedback", "negative", "--customer", CUSTOMER, "--json",
                           env=fleet_env).stdout)
    assert [r["conversation_id"] for r in scoped] == ["c-a"]
    bad = tf("find", "--feedback", "bad", env=fleet_env)
    assert bad.returncode == 2


async def test_the_replay_shows_the_turns_feedback(redis: Any, producer: Producer, fleet_env: dict[str, str],
                                                   tmp_path: Path) -> None:
    await ran_turns(redis, fleet_env, tmp_path)
    given = await producer.feedback("t-1", score=-1, comment="refunded the wrong order", source="customer")
    await producer.feedback("t-1", score=1, source="operator")
    await drain(redis)
    shown = tf("turn", "t-1", "--json", env=fleet_env)
    assert shown.returncode == 0, shown.stderr
    feedback = json.loads(shown.stdout)["feedback"]
    assert [(f["score"], f["source"], f["comment"]) for f in feedback] == [
        (-1, "customer", "refunded the wrong order"), (1, "operator", None)]
    assert feedback[0]["feedback_id"] == given.feedback_id and feedback[0]["at"]
    text = tf("turn", "t-1", env=fleet_env)
    assert text.returncode == 0 and "refunded the wrong order" in text.stdout and "feedback" in text.stdout


async def test_the_negative_feedback_rate_alert_fires_at_the_rate_with_its_minimum_count(
        redis: Any, producer: Producer, fleet_env: dict[str, str], tmp_path: Path) -> None:
    from turnfleet.telemetry.alert_reads import read_alerts

    alerting = {"alert_feedback_negative_rate": 0.5, "alert_feedback_negative_min_count": 2,
                "alert_error_rate_window_s": 10**8}  # one window for the whole test
    await ran_turns(redis, fleet_env, tmp_path, **alerting)  # 4 turns finished in the window
    await producer.feedback("t-1", score=-1)
    await producer.feedback("t-3", score=1)
    await drain(redis, **alerting)
    assert [a for _, a in await read_alerts(redis) if a.rule == "feedback_negative_rate"] == []  # 1 < 2
    await producer.feedback("t-2", score=-1)
    await drain(redis, **alerting)
    [alert] = [a for _, a in await read_alerts(redis) if a.rule == "feedback_negative_rate"]
    assert (alert.figures["feedback_negative"], alert.figures["turns"], alert.figures["feedback_negative_rate"]) == (
        2, 4, 0.5)
    await producer.feedback("t-4", score=-1)
    await drain(redis, **alerting)
    assert len([a for _, a in await read_alerts(redis) if a.rule == "feedback_negative_rate"]) == 1  # once a window


async def test_the_console_turn_view_and_the_json_replay_show_the_feedback(
        redis: Any, redis_url: str, producer: Producer, fleet_env: dict[str, str], tmp_path: Path) -> None:
    from tests.test_http import KEY_A, KEY_B, auth, make_settings, serving

    for turn_id in ("t-1", "t-2"):
        await enqueue(redis, turn_id, "c-a", "C-100")
    run_burst("worker", fleet_env, tmp_path)
    await producer.feedback("t-2", score=-1, comment="sent jane.doe@example.com the wrong amount")
    await drain(redis)
    async with serving(make_settings(), redis_url) as (_, api):
        page = (await api.get("/console/conversations/c-a", headers=auth(KEY_A))).text
        data = (await api.get("/v1/conversations/c-a", headers=auth(KEY_A))).json()
        other = await api.get("/console/conversations/c-a", headers=auth(KEY_B))
    assert page.count('class="feedback-item negative"') == 1 and "feedback from customer" in page
    assert "the wrong amount" in page and "jane.doe@example.com" not in page
    assert [[f["score"] for f in t["feedback"]] for t in data["turns"]] == [[], [-1]]
    assert other.status_code == 404 and "the wrong amount" not in other.text
