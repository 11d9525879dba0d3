"""A workflow's own redaction patterns (issue 16: ``Workflow.redaction_patterns``) reach every
process that writes or shows its text, as ``TURNFLEET_REDACT_PATTERNS`` does.

Real worker and telemetry subprocesses (``--burst``) and the real CLI on the test's Redis; the
app is ``tests/apps/redacting.py`` (an employee number, ``EMP-482913``, in the user's text, in
the tool's arguments, result and log line, and in the answer).
"""

from __future__ import annotations

import json

from redis.asyncio import Redis

from turnfleet import keys, registry
from turnfleet.audit import entries
from turnfleet.producer.api import Producer
from turnfleet.redaction import redactor_for
from turnfleet.settings import CommonSettings, TelemetrySettings
from turnfleet.telemetry.raw_expiry import RawExpiry
from tests.apps.redacting import EMPLOYEE_PATTERN, MARK
from tests.processes import run_burst, tf
from tests.redis_scan import find_mentions
from tests.test_http_read import OPERATOR, auth, serve

APP = "tests.apps.redacting:app"
DIGITS = "482913"  # the secret, whatever the case of its "EMP-"
TEXT = f"EMP-{DIGITS} cannot log in, please look them up"


async def _holding(redis_url: str, needle: str) -> set[str]:
    """The keys of the test's Redis whose name or value mention ``needle``."""
    return {m.split(" ", 1)[1].split(f": {needle} in ")[0] for m in await find_mentions([redis_url], [needle])}


async def test_a_workflows_pattern_is_redacted_everywhere_telemetry_and_operators_read(
        redis, redis_url, fleet_env, tmp_path):
    env = {**fleet_env, "TURNFLEET_APP": APP}
    run_burst("worker", env, tmp_path, "register")  # registers it-redacting, its pattern with it
    producer = Producer(redis=redis)
    tid = await producer.enqueue_turn(conversation_id="c-emp", customer_id="C-100", text=TEXT,
                                      agent="it-redacting", turn_id="t-emp")
    worker = run_burst("worker", env, tmp_path, "serve")
    run_burst("telemetry", env, tmp_path)
    done = await producer.result(tid)
    assert done.status == "completed", done
    assert DIGITS in done.final_output and DIGITS in done.tool_calls[0].output  # business data as written

    # Only the raw-text keys (the turn record, the conversation's memory) hold it: not the
    # telemetry stream, the event timeline, the trace store, the aggregates, alerts or results.
    raw_keys = {keys.turn(tid), keys.session_messages("c-emp")}
    assert await _holding(redis_url, DIGITS) <= raw_keys
    assert await _holding(redis_url, MARK) & {keys.trace(tid), keys.turn_events(tid)} == {keys.trace(tid), keys.turn_events(tid)}
    # The tool's log line went through the worker's redactor too.
    log = worker.output()
    assert "employee.looked_up" in log and MARK in log and DIGITS not in log

    # What an operator reads by default is redacted; --unredacted shows the text (audited).
    for verb, subject in (("result", tid), ("turn", tid), ("conversation", "c-emp")):
        shown = tf(verb, subject, "--json", env=env)
        assert shown.returncode == 0, shown.stderr
        assert DIGITS not in shown.stdout and MARK in shown.stdout, (verb, shown.stdout)
    async with serve(redis_url) as http:  # what an operator key reads over HTTP and in the console
        for path in (f"/v1/turns/{tid}", f"/v1/turns/{tid}/replay", "/v1/conversations/c-emp",
                     "/console/conversations/c-emp"):
            shown = await http.get(path, headers=auth(OPERATOR))
            assert shown.status_code == 200 and DIGITS not in shown.text and MARK in shown.text, path
    raw = tf("result", tid, "--json", "--unredacted", env=env)
    assert raw.returncode == 0 and f"EMP-{DIGITS}" in raw.stdout
    assert [e["subject"] for e in await entries(redis)] == [tid]

    # Once the raw text expires (the telemetry consumer's pass), the turn keeps only the
    # redacted form, with the workflow's pattern applied: the secret is nowhere any more.
    assert (await RawExpiry(redis, TelemetrySettings()).expire_turns([tid])).turns == 1
    assert MARK in json.loads(await redis.hget(keys.turn(tid), "request"))["text"]
    assert await _holding(redis_url, DIGITS) == set()
    # ...and the same request sent again is still recognised as the same turn.
    [again] = await producer.enqueue_batch([{"conversation_id": "c-emp", "customer_id": "C-100",
                                             "text": TEXT, "agent": "it-redacting", "turn_id": tid}])
    assert (again.status, again.turn_status) == ("existing", "completed")


async def test_a_pattern_that_does_not_compile_stops_the_worker_before_it_registers(redis, fleet_env):
    proc = tf("worker", "--burst", "--app", "tests.apps.redacting:bad", env=fleet_env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'it-badpattern'" in lines[0] and "EMP-(" in lines[0], proc.stderr
    assert not await redis.hexists(keys.WORKFLOWS, "it-badpattern")


async def test_the_fleet_patterns_are_the_union_of_the_registered_workflows(redis):
    settings = CommonSettings(redact_patterns=[r"TCK-\d+"])
    assert await registry.redaction_patterns(redis) == ()
    await registry.register(redis, [registry.Registration("wf-a", "f1", None, (EMPLOYEE_PATTERN,)),
                                    registry.Registration("wf-b", "f2", None, (r"ORD-\d+", EMPLOYEE_PATTERN))],
                            "w-1")
    assert await registry.redaction_patterns(redis) == tuple(sorted({EMPLOYEE_PATTERN, r"ORD-\d+"}))
    redactor = await registry.redactor(redis, settings)
    assert redactor.text("EMP-482913 ORD-7 TCK-9") == f"{MARK} [REDACTED:custom] [REDACTED:custom]"
    assert redactor is await registry.redactor(redis, settings)  # built once per set
    assert redactor is redactor_for(settings, [r"ORD-\d+", EMPLOYEE_PATTERN, EMPLOYEE_PATTERN])
