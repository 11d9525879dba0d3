"""The read side over real HTTP: replays, find, stats, alerts (JSON and SSE), readiness.

The app is served by uvicorn on a free port in the test's event loop and called with httpx;
turns run through real ``turnfleet worker`` / ``turnfleet telemetry`` subprocesses on the
test's own redis-server. What HTTP answers is compared with what the query functions (the
CLI's ``--json`` source) compute directly from the same Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from turnfleet.producer import Producer
from turnfleet.telemetry.alert_reads import read_alerts
from turnfleet.telemetry.find import find_conversations
from turnfleet.telemetry.latency import latency_report, slowest_turns
from turnfleet.telemetry.stats import stats, totals
from turnfleet.telemetry.replay import conversation_replay, turn_replay
from tests.waiting import until
from tests.processes import run_burst
from tests.uvicorn_server import serving_app
from turnfleet import keys
from turnfleet.auth import hash_key
from turnfleet.shell.fleet import FleetProcess
from turnfleet.models import Alert
from turnfleet.shell.server import create_app
from turnfleet.settings import ApiKey, ProducerSettings

OPERATOR = "tfk_test-operator"
C100 = "tfk_test-c100"
C102 = "tfk_test-c102"
PAIR = "tfk_test-c100-c102"
API_KEYS = [
    ApiKey(name="ops", sha256=hash_key(OPERATOR), customers=["*"]),
    ApiKey(name="c100", sha256=hash_key(C100), customers=["C-100"]),
    ApiKey(name="c102", sha256=hash_key(C102), customers=["C-102"]),
    ApiKey(name="pair", sha256=hash_key(PAIR), customers=["C-100", "C-102"]),
]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def as_json(data: Any) -> Any:
    """What a value looks like after a trip through JSON."""
    return json.loads(json.dumps(data))


@contextlib.asynccontextmanager
async def serve(redis_url: str, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The real app under uvicorn on a free port in this event loop; a client for it
    (``api_keys`` defaults to ``API_KEYS``)."""
    app = create_app(ProducerSettings(**{"api_keys": API_KEYS, **settings}), redis_url)
    async with serving_app(app) as base_url, httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        yield client


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30) -> None:
    """Wait until ``check()`` holds, or fail naming it."""
    await until(check, what, timeout_s)


async def support_scenario(producer: Producer, fleet_env: dict[str, str], tmp_path: Path,
                           **telemetry_env: str) -> dict[str, str]:
    """Three customers' conversations through a burst worker and burst telemetry."""
    turns = {
        "dana-1": ("conv-dana", "C-100", "Hi, I'm Dana Whitfield, customer C-100."),
        "dana-2": ("conv-dana", "C-100", "Where is order 1042?"),
        "priya-1": ("conv-priya", "C-102", "I'd like a refund for order 1047, the headphones stopped working."),
        "aiko-1": ("conv-aiko", "C-104", "Hello, this is Aiko Tanaka."),
    }
    ids = {name: await producer.enqueue_turn(conversation_id=c, customer_id=cust, text=text)
           for name, (c, cust, text) in turns.items()}
    run_burst("worker", fleet_env, tmp_path)
    run_burst("telemetry", {**fleet_env, **telemetry_env}, tmp_path)
    return ids


async def test_replays_over_http_equal_the_replay_and_each_key_sees_only_its_customers(
    redis, redis_url, producer, fleet_env, tmp_path
):
    ids = await support_scenario(producer, fleet_env, tmp_path)
    dana = as_json(await conversation_replay(redis, "conv-dana"))
    priya = as_json(await conversation_replay(redis, "conv-priya"))
    assert len(dana["turns"]) == 2 and dana["totals"]["turns_completed"] == 2
    async with serve(redis_url) as http:
        for key in (OPERATOR, C100):
            r = await http.get("/v1/conversations/conv-dana", headers=auth(key))
            assert r.status_code == 200 and r.json() == dana
        r = await http.get("/v1/conversations/conv-priya", headers=auth(OPERATOR))
        assert r.status_code == 200 and r.json() == priya

        # Another customer's conversation and turn answer exactly like ones that do not exist.
        hidden = await http.get("/v1/conversations/conv-priya", headers=auth(C100))
        missing = await http.get("/v1/conversations/conv-nope", headers=auth(C100))
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json() == {"error": "not_found", "message": "no conversation 'conv-priya'"}
        assert missing.json()["error"] == "not_found"

        turn = ids["priya-1"]
        r = await http.get(f"/v1/turns/{turn}/replay", headers=auth(OPERATOR))
        assert r.status_code == 200 and r.json() == as_json(await turn_replay(redis, turn))
        assert r.json()["turn"]["status"] == "completed"
        assert (await http.get(f"/v1/turns/{turn}/replay", headers=auth(C102))).status_code == 200
        hidden = await http.get(f"/v1/turns/{turn}/replay", headers=auth(C100))
        assert hidden.status_code == 404 and hidden.json()["error"] == "not_found"
        assert (await http.get("/v1/turns/t-nope/replay", headers=auth(C100))).status_code == 404

        for headers in ({}, auth("tfk_not-a-key"), {"X-API-Key": "tfk_not-a-key"}):
            r = await http.get("/v1/conversations/conv-dana", headers=headers)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        r = await http.get("/v1/conversations/conv-dana", headers={"X-API-Key": C100})
        assert r.status_code == 200


async def test_find_searches_the_keys_customers_only(redis, redis_url, producer, fleet_env, tmp_path):
    await support_scenario(producer, fleet_env, tmp_path)
    everything = as_json(await find_conversations(redis))
    assert {r["conversation_id"] for r in everything} == {"conv-dana", "conv-priya", "conv-aiko"}
    async with serve(redis_url) as http:
        async def find(key: str, **params: Any) -> Any:
            r = await http.get("/v1/find", params=params, headers=auth(key))
            assert r.status_code == 200, r.text
            return r.json()

        assert await find(OPERATOR) == everything
        assert await find(OPERATOR, tool="process_refund") == as_json(
            await find_conversations(redis, tool="process_refund"))
        # A customer key without `customer`: the union over its customers, newest first.
        assert await find(C100) == [r for r in everything if r["customer_id"] == "C-100"]
        assert await find(PAIR) == [r for r in everything if r["customer_id"] in ("C-100", "C-102")]
        assert await find(PAIR, limit=1) == (await find(PAIR))[:1]
        assert await find(PAIR, agent="Billing") == as_json(
            await find_conversations(redis, agent="Billing", customer="C-102"))
        assert await find(C100, customer="C-100", since="1h") == as_json(
            await find_conversations(redis, customer="C-100"))
        # Another customer's conversations are as invisible as a customer with none.
        assert await find(C100, customer="C-102") == []
        assert await find(C100, tool="process_refund") == []
        assert await find(C102, tool="process_refund") == [
            r for r in everything if r["conversation_id"] == "conv-priya"]

        bad = await http.get("/v1/find", params={"since": "yesterday"}, headers=auth(OPERATOR))
        assert bad.status_code == 422
        assert bad.json()["errors"][0]["field"] == "since"
        assert (await http.get("/v1/find")).status_code == 401


async def test_stats_equal_the_cli_figures_and_a_customer_key_gets_its_customers_only(
    redis, redis_url, producer, fleet_env, tmp_path
):
    await support_scenario(producer, fleet_env, tmp_path)
    async with serve(redis_url) as http:
        for by in ("model", "customer", "conversation"):
            r = await http.get("/v1/stats", params={"by": by}, headers=auth(OPERATOR))
            assert r.status_code == 200
            assert r.json() == as_json({
                "by": by, "rows": await stats(redis, by, limit=50), "totals": await totals(redis),
                "latency": await latency_report(redis), "slowest": await slowest_turns(redis, 10),
            })

        customers = {row["customer_id"]: row for row in as_json(await stats(redis, "customer"))}
        conversations = as_json(await stats(redis, "conversation"))
        slowest = as_json(await slowest_turns(redis, 1000))

        r = await http.get("/v1/stats", params={"by": "customer"}, headers=auth(C100))
        body = r.json()
        assert r.status_code == 200 and body["by"] == "customer"
        assert body["rows"] == [customers["C-100"]]
        identity = ("subject", "customer_id", "last_event_at")
        assert body["totals"] == {k: v for k, v in customers["C-100"].items() if k not in identity}
        assert body["latency"] is None
        assert body["slowest"] == [t for t in slowest if t["customer_id"] == "C-100"]
        assert len(body["slowest"]) == 2

        r = await http.get("/v1/stats", params={"by": "conversation", "slowest": 1}, headers=auth(PAIR))
        body = r.json()
        assert body["rows"] == [c for c in conversations if c["customer_id"] in ("C-100", "C-102")]
        assert {row["conversation_id"] for row in body["rows"]} == {"conv-priya", "conv-dana"}
        pair_totals = body["totals"]
        assert pair_totals["turns_completed"] == 3
        assert pair_totals["input_tokens"] == (customers["C-100"]["input_tokens"]
                                               + customers["C-102"]["input_tokens"])
        assert pair_totals["cost_usd"] == pytest.approx(customers["C-100"]["cost_usd"]
                                                        + customers["C-102"]["cost_usd"])
        assert body["slowest"] == [t for t in slowest if t["customer_id"] in ("C-100", "C-102")][:1]

        forbidden = await http.get("/v1/stats", params={"by": "model"}, headers=auth(C100))
        assert forbidden.status_code == 403 and forbidden.json()["error"] == "forbidden"
        assert (await http.get("/v1/stats", params={"by": "agent"},
                               headers=auth(OPERATOR))).status_code == 422
        assert (await http.get("/v1/stats")).status_code == 401


async def fire(redis: Any, customer_id: str | None, subject: str) -> str:
    """An alert written as telemetry/alerts.py writes it: one stream entry, field ``alert``."""
    alert = Alert(alert_id=f"al_{subject}", rule="test_rule", subject_kind="conversation",
                  subject=subject, window="once", message=f"test alert {subject}",
                  conversation_id=subject if customer_id else None, customer_id=customer_id)
    return await redis.xadd(keys.ALERTS_STREAM, {"alert": alert.model_dump_json()})


async def test_alerts_are_listed_per_key_and_fleet_alerts_only_for_operators(
    redis, redis_url, producer, fleet_env, tmp_path
):
    # A tiny threshold: every conversation raises a real conversation_cost alert.
    await support_scenario(producer, fleet_env, tmp_path,
                           TURNFLEET_ALERT_CONVERSATION_COST_USD="0.0000001")
    fleet_id = await fire(redis, None, "fleet")
    everything = [{"id": i, **a.model_dump(mode="json")} for i, a in await read_alerts(redis)]
    assert {(a["rule"], a["customer_id"]) for a in everything} == {
        ("conversation_cost", "C-100"), ("conversation_cost", "C-102"),
        ("conversation_cost", "C-104"), ("test_rule", None)}
    async with serve(redis_url) as http:
        async def alerts(key: str, **params: Any) -> list[dict[str, Any]]:
            r = await http.get("/v1/alerts", params=params, headers=auth(key))
            assert r.status_code == 200, r.text
            return r.json()

        assert await alerts(OPERATOR) == everything
        assert await alerts(C100) == [a for a in everything if a["customer_id"] == "C-100"]
        assert await alerts(PAIR) == [a for a in everything if a["customer_id"] in ("C-100", "C-102")]
        # Pages: `limit` visible alerts after `after`.
        first = await alerts(PAIR, limit=1)
        assert first == (await alerts(PAIR))[:1]
        assert await alerts(PAIR, after=first[0]["id"]) == (await alerts(PAIR))[1:]
        assert await alerts(OPERATOR, after=fleet_id) == []
        bad = await http.get("/v1/alerts", params={"after": "latest"}, headers=auth(OPERATOR))
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "after"
        assert (await http.get("/v1/alerts")).status_code == 401


async def read_event(lines: AsyncIterator[str], timeout_s: float = 15) -> dict[str, str]:
    """The next SSE event's fields (comments skipped)."""
    async def next_event() -> dict[str, str]:
        fields: dict[str, str] = {}
        async for line in lines:
            if not line:
                if fields:
                    return fields
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        raise AssertionError("the event stream ended")

    return await asyncio.wait_for(next_event(), timeout_s)


async def blocked_clients(redis: Any) -> int:
    return int((await redis.info("clients"))["blocked_clients"])


async def test_alert_stream_sends_events_and_resumes_after_last_event_id(redis, redis_url):
    a1 = await fire(redis, "C-100", "a1")
    await fire(redis, "C-102", "a2")
    await fire(redis, None, "a3")
    async with serve(redis_url) as http:
        async with http.stream("GET", "/v1/alerts", params={"follow": "true"},
                               headers=auth(C100)) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = r.aiter_lines()
            event = await read_event(lines)  # the backlog: C-100's only
            assert event["id"] == a1 and event["event"] == "alert"
            assert json.loads(event["data"])["alert_id"] == "al_a1"
            await fire(redis, "C-102", "a4-other")  # not this key's: skipped
            a5 = await fire(redis, "C-100", "a5")  # written while connected
            event = await read_event(lines)
            assert event["id"] == a5
            assert json.loads(event["data"]) == {"id": a5, **as_json(
                Alert.model_validate_json((await redis.xrange(keys.ALERTS_STREAM, a5, a5))[0][1]["alert"])
                .model_dump(mode="json"))}
        # The client left: the server stops its blocking reads.
        await eventually(lambda: _none_blocked(redis), what="the stream's XREAD to end")

        a6 = await fire(redis, "C-100", "a6")
        a7 = await fire(redis, "C-102", "a7")
        async with http.stream("GET", "/v1/alerts", params={"follow": "true"},
                               headers={**auth(C100), "Last-Event-ID": a5}) as r:
            event = await read_event(r.aiter_lines())
            assert event["id"] == a6  # only what came after the last event seen
        async with http.stream("GET", "/v1/alerts", params={"follow": "true", "after": a5},
                               headers=auth(OPERATOR)) as r:
            lines = r.aiter_lines()
            assert [(await read_event(lines))["id"] for _ in range(2)] == [a6, a7]
        async with http.stream("GET", "/v1/alerts", params={"follow": "true", "new_only": "true"},
                               headers=auth(OPERATOR)) as r:
            lines = r.aiter_lines()
            a8 = await fire(redis, None, "a8")  # the backlog is skipped; fleet alert: operator
            assert (await read_event(lines))["id"] == a8
        bad = await http.get("/v1/alerts", params={"follow": "true"},
                             headers={**auth(C100), "Last-Event-ID": "nope"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "Last-Event-ID"
        assert (await http.get("/v1/alerts", params={"follow": "true"})).status_code == 401
    await eventually(lambda: _none_blocked(redis), what="every stream's XREAD to end")


async def _none_blocked(redis: Any) -> bool:
    return await blocked_clients(redis) == 0


async def test_readyz_needs_a_live_worker_and_caught_up_telemetry(
    redis, redis_url, producer, fleet_env, tmp_path
):
    async with serve(redis_url, ready_max_telemetry_lag=0) as http:
        r = await http.get("/readyz")  # no key needed
        body = r.json()
        assert r.status_code == 503 and body["status"] == "not_ready"
        assert body["failing"] == ["workers"]
        assert body["checks"]["redis"] == {"ok": True}
        assert body["checks"]["workers"]["ok"] is False and body["checks"]["workers"]["alive"] == 0
        assert "heartbeat" in body["checks"]["workers"]["error"]
        assert body["checks"]["telemetry"]["ok"] is True and body["checks"]["telemetry"]["lag"] == 0

        turn = await producer.enqueue_turn(conversation_id="conv-r", customer_id="C-100",
                                           text="Where is order 1042?")
        worker = FleetProcess("worker", ["worker"], {**fleet_env, "TURNFLEET_WORKER_NAME": "w-ready"},
                              tmp_path / "worker.log").start()
        try:
            result = await producer.wait(turn, timeout_s=60)
            assert result is not None and result.status == "completed", worker.output()[-3000:]

            async def beating() -> bool:
                return await redis.zscore(keys.WORKERS, "w-ready") is not None
            await eventually(beating, what="the worker's heartbeat")
            assert await redis.hget(keys.WORKER_INFLIGHT, "w-ready") == "0"  # ran one, none left

            # A live worker, but the turn's telemetry entry is not aggregated yet.
            r = await http.get("/readyz")
            body = r.json()
            assert r.status_code == 503 and body["failing"] == ["telemetry"]
            assert body["checks"]["workers"]["ok"] is True and body["checks"]["workers"]["alive"] == 1
            assert body["checks"]["telemetry"]["lag"] == 1
            assert body["checks"]["telemetry"]["undelivered"] == 1

            run_burst("telemetry", fleet_env, tmp_path)
            r = await http.get("/readyz")
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "ready" and r.json()["failing"] == []
            assert r.json()["checks"]["telemetry"]["lag"] == 0
        finally:
            assert worker.stop() == 0, worker.output()[-3000:]
        # A worker that stops takes its heartbeat and in-flight count with it.
        assert await redis.zscore(keys.WORKERS, "w-ready") is None
        assert await redis.hget(keys.WORKER_INFLIGHT, "w-ready") is None
        r = await http.get("/readyz")
        assert r.status_code == 503 and r.json()["failing"] == ["workers"]
