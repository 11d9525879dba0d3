"""The Support Desk's agents as workflow ``desk-v``, whose Triage instructions come from the
environment (``TESTAPP_TRIAGE_INSTRUCTIONS``): two worker runs with two values serve two
versions of one workflow, as a changed prompt deployed would (tests/test_workflow_versions.py)."""

import os

from turnfleet import App, Workflow
from turnfleet.workers.model import OfflineModel
from turnfleet.workers.support_desk import build_support_desk

NAME = "desk-v"
INSTRUCTIONS_ENV = "TESTAPP_TRIAGE_INSTRUCTIONS"


def build(instructions: str | None = None) -> Workflow:
    """``desk-v`` with Triage told ``instructions`` (the desk's own when None)."""
    triage = build_support_desk(OfflineModel()).triage  # fresh agents: changing one is local
    if instructions:
        triage.instructions = instructions  # in place: the specialists hand back to this agent
    return Workflow(name=NAME, agent=triage, version="1.0")


workflow = build(os.environ.get(INSTRUCTIONS_ENV))
app = App([workflow])
