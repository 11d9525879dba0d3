"""The edges of erasure: ``turnfleet forget`` and ``DELETE /v1/customers|conversations/{id}``.

What erasure removes is proven by tests/test_erasure.py (every key of every Redis scanned);
here: what the CLI prints and exits with, who may erase over HTTP, that a subject with a turn
still queued is refused with nothing erased, that erasing again finds nothing, and that each
erasure is audited without naming its subject.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from turnfleet.producer import ErasureBusy, Producer
from tests.processes import tf
from tests.test_operator_views import pii_turn
from tests.test_http_read import C100, OPERATOR, auth, serve
from turnfleet import audit, keys


async def _queued_turn(redis: Any, customer: str = "C-100", conversation: str = "conv-queued") -> str:
    """A turn that stays queued: no worker runs in these tests unless one is started."""
    async with Producer(redis=redis) as producer:
        return await producer.enqueue_turn(conversation_id=conversation, customer_id=customer, text="where is 1042?")


async def test_cli_forget_prints_what_it_removed_and_a_second_run_finds_nothing(redis, fleet_env, tmp_path):
    turn_id = await pii_turn(redis, fleet_env, tmp_path)
    first = tf("forget", "--customer", "C-100", env=fleet_env)
    assert first.returncode == 0, first.stderr
    line = first.stdout.splitlines()[0]
    assert line.startswith("Erased customer 'C-100': 1 conversation(s), 1 turn(s); removed "), first.stdout
    assert "refund ledger" in first.stdout and "AOF" in first.stdout and "webhook" in first.stdout
    gone = tf("result", turn_id, env=fleet_env)
    assert gone.returncode == 1 and "no turn" in gone.stderr
    assert not await redis.exists(keys.turn(turn_id), keys.customer_conversations("C-100"))

    again = tf("forget", "--customer", "C-100", "--json", env=fleet_env)
    assert again.returncode == 0, again.stderr
    body = json.loads(again.stdout)
    assert body["nothing"] is True and body["turns"] == 0 and body["keys"] == 0
    assert (body["erased"], body["id"]) == ("customer", "C-100")
    text = tf("forget", "--conversation", "conv-pii", env=fleet_env)
    assert text.returncode == 0 and text.stdout.startswith("Nothing to erase for conversation 'conv-pii'")

    # Each erasure is in the audit log: who and what, never whom.
    audit = tf("audit", "--json", env=fleet_env)
    entries = json.loads(audit.stdout)["entries"]
    assert [e["what"] for e in entries] == ["forget customer", "forget customer", "forget conversation"]
    assert all(e["who"].startswith("cli:") for e in entries)
    assert "C-100" not in audit.stdout and "conv-pii" not in audit.stdout


async def test_cli_forget_refuses_while_a_turn_is_queued_and_erases_nothing(redis, fleet_env):
    turn_id = await _queued_turn(redis)
    busy = tf("forget", "--customer", "C-100", "--json", env=fleet_env)
    assert busy.returncode == 3, (busy.stdout, busy.stderr)
    err = json.loads(busy.stderr)
    assert err["error"] == "busy" and "nothing was erased" in err["message"]
    assert await redis.hget(keys.turn(turn_id), "status") == "queued"
    plain = tf("forget", "--conversation", "conv-queued", env=fleet_env)
    assert plain.returncode == 3 and "nothing was erased" in plain.stderr and "Traceback" not in plain.stderr
    assert await redis.exists(keys.turn(turn_id))


@pytest.mark.parametrize("args,message", [
    (["forget"], "one of the arguments --customer --conversation is required"),
    (["forget", "--customer", "C-100", "--conversation", "c-1"], "not allowed with argument"),
    (["forget", "--customer", "C-100\n"], "--customer"),
    (["forget", "--conversation", "a b"], "--conversation"),
    (["forget", "--customer", "C-100", "--wait", "-1"], "--wait"),
])
def test_cli_forget_bad_input_is_a_usage_error(args, message, fleet_env, redis_server):
    proc = tf(*args, env=fleet_env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


async def test_http_erasure_is_for_operator_keys_and_is_idempotent(redis, redis_url, fleet_env, tmp_path: Path):
    turn_id = await pii_turn(redis, fleet_env, tmp_path)
    async with serve(redis_url) as http:
        for path in ("/v1/customers/C-100", "/v1/conversations/conv-pii"):
            r = await http.delete(path, headers=auth(C100))  # a customer key may not erase, even itself
            assert r.status_code == 403 and r.json()["error"] == "forbidden", r.text
            r = await http.delete(path)
            assert r.status_code == 401
        assert await redis.exists(keys.turn(turn_id))

        bad = await http.delete("/v1/customers/C-100", params={"wait": "-1"}, headers=auth(OPERATOR))
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "wait", bad.text
        bad = await http.delete("/v1/conversations/a%20b", headers=auth(OPERATOR))
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "conversation_id", bad.text

        r = await http.delete("/v1/conversations/conv-pii", headers=auth(OPERATOR))
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["erased"], body["id"], body["conversations"], body["turns"]) == (
            "conversation", "conv-pii", 1, 1)
        assert body["nothing"] is False and body["keys"] > 0 and "ledger" in body["kept"]
        assert "AOF" in body["not_reached"]
        assert (await http.get(f"/v1/turns/{turn_id}", headers=auth(OPERATOR))).status_code == 404

        again = await http.delete("/v1/conversations/conv-pii", headers=auth(OPERATOR))
        assert again.status_code == 200 and again.json()["nothing"] is True
        whole = await http.delete("/v1/customers/C-100", headers=auth(OPERATOR))
        assert whole.status_code == 200 and whole.json()["customers"] in (0, 1), whole.text
        audit = await http.get("/v1/audit", headers=auth(OPERATOR))
        whats = [e["what"] for e in audit.json()["entries"]]
        assert whats.count("forget conversation") == 2 and whats.count("forget customer") == 1
        assert "C-100" not in audit.text and "conv-pii" not in audit.text and turn_id not in audit.text


async def test_http_erasure_refuses_while_a_turn_is_queued(redis, redis_url):
    turn_id = await _queued_turn(redis)
    async with serve(redis_url) as http:
        r = await http.delete("/v1/customers/C-100", headers=auth(OPERATOR))
        assert r.status_code == 409, r.text
        assert r.json()["error"] == "busy" and r.json()["unfinished"] == 1
        r = await http.delete("/v1/conversations/conv-queued", headers=auth(OPERATOR))
        assert r.status_code == 409 and r.json()["unfinished"] == 1
    assert await redis.hget(keys.turn(turn_id), "status") == "queued"
    assert await redis.zscore(keys.customer_conversations("C-100"), "conv-queued") is not None


async def test_python_api_forget_erases_and_refuses_while_busy(redis, fleet_env, tmp_path):
    turn_id = await pii_turn(redis, fleet_env, tmp_path)
    queued = await _queued_turn(redis, customer="C-101", conversation="conv-busy")
    async with Producer(redis=redis) as producer:
        with pytest.raises(ErasureBusy) as busy:
            await producer.forget(customer_id="C-101")
        assert busy.value.unfinished == 1 and await redis.exists(keys.turn(queued))
        with pytest.raises(ValueError, match="customer_id"):
            await producer.forget(customer_id="C-100\n")
        report = await producer.forget(customer_id="C-100", who="crm")
        assert (report.conversations, report.turns, report.nothing) == (1, 1, False)
        assert await producer.result(turn_id) is None
        assert (await producer.forget(customer_id="C-100")).nothing
    entries = [e for e in await audit.entries(redis) if e["what"] == "forget customer"]
    assert [e["who"] for e in entries] == ["crm", "python"]  # a refusal erased nothing: not an erasure
