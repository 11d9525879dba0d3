"""The Support Desk with its checks and an LLM judge on every turn (tests/test_judge.py): run by
a real worker pointed at tests/llm_server.py, which serves both the turns and the judge."""

from __future__ import annotations

import dataclasses

from turnfleet import App, llm_judge
from turnfleet.workers.model import OfflineModel
from turnfleet.workers.support_desk import support_desk_workflow

judge = llm_judge("polite_and_accurate", "The answer is polite and states what the tools returned.",
                  sample_rate=1.0, pass_score=0.7)
desk = support_desk_workflow(OfflineModel())
app = App([dataclasses.replace(desk, checks=(*desk.checks, judge))])
