"""The Support Desk's checks as tests want them: ``unchecked``, the Desk without its checks (a
drill that counts one telemetry entry per turn), and ``app``, the Desk with one more check that
holds while a named pipe exists (the check-job drill, tests/drills/test_check_drills.py): it
writes ``<started dir>/<turn id>`` holding its process id when it begins, then blocks opening the
pipe until a writer opens it (or goes on at once when the pipe is gone): an event, not a poll. Paths from the environment
(``TURNFLEET_TEST_CHECK_HOLD``, ``TURNFLEET_TEST_CHECK_STARTED``), read when the check runs."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from turnfleet import App
from turnfleet.checks import FinishedTurn, check, passed
from turnfleet.workers.model import OfflineModel
from turnfleet.workers.support_desk import support_desk_workflow

HOLD = "TURNFLEET_TEST_CHECK_HOLD"
STARTED = "TURNFLEET_TEST_CHECK_STARTED"


@check("held")
def held(turn: FinishedTurn):
    """Passes once released (sync team code, run in a thread by the check job)."""
    started = Path(os.environ[STARTED]) / turn.turn_id
    started.write_text(str(os.getpid()))
    try:
        with open(os.environ[HOLD], "rb") as pipe:  # blocks until a writer opens the FIFO
            pipe.read()
    except FileNotFoundError:  # no pipe (removed): nothing holds the check
        pass
    return passed("released")


desk = support_desk_workflow(OfflineModel())
app = App([dataclasses.replace(desk, checks=(*desk.checks, held))])
unchecked = App([dataclasses.replace(desk, checks=())])
