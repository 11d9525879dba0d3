"""The CLI's manners (issue 18): ``--version``, help and examples everywhere, ``--json`` errors,
``enqueue --file`` with progress. Real subprocesses on a real Redis, as a user runs them."""

from __future__ import annotations

import argparse
import json
from importlib.metadata import version

import pytest

from tests.processes import tf
from turnfleet import keys
from turnfleet.shell.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, path: str = "turnfleet"):
    """Every parser of the CLI (the top one, each verb, each sub-verb), with its command path."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


# -- item 1: --version ---------------------------------------------------------------------------


def test_version_is_one_line_naming_the_package_version(fleet_env):
    proc = tf("--version", env=fleet_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"turnfleet {version('turnfleet')}\n"


def test_version_json_names_the_sdk_too(fleet_env):
    proc = tf("--version", "--json", env=fleet_env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "turnfleet": version("turnfleet"), "openai-agents": version("openai-agents"),
        "python": json.loads(proc.stdout)["python"],
    }


def test_version_with_a_verb_is_a_usage_error(fleet_env):
    proc = tf("--version", "stats", env=fleet_env)
    assert proc.returncode == 2 and "--version" in proc.stderr and proc.stdout == ""


# -- item 2: help for every option, examples on every verb ---------------------------------------


def test_every_option_of_every_verb_has_help():
    missing = [f"{path} {action.dest}" for path, parser in _parsers(build_parser())
               for action in parser._actions
               if not isinstance(action, argparse._HelpAction) and not action.help]
    assert missing == []


def test_every_verb_has_examples_that_run_that_verb():
    verbs = [(path, parser) for path, parser in _parsers(build_parser())
             if path != "turnfleet" and not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)]
    assert len(verbs) > 15
    for path, parser in verbs:
        epilog = parser.epilog or ""
        assert epilog.startswith("Examples:\n"), path
        assert f"\n  {path}" in epilog, path  # each example is the verb itself, indented


def test_help_keeps_the_examples_laid_out(fleet_env):
    proc = tf("enqueue", "--help", env=fleet_env)
    assert proc.returncode == 0
    examples = proc.stdout.split("Examples:\n", 1)[1].splitlines()
    assert len(examples) >= 2 and all(line.startswith("  turnfleet enqueue") for line in examples if line.strip())


# -- item 3: --json on demo, health and every read verb, errors included ------------------------


def _json_error(proc) -> dict:
    assert proc.stdout == "", proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return json.loads(proc.stderr)


@pytest.mark.parametrize("args", [
    ["result", "bad id!", "--json"],
    ["turn", "bad id!", "--json"],
    ["conversation", "bad id!", "--json"],
    ["stats", "--by", "nothing", "--json"],
    ["find", "--since", "yesterday-ish", "--json"],
    ["alerts", "--limit", "0", "--json"],
    ["audit", "--limit", "x", "--json"],
    ["rerun", "--json"],
    ["regress", "--concurrency", "0", "--json"],
    ["feedback", "t-1", "--score", "5", "--json"],
    ["health", "--role", "nobody", "--json"],
    ["demo", "--workers", "0", "--json"],
    ["enqueue", "--conversation", "c 1", "--customer", "C-100", "--json", "hi"],
])
def test_bad_input_is_exit_2_and_one_json_error_on_stderr(fleet_env, args):
    proc = tf(*args, env=fleet_env)
    assert proc.returncode == 2, proc.stderr
    body = _json_error(proc)
    assert body["error"] in ("usage", "validation") and body["message"]


@pytest.mark.parametrize("args,exit,error", [
    (["result", "no-such-turn", "--json"], 1, "not_found"),
    (["turn", "no-such-turn", "--json"], 1, "not_found"),
    (["conversation", "no-such-conversation", "--json"], 1, "not_found"),
    (["feedback", "no-such-turn", "--score", "1", "--json"], 1, "not_found"),
])
def test_not_found_is_its_exit_and_one_json_error_on_stderr(fleet_env, args, exit, error):
    proc = tf(*args, env=fleet_env)
    assert proc.returncode == exit, proc.stderr
    assert _json_error(proc)["error"] == error


def test_health_json_says_the_verdict_and_an_unhealthy_one_is_a_json_error(fleet_env):
    proc = tf("health", "--role", "worker", "--json", env=fleet_env)
    assert proc.returncode == 1
    body = _json_error(proc)
    assert body["error"] == "unhealthy" and "no worker heartbeat" in body["message"]
    assert isinstance(body["notes"], list)


def test_demo_json_is_the_summary_alone_on_stdout(fleet_env):
    from turnfleet.shell.demo import SCENARIO

    proc = tf("demo", "--json", env=fleet_env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""
    summary = json.loads(proc.stdout)
    assert summary["ok"] is True and summary["turns"] == sum(len(texts) for _l, _c, texts in SCENARIO)
    assert [c["customer_id"] for c in summary["conversations"]] == [c for _l, c, _t in SCENARIO]
    assert all(c["failed"] == 0 and c["cost_usd"] > 0 for c in summary["conversations"])
    assert [a["rule"] for a in summary["alerts"]] == ["conversation_cost"]


# -- item 4: enqueue --file -----------------------------------------------------------------------


def _turns_file(tmp_path, *lines: object):
    path = tmp_path / "turns.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD = [
    {"conversation_id": "bf-c1", "customer_id": "C-100", "text": "Where is order 1047?", "turn_id": "bf-t1"},
    {"conversation_id": "bf-c1", "customer_id": "C-100", "text": "Thanks", "meta": {"channel": "email"}},
    {"conversation_id": "bf-c2", "customer_id": "C-101", "text": "Thanks"},
]


async def test_enqueue_file_prints_a_plain_line_per_turn_and_a_rerun_enqueues_nothing_twice(fleet_env, redis,
                                                                                              tmp_path):
    path = _turns_file(tmp_path, GOOD[0], "", *GOOD[1:])  # a blank line is no turn
    first = tf("enqueue", "--file", str(path), env=fleet_env)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["line 1", "line 3", "line 4"]
    assert lines[0] == "line 1: enqueued bf-t1" and all(": enqueued " in line for line in lines)
    assert "3 enqueued, 0 existing, 0 rejected, 0 skipped" in first.stderr
    assert await redis.llen(keys.conversation_turns("bf-c1")) == 2
    assert await redis.llen(keys.conversation_turns("bf-c2")) == 1

    again = tf("enqueue", "--file", str(path), env=fleet_env)
    assert again.returncode == 0, again.stderr
    assert [line.split(" ")[2] for line in again.stdout.splitlines()] == ["existing"] * 3
    assert [line.split(" ")[3] for line in again.stdout.splitlines()] == [line.split(" ")[3] for line in lines]
    assert await redis.llen(keys.conversation_turns("bf-c1")) == 2  # nothing enqueued twice
    assert await redis.llen(keys.conversation_turns("bf-c2")) == 1


async def test_enqueue_file_with_a_bad_line_enqueues_nothing_and_names_every_bad_line(fleet_env, redis, tmp_path):
    path = _turns_file(tmp_path, GOOD[0], "{not json", GOOD[1],
                       {"conversation_id": "bf-c3", "customer_id": "C-100", "text": "  "},
                       {"conversation_id": "bf-c3", "customer_id": "C-100", "text": "hi", "colour": "red"},
                       {**GOOD[2], "turn_id": "bf-t1"})
    plain = tf("enqueue", "--file", str(path), env=fleet_env)
    assert plain.returncode == 2 and plain.stdout == ""
    assert "4 of 6 lines" in plain.stderr and "nothing was enqueued" in plain.stderr
    for expected in ("line 2: line: not JSON", "line 4: text: must not be empty", "line 5: colour: is not a known",
                     "line 6: turn_id: also on line 1"):
        assert expected in plain.stderr
    as_json = tf("enqueue", "--file", str(path), "--json", env=fleet_env)
    assert as_json.returncode == 2 and as_json.stdout == ""
    body = json.loads(as_json.stderr)
    assert body["error"] == "validation" and [e["line"] for e in body["errors"]] == [2, 4, 5, 6]
    assert await redis.dbsize() == 0


async def test_enqueue_file_skip_bad_enqueues_the_good_lines_as_json_lines(fleet_env, redis, tmp_path):
    path = _turns_file(tmp_path, GOOD[0], {"conversation_id": "bf-c3", "customer_id": "C-100"}, GOOD[2])
    proc = tf("enqueue", "--file", str(path), "--skip-bad", "--json", env=fleet_env)
    assert proc.returncode == 1, proc.stderr  # a line was not enqueued: the run did not do it all
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["line"], r["status"]) for r in rows] == [(2, "skipped"), (1, "enqueued"), (3, "enqueued")]
    assert rows[0]["errors"] == [{"field": "text", "message": "is required"}]
    assert rows[1]["turn_id"] == "bf-t1" and rows[1]["turn_status"] == "queued"
    assert await redis.llen(keys.conversation_turns("bf-c1")) == 1
    assert await redis.exists(keys.conversation_turns("bf-c3")) == 0


async def test_enqueue_file_goes_in_at_the_bounded_rate(fleet_env, redis, tmp_path):
    from turnfleet.queue import TurnQueue

    turns = [{"conversation_id": f"bf-r{i}", "customer_id": "C-100", "text": "hi", "turn_id": f"bf-r{i}"}
             for i in range(4)]
    proc = tf("enqueue", "--file", str(_turns_file(tmp_path, *turns)), "--rate", "10", env=fleet_env)
    assert proc.returncode == 0, proc.stderr
    queue = TurnQueue(redis)
    times = [(await queue.get(f"bf-r{i}")).enqueued_at for i in range(4)]
    # paced: the i-th turn not before i / rate seconds after the first (a lower bound, never flaky)
    assert all((times[i] - times[0]).total_seconds() >= i / 10 - 0.01 for i in range(4))


def test_enqueue_file_refuses_single_turn_flags_and_a_bad_rate(fleet_env, tmp_path):
    path = str(_turns_file(tmp_path, GOOD[0]))
    for args, message in ((["--file", path, "--customer", "C-1"], "--customer: not with --file"),
                          (["--file", path, "--rate", "0"], "--rate: must be"),
                          (["--file", str(tmp_path / "nope.jsonl")], "--file: cannot read"),
                          (["--conversation", "c", "--customer", "C-1", "--rate", "5", "hi"], "--rate: only with --file")):
        proc = tf("enqueue", *args, env=fleet_env)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


def test_enqueue_file_on_a_terminal_shows_a_progress_bar_not_a_line_per_turn(fleet_env, tmp_path):
    import os
    import pty
    import subprocess

    from tests.processes import CLI

    main, child = pty.openpty()
    env = {**fleet_env, "TERM": "xterm-256color", "COLUMNS": "100"}
    proc = subprocess.Popen([*CLI, "enqueue", "--file", str(_turns_file(tmp_path, *GOOD))],
                            stdin=child, stdout=child, stderr=child, env=env)
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=60) == 0
    os.close(main)
    text = out.decode(errors="replace")
    assert "3/3" in text and "━" in text  # the bar, complete
    assert "line 1:" not in text  # no per-line results on a terminal: only problems would be listed
    assert "3 enqueued" in text


async def test_enqueue_file_goes_on_past_a_refused_turn_and_exits_1(fleet_env, redis, tmp_path):
    mine = tf("enqueue", "--conversation", "bf-owned", "--customer", "C-100", "hi", env=fleet_env)
    assert mine.returncode == 0, mine.stderr
    path = _turns_file(tmp_path, {"conversation_id": "bf-owned", "customer_id": "C-101", "text": "hi",
                                  "turn_id": "bf-theirs"}, GOOD[0])
    proc = tf("enqueue", "--file", str(path), env=fleet_env)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines() == [
        "line 1: rejected bf-theirs (conflict): conversation_id 'bf-owned' belongs to another customer",
        "line 2: enqueued bf-t1"]
    assert "1 enqueued, 0 existing, 1 rejected, 0 skipped" in proc.stderr
    assert await redis.llen(keys.conversation_turns("bf-owned")) == 1
