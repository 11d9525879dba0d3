"""``turnfleet demo --story wrong-refund`` end to end, as a newcomer runs it (issue 17, "The demo
tells the story"; must-show: "The story demo runs from a fresh clone and exits 0").

The real CLI from the venv, embedded Redis in a fresh state folder, ``REDIS_URL`` unset: once
narrated, once more with ``--json`` on the same state folder (so the second run meets the first
run's turns and complaints, and must still list only its own). The figures are exact: the
flawed model picks its turns by a digest of the message and the story phrases each request for
this run's order numbers, so the same four turns go wrong on every run. The commands the story
prints are then run as printed and must show what the story says.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.test_demo import TURNFLEET, _stop_leftover_redis
from turnfleet.workers.orderbook import load_order_book

WRONG = ["dana-boots-t1", "tomas-lamp-t1", "dana-socks-t2", "tomas-desk-again-t1"]  # label-turn
COMPLAINED = WRONG[:3]
MONEY_CHECK = "refund_order_named_by_customer"
SIBLING = {"1042": "1043", "1043": "1042", "1049": "1050", "1050": "1049"}  # the flaw's other order


def turnfleet(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNFLEET_") and k != "REDIS_URL"}
    env.update(TURNFLEET_STATE_DIR=str(state), PYTHONUNBUFFERED="1")
    return subprocess.run([str(TURNFLEET), *args], env=env, capture_output=True, text=True, timeout=240)


def test_the_story_runs_twice_on_one_state_folder_with_the_same_wrong_turns_each_time(tmp_path):
    state = tmp_path / "state"
    try:
        told = turnfleet(state, "demo", "--story", "wrong-refund")
        assert told.returncode == 0, f"{told.stderr[-2000:]}\n{told.stdout[-3000:]}"
        assert "Traceback" not in told.stderr
        out = told.stdout
        [first_run] = re.findall(r"turnfleet demo --story wrong-refund · run (\w{6})", out)
        titles = re.findall(r"^(\d)\. (.+)$", out, re.MULTILINE)
        assert [n for n, _t in titles] == ["1", "2", "3", "4", "5", "6", "7", "8"]
        assert "In 4 of the refunds the model refunded another of the customer's orders" in out
        assert f"$ turnfleet turn story-{first_run}-dana-boots-t1" in out
        assert "$ turnfleet find --feedback negative --since " in out
        assert "refund_order_named_by_customer flagged 4 turns — exactly the wrong refunds" in out
        assert f"story-{first_run}-tomas-desk-again-t1) is one no customer will complain about" in out
        assert "$ turnfleet alerts" in out
        assert "$ turnfleet regress --feedback negative --since " in out

        proc = turnfleet(state, "demo", "--story", "wrong-refund", "--json")
        assert proc.returncode == 0, f"{proc.stderr[-2000:]}\n{proc.stdout[-3000:]}"
        story = json.loads(proc.stdout)
        run = story["run_id"]
        assert run != first_run and story["error"] is None
        traffic, flagged, alerted, complaints, found, replay, fixed, others = (s["figures"] for s in story["steps"])

        assert (traffic["turns"], traffic["conversations"], traffic["refunds"]) == (14, 12, 9)
        wrong = traffic["wrong_refunds"]
        assert [w["turn_id"] for w in wrong] == [f"story-{run}-{t}" for t in WRONG]
        for w in wrong:  # another order of the same customer, this conversation's copy
            [refunded] = w["refunded"]
            assert refunded == SIBLING[w["named"][:4]] + w["named"][4:]
            assert load_order_book().orders[refunded[:4]].customer_id == w["customer"]
        assert [w["complained"] for w in wrong] == [True, True, True, False]

        # The money-path check flagged exactly the four wrong refunds (the silent one too), no
        # check failed on any other turn, and a critical check_failed alert fired for each.
        wrong_ids = [f"story-{run}-{t}" for t in WRONG]
        assert flagged["judged_turns"] == 14
        assert flagged["flagged_turns"] == sorted(wrong_ids)
        assert flagged["failed_checks"] == sorted([t, MONEY_CHECK] for t in wrong_ids)
        assert flagged["flagged_without_complaint"] == [wrong_ids[3]]
        assert alerted["rule"] == "check_failed"
        assert sorted((a["turn_id"], a["severity"], a["check"]) for a in alerted["alerts"]) == \
            sorted((t, "critical", MONEY_CHECK) for t in wrong_ids)

        complained = [f"story-{run}-{t}" for t in COMPLAINED]
        assert [c["turn_id"] for c in complaints["complaints"]] == complained
        assert complaints["wrong_without_complaint"] == [f"story-{run}-{WRONG[3]}"]
        # find lists exactly this run's complained-about turns, not the first run's.
        assert found["listed_turns"] == sorted(complained)
        assert (replay["turn_id"], replay["named"]) == (complained[0], wrong[0]["named"])
        assert replay["chosen_by_generation"] == wrong[0]["refunded"][0]
        assert replay["model"] == "turnfleet-offline-flawed"
        assert replay["failed_checks"] == [MONEY_CHECK]

        # regress on the fixed model: the 3 complained turns fixed (the named order refunded),
        # then all 9 refund turns: the 4 wrong ones fixed, the other 5 unchanged; exit 0 both.
        assert sorted(fixed["turns"]) == sorted(complained)
        assert sorted(fixed["checks_fixed"][MONEY_CHECK]) == sorted(complained) and fixed["checks_broken"] == {}
        assert list(fixed["checks_fixed"]) == [MONEY_CHECK]
        assert fixed["refunded_by_candidate"] == {w["turn_id"]: [w["named"]] for w in wrong[:3]}
        assert fixed["exit_code"] == 0
        assert others["turns"] == 9
        assert sorted(others["changed"]) == sorted(wrong_ids)
        assert sorted(others["checks_fixed"][MONEY_CHECK]) == sorted(wrong_ids)
        assert others["checks_broken"] == {} and len(others["unchanged"]) == 5
        assert not set(others["unchanged"]) & set(wrong_ids)
        assert others["exit_code"] == 0

        # The commands the story prints reproduce what it says.
        listed = turnfleet(state, *printed(story, "turnfleet find --feedback negative"), "--json")
        assert listed.returncode == 0, listed.stderr
        assert sorted(t for row in json.loads(listed.stdout) for t in row["feedback_turns"]) == sorted(complained)
        shown = turnfleet(state, *printed(story, "turnfleet turn "), "--json")
        assert shown.returncode == 0, shown.stderr
        turn = json.loads(shown.stdout)
        assert ("check_refund_eligibility", {"order_id": replay["chosen_by_generation"]}) in generation_calls(turn)
        assert [f["score"] for f in turn["feedback"]] == [-1]
        checked = turnfleet(state, *printed(story, "turnfleet find --check-failed "), "--json")
        assert checked.returncode == 0, checked.stderr
        assert sorted(t for row in json.loads(checked.stdout) for t in row["check_failed_turns"]) == sorted(wrong_ids)
        for start, turns, fixed_turns, unchanged in (
                ("turnfleet regress --feedback negative ", 3, complained, 0),
                ("turnfleet regress --tool process_refund ", 9, wrong_ids, 5)):
            regressed = turnfleet(state, *printed(story, start), "--json")
            assert regressed.returncode == 0, regressed.stderr
            summary = json.loads(regressed.stdout)
            assert (summary["turns"], summary["checks_broken"], summary["ok"]) == (turns, {}, True)
            assert sorted(summary["checks_fixed"][MONEY_CHECK]) == sorted(fixed_turns)
            assert sorted(summary["changed"]) == sorted(fixed_turns)
            assert len([r for r in summary["results"] if not r["changed"]]) == unchanged
    finally:
        _stop_leftover_redis(state)


def generation_calls(replay: dict) -> list[tuple[str, dict]]:
    """The tool calls the replay's generations decided on, with their arguments."""
    def walk(nodes: list[dict]) -> Iterator[dict]:
        for node in nodes:
            yield node
            yield from walk(node["children"])

    return [(call["name"], json.loads(call.get("arguments") or "{}"))
            for attempt in replay["attempts"] for node in walk(attempt["tree"]) if node["kind"] == "generation"
            for call in (node["detail"].get("decision") or {}).get("calls") or []]


def printed(story: dict, start: str) -> list[str]:
    """The arguments of the one command the story printed that starts with ``start``."""
    [command] = [c for s in story["steps"] for c in s["commands"] if c.startswith(start)]
    return command.split()[1:]


def test_an_unknown_story_is_refused_naming_the_known_ones_before_anything_starts(tmp_path):
    state = tmp_path / "state"
    proc = turnfleet(state, "demo", "--story", "right-refund")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("turnfleet demo: --story: no story 'right-refund'; "
                                   "the stories are: wrong-refund")
    assert proc.stdout == ""
    assert not state.exists()  # no Redis was started, nothing written
    as_json = turnfleet(state, "demo", "--story", "right-refund", "--json")
    assert as_json.returncode == 2
    assert json.loads(as_json.stderr)["errors"] == [
        {"field": "--story", "message": "no story 'right-refund'; the stories are: wrong-refund"}]
