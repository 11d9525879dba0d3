"""Raw text has a bounded life (issue 14): after ``raw_retention_s`` a finished turn keeps only
the redacted form, everywhere it kept the customer's words, and everything still works.

The scenario runs in real worker processes against the local OpenAI-compatible model server
(``tests/llm_server.py``, which also fails the calls of one turn with an error quoting the
customer's message), telemetry through the real consumer; the expiry pass is given an explicit
``now_ms`` (no waiting for the clock).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from turnfleet.producer import Producer
from turnfleet.telemetry.consumer import run_consumer
from turnfleet.telemetry.find import find_conversations
from turnfleet.telemetry.stats import stats
from turnfleet.telemetry.raw_expiry import RawExpiry
from turnfleet.telemetry.replay import conversation_replay
from tests.llm_server import llm_server  # noqa: F401 - the fixture
from tests.processes import tf
from tests.processes import run_burst
from tests.test_http_read import C100, auth, serve
from tests.worker_runtime import runtime
from tests.redis_scan import dump_keys
from turnfleet import keys
from turnfleet.models import (
    DEFAULT_MAX_METADATA_BYTES,
    DEFAULT_MAX_METADATA_ITEMS,
    DEFAULT_MAX_TEXT_CHARS,
    AttemptError,
    TurnRequest,
    TurnResult,
)
from turnfleet.raw_text import redact_request
from turnfleet.redaction import Redactor
from turnfleet.settings import CommonSettings, TelemetrySettings
from turnfleet.workers.job import run_turn
from turnfleet.workers.model import OfflineModel

CARD = "4111 1111 1111 1111"
PHONE = "+44 20 7946 0958"
EMAIL = "dana.whitfield@example.com"
KEY = "sk-proj-Zx8Kq2Lm9Np4Rt6Vw1Yb3Cd5Ef7Gh9Jk"
FAIL_EMAIL = "lee.park@example.org"  # the failing turn's: its model calls fail, quoting it
FAIL_CARD = "5500 0000 0000 0004"
RECENT_EMAIL = "robin.frost@example.net"  # a turn finished after the cutoff keeps it
EXPIRED = (CARD, PHONE, EMAIL, KEY, FAIL_EMAIL, FAIL_CARD)
WEEK_MS = 7 * 86_400_000


def redacted(obj, settings):
    """``obj`` as an operator reads it by default (the settings' patterns; this app has none)."""
    return Redactor.from_settings(settings).value(obj)


async def _run(ctx: dict[str, Any], producer: Producer, conv: str, text: str, **kw: Any) -> str:
    """One turn through the job function in this process (no telemetry redactor: for the
    tests that look at the turn's own records only)."""
    tid = await producer.enqueue_turn(conversation_id=conv, customer_id="C-100", text=text, **kw)
    assert await run_turn(ctx, tid, conv) == "completed"
    return tid


def _found(blob: str, values: tuple[str, ...]) -> list[str]:
    """Which of ``values`` occur in ``blob``."""
    return [v for v in values if v in blob]


async def _turn(producer: Producer, conv: str, text: str) -> str:
    return await producer.enqueue_turn(conversation_id=conv, customer_id="C-100", text=text)


async def _run_fleet_scenario(producer: Producer, server: Any, env: dict[str, str], tmp_path: Path,
                              conv: str) -> tuple[str, str, str]:
    """Through a real worker process: two turns of ``conv`` holding a card, phone, e-mail and
    key (the second opens an escalation ticket), and a turn of ``<conv>-fail`` whose model calls
    fail with an error quoting the customer (two attempts, both fail)."""
    t1 = await _turn(producer, conv, f"Where is order 1043? My card is {CARD}, phone {PHONE}.")
    t2 = await _turn(producer, conv, f"I want to talk to a human. Mail {EMAIL}, my key is {KEY}.")
    server.inject("400", times=None, match=FAIL_EMAIL, echo=True)
    failed = await _turn(producer, f"{conv}-fail", f"Refund order 1042 to card {FAIL_CARD}, mail {FAIL_EMAIL}")
    run_burst("worker", env, tmp_path)
    return t1, t2, failed


async def test_expired_turns_keep_only_redacted_text_everywhere_and_everything_still_works(
    redis, redis_url, fleet_env, tmp_path, llm_server  # noqa: F811
):
    server = llm_server()
    env = server.worker_env(fleet_env, TURNFLEET_MAX_ATTEMPTS="2", TURNFLEET_RETRY_DELAY_S="0")
    producer = Producer(redis=redis)
    t1, t2, failed = await _run_fleet_scenario(producer, server, env, tmp_path, "conv-raw")
    recent = await _turn(producer, "conv-raw", f"Thanks, that's all. Write to {RECENT_EMAIL}")
    run_burst("worker", env, tmp_path, "worker-recent")
    assert [(await producer.result(t)).status for t in (t1, t2, failed, recent)] == [
        "completed", "completed", "failed", "completed"]
    await run_consumer(TelemetrySettings(block_ms=50), redis_url, burst=True)  # nothing is old yet

    # Raw text where it was kept, before the expiry.
    assert FAIL_EMAIL in (await producer.result(failed)).error_message
    assert FAIL_EMAIL in (await redis.lindex(keys.turn_errors(failed), 0))
    assert EMAIL in json.loads(await redis.get(keys.conversation_escalation("conv-raw")))["reason"]
    await redis.set(keys.turn_quarantine(t1), f"an old record with {CARD}")
    memory_before = await redis.lrange(keys.session_messages("conv-raw"), 0, -1)
    assert _found("".join(memory_before), EXPIRED) == [CARD, PHONE, EMAIL, KEY]
    before = {
        "replay": redacted(await conversation_replay(redis, "conv-raw"), CommonSettings()),
        "fail_replay": redacted(await conversation_replay(redis, "conv-raw-fail"), CommonSettings()),
        "cli": tf("conversation", "conv-raw", "--json", env=fleet_env),
        "stats": await stats(redis, "conversation"),
        "find": await find_conversations(redis, customer="C-100"),
        "results": {t: await producer.result(t) for t in (t1, t2, failed)},
    }
    assert before["cli"].returncode == 0, before["cli"].stderr

    # The cutoff falls after the first three turns finished, before the recent one did.
    last_old = max([await redis.zscore(keys.RAW_TEXT, t) for t in (t1, t2, failed)])
    assert last_old < await redis.zscore(keys.RAW_TEXT, recent)
    expiry = RawExpiry(redis, TelemetrySettings())
    done = await expiry.expire(now_ms=int(last_old) + WEEK_MS)
    assert sorted(done.turn_ids) == sorted([t1, t2, failed])
    assert (done.turns, done.skipped, done.errors, done.tickets) == (3, 0, 1, 1)
    assert done.memory_items > 0
    assert await redis.zrange(keys.RAW_TEXT, 0, -1) == [recent]

    # Every key and value in Redis: no raw value of an expired turn is left anywhere.
    everything = await dump_keys(redis)
    blob = "\n".join(f"{k}\n{v}" for k, v in everything.items())
    assert _found(blob, EXPIRED) == []
    assert RECENT_EMAIL in json.loads(await redis.hget(keys.turn(recent), "request"))["text"]
    assert keys.turn_quarantine(t1) not in everything
    for kind in ("card", "phone", "email", "secret"):
        assert f"[REDACTED:{kind}]" in blob, kind

    # Each place, redacted and still decodable; ids, tools, agents, usage unchanged.
    for t in (t1, t2, failed):
        record = await redis.hgetall(keys.turn(t))
        assert record["raw_expired_at"]
        request = TurnRequest.model_validate_json(record["request"])
        result = TurnResult.model_validate_json(record["result"])
        old = before["results"][t]
        assert (request.turn_id, request.conversation_id, request.customer_id) == (t, old.conversation_id, "C-100")
        assert "[REDACTED:" in request.text and result.text == request.text
        assert ([c.tool for c in result.tool_calls], result.agents, result.usage, result.status) == (
            [c.tool for c in old.tool_calls], old.agents, old.usage, old.status)
    assert "[REDACTED:email]" in (await producer.result(failed)).error_message
    [error] = [AttemptError.model_validate_json(e) for e in await redis.lrange(keys.turn_errors(failed), 0, -1)]
    assert error.error_type == "BadRequestError" and "[REDACTED:email]" in error.message
    ticket = json.loads(await redis.get(keys.conversation_escalation("conv-raw")))
    assert ticket["turn_id"] == t2 and "[REDACTED:email]" in ticket["reason"]
    memory_after = await redis.lrange(keys.session_messages("conv-raw"), 0, -1)
    assert len(memory_after) == len(memory_before)
    recent_record = await redis.hgetall(keys.turn(recent))
    recent_items = slice(int(recent_record["memory_base"]), int(recent_record["memory_end"]))
    assert memory_after[recent_items] == memory_before[recent_items]  # after the cutoff: as written
    assert RECENT_EMAIL in "".join(memory_after[recent_items])

    # A second pass finds nothing to do, and changes nothing.
    assert (await expiry.expire(now_ms=int(last_old) + WEEK_MS)).turns == 0
    assert await dump_keys(redis) == everything

    # The operator views read the same as before (they were redacted already); stats and find
    # are untouched; even an audited unredacted read gets the redacted form now.
    assert redacted(await conversation_replay(redis, "conv-raw"), CommonSettings()) == before["replay"]
    assert redacted(await conversation_replay(redis, "conv-raw-fail"), CommonSettings()) == before["fail_replay"]
    cli = tf("conversation", "conv-raw", "--json", env=fleet_env)
    assert cli.returncode == 0 and json.loads(cli.stdout) == json.loads(before["cli"].stdout)
    raw_view = tf("turn", t1, "--json", "--unredacted", env=fleet_env)
    assert raw_view.returncode == 0, raw_view.stderr
    assert _found(raw_view.stdout, EXPIRED) == [] and "[REDACTED:card]" in raw_view.stdout
    assert await stats(redis, "conversation") == before["stats"]
    assert await find_conversations(redis, customer="C-100") == before["find"]
    async with serve(redis_url) as http:  # the customer's own read: what is left is the redacted form
        own = await http.get(f"/v1/turns/{t1}", headers=auth(C100))
        assert own.status_code == 200
        assert own.json()["text"] == "Where is order 1043? My card is [REDACTED:card], phone [REDACTED:phone]."

    # The conversation goes on with its redacted memory.
    t5 = await _turn(producer, "conv-raw", "Where is my order now?")
    run_burst("worker", env, tmp_path, "worker-after")
    assert (await producer.result(t5)).status == "completed"
    assert [c.tool for c in (await producer.result(t5)).tool_calls] == ["lookup_order"]
    assert json.loads((await producer.result(t5)).tool_calls[0].arguments) == {"order_id": "1043"}


async def test_an_expired_turn_sent_again_is_the_same_turn_and_a_different_one_is_refused(redis):
    producer = Producer(redis=redis)
    ctx = runtime(redis, OfflineModel())
    text = f"Where is order 1043? My card is {CARD}"
    metadata = {"channel": "email", "api_key": "abc123"}
    tid = await _run(ctx, producer, "conv-idem", text, turn_id="t-idem", metadata=metadata)
    assert (await RawExpiry(redis, TelemetrySettings()).expire_turns([tid])).turns == 1
    stored = json.loads(await redis.hget(keys.turn(tid), "request"))
    assert CARD not in stored["text"] and stored["metadata"] == {"channel": "email", "api_key": "[REDACTED:field]"}

    same = {"conversation_id": "conv-idem", "customer_id": "C-100", "text": text, "metadata": metadata,
            "turn_id": "t-idem"}
    [again] = await producer.enqueue_batch([same])
    assert (again.status, again.turn_status) == ("existing", "completed")
    assert await producer.enqueue_turn(**same) == "t-idem"
    for change in ({"text": f"Where is order 1043? My card is {FAIL_CARD}."}, {"text": "Where is order 1044?"},
                   {"metadata": {"channel": "chat", "api_key": "abc123"}}, {"conversation_id": "conv-other"}):
        [other] = await producer.enqueue_batch([{**same, **change}])
        assert (other.status, other.error) == ("rejected", "validation"), change
        assert other.errors == [{"field": "turn_id", "message": "already used for a different request"}]
    assert await redis.llen(keys.conversation_turns("conv-idem")) == 1


async def test_a_turn_changed_while_read_is_left_for_the_next_pass(redis):
    producer = Producer(redis=redis)
    ctx = runtime(redis, OfflineModel())
    tid = await _run(ctx, producer, "conv-cas", f"I want to talk to a human. Mail {EMAIL}")
    expiry = RawExpiry(redis, TelemetrySettings())
    [plan], unreadable = await expiry.read([tid])
    assert unreadable == 0 and plan.plan["memory"] and plan.plan["ticket"]
    # Between the read and the write, the conversation memory item changes (by another hand).
    first = plan.plan["memory"][0]["i"]
    await redis.lset(keys.session_messages("conv-cas"), first, json.dumps({"role": "user", "content": EMAIL}))
    result = await expiry.write([plan])
    assert (result.turns, result.skipped) == (0, 1)
    assert EMAIL in (await redis.hget(keys.turn(tid), "request"))  # nothing was written
    assert await redis.zscore(keys.RAW_TEXT, tid) is not None
    again = await expiry.expire_turns([tid])
    assert (again.turns, again.skipped) == (1, 0)
    assert EMAIL not in "".join(await redis.lrange(keys.session_messages("conv-cas"), 0, -1))
    assert EMAIL not in await redis.hget(keys.turn(tid), "request")


async def test_the_telemetry_consumer_runs_the_expiry(redis, fleet_env, tmp_path):
    producer = Producer(redis=redis)
    ctx = runtime(redis, OfflineModel())
    old = await _run(ctx, producer, "conv-old", f"Where is order 1043? Mail {EMAIL}")
    new = await _run(ctx, producer, "conv-new", f"Where is order 1043? Mail {RECENT_EMAIL}")
    # The old turn finished two days ago (as far as the index says); the new one just now.
    finished = await redis.zscore(keys.RAW_TEXT, old)
    await redis.zadd(keys.RAW_TEXT, {old: finished - 2 * 86_400_000})
    run_burst("telemetry", {**fleet_env, "TURNFLEET_RAW_RETENTION_S": "86400"}, tmp_path)
    assert EMAIL not in await redis.hget(keys.turn(old), "request")
    assert await redis.hget(keys.turn(old), "raw_expired_at")
    assert RECENT_EMAIL in await redis.hget(keys.turn(new), "request")
    assert await redis.zrange(keys.RAW_TEXT, 0, -1) == [new]
    # With 0 the raw text is kept as long as the turn: the consumer runs no expiry.
    await redis.zadd(keys.RAW_TEXT, {new: 0})
    run_burst("telemetry", {**fleet_env, "TURNFLEET_RAW_RETENTION_S": "0"}, tmp_path, "telemetry-keep")
    assert RECENT_EMAIL in await redis.hget(keys.turn(new), "request")


def test_the_redacted_form_of_a_request_at_its_limits_still_decodes_and_redacting_again_changes_nothing():
    redactor = Redactor()
    # Markers are longer than what they replace: text at the length limit, metadata at its size limit.
    text = ("x@y.io " * 1200)[:DEFAULT_MAX_TEXT_CHARS]
    metadata = {f"k{i:02}": ("a@b.io " * 17).strip() for i in range(DEFAULT_MAX_METADATA_ITEMS)}
    assert sum(len(k) + len(v) for k, v in metadata.items()) <= DEFAULT_MAX_METADATA_BYTES
    req = TurnRequest(conversation_id="c-1", customer_id="C-100", text=text, metadata=metadata)
    out = redact_request(req, redactor)
    assert TurnRequest.model_validate_json(out.model_dump_json()) == out
    assert "@" not in out.text and "@" not in "".join(out.metadata.values())
    assert set(out.metadata) == set(metadata)
    assert redact_request(out, redactor) == out
    assert (out.turn_id, out.conversation_id, out.customer_id, out.enqueued_at) == (
        req.turn_id, req.conversation_id, req.customer_id, req.enqueued_at)


# -- turns that finished before the raw-text index existed (an upgraded deployment) ----------


async def _as_legacy(redis, *turn_ids: str) -> None:
    """What a release before the raw-text index left of these finished turns: no index entry,
    no ``memory_end`` / ``memory_session`` on the record (the only things its finish script
    did not write)."""
    for t in turn_ids:
        assert await redis.zrem(keys.RAW_TEXT, t) == 1
        assert await redis.hdel(keys.turn(t), "memory_end", "memory_session") == 2


def _finish_ms(result: TurnResult) -> int:
    return int(result.finished_at.timestamp() * 1000)


async def test_turns_finished_before_the_index_are_backfilled_and_redacted_with_their_memory(
    redis, fleet_env, tmp_path, llm_server  # noqa: F811
):
    server = llm_server()
    env = server.worker_env(fleet_env, TURNFLEET_MAX_ATTEMPTS="2", TURNFLEET_RETRY_DELAY_S="0")
    producer = Producer(redis=redis)
    t1, t2, failed = await _run_fleet_scenario(producer, server, env, tmp_path, "conv-legacy")
    waiting = await _turn(producer, "conv-legacy-waiting", f"Where is order 1043? Write to {RECENT_EMAIL}")  # not run
    results = {t: await producer.result(t) for t in (t1, t2, failed)}
    assert [r.status for r in results.values()] == ["completed", "completed", "failed"]
    await _as_legacy(redis, t1, t2, failed)
    assert await redis.zcard(keys.RAW_TEXT) == 0
    memory_before = await redis.lrange(keys.session_messages("conv-legacy"), 0, -1)
    base1, base2 = [int(await redis.hget(keys.turn(t), "memory_base")) for t in (t1, t2)]
    first, last = slice(base1, base2), slice(base2, len(memory_before))
    assert _found("".join(memory_before[first]), EXPIRED) == [CARD, PHONE]
    assert _found("".join(memory_before[last]), EXPIRED) == [EMAIL, KEY]

    # A pass at the first turn's due time: it indexes the three finished turns (at their finish
    # time) and redacts the first, whose memory ends where the next turn's begins.
    expiry = RawExpiry(redis, TelemetrySettings())
    done = await expiry.expire(now_ms=_finish_ms(results[t1]) + WEEK_MS)
    assert done.backfilled == 3 and t1 in done.turn_ids and t2 not in done.turn_ids
    assert await redis.get(keys.RAW_TEXT_BACKFILL) == "done"
    assert await redis.zscore(keys.RAW_TEXT, t2) == _finish_ms(results[t2])
    memory_mid = await redis.lrange(keys.session_messages("conv-legacy"), 0, -1)
    assert _found("".join(memory_mid[first]), EXPIRED) == [] and "[REDACTED:card]" in "".join(memory_mid[first])
    assert memory_mid[last] == memory_before[last]  # the second turn's items: not due yet

    # A pass a week after the last: the rest, the last turn's memory up to the memory's length.
    late = max(_finish_ms(r) for r in results.values()) + WEEK_MS
    done = await expiry.expire(now_ms=late)
    assert done.backfilled == 0 and t2 in done.turn_ids and await redis.zcard(keys.RAW_TEXT) == 0
    memory_after = await redis.lrange(keys.session_messages("conv-legacy"), 0, -1)
    assert len(memory_after) == len(memory_before)
    assert "[REDACTED:secret]" in "".join(memory_after[last])
    everything = await dump_keys(redis)
    blob = "\n".join(f"{k}\n{v}" for k, v in everything.items())
    assert _found(blob, EXPIRED) == []
    for t in (t1, t2, failed):
        record = await redis.hgetall(keys.turn(t))
        assert record["raw_expired_at"]
        result = TurnResult.model_validate_json(record["result"])
        assert (result.status, result.usage, result.agents) == (results[t].status, results[t].usage, results[t].agents)
    [error] = [AttemptError.model_validate_json(e) for e in await redis.lrange(keys.turn_errors(failed), 0, -1)]
    assert "[REDACTED:email]" in error.message
    assert json.loads(await redis.get(keys.conversation_escalation("conv-legacy")))["turn_id"] == t2

    # The unfinished turn is neither indexed nor touched.
    record = await redis.hgetall(keys.turn(waiting))
    assert record["status"] == "queued" and "raw_expired_at" not in record
    assert RECENT_EMAIL in json.loads(record["request"])["text"]
    assert await redis.zscore(keys.RAW_TEXT, waiting) is None

    # Later passes do no SCAN work, and change nothing.
    scans = (await redis.info("commandstats"))["cmdstat_scan"]["calls"]
    assert (await expiry.expire(now_ms=late)).backfilled == 0
    assert (await redis.info("commandstats"))["cmdstat_scan"]["calls"] == scans
    assert await dump_keys(redis) == everything


async def test_the_backfill_walks_a_keyspace_bigger_than_one_pass_over_several_passes(redis):
    producer = Producer(redis=redis)
    ctx = runtime(redis, OfflineModel())
    finished = [await _run(ctx, producer, f"conv-walk-{i}", f"Where is order 1043? Mail {EMAIL}") for i in range(6)]
    await _as_legacy(redis, *finished)
    expiry = RawExpiry(redis, TelemetrySettings())
    # One already redacted (it left the index) and one still queued: neither is indexed again.
    redacted_turn = await _run(ctx, producer, "conv-walk-done", "Where is order 1043?")
    assert (await expiry.expire_turns([redacted_turn])).turns == 1
    waiting = await producer.enqueue_turn(conversation_id="conv-walk-0", customer_id="C-100", text="And 1044?")
    await redis.mset({f"filler:{i}": "x" for i in range(400)})  # a keyspace many passes long
    # Indexed at the result's finished_at; without a readable result at started_at; else now.
    due = {t: _finish_ms(await producer.result(t)) for t in finished}
    await redis.hset(keys.turn(finished[0]), "result", "{not a result")
    due[finished[0]] = int(datetime.fromisoformat(await redis.hget(keys.turn(finished[0]), "started_at"))
                           .timestamp() * 1000)
    await redis.hset(keys.turn(finished[1]), "result", "{not a result")
    await redis.hdel(keys.turn(finished[1]), "started_at")
    now_ms = due[finished[1]] = max(due.values()) + 1000

    expiry.backfill_scans, expiry.backfill_count = 2, 10
    passes, added = 0, 0
    while await redis.get(keys.RAW_TEXT_BACKFILL) != "done":
        added += await expiry.backfill(now_ms)
        passes += 1
        assert passes < 200, "the walk never ends"
    assert passes > 3 and added == len(finished)
    indexed = dict(await redis.zrange(keys.RAW_TEXT, 0, -1, withscores=True))
    assert indexed == due
    assert waiting not in indexed and redacted_turn not in indexed

    scans = (await redis.info("commandstats"))["cmdstat_scan"]["calls"]
    assert await expiry.backfill() == 0
    assert (await redis.info("commandstats"))["cmdstat_scan"]["calls"] == scans


async def test_legacy_memory_is_left_when_its_range_or_its_memory_cannot_be_known(redis):
    producer = Producer(redis=redis)
    ctx = runtime(redis, OfflineModel())
    expiry = RawExpiry(redis, TelemetrySettings())
    # conv-open: two legacy turns, then a third queued: the last one's items end is not known yet.
    t1 = await _run(ctx, producer, "conv-open", f"Where is order 1043? My card is {CARD}")
    t2 = await _run(ctx, producer, "conv-open", f"I want to talk to a human. Mail {EMAIL}")
    await producer.enqueue_turn(conversation_id="conv-open", customer_id="C-100", text="Thanks")
    # conv-again: its memory was dropped and started again after the turn finished.
    t3 = await _run(ctx, producer, "conv-again", f"I want to talk to a human. Mail {FAIL_EMAIL}")
    finished = _finish_ms(await producer.result(t3))
    await redis.hset(f"{keys.SESSION_PREFIX}:{keys.session_id('conv-again')}", "created_at", finished // 1000 + 60)
    await _as_legacy(redis, t1, t2, t3)

    done = await expiry.expire(now_ms=finished + WEEK_MS)
    assert done.backfilled == 3 and sorted(done.turn_ids) == sorted([t1, t2, t3])
    memory = "".join(await redis.lrange(keys.session_messages("conv-open"), 0, -1))
    assert CARD not in memory and EMAIL in memory  # the first turn's items (to t2's base) only
    assert FAIL_EMAIL in "".join(await redis.lrange(keys.session_messages("conv-again"), 0, -1))
    for t in (t1, t2, t3):  # the records themselves are redacted all the same
        assert "[REDACTED:" in json.loads(await redis.hget(keys.turn(t), "request"))["text"]
