"""The CLI's manners (issue 18): ``--version``, help and examples everywhere. Real
subprocesses, as a user runs them."""

from __future__ import annotations

import argparse
import json
from importlib.metadata import version

from tests.processes import tf
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
