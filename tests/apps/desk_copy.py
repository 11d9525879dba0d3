"""The Support Desk's agents served as a team's own workflow (``desk-b``), as ``--app`` loads it."""

from turnfleet import App, Workflow
from turnfleet.workers.model import OfflineModel
from turnfleet.workers.support_desk import build_support_desk, support_desk_workflow

workflow = Workflow(name="desk-b", agent=build_support_desk(OfflineModel()).triage, version="1.0")
app = App([workflow])
# One worker serving two workflows: desk-b and the built-in Support Desk (routing).
with_builtin = App([workflow, support_desk_workflow(OfflineModel())])
