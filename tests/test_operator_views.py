"""What an operator reads is redacted; raw text is an opt-in that is permitted and audited.

A turn whose text carries a card number and an e-mail address runs through a real burst worker
and telemetry; the CLI (subprocesses) and HTTP (uvicorn) views are read back from the same Redis.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from turnfleet.producer import Producer
from tests.processes import tf
from tests.processes import run_burst
from tests.test_http_read import API_KEYS, C100, OPERATOR, auth, serve
from turnfleet import keys
from turnfleet.auth import hash_key
from turnfleet.settings import ApiKey

CARD = "4111 1111 1111 1111"
EMAIL = "dana.whitfield@example.com"
TEXT = f"Please charge my card {CARD} and mail the receipt to {EMAIL}"
AUDITOR = "tfk_test-auditor"
KEYS = [*API_KEYS, ApiKey(name="auditor", sha256=hash_key(AUDITOR), customers=["*"], unredacted=True)]


async def pii_turn(redis: Any, fleet_env: dict[str, str], tmp_path: Path) -> str:
    async with Producer(redis=redis) as producer:
        turn_id = await producer.enqueue_turn(conversation_id="conv-pii", customer_id="C-100", text=TEXT)
    run_burst("worker", fleet_env, tmp_path)
    run_burst("telemetry", fleet_env, tmp_path)
    return turn_id


def assert_redacted(body: str) -> None:
    assert "[REDACTED:card]" in body and "[REDACTED:email]" in body, body[:2000]
    assert CARD not in body and EMAIL not in body


def assert_raw(body: str) -> None:
    assert CARD in body and EMAIL in body, body[:2000]


async def test_http_views_redact_for_operators_and_a_customer_reads_its_own_turn_as_written(
    redis, redis_url, fleet_env, tmp_path
):
    turn_id = await pii_turn(redis, fleet_env, tmp_path)
    async with serve(redis_url, api_keys=KEYS) as http:
        for path in ("/v1/conversations/conv-pii", f"/v1/turns/{turn_id}/replay", f"/v1/turns/{turn_id}"):
            for key in (OPERATOR, AUDITOR):  # the permission alone does not unredact
                r = await http.get(path, headers=auth(key))
                assert r.status_code == 200, r.text
                assert_redacted(r.text)
        # The replays redact for every key; the caller's own result is the end user's answer.
        for path in ("/v1/conversations/conv-pii", f"/v1/turns/{turn_id}/replay"):
            r = await http.get(path, headers=auth(C100))
            assert r.status_code == 200 and r.text
            assert_redacted(r.text)
        own = await http.get(f"/v1/turns/{turn_id}", headers=auth(C100))
        assert own.status_code == 200 and own.json()["text"] == TEXT
    assert await redis.xlen(keys.AUDIT) == 0


async def test_http_unredacted_needs_the_permission_and_each_read_is_audited(
    redis, redis_url, fleet_env, tmp_path
):
    turn_id = await pii_turn(redis, fleet_env, tmp_path)
    paths = {"/v1/conversations/conv-pii": ("GET /v1/conversations/{id}", "conv-pii"),
             f"/v1/turns/{turn_id}/replay": ("GET /v1/turns/{id}/replay", turn_id),
             f"/v1/turns/{turn_id}": ("GET /v1/turns/{id}", turn_id)}
    async with serve(redis_url, api_keys=KEYS) as http:
        for path in paths:
            for key in (OPERATOR, C100):
                r = await http.get(path, params={"unredacted": "true"}, headers=auth(key))
                assert r.status_code == 403, r.text
                assert r.json()["error"] == "forbidden" and "unredacted" in r.json()["message"]
        assert await redis.xlen(keys.AUDIT) == 0

        for n, path in enumerate(paths, start=1):
            r = await http.get(path, params={"unredacted": "true"}, headers=auth(AUDITOR))
            assert r.status_code == 200, r.text
            assert_raw(r.text)
            assert await redis.xlen(keys.AUDIT) == n  # exactly one entry per read

        listed = await http.get("/v1/audit", headers=auth(OPERATOR))
        assert listed.status_code == 200, listed.text
        entries = listed.json()["entries"]
        assert [(e["who"], e["what"], e["subject"]) for e in entries] == [
            ("auditor", what, subject) for what, subject in paths.values()]
        assert all(e["at"].endswith("Z") and e["id"] for e in entries)
        assert CARD not in listed.text and EMAIL not in listed.text  # no customer text in the log
        forbidden = await http.get("/v1/audit", headers=auth(C100))
        assert forbidden.status_code == 403 and forbidden.json()["error"] == "forbidden"


async def test_cli_views_redact_and_unredacted_is_audited(redis, fleet_env, tmp_path):
    turn_id = await pii_turn(redis, fleet_env, tmp_path)
    for args in (["conversation", "conv-pii"], ["conversation", "conv-pii", "--json"],
                 ["turn", turn_id], ["turn", turn_id, "--json"],
                 ["result", turn_id], ["result", turn_id, "--json"]):
        proc = tf(*args, env={**fleet_env, "COLUMNS": "400"})
        assert proc.returncode == 0, proc.stderr
        assert_redacted(proc.stdout)
    assert await redis.xlen(keys.AUDIT) == 0
    empty = tf("audit", env=fleet_env)
    assert empty.returncode == 0 and empty.stdout.strip() == "No unredacted reads or erasures recorded."

    raw = tf("turn", turn_id, "--json", "--unredacted", env=fleet_env)
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout)["turn"]["text"] == TEXT
    assert await redis.xlen(keys.AUDIT) == 1

    listed = tf("audit", "--json", env=fleet_env)
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)["entries"]
    assert entry["who"].startswith("cli:") and "@" in entry["who"]
    assert (entry["what"], entry["subject"]) == ("turnfleet turn", turn_id)
    assert CARD not in listed.stdout and EMAIL not in listed.stdout
    text = tf("audit", env=fleet_env)
    assert text.returncode == 0 and turn_id in text.stdout and "turnfleet turn" in text.stdout


def test_apikey_new_unredacted_makes_an_entry_with_the_permission():
    proc = tf("apikey", "new", "--name", "auditor", "--operator", "--unredacted", "--json", env={})
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(proc.stdout)["entry"]
    assert ApiKey.model_validate(entry).unredacted is True
    plain = tf("apikey", "new", "--name", "ops", "--operator", "--json", env={})
    assert ApiKey.model_validate(json.loads(plain.stdout)["entry"]).unredacted is False
