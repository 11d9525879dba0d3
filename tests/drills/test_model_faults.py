"""Drill 4: the model endpoint misbehaves — 500s, 429s, timeouts, garbage bodies.

Real worker and telemetry subprocesses (burst mode) against the local OpenAI-compatible
server (``tests/llm_server.py``). What must hold:

- transient faults are retried, by the openai client within a model call (5xx, 429 after its
  Retry-After, timeouts) and by turn attempts (what the client gave up on, and malformed
  bodies), and every turn completes;
- a fault that persists for one turn fails that turn after ``TURNFLEET_MAX_ATTEMPTS``, with
  every attempt's error, and the conversation's later turns still run;
- telemetry counts the failures per model and by error type, and the ``error_rate`` alert
  fires once;
- the audit (``tests/drills/audit.py``) holds.

Time is bounded by settings, not by waiting: model requests time out after 0.5 s, the client
retries once (its backoff is at most 0.5 s), the job retries after 0.05 s. The test waits on
process exits and stored results only.
"""

from __future__ import annotations

from turnfleet.producer import Producer
from turnfleet.telemetry.alert_reads import read_alerts
from turnfleet.telemetry.stats import stats, totals
from tests.drills.audit import audit
from tests.llm_server import LLMServer, llm_server  # noqa: F401 - the fixture
from tests.processes import run_burst

MODEL = "gpt-4o-mini"


def drill_env(env: dict[str, str], server: LLMServer, **extra: str) -> dict[str, str]:
    return server.worker_env(
        env, MODEL,
        TURNFLEET_MODEL_TIMEOUT_S="0.5",
        TURNFLEET_MODEL_MAX_RETRIES="1",
        TURNFLEET_RETRY_DELAY_S="0.05",
        TURNFLEET_TURN_TIMEOUT_S="20",
        **extra,
    )


async def enqueue(producer: Producer, turns: list[tuple[str, str, str]]) -> list[str]:
    return await producer.enqueue_turns(
        [{"conversation_id": c, "customer_id": cust, "text": t} for c, cust, t in turns])


async def test_transient_model_faults_are_retried_and_every_turn_completes(
    redis, fleet_env, tmp_path, llm_server  # noqa: F811
):
    server = llm_server()
    # Each fault is aimed at one turn (by its text), so who gets what is deterministic.
    server.inject("500", times=2, match="I'm Dana")  # the client's one retry fails too: the
    #                                                  attempt fails, the job's next one runs
    server.inject("429", retry_after=0.05, match="order 1045")  # the client retries after 0.05 s
    server.inject("timeout", match="order 1047")  # the client times out and retries
    server.inject("garbage", match="order 1053")  # not retried by the client: attempt 1 fails,
    server.inject("schemaless", match="order 1053")  # and attempt 2; attempt 3 completes
    env = drill_env(fleet_env, server, TURNFLEET_MAX_ATTEMPTS="3")
    async with Producer(redis=redis) as producer:
        ids = await enqueue(producer, [
            ("conv-a", "C-100", "Hi, I'm Dana."),
            ("conv-a", "C-100", "I'd like a refund for order 1042."),
            ("conv-b", "C-101", "Where is order 1045?"),
            ("conv-b", "C-101", "Thanks, bye"),
            ("conv-c", "C-102", "I want a refund for order 1047, it arrived broken."),
            ("conv-c", "C-102", "I want to talk to a human, please."),
            ("conv-d", "C-100", "What's the status of order 1053?"),
            ("conv-d", "C-100", "Hello there"),
        ])
        run_burst("worker", env, tmp_path)
        results = [await producer.result(t) for t in ids]

    assert [r.status for r in results] == ["completed"] * len(ids)
    assert [[e.error_type for e in r.errors] for r in results] == [
        ["InternalServerError"], [], [], [], [], [],
        ["MalformedModelResponse", "MalformedModelResponse"], []]
    assert [r.attempts for r in results] == [2, 1, 1, 1, 1, 1, 3, 1]
    assert {k: v for k, v in server.counts.items() if k != "ok"} == {
        "500": 2, "429": 1, "timeout": 1, "garbage": 1, "schemaless": 1}
    # The 429 and the timeout were retried by the client, within one model call.
    for text in ("order 1045", "order 1047"):
        first, retry = sorted((s for s in server.log if text in s.user_text),
                              key=lambda s: s.number)[:2]
        assert (first.retry_count, retry.retry_count, retry.outcome) == (0, 1, "ok")

    run_burst("telemetry", fleet_env, tmp_path)
    report = await audit(redis, ids)
    assert report.statuses() == {"completed": len(ids)}
    # Every answer the server sent was read and counted: nothing lost, nothing twice.
    served = server.usage_served()
    fleet = await totals(redis)
    assert (fleet["input_tokens"], fleet["output_tokens"], fleet["llm_calls"]) == (
        served["input_tokens"], served["output_tokens"], served["requests"])
    assert (fleet["attempts_failed"], fleet["turns_failed"]) == (3, 0)
    row = {r["model"]: r for r in await stats(redis, "model")}[MODEL]
    assert row["errors"] == 3
    assert row["errors_by_type"] == {"InternalServerError": 1, "MalformedModelResponse": 2}
    assert [a for _, a in await read_alerts(redis)] == []  # nothing failed for good


async def test_a_persistent_model_fault_fails_its_turn_after_max_attempts_and_alerts_once(
    redis, fleet_env, tmp_path, llm_server  # noqa: F811
):
    server = llm_server()
    # Every model request of these turns fails: 503 (retried by the client, then by the job),
    # or a garbage body (retried by the job only).
    server.inject("503", times=None, match="order 1044")
    server.inject("garbage", times=None, match="order 1046")
    env = drill_env(fleet_env, server, TURNFLEET_MAX_ATTEMPTS="2")
    telemetry_env = {
        **fleet_env,
        "TURNFLEET_ALERT_ERROR_RATE": "0.2",
        "TURNFLEET_ALERT_ERROR_RATE_MIN_TURNS": "5",
        # One window for the whole drill: its boundary (epoch multiple of 1e9 s) is in 2033.
        "TURNFLEET_ALERT_ERROR_RATE_WINDOW_S": "1000000000",
    }
    async with Producer(redis=redis) as producer:
        ids = await enqueue(producer, [
            ("conv-x", "C-100", "Where is order 1044?"),
            ("conv-x", "C-100", "Thanks, bye"),
            ("conv-y", "C-101", "Where is order 1046?"),
            ("conv-y", "C-101", "Hello there"),
            ("conv-z", "C-102", "I want a refund for order 1047, it arrived broken."),
            ("conv-z", "C-102", "Where is order 1048?"),
            ("conv-w", "C-100", "Where is order 1043?"),
            ("conv-w", "C-100", "Thanks, bye"),
        ])
        run_burst("worker", env, tmp_path)
        results = {t: await producer.result(t) for t in ids}
        broken_503, after_503, broken_garbage, after_garbage = (results[t] for t in ids[:4])

        assert (broken_503.status, broken_503.error_type, broken_503.attempts) == (
            "failed", "InternalServerError", 2)
        assert [(e.attempt, e.error_type) for e in broken_503.errors] == [
            (1, "InternalServerError"), (2, "InternalServerError")]
        assert (broken_garbage.status, broken_garbage.error_type, broken_garbage.attempts) == (
            "failed", "MalformedModelResponse", 2)
        assert [(e.attempt, e.error_type) for e in broken_garbage.errors] == [
            (1, "MalformedModelResponse"), (2, "MalformedModelResponse")]
        assert "not a chat completion" in broken_garbage.error_message
        # Later turns of the same conversations, and the other conversations, still ran.
        assert [r.status for t, r in results.items() if t not in (ids[0], ids[2])] == [
            "completed"] * 6
        assert after_503.final_output and after_garbage.final_output
        # Two attempts × (a request and the client's one retry) each; garbage is not retried.
        assert (server.counts["503"], server.counts["garbage"]) == (4, 2)

        run_burst("telemetry", telemetry_env, tmp_path)
        row = {r["model"]: r for r in await stats(redis, "model")}[MODEL]
        assert row["errors"] == 4  # attempt_failed + turn_failed, for each broken turn
        assert row["errors_by_type"] == {"InternalServerError": 2, "MalformedModelResponse": 2}
        fleet = await totals(redis)
        assert (fleet["turns_failed"], fleet["turns_completed"], fleet["attempts_failed"]) == (
            2, 6, 2)

        # Another failure in the same window, aggregated by another consumer run: the error
        # rate still holds, and still one alert.
        ids.append(await producer.enqueue_turn(conversation_id="conv-x", customer_id="C-100",
                                               text="Any news on order 1044?"))
        run_burst("worker", env, tmp_path, name="worker-2")
        run_burst("telemetry", telemetry_env, tmp_path, name="telemetry-2")
        assert (await producer.result(ids[-1])).status == "failed"

    alerts = [a for _, a in await read_alerts(redis)]
    rate_alerts = [a for a in alerts if a.rule == "error_rate"]
    assert len(rate_alerts) == 1
    assert rate_alerts[0].figures["error_rate"] >= 0.2 and rate_alerts[0].figures["turns"] >= 5
    assert sorted(a.turn_id for a in alerts if a.rule == "turn_failed") == sorted(
        [ids[0], ids[2], ids[-1]])
    row = {r["model"]: r for r in await stats(redis, "model")}[MODEL]
    assert row["errors_by_type"] == {"InternalServerError": 4, "MalformedModelResponse": 2}

    report = await audit(redis, ids)
    assert report.statuses() == {"completed": 6, "failed": 3}
