"""The main job under test: ``turnfleet demo`` end to end, as a user runs it, twice.

The real CLI from the venv, with its embedded Redis in a state folder of its own and
``REDIS_URL`` unset, run twice on the same state folder (so the second run finds the first
run's refund in the ledger): each run prints every turn of the scenario completed, a real
refund (a new one each time: every run refunds its own fresh copy of order 1047), the cost
alert, and exits 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from turnfleet.shell.demo import SCENARIO

TURNFLEET = Path(sys.executable).parent / "turnfleet"
REFUND = re.compile(r"I've refunded \$229\.00 for order (\d+) \(refund (RF-[0-9A-F]{10})\)")
HEADLINE = re.compile(r"^(\S+ \d+/\d+)  \S+  (\w+)  ", re.MULTILINE)


def run_demo(state: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNFLEET_") and k != "REDIS_URL"}
    env.update(TURNFLEET_STATE_DIR=str(state), PYTHONUNBUFFERED="1")
    return subprocess.run([str(TURNFLEET), "demo"], env=env, capture_output=True, text=True, timeout=240)


def test_the_demo_runs_twice_on_one_state_folder_with_a_real_refund_each_time(tmp_path):
    state = tmp_path / "state"
    expected = {f"{label} {i}/{len(texts)}" for label, _c, texts in SCENARIO for i in range(1, len(texts) + 1)}
    refunds = []
    try:
        for run in (1, 2):
            proc = run_demo(state)
            out = proc.stdout
            assert proc.returncode == 0, f"run {run}: {proc.stderr[-2000:]}\n{out[-3000:]}"
            assert "Traceback" not in proc.stderr
            headlines = dict(HEADLINE.findall(out))
            assert set(headlines) == expected, f"run {run} printed turns {sorted(headlines)}"
            assert set(headlines.values()) == {"completed"}
            assert f"Enqueued {len(expected)} turns in {len(SCENARIO)} conversations." in out
            [(order, refund_id)] = REFUND.findall(out)
            assert f"1047 → {order}" in out  # this run's own copy of order 1047
            refunds.append((order, refund_id))
            assert out.count("isn't eligible for a refund") == 3  # 1045 late, 1052 late, 1051 digital
            assert "already refunded" not in out
            assert "Alerts raised (1)" in out and "conversation_cost Conversation demo-" in out
            assert f"{len(expected)} turns in " in out
            assert "turnfleet demo --story wrong-refund" in out  # the pointer to the story
            # The CLI stopped the embedded Redis it started.
            assert not (state / "redis.json").exists()
    finally:
        _stop_leftover_redis(state)
    (first_order, first_refund), (second_order, second_refund) = refunds
    assert first_order != second_order and first_refund != second_refund


def _stop_leftover_redis(state: Path) -> None:
    """If a failed run left its embedded Redis behind, stop that one (by its recorded pid)."""
    try:
        pid = json.loads((state / "redis.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
