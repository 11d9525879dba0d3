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
