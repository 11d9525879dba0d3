"""The ``turnfleet`` CLI as a user runs it: real subprocesses, real Redis, exit codes, JSON."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.processes import CLI, tf
from turnfleet import keys



@pytest.mark.parametrize(
    "args,message",
    [
        (["--conversation", "c 1", "--customer", "C-100", "hi"], "conversation_id"),
        (["--conversation", "c-1", "--customer", "C-100", "  "], "text: must not be empty"),
        (["--conversation", "c-1", "--customer", "C-100", "--meta", "novalue", "hi"], "KEY=VALUE"),
        (["--conversation", "c-1", "--customer", "x" * 129, "hi"], "customer_id"),
    ],
)
async def test_enqueue_rejects_bad_input_with_one_line_and_writes_nothing(fleet_env, redis, args, message):
    proc = tf("enqueue", *args, env=fleet_env)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert await redis.dbsize() == 0


async def test_enqueue_result_conversation_stats_and_alerts_verbs(fleet_env, redis, tmp_path):
    enq = tf("enqueue", "--conversation", "c-cli", "--customer", "C-102", "--meta", "channel=chat",
             "--turn-id", "turn-cli-1", "I want a refund for order 1047", env=fleet_env)
    assert enq.returncode == 0, enq.stderr
    assert enq.stdout.strip() == "turn-cli-1"
    again = tf("enqueue", "--conversation", "c-cli", "--customer", "C-102", "--meta", "channel=chat",
               "--turn-id", "turn-cli-1", "I want a refund for order 1047", env=fleet_env)
    assert again.returncode == 0 and again.stdout.strip() == "turn-cli-1"  # the same request: the same turn
    without_meta = tf("enqueue", "--conversation", "c-cli", "--customer", "C-102", "--turn-id", "turn-cli-1",
                      "I want a refund for order 1047", env=fleet_env)
    assert without_meta.returncode == 2 and "already used for a different request" in without_meta.stderr
    assert await redis.llen(keys.conversation_turns("c-cli")) == 1

    pending = tf("result", "turn-cli-1", "--json", env=fleet_env)
    assert pending.returncode == 3 and json.loads(pending.stdout)["status"] == "queued"

    assert tf("worker", "--burst", env=fleet_env).returncode == 0
    assert tf("telemetry", "--burst", env=fleet_env).returncode == 0

    res = tf("result", "turn-cli-1", "--wait", "5", "--json", env=fleet_env)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["status"] == "completed" and "$229.00" in data["final_output"]
    assert data["cost_usd"] > 0

    conv = tf("conversation", "c-cli", "--json", env=fleet_env)
    turns = json.loads(conv.stdout)["turns"]
    assert [t["turn"]["turn_id"] for t in turns] == ["turn-cli-1"]
    assert [c["tool"] for c in turns[0]["turn"]["tool_calls"]] == ["check_refund_eligibility", "process_refund"]
    text = tf("conversation", "c-cli", env=fleet_env).stdout
    assert "Tool process_refund" in text and "Handoff Triage → Billing" in text

    stats = json.loads(tf("stats", "--by", "customer", "--json", env=fleet_env).stdout)
    row = next(r for r in stats["rows"] if r["subject"] == "C-102")
    assert row["turns_completed"] == 1 and row["input_tokens"] == data["usage"]["input_tokens"]

    alerts = tf("alerts", "--json", env=fleet_env)
    assert alerts.returncode == 0 and json.loads(alerts.stdout) == []

    missing = tf("result", "no-such-turn", env=fleet_env)
    assert missing.returncode == 1 and "no turn" in missing.stderr  # not found: 1 (2 is bad input)


async def test_without_redis_url_the_embedded_redis_is_started_kept_on_disk_and_stopped(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "TURNFLEET_REDIS_URL")}
    env["TURNFLEET_STATE_DIR"] = str(tmp_path / "state")
    enq = tf("enqueue", "--conversation", "c-emb", "--customer", "C-100", "hello", env=env)
    assert enq.returncode == 0, enq.stderr
    turn_id = enq.stdout.strip()
    # The server was stopped on exit; its AOF is on disk, and the next command finds the turn.
    assert not (tmp_path / "state" / "redis.json").exists()
    assert list((tmp_path / "state" / "redis").glob("appendonly*"))
    res = tf("result", turn_id, "--json", env=env)
    assert res.returncode == 3 and json.loads(res.stdout)["status"] == "queued"
    assert not (tmp_path / "state" / "redis.json").exists()


def test_ctrl_c_stops_the_embedded_redis_the_command_started(tmp_path):
    import json as _json
    import signal

    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "TURNFLEET_REDIS_URL")}
    env["TURNFLEET_STATE_DIR"] = str(tmp_path / "state")
    env["TURNFLEET_LOG_FORMAT"] = "json"
    proc = subprocess.Popen([*CLI, "worker"], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stderr:  # wait for the event, not a while
            if "redis.embedded_started" in line:
                break
        state = _json.loads((tmp_path / "state" / "redis.json").read_text())
        os.kill(state["pid"], 0)  # the server runs
        proc.send_signal(signal.SIGINT)
        try:  # communicate, not wait: the child's log goes on after the line read above, and
            # a pipe nobody reads fills up and blocks it
            _out, rest = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"worker still running 90 s after SIGINT; its log: {proc.communicate()[1][-3000:]}")
    finally:
        proc.kill()
    assert not (tmp_path / "state" / "redis.json").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(state["pid"], 0)


async def test_alerts_follow_prints_each_new_alert_as_a_json_line(fleet_env, redis, tmp_path):
    follower = subprocess.Popen([*CLI, "alerts", "--follow", "--json"], env=fleet_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        env = {**fleet_env, "TURNFLEET_MAX_AGENT_TURNS": "1"}  # a routed question then fails
        assert tf("enqueue", "--conversation", "c-f", "--customer", "C-100", "Where is order 1043?",
                  env=env).returncode == 0
        assert tf("worker", "--burst", env=env).returncode == 0
        assert tf("telemetry", "--burst", env=env).returncode == 0
        line = follower.stdout.readline()  # blocks until the alert is printed
        alert = json.loads(line)
        assert alert["rule"] == "turn_failed" and alert["conversation_id"] == "c-f"
        assert alert["figures"]["error_type"] == "MaxTurnsExceeded"
    finally:
        follower.kill()
        follower.wait()


async def test_alerts_follow_resumes_where_the_named_follower_left_off(fleet_env, redis, tmp_path):
    from turnfleet.models import Alert

    async def fire(n: int) -> None:
        alert = Alert(alert_id=f"al-{n}", rule="turn_failed", subject_kind="turn", subject=f"t-{n}",
                      window="once", message=f"turn t-{n} failed")
        await redis.xadd(keys.ALERTS_STREAM, {"alert": alert.model_dump_json()})

    def follow(count: int) -> list[str]:
        """Read ``count`` alerts, then Ctrl-C the follower as a person would."""
        import signal

        proc = subprocess.Popen([*CLI, "alerts", "--follow", "--json", "--cursor", "ops"], env=fleet_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            seen = [json.loads(proc.stdout.readline())["alert_id"] for _ in range(count)]
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
            return seen
        finally:
            proc.kill()

    await fire(1)
    await fire(2)
    assert follow(2) == ["al-1", "al-2"]
    await fire(3)
    assert follow(1) == ["al-3"]  # resumed after al-2, not from the start
    await fire(4)
    assert follow(1) == ["al-4"]


# -- the edges: exit codes, --json errors, invalid UTF-8, refused flag combinations ---------


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The error a user sees: one line on stderr, nothing on stdout, no traceback."""
    assert proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


async def test_text_that_is_not_utf8_is_one_line_naming_the_field_and_nothing_is_enqueued(fleet_env, redis):
    for argv, field in (
        ([b"--conversation", b"c-1", b"--customer", b"C-100", b"caf\xe9 \xff"], "text"),
        ([b"--conversation", b"c-1", b"--customer", b"C-100", b"--meta", b"k=\xff", b"hi"], "metadata"),
        ([b"--conversation", b"c-\xff", b"--customer", b"C-100", b"hi"], "conversation_id"),
        ([b"--conversation", b"c-1", b"--customer", b"C-100", b"--agent", b"\xc3", b"hi"], "agent"),
    ):
        proc = subprocess.run([*CLI, "enqueue", *argv], env=fleet_env, capture_output=True, timeout=60)
        text = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                           proc.stderr.decode(errors="replace"))
        assert proc.returncode == 2, text.stderr
        line = one_line(text)
        assert line.startswith(f"turnfleet enqueue: {field}: "), line
        assert "UTF-8" in line or "characters outside" in line, line  # text / an id's grammar
    assert await redis.dbsize() == 0
    for argv, field in (([b"result", b"t-\xff"], b"turn_id"), ([b"apikey", b"hash", b"\xff"], b"key"),
                        ([b"find", b"--customer", b"\xff"], b"--customer")):
        other = subprocess.run([*CLI, *argv], env=fleet_env, capture_output=True, timeout=60)
        assert other.returncode == 2 and field + b": " in other.stderr, other.stderr
        assert b"Traceback" not in other.stderr and other.stdout == b""


async def test_same_turn_id_with_different_text_is_refused_and_the_first_turn_kept(fleet_env, redis):
    base = ["enqueue", "--conversation", "c-1", "--customer", "C-100", "--turn-id", "t-1"]
    assert tf(*base, "refund order 1042", env=fleet_env).stdout.strip() == "t-1"
    assert tf(*base, "refund order 1042", env=fleet_env).stdout.strip() == "t-1"  # a retry: the same turn
    other = tf(*base, "refund order 1047", env=fleet_env)
    assert other.returncode == 2
    assert one_line(other) == "turnfleet enqueue: turn_id: already used for a different request"
    as_json = tf(*base, "--json", "refund order 1047", env=fleet_env)
    assert as_json.returncode == 2 and as_json.stdout == ""
    assert json.loads(as_json.stderr) == {
        "error": "validation", "message": "turn_id: already used for a different request",
        "errors": [{"field": "turn_id", "message": "already used for a different request"}]}
    assert await redis.lrange(keys.conversation_turns("c-1"), 0, -1) == ["t-1"]
    assert json.loads(await redis.hget(keys.turn("t-1"), "request"))["text"] == "refund order 1042"
    taken = tf("enqueue", "--conversation", "c-1", "--customer", "C-200", "hi", env=fleet_env)
    assert taken.returncode == 1 and "belongs to another customer" in one_line(taken)


async def test_not_found_exits_1_and_json_errors_are_json(fleet_env, redis):
    for verb, ident, what in (("result", "no-such-turn", "turn"), ("turn", "no-such-turn", "turn"),
                              ("conversation", "no-such-conv", "conversation")):
        plain = tf(verb, ident, env=fleet_env)
        assert plain.returncode == 1, (verb, plain.stderr)
        assert one_line(plain) == f"turnfleet {verb}: no {what} '{ident}'"
        as_json = tf(verb, ident, "--json", env=fleet_env)
        assert as_json.returncode == 1 and as_json.stdout == ""
        assert json.loads(as_json.stderr) == {"error": "not_found", "message": f"no {what} '{ident}'"}
    bad = tf("enqueue", "--json", "--conversation", "c 1", "--customer", "C-100", "", env=fleet_env)
    assert bad.returncode == 2 and bad.stdout == ""
    body = json.loads(bad.stderr)
    assert body["error"] == "validation" and [e["field"] for e in body["errors"]] == ["conversation_id", "text"]
    usage = tf("enqueue", "--json", "--conversation", "c-1", env=fleet_env)
    assert usage.returncode == 2 and json.loads(usage.stderr)["error"] == "usage"
    assert "--customer" in json.loads(usage.stderr)["message"]
    assert await redis.dbsize() == 0


@pytest.mark.parametrize("args,message", [
    (["alerts", "--new-only"], "--new-only: only with --follow"),
    (["alerts", "--from-start"], "--from-start: only with --follow"),
    (["alerts", "--cursor", "ops"], "--cursor: only with --follow"),
    (["alerts", "--follow", "--new-only", "--from-start"], "contradict"),
    (["alerts", "--follow", "--cursor", "../../etc/x"], "--cursor"),
    (["demo", "--workers", "0"], "--workers: must be at least 1"),
    (["demo", "--workers", "-3"], "--workers: must be at least 1"),
    (["demo", "--workers", "two"], "invalid int value"),
    (["result", "t-1", "--wait", "-1"], "--wait"),
])
async def test_flags_that_would_be_ignored_or_time_out_are_refused_in_one_line(fleet_env, redis, tmp_path, args, message):
    proc = tf(*args, env=fleet_env, timeout=60)
    assert proc.returncode == 2
    assert message in one_line(proc)
    assert await redis.dbsize() == 0
    assert not (tmp_path / "state" / "alerts-default.cursor").exists()
