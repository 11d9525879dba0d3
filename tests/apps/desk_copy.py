"""The Support Desk's agents served as a team's own workflow (``desk-b``), as ``--app`` loads it."""

from turnfleet import App, Workflow
from turnfleet.workers.model import OfflineModel
from turnfleet.workers.support_desk import build_support_desk

workflow = Workflow(name="desk-b", agent=build_support_desk(OfflineModel()).triage, version="1.0")
app = App([workflow])
