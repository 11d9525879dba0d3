"""The HTTP API for real: the app served by uvicorn on a free port in the test's event loop,
an ``httpx.AsyncClient``, a real Redis, and real ``turnfleet worker --burst`` /
``turnfleet telemetry --burst`` subprocesses where a result or spend is needed.

Burst processes are awaited in a thread (``asyncio.to_thread``) so the server, which runs in
this loop, keeps answering while they work: that is what the long-poll test relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.uvicorn_server import serving_app
from turnfleet import budget, keys
from turnfleet.auth import hash_key, new_key

from tests.processes import run_burst_in_thread, tf
from turnfleet.shell.fleet import FleetProcess, listening_socket
from turnfleet.shell.server import create_app
from turnfleet.settings import ApiKey, ProducerSettings

KEY_A = new_key()  # customer C-100
KEY_B = new_key()  # customer C-102
KEY_OP = new_key()  # operator: every customer
API_KEYS = [
    ApiKey(name="svc-a", sha256=hash_key(KEY_A), customers=["C-100"]),
    ApiKey(name="svc-b", sha256=hash_key(KEY_B), customers=["C-102"]),
    ApiKey(name="ops", sha256=hash_key(KEY_OP), customers=["*"]),
]
REFUND_1047 = "I'd like a refund for order 1047, the headphones stopped working."


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_settings(**overrides: Any) -> ProducerSettings:
    return ProducerSettings(**{"api_keys": API_KEYS, **overrides})


@contextlib.asynccontextmanager
async def serving(settings: ProducerSettings, redis_url: str) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app under uvicorn in this loop, and a client for it; stopped on the way out."""
    app = create_app(settings, redis_url)
    async with serving_app(app) as base_url, httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        yield app, client


@pytest.fixture
async def served(redis_url: str) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async with serving(make_settings(), redis_url) as pair:
        yield pair


@pytest.fixture
async def api(served: tuple[FastAPI, httpx.AsyncClient]) -> httpx.AsyncClient:
    return served[1]


def turn(conversation_id: str, customer_id: str, text: str = "Where is order 1042?", **extra: Any) -> dict[str, Any]:
    return {"conversation_id": conversation_id, "customer_id": customer_id, "text": text, **extra}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """An error answer: the status, a JSON body with ``error`` and a message, no traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "Traceback" not in response.text and 'File "' not in response.text
    body = response.json()
    assert body["error"] == code and body["message"]
    return body


# -- enqueue, result, retries ---------------------------------------------------------


async def test_turn_posted_over_http_is_run_by_a_worker_and_read_back(api, fleet_env, tmp_path):
    posted = await api.post("/v1/turns", json=turn("conv-priya", "C-102", REFUND_1047), headers=auth(KEY_B))
    assert posted.status_code == 202, posted.text
    body = posted.json()
    turn_id = body["turn_id"]
    assert body == {"turn_id": turn_id, "conversation_id": "conv-priya", "status": "queued",
                    "status_url": f"/v1/turns/{turn_id}"}
    assert posted.headers["location"] == f"/v1/turns/{turn_id}"

    queued = await api.get(body["status_url"], headers=auth(KEY_B))
    assert queued.status_code == 200 and queued.json()["status"] == "queued"

    await run_burst_in_thread("worker", fleet_env, tmp_path)
    done = (await api.get(body["status_url"], headers=auth(KEY_B))).json()
    assert done["status"] == "completed"
    assert done["turn_id"] == turn_id and done["customer_id"] == "C-102"
    assert "$229.00" in done["final_output"] and "1047" in done["final_output"]
    assert done["agents"] == ["Triage", "Billing"]
    assert [c["tool"] for c in done["tool_calls"]] == ["check_refund_eligibility", "process_refund"]
    assert done["attempts"] == 1 and done["errors"] == []
    assert done["usage"]["requests"] >= 3 and done["usage"]["input_tokens"] > 0


async def test_same_idempotency_key_is_one_turn_and_is_answered_200(api, redis):
    headers = {**auth(KEY_B), "Idempotency-Key": "refund-1047-attempt"}
    body = turn("conv-retry", "C-102", REFUND_1047, metadata={"channel": "chat"})
    first = await api.post("/v1/turns", json=body, headers=headers)
    assert first.status_code == 202, first.text
    assert first.json()["turn_id"] == "refund-1047-attempt"

    again = await api.post("/v1/turns", json=body, headers=headers)
    assert again.status_code == 200, again.text
    assert again.json() == {**first.json(), "status": "queued"}
    # The body's turn_id is the same key when no header is sent.
    by_body = await api.post("/v1/turns", json={**body, "turn_id": "refund-1047-attempt"}, headers=auth(KEY_B))
    assert by_body.status_code == 200 and by_body.json()["turn_id"] == "refund-1047-attempt"

    assert await redis.zcard(keys.ARQ_QUEUE) == 1
    assert await redis.lrange(keys.conversation_turns("conv-retry"), 0, -1) == ["refund-1047-attempt"]
    assert await redis.hget(keys.COUNTERS, "turns_enqueued") == "1"

    # The same key for a different request is refused, not answered as if it were enqueued.
    other = await api.post("/v1/turns", json={**body, "text": "Where is order 1047?"}, headers=headers)
    err = assert_error(other, 422, "validation")
    assert err["errors"] == [{"field": "Idempotency-Key", "message": "already used for a different request"}]
    # Header and body disagreeing is an error, too.
    both = await api.post("/v1/turns", json={**body, "turn_id": "something-else"}, headers=headers)
    assert [e["field"] for e in assert_error(both, 422, "validation")["errors"]] == ["turn_id"]
    bad_key = await api.post("/v1/turns", json=body, headers={**auth(KEY_B), "Idempotency-Key": "no spaces"})
    assert [e["field"] for e in assert_error(bad_key, 422, "validation")["errors"]] == ["Idempotency-Key"]
    assert await redis.llen(keys.conversation_turns("conv-retry")) == 1


async def test_batch_judges_each_item_on_its_own(api, redis):
    items = [
        turn("conv-b1", "C-100", turn_id="b-1"),
        turn("conv-b2", "C-100", "   ", turn_id="b-2"),
        turn("conv-b3", "C-100", "Hello there", turn_id="b-3"),
        turn("conv-b4", "C-102", turn_id="b-4"),  # not this key's customer
        "not an object",
    ]
    resp = await api.post("/v1/turns:batch", json={"turns": items}, headers=auth(KEY_A))
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    assert [r["status"] for r in results] == [202, 422, 202, 403, 422]
    assert results[0]["turn_id"] == "b-1" and results[0]["turn_status"] == "queued"
    assert results[0]["status_url"] == "/v1/turns/b-1"
    assert results[1]["error"] == "validation"
    assert results[1]["errors"] == [{"field": "text", "message": "must not be empty"}]
    assert results[3]["error"] == "forbidden"
    # Rejected items wrote nothing.
    for rejected in ("b-2", "b-4"):
        assert not await redis.exists(keys.turn(rejected))
    for conversation in ("conv-b2", "conv-b4"):
        assert await redis.llen(keys.conversation_turns(conversation)) == 0
    assert sorted(await redis.zrange(keys.ARQ_QUEUE, 0, -1)) == ["b-1", "b-3"]

    # The same batch again: the accepted items are known (200), nothing new is written.
    again = (await api.post("/v1/turns:batch", json={"turns": items}, headers=auth(KEY_A))).json()["results"]
    assert [r["status"] for r in again] == [200, 422, 200, 403, 422]
    assert await redis.hget(keys.COUNTERS, "turns_enqueued") == "2"


async def test_batch_over_max_batch_is_refused_naming_the_limit(redis_url, redis):
    async with serving(make_settings(max_batch=3), redis_url) as (_, api):
        items = [turn(f"conv-{i}", "C-100") for i in range(4)]
        resp = await api.post("/v1/turns:batch", json={"turns": items}, headers=auth(KEY_A))
        err = assert_error(resp, 422, "validation")
        assert "the limit is 3" in err["message"]
        assert err["errors"][0]["field"] == "turns"
        missing = await api.post("/v1/turns:batch", json={"items": []}, headers=auth(KEY_A))
        assert assert_error(missing, 422, "validation")["errors"][0]["field"] == "turns"
    assert await redis.dbsize() == 0


# -- long poll ------------------------------------------------------------------------


async def test_long_poll_is_answered_when_a_worker_finishes_the_turn(api, redis, fleet_env, tmp_path):
    posted = await api.post("/v1/turns", json=turn("conv-wait", "C-102", REFUND_1047), headers=auth(KEY_B))
    url = posted.json()["status_url"]
    started = time.monotonic()
    poll = asyncio.create_task(api.get(url, params={"wait": 20}, headers=auth(KEY_B)))
    # The server is now waiting on the results stream: a client blocked in XREAD.
    deadline = time.monotonic() + 10
    while not any(c.get("cmd") == "xread" and "b" in c.get("flags", "") for c in await redis.client_list()):
        assert not poll.done(), poll.result().text
        assert time.monotonic() < deadline, "the long poll never reached Redis"
    assert not poll.done()

    await run_burst_in_thread("worker", fleet_env, tmp_path)
    answered = await poll
    assert answered.status_code == 200, answered.text
    assert answered.json()["status"] == "completed"
    assert "$229.00" in answered.json()["final_output"]
    assert time.monotonic() - started < 20


async def test_wait_outside_its_bounds_is_422(api):
    posted = await api.post("/v1/turns", json=turn("conv-w", "C-100"), headers=auth(KEY_A))
    url = posted.json()["status_url"]
    for wait in ("0", "-1", "60.5", "nan", "inf", "soon"):
        resp = await api.get(url, params={"wait": wait}, headers=auth(KEY_A))
        err = assert_error(resp, 422, "validation")
        assert any(e["field"].endswith("wait") for e in err["errors"]), (wait, err)
    # In bounds, on an unfinished turn: the current state once the time is up.
    short = await api.get(url, params={"wait": "0.05"}, headers=auth(KEY_A))
    assert short.status_code == 200 and short.json()["status"] == "queued"


# -- who may do what ------------------------------------------------------------------


async def test_a_key_acts_only_for_its_customers(api, redis):
    forbidden = await api.post("/v1/turns", json=turn("conv-x", "C-102", turn_id="x-1"), headers=auth(KEY_A))
    assert "C-102" in assert_error(forbidden, 403, "forbidden")["message"]
    assert await redis.dbsize() == 0  # nothing written at all

    b = await api.post("/v1/turns", json=turn("conv-b", "C-102", turn_id="b-turn"), headers=auth(KEY_B))
    a = await api.post("/v1/turns", json=turn("conv-a", "C-100", turn_id="a-turn"), headers=auth(KEY_A))
    assert b.status_code == a.status_code == 202

    # Another customer's turn reads exactly like one that does not exist.
    hidden = assert_error(await api.get("/v1/turns/b-turn", headers=auth(KEY_A)), 404, "not_found")
    missing = assert_error(await api.get("/v1/turns/no-turn", headers=auth(KEY_A)), 404, "not_found")
    assert hidden == {**missing, "message": missing["message"].replace("no-turn", "b-turn")}
    assert (await api.get("/v1/turns/a-turn", headers=auth(KEY_A))).status_code == 200

    for turn_id, customer in (("a-turn", "C-100"), ("b-turn", "C-102")):
        seen = await api.get(f"/v1/turns/{turn_id}", headers=auth(KEY_OP))
        assert seen.status_code == 200 and seen.json()["customer_id"] == customer

    # A conversation belongs to the customer that started it.
    taken = await api.post("/v1/turns", json=turn("conv-b", "C-100", turn_id="a-2"), headers=auth(KEY_A))
    assert "conv-b" in assert_error(taken, 409, "conflict")["message"]
    assert not await redis.exists(keys.turn("a-2"))
    assert await redis.lrange(keys.conversation_turns("conv-b"), 0, -1) == ["b-turn"]


async def test_no_key_or_an_unknown_key_is_401(api, redis):
    body = turn("conv-1", "C-100")
    for headers in ({}, {"Authorization": "Bearer tfk_not-a-key"}, {"X-API-Key": "nope"},
                    {"Authorization": "Basic abc"}):
        assert_error(await api.post("/v1/turns", json=body, headers=headers), 401, "unauthorized")
        assert_error(await api.post("/v1/turns:batch", json={"turns": [body]}, headers=headers), 401, "unauthorized")
        assert_error(await api.get("/v1/turns/t-1", headers=headers), 401, "unauthorized")
    assert await redis.dbsize() == 0
    # X-API-Key is the other way to present a key.
    assert (await api.post("/v1/turns", json=body, headers={"X-API-Key": KEY_A})).status_code == 202


# -- input limits ---------------------------------------------------------------------


async def test_body_over_max_body_bytes_is_413_as_json(redis_url, redis):
    async with serving(make_settings(max_body_bytes=1024), redis_url) as (_, api):
        big = turn("conv-big", "C-100", "x" * 2000)
        assert_error(await api.post("/v1/turns", json=big, headers=auth(KEY_A)), 413, "too_large")

        async def chunked():  # no Content-Length: the limit is enforced as the body streams in
            raw = json.dumps(big).encode()
            for i in range(0, len(raw), 256):
                yield raw[i:i + 256]

        streamed = await api.post("/v1/turns", content=chunked(),
                                  headers={**auth(KEY_A), "Content-Type": "application/json"})
        assert_error(streamed, 413, "too_large")
        batch = await api.post("/v1/turns:batch", json={"turns": [big]}, headers=auth(KEY_A))
        assert_error(batch, 413, "too_large")
    assert await redis.dbsize() == 0


async def test_422_names_each_bad_field_and_writes_nothing(api, redis):
    bad = {"conversation_id": "c 1", "customer_id": "C-100", "text": "", "metadata": {"a": {"b": "c"}}}
    err = assert_error(await api.post("/v1/turns", json=bad, headers=auth(KEY_A)), 422, "validation")
    fields = {e["field"]: e["message"] for e in err["errors"]}
    assert set(fields) == {"conversation_id", "text", "metadata"}
    assert "outside letters" in fields["conversation_id"]
    assert fields["text"] == "must not be empty"
    assert "flat" in fields["metadata"]
    for field in fields:
        assert field in err["message"]

    cases = [
        ({"customer_id": "C-100", "text": "hi"}, {"conversation_id": "is required"}),
        ({**turn("c-1", "C-100"), "enqueued_at": "2020-01-01T00:00:00Z"}, {"enqueued_at": "is not a known field"}),
        ({**turn("c-1", "C-100"), "text": "x" * 8001}, {"text": "is 8001 characters long; the limit is 8000"}),
    ]
    for body, expected in cases:
        got = assert_error(await api.post("/v1/turns", json=body, headers=auth(KEY_A)), 422, "validation")
        assert {e["field"]: e["message"] for e in got["errors"]} == expected
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        resp = await api.post("/v1/turns", content=raw,
                              headers={**auth(KEY_A), "Content-Type": "application/json"})
        assert_error(resp, 422, "validation")
    assert_error(await api.get("/v1/nowhere", headers=auth(KEY_A)), 404, "not_found")
    assert await redis.dbsize() == 0


# -- budgets --------------------------------------------------------------------------


async def test_customer_over_daily_budget_gets_429_with_retry_after(redis_url, redis, fleet_env, tmp_path):
    limit = 0.0005  # one refund turn of the offline model costs more than this
    async with serving(make_settings(budgets={"C-102": limit}), redis_url) as (_, api):
        first = await api.post("/v1/turns", json=turn("conv-spend", "C-102", REFUND_1047),
                               headers={**auth(KEY_B), "Idempotency-Key": "spend-1"})
        assert first.status_code == 202, first.text
        await run_burst_in_thread("worker", fleet_env, tmp_path)
        await run_burst_in_thread("telemetry", fleet_env, tmp_path)
        spent = await budget.spend_today(redis, "C-102")
        assert spent > limit

        refused = await api.post("/v1/turns", json=turn("conv-spend", "C-102", "Where is order 1047?",
                                                         turn_id="spend-2"), headers=auth(KEY_B))
        err = assert_error(refused, 429, "budget_exceeded")
        now = datetime.now(timezone.utc)
        assert err["budget"] == {
            "customer_id": "C-102", "limit_usd": limit, "spent_usd": pytest.approx(spent),
            "day": now.date().isoformat(), "resets_at": budget.resets_at(now).isoformat().replace("+00:00", "Z"),
        }
        retry_after = int(refused.headers["retry-after"])
        assert 0 < retry_after <= 86400
        assert abs((budget.resets_at(now) - now).total_seconds() - retry_after) < 5
        # Nothing enqueued for the refused turn.
        assert not await redis.exists(keys.turn("spend-2"))
        assert await redis.zcard(keys.ARQ_QUEUE) == 0
        assert await redis.lrange(keys.conversation_turns("conv-spend"), 0, -1) == ["spend-1"]

        # A retry of the turn accepted before the budget ran out still gets its answer.
        retry = await api.post("/v1/turns", json=turn("conv-spend", "C-102", REFUND_1047),
                               headers={**auth(KEY_B), "Idempotency-Key": "spend-1"})
        assert retry.status_code == 200 and retry.json()["status"] == "completed"
        # Batches: the customer's items are 429, other customers' go through.
        batch = await api.post("/v1/turns:batch", headers=auth(KEY_OP), json={"turns": [
            turn("conv-spend", "C-102", turn_id="spend-3"), turn("conv-other", "C-100", turn_id="other-1")]})
        results = batch.json()["results"]
        assert [r["status"] for r in results] == [429, 202]
        assert results[0]["error"] == "budget_exceeded" and results[0]["budget"]["customer_id"] == "C-102"
        assert not await redis.exists(keys.turn("spend-3"))


# -- key rotation ---------------------------------------------------------------------


def write_keys(path: Path, *entries: tuple[str, str, list[str]]) -> None:
    path.write_text(json.dumps([{"name": n, "sha256": hash_key(k), "customers": c} for n, k, c in entries]))


@pytest.mark.parametrize("trigger", ["sighup", "file_check"])
async def test_rotated_keys_file_takes_effect_without_restart(redis_url, tmp_path, trigger):
    k1, k2 = new_key(), new_key()
    path = tmp_path / "keys.json"
    write_keys(path, ("old", k1, ["C-100"]))
    reload_s = 3600 if trigger == "sighup" else 0.02  # SIGHUP alone, or the periodic mtime check
    settings = make_settings(api_keys=[], api_keys_file=path, api_keys_reload_s=reload_s)
    async with serving(settings, redis_url) as (app, api):
        assert (await api.post("/v1/turns", json=turn("c-rot", "C-100"), headers=auth(k1))).status_code == 202
        assert_error(await api.get("/v1/turns/t", headers=auth(k2)), 401, "unauthorized")

        app.state.keys.reloaded.clear()
        write_keys(path, ("new", k2, ["C-100"]))
        if trigger == "sighup":
            # The app's lifespan installed its handler in this loop (else SIGHUP would end pytest).
            assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            os.kill(os.getpid(), signal.SIGHUP)
        else:
            stat = path.stat()  # a visible mtime change, whatever the filesystem's granularity
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        # The reload runs on a later loop turn: wait for the store to say it reloaded.
        await asyncio.wait_for(app.state.keys.reloaded.wait(), 5)

        assert_error(await api.post("/v1/turns", json=turn("c-rot", "C-100"), headers=auth(k1)), 401, "unauthorized")
        assert (await api.post("/v1/turns", json=turn("c-rot", "C-100"), headers=auth(k2))).status_code == 202


# -- the CLI verbs ----------------------------------------------------------------------


async def test_apikey_new_entry_lets_turnfleet_serve_accept_the_key_and_stop_gracefully(fleet_env, tmp_path):
    made = tf("apikey", "new", "--name", "billing-svc", "--customer", "C-102", "--json", env=fleet_env)
    assert made.returncode == 0, made.stderr
    key, entry = json.loads(made.stdout)["key"], json.loads(made.stdout)["entry"]
    assert entry == {"name": "billing-svc", "sha256": hash_key(key), "customers": ["C-102"]}
    assert tf("apikey", "hash", key, env=fleet_env).stdout.strip() == entry["sha256"]
    plain = tf("apikey", "new", "--name", "ops", "--operator", env=fleet_env)
    line_key, line_entry = plain.stdout.strip().splitlines()
    assert json.loads(line_entry)["sha256"] == hash_key(line_key)
    assert json.loads(line_entry)["customers"] == ["*"]
    bad = tf("apikey", "new", "--name", "x", "--customer", "no spaces", env=fleet_env)
    assert bad.returncode == 2 and "--customer" in bad.stderr and "Traceback" not in bad.stderr

    env = {**fleet_env, "TURNFLEET_API_KEYS": json.dumps([entry])}
    sock = listening_socket()  # the client's first request queues on it until serve is up
    port = sock.getsockname()[1]
    proc = FleetProcess("serve", ["serve", "--fd", str(sock.fileno())], env, tmp_path / "serve.log",
                        pass_fds=(sock.fileno(),)).start()
    sock.close()  # the child holds it now: if it dies, the request fails instead of waiting
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            healthz = await client.get("/healthz")
            assert healthz.status_code == 200, proc.output()[-3000:]
            posted = await client.post("/v1/turns", json=turn("conv-serve", "C-102"), headers=auth(key))
            assert posted.status_code == 202, posted.text
            assert (await client.get(posted.json()["status_url"], headers=auth(key))).json()["status"] == "queued"
            assert "server" not in posted.headers  # no uvicorn banner
    finally:
        code = await asyncio.to_thread(proc.stop, 15)
    assert code == 0, proc.output()[-3000:]
    assert "http.serving" in proc.output()
