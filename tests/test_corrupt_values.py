"""Corrupt values in Redis fail one turn, never a conversation (issue 12, item 4).

Each test writes the bad value straight into a real Redis, as an attacker with write access
or a bad migration would, then lets a real ``turnfleet worker --burst`` subprocess (and the
real reconciler) deal with it: the affected turn ends ``failed`` with a clear error type,
the conversation's next turn runs, and every reader answers instead of raising.
"""

from __future__ import annotations

import json
import subprocess

from turnfleet.producer import Producer
from turnfleet.telemetry.replay import turn_replay
from tests.processes import run_burst
from turnfleet import keys
from turnfleet.queue import CORRUPT_TURN_RECORD, TurnQueue, deserialize_job, UNDECODABLE_FUNCTION
from turnfleet.workers.memory import CORRUPT_ITEM_TYPE
from turnfleet.workers.reconcile import reconcile

DEEP = "[" * 100_000 + "]" * 100_000  # json.loads raises RecursionError on this, not ValueError

CORRUPT_REQUESTS = {
    "not-json": b"{not json",
    "wrong-shape": b"[1, 2, 3]",
    "deep": DEEP.encode(),
    "not-utf8": b'{"text": "\xff\xfe"}',
    "missing": None,  # the field deleted
    "not-a-hash": "string",  # the whole record replaced by a string
}


async def _two_turn_conversations(producer: Producer, names) -> dict[str, tuple[str, str]]:
    out = {}
    for name in names:
        first, second = await producer.enqueue_turns([
            {"conversation_id": f"cv-{name}", "customer_id": "C-100", "text": "Hello there"},
            {"conversation_id": f"cv-{name}", "customer_id": "C-100", "text": "Where is order 1043?"},
        ])
        out[name] = (first, second)
    return out


async def test_a_turn_whose_stored_request_is_corrupt_fails_and_its_conversation_moves_on(
    redis, fleet_env, tmp_path, turnfleet_cmd
):
    async with Producer(redis=redis) as producer:
        convs = await _two_turn_conversations(producer, CORRUPT_REQUESTS)
        for name, raw in CORRUPT_REQUESTS.items():
            turn = keys.turn(convs[name][0])
            if raw is None:
                await redis.hdel(turn, "request")
            elif raw == "string":
                await redis.delete(turn)
                await redis.set(turn, "garbage")
            else:
                await redis.execute_command("HSET", turn, "request", raw)
        queue = TurnQueue(redis)
        # Reading answers before the worker has seen it: the record is shown as corrupt.
        before = await queue.get(convs["deep"][0])
        assert before is not None and before.status == "queued"
        assert (before.error_type, before.conversation_id, before.customer_id) == (
            CORRUPT_TURN_RECORD, "cv-deep", "C-100")
        assert (await queue.get(convs["not-a-hash"][0])).error_type == CORRUPT_TURN_RECORD
        # The reconciler sees an unfinished head (not an error) and leaves the job be.
        assert set((await reconcile(redis, lease_s=2.0)).actions) == {"ok"}

        run_burst("worker", {**fleet_env, "TURNFLEET_RECONCILE_EVERY_S": "3600"}, tmp_path)

        for name, (first, second) in convs.items():
            failed, followed = await queue.get(first), await queue.get(second)
            assert (failed.status, failed.error_type, failed.attempts) == ("failed", CORRUPT_TURN_RECORD, 1), name
            assert ("not a hash" if name == "not-a-hash" else "stored request") in failed.error_message, name
            assert failed.customer_id == "C-100", name
            assert followed.status == "completed", (name, followed)
        # Nothing left for the reconciler: every conversation moved on, and a pass is clean.
        report = await reconcile(redis, lease_s=2.0)
        assert report.repaired == [] and set(report.actions) == {"idle"}
        replay = await turn_replay(redis, convs["not-utf8"][0])
        assert replay["turn"]["error_type"] == CORRUPT_TURN_RECORD
        assert [a["status"] for a in replay["attempts"]] == ["failed"]
        assert await redis.get(keys.turn_quarantine(convs["not-a-hash"][0])) == "garbage"  # kept aside

    cli = subprocess.run([*turnfleet_cmd, "result", convs["deep"][0], "--json"], env=fleet_env,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["error_type"] == CORRUPT_TURN_RECORD and "Traceback" not in cli.stderr


async def test_http_answers_for_a_turn_whose_record_is_corrupt(redis, redis_url):
    from tests.test_http import KEY_A, KEY_B, auth, make_settings, serving

    async with Producer(redis=redis) as producer:
        turn_id = await producer.enqueue_turn(conversation_id="cv-http", customer_id="C-100", text="Hello there")
    await redis.hset(keys.turn(turn_id), "request", DEEP)
    async with serving(make_settings(), redis_url) as (_app, api):
        status = await api.get(f"/v1/turns/{turn_id}", headers=auth(KEY_A))
        replay = await api.get(f"/v1/turns/{turn_id}/replay", headers=auth(KEY_A))
        other = await api.get(f"/v1/turns/{turn_id}", headers=auth(KEY_B))
    assert status.status_code == 200 and status.json()["error_type"] == CORRUPT_TURN_RECORD, status.text
    assert replay.status_code == 200 and replay.json()["turn"]["error_type"] == CORRUPT_TURN_RECORD, replay.text
    assert other.status_code == 404  # still only its own customer's


async def test_a_stored_result_or_attempt_error_that_is_corrupt_is_read_as_such(redis):
    async with Producer(redis=redis) as producer:
        turn_id = await producer.enqueue_turn(conversation_id="cv-r", customer_id="C-100", text="Hello there")
        await redis.execute_command("HSET", keys.turn(turn_id), "status", "completed", "result", b"\xff{")
        await redis.rpush(keys.turn_errors(turn_id), "[" * 50_000)
        result = await producer.result(turn_id)
    assert (result.status, result.error_type) == ("completed", CORRUPT_TURN_RECORD)
    assert "stored result" in result.error_message
    assert [e.error_type for e in result.errors] == [CORRUPT_TURN_RECORD]


async def test_one_conversation_the_reconcile_script_fails_on_does_not_stop_the_pass(redis):
    async with Producer(redis=redis) as producer:
        _, lost = await producer.enqueue_turns([
            {"conversation_id": "cv-wrongtype", "customer_id": "C-100", "text": "Hello there"},
            {"conversation_id": "cv-lost", "customer_id": "C-100", "text": "Hello there"},
        ])
    # A conversation queue of the wrong type (the script fails on it), and a healthy
    # conversation whose job is gone: the pass must still repair the second.
    await redis.delete(keys.conversation_queue("cv-wrongtype"))
    await redis.set(keys.conversation_queue("cv-wrongtype"), "not a list")
    await redis.delete(keys.ARQ_JOB_PREFIX + lost)
    await redis.zrem(keys.ARQ_QUEUE, lost)
    report = await reconcile(redis, lease_s=2.0)
    assert report.actions["error"] == 1
    assert [(r.conversation_id, r.action) for r in report.repaired] == [("cv-lost", "rewoke")]
    assert await redis.exists(keys.ARQ_JOB_PREFIX + lost)


# -- conversation memory -------------------------------------------------------------------


CORRUPT_ITEMS = ["{broken", b"\xff\xfe", "[" * 100_000, "[]", '{"no": "type or role"}']


async def test_a_corrupt_memory_item_is_marked_in_place_skipped_and_reported(redis, fleet_env, tmp_path):
    async with Producer(redis=redis) as producer:
        first = await producer.enqueue_turn(conversation_id="cv-mem", customer_id="C-100", text="Hello there")
        run_burst("worker", fleet_env, tmp_path, name="worker-1")
        memory = keys.session_messages("cv-mem")
        base = await redis.llen(memory)
        await redis.rpush(memory, *CORRUPT_ITEMS)  # e.g. a bad migration appended these
        ids = [await producer.enqueue_turn(conversation_id="cv-mem", customer_id="C-100", text=t)
               for t in ("Where is order 1043?", "Hello again")]
        worker = run_burst("worker", fleet_env, tmp_path, name="worker-2")
        results = [await producer.result(t) for t in (first, *ids)]

    assert [r.status for r in results] == ["completed"] * 3
    found = results[1].warnings
    assert len(found) == len(CORRUPT_ITEMS) and all("corrupt" in w and "skipped" in w for w in found)
    assert [w.split()[3] for w in found] == [str(base + i) for i in range(len(CORRUPT_ITEMS))]
    assert results[2].warnings == []  # marked once; later turns skip the markers quietly
    stored = await redis.lrange(memory, base, base + len(CORRUPT_ITEMS) - 1)
    markers = [json.loads(s) for s in stored]
    assert [m["type"] for m in markers] == [CORRUPT_ITEM_TYPE] * len(CORRUPT_ITEMS)
    assert markers[0]["found_by_turn"] == ids[0] and "sha256" in markers[0]
    # In place: the positions retries and roll-backs rely on did not shift.
    turn_record = await redis.hgetall(keys.turn(ids[0]))
    assert int(turn_record["memory_base"]) == base + len(CORRUPT_ITEMS)
    assert worker.output().count('"event": "memory.corrupt_item"') == len(CORRUPT_ITEMS)


# -- job payloads --------------------------------------------------------------------------


CORRUPT_PAYLOADS = {
    "deep": DEEP.encode(),
    "not-utf8": b"\xff\xfe\x00",
    "huge-number": b"9" * 5000,
    "huge-try": json.dumps({"t": 10**30, "f": "run_turn", "a": ["x", "y"], "k": {}, "et": 1}).encode(),
    "bad-id": json.dumps({"t": 1, "f": "run_turn", "a": ["\ud800", "y"], "k": {}, "et": 1}).encode(),
    "float-time": b'{"t": 1, "f": "run_turn", "a": ["x", "y"], "k": {}, "et": 1e999}',
}


def test_every_undecodable_payload_decodes_into_the_job_that_records_it():
    for name, raw in CORRUPT_PAYLOADS.items():
        job = deserialize_job(raw)
        assert job["f"] == UNDECODABLE_FUNCTION and isinstance(job["a"][0], str), name


async def test_every_undecodable_payload_fails_its_turn_promptly_and_the_conversation_moves_on(
    redis, fleet_env, tmp_path
):
    async with Producer(redis=redis) as producer:
        convs = await _two_turn_conversations(producer, [*CORRUPT_PAYLOADS, "another-turn"])
        for name, raw in CORRUPT_PAYLOADS.items():
            await redis.execute_command("SET", keys.ARQ_JOB_PREFIX + convs[name][0], raw)
        # Well-formed, but naming another conversation's queued turn instead of its own.
        await redis.set(keys.ARQ_JOB_PREFIX + convs["another-turn"][0], json.dumps(
            {"t": 1, "f": "run_turn", "a": [convs["deep"][1], "cv-deep"], "k": {}, "et": 1}))
        # No reconciler pass: the worker alone must end each turn. A job arq could not
        # decode would count as a failed job and make the burst exit 1.
        run_burst("worker", {**fleet_env, "TURNFLEET_RECONCILE_EVERY_S": "3600"}, tmp_path)
        for name, (first, second) in convs.items():
            failed, followed = await producer.result(first), await producer.result(second)
            assert (failed.status, failed.error_type) == ("failed", "UndecodableJob"), (name, failed)
            assert (followed.status, followed.attempts) == ("completed", 1), (name, followed)


async def test_repeating_a_turn_id_whose_record_is_corrupt_is_refused_not_an_error(redis, redis_url):
    """A retried POST (or enqueue) of a turn whose stored record is unreadable can't be shown
    to be the same turn: it is refused as a reused id (422), never a 500 or a raw exception."""
    from turnfleet.producer import TurnIdReused
    from tests.test_http import KEY_A, auth, make_settings, serving

    body = {"conversation_id": "cv-rep", "customer_id": "C-100", "text": "Hello there"}
    async with Producer(redis=redis) as producer:
        ids = [await producer.enqueue_turn(**body, turn_id=f"rep-{name}") for name in CORRUPT_REQUESTS]
        for turn_id, raw in zip(ids, CORRUPT_REQUESTS.values()):
            if raw is None:
                await redis.hdel(keys.turn(turn_id), "request")
            elif raw == "string":
                await redis.delete(keys.turn(turn_id))
                await redis.set(keys.turn(turn_id), "garbage")
            else:
                await redis.execute_command("HSET", keys.turn(turn_id), "request", raw)
        for turn_id in ids:
            try:
                await producer.enqueue_turn(**body, turn_id=turn_id)
            except TurnIdReused as exc:
                assert exc.errors[0]["field"] == "turn_id", exc.errors
            else:
                raise AssertionError(f"{turn_id}: a repeat of an unreadable turn was accepted")
    async with serving(make_settings(), redis_url) as (_app, api):
        answers = [await api.post("/v1/turns", json={**body, "turn_id": turn_id}, headers=auth(KEY_A))
                   for turn_id in ids]
    assert [a.status_code for a in answers] == [422] * len(ids), [a.text for a in answers]
    assert {a.json()["error"] for a in answers} == {"validation"}
    assert await redis.llen(keys.conversation_queue("cv-rep")) == len(ids)  # nothing more queued


async def test_a_replay_with_an_unreadable_trace_record_or_timeline_names_them_and_still_answers(
    redis, fleet_env, tmp_path, turnfleet_cmd
):
    async with Producer(redis=redis) as producer:
        turn_id = await producer.enqueue_turn(conversation_id="cv-replay", customer_id="C-100",
                                              text="Where is order 1043?")
    run_burst("worker", fleet_env, tmp_path)
    whole = await turn_replay(redis, turn_id)
    assert [a["source"] for a in whole["attempts"]] == ["trace"] and "unreadable" not in whole
    # Damage what the worker wrote: a second trace record that is not JSON, one that is too
    # deep, an event timeline of invalid UTF-8 and one under an attempt that is not a number.
    await redis.execute_command("RPUSH", keys.trace(turn_id), b"\xff{", DEEP)
    await redis.execute_command("HSET", keys.turn_events(turn_id), "7", b"\xfe[", "x", "[]")
    replay = await turn_replay(redis, turn_id)
    assert replay["attempts"] == whole["attempts"]  # what could be read is shown as before
    assert sorted(replay["unreadable"]) == sorted([
        "a trace record", "a trace record", "the event timeline of attempt 7",
        "the event timeline of attempt x"])
    # The spans themselves damaged: the replay falls back to the hook-event timeline.
    await redis.delete(keys.trace(turn_id))
    await redis.rpush(keys.trace(turn_id), json.dumps({"trace": {"attempt": 1}, "spans": [1, "x"]}))
    fallback = await turn_replay(redis, turn_id)
    assert [a["source"] for a in fallback["attempts"]] == ["events"]
    assert any(node["kind"] == "tool" for node in _walk(fallback["attempts"][0]["tree"]))
    cli = subprocess.run([*turnfleet_cmd, "turn", turn_id], env=fleet_env, capture_output=True,
                         text=True, timeout=60)
    assert cli.returncode == 0 and "lookup_order" in cli.stdout and "Traceback" not in cli.stderr, cli.stderr


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.get("children", []))
