"""``turnfleet rerun`` and ``turnfleet regress`` as a user runs them (issue 17): turns served by
real worker processes on the flawed or the fixed offline model, counted by a real telemetry
consumer, then re-run by the CLI in a subprocess. ``regress`` exits 0 when no check newly
fails and 1 when one does — both ways.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.processes import run_burst
from tests.test_rerun import NAMED_CHECK, flawed_ask, production_state
from turnfleet.queue import TurnQueue
from turnfleet.workers.llm import FLAWED_OFFLINE_MODEL, OFFLINE_MODEL
from turnfleet.workers.orderbook import copy_orders

CLI = [sys.executable, "-m", "turnfleet.shell.cli"]


def turnfleet(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *argv], env=env, capture_output=True, text=True, timeout=120)


async def served_turns(redis: Any, producer: Any, env: dict[str, str], tmp_path: Any, model: str) -> dict[str, str]:
    """A refund the flaw picks (C-100), an order-status question (C-100) and a refund of
    a customer with no other eligible order (C-102), run by a real worker on ``model`` and
    counted by a real telemetry consumer: their turn ids by name."""
    c100 = await copy_orders(redis, ["1042", "1043", "1044"])
    c102 = await copy_orders(redis, ["1047", "1048"])
    turns = {
        "refund": await producer.enqueue_turn(conversation_id="conv-1", customer_id="C-100",
                                              text=flawed_ask(c100["1042"])),
        "status": await producer.enqueue_turn(conversation_id="conv-2", customer_id="C-100",
                                              text=f"Where is order {c100['1044']}?"),
        "other": await producer.enqueue_turn(conversation_id="conv-3", customer_id="C-102",
                                             text=f"Refund order {c102['1047']}"),
    }
    run_burst("worker", {**env, "TURNFLEET_MODEL_NAME": model}, tmp_path)
    run_burst("telemetry", env, tmp_path)
    for turn_id in turns.values():
        assert (await TurnQueue(redis).get(turn_id)).status == "completed"
    return turns


async def test_regress_of_flawed_turns_on_the_fixed_model_fixes_them_and_exits_0_and_rerun_shows_one(redis, producer, fleet_env, tmp_path):
    turns = await served_turns(redis, producer, fleet_env, tmp_path, FLAWED_OFFLINE_MODEL)
    before = await production_state(redis)
    proc = turnfleet(fleet_env, "regress", "--customer", "C-100", "--model", OFFLINE_MODEL, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert (summary["turns"], summary["rerun"]) == (2, 2)  # C-100's two turns; C-102's not matched
    assert summary["changed"] == [turns["refund"]]  # the status question decided the same
    assert summary["checks_fixed"] == {NAMED_CHECK: [turns["refund"]]}
    assert summary["checks_broken"] == {} and summary["ok"] is True
    assert summary["cost"]["delta_usd"] is not None
    after = {k: v for k, v in (await production_state(redis)).items()}
    assert after == before  # no ledger entry, aggregate, stream entry, memory: only rerun records
    # Text form: the same verdict, one line each.
    text = turnfleet(fleet_env, "regress", "--feedback", "negative", "--model", OFFLINE_MODEL)
    assert text.returncode == 0 and "0 of 0 turn(s) re-run" in text.stdout  # no feedback given
    # The same turns, one at a time (one fleet for both: worker processes are the slow part).
    rerun_cli_shows_both_sides_and_errors_are_one_line(fleet_env, turns)


async def test_regress_of_fixed_turns_on_the_flawed_model_breaks_a_check_and_exits_1(redis, producer, fleet_env,
                                                                                     tmp_path):
    turns = await served_turns(redis, producer, fleet_env, tmp_path, OFFLINE_MODEL)
    proc = turnfleet(fleet_env, "regress", "--tool", "process_refund", "--model", FLAWED_OFFLINE_MODEL,
                     "--concurrency", "2", "--json")
    assert proc.returncode == 1, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert (summary["turns"], summary["rerun"]) == (2, 2)  # the two refund turns
    assert summary["checks_broken"] == {NAMED_CHECK: [turns["refund"]]}
    assert summary["changed"] == [turns["refund"]]  # C-102 has no other order to get wrong
    assert summary["ok"] is False
    text = turnfleet(fleet_env, "regress", "--tool", "process_refund", "--model", FLAWED_OFFLINE_MODEL)
    assert text.returncode == 1
    assert f"checks broken: {NAMED_CHECK} on 1 turn(s): {turns['refund']}" in text.stdout


def rerun_cli_shows_both_sides_and_errors_are_one_line(fleet_env: dict[str, str], turns: dict[str, str]) -> None:
    proc = turnfleet(fleet_env, "rerun", turns["refund"], "--model", OFFLINE_MODEL, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["changed"] is True
    assert set(report) >= {"changed", "differences", "original", "candidate", "usage"}
    assert [c["source"] for c in report["candidate"]["tool_calls"]] == ["live", "side_effect_not_made"]
    shown = turnfleet(fleet_env, "rerun", turns["refund"], "--model", OFFLINE_MODEL)
    assert shown.returncode == 0
    for words in ("original", "candidate", "[live]", "[side effect NOT made]", "CHANGED: tool_calls, final_output",
                  f"checks fixed: {NAMED_CHECK}"):
        assert words in shown.stdout, words
    for argv, message in (
            (["t-nope"], "no turn 't-nope' (never enqueued, or removed by retention): cannot re-run"),
            ([turns["refund"], "--model", "gpt-nope"], "--model 'gpt-nope': no such model here"),
            ([turns["refund"], "--workflow", "nope"], "--workflow 'nope': no such workflow"),
            ([turns["refund"], "--app", "nope_mod:app"], "--app 'nope_mod:app': no module named 'nope_mod'")):
        bad = turnfleet(fleet_env, "rerun", *argv)
        assert bad.returncode == 2, bad.stderr
        assert bad.stderr.startswith(f"turnfleet rerun: {message}") and bad.stderr.count("\n") == 1, bad.stderr
    as_json = json.loads(turnfleet(fleet_env, "rerun", "t-nope", "--json").stderr)
    assert as_json == {"error": "not_found", "message": "no turn 't-nope' (never enqueued, or removed by retention): "
                                                        "cannot re-run"}
