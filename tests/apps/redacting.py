"""A workflow that declares its own redaction pattern (issue 16: ``Workflow.redaction_patterns``):
an IT helpdesk whose employee numbers (``EMP-482913``) are personal data the built-in detectors
do not know. Its tool returns the number and logs it, as a team's tool might; on the offline
model by its own script. ``bad`` declares a pattern that does not compile."""

from __future__ import annotations

import json

import structlog
from agents import Agent, function_tool

from turnfleet import App, Call, Intent, Outcome, Rule, Script, Slot, Step, Workflow

EMPLOYEE_PATTERN = r"(?P<employee>(?i:EMP)-\d{6})"  # any case: the model may write it lower-case
MARK = "[REDACTED:employee]"
LOOKUP = "lookup_employee"
SCRIPT = Script(
    rules=(Rule("lookup", (r"\bemp-\d{6}\b",)),),
    intents=(
        Intent(
            "lookup",
            steps=(
                Step(
                    Call(LOOKUP, {"employee": "{employee}"}),
                    outcomes=(Outcome("found", "{badge} is {name}; their laptop ticket is open."),),
                    failed="I could not look up {employee}.",
                ),
            ),
            ask="Which employee number is it?",
        ),
        Intent("other", reply="Give me an employee number (EMP-123456)."),
    ),
    fallback="other",
    slot=Slot("employee", r"\b(EMP-\d{6})\b"),
)


@function_tool
def lookup_employee(employee: str) -> str:
    """Look an employee up by their number."""
    structlog.get_logger("tests.apps.redacting").info("employee.looked_up", employee=employee)
    return json.dumps({"found": True, "badge": employee.upper(), "name": "Dana Field"})


helpdesk = Agent(name="Helpdesk", instructions="You are the IT helpdesk. Look employees up with lookup_employee.",
                 tools=[lookup_employee])
workflow = Workflow(name="it-redacting", agent=helpdesk, offline_script=SCRIPT,
                    redaction_patterns=[EMPLOYEE_PATTERN])
app = App([workflow])
bad = Workflow(name="it-badpattern", agent=helpdesk, offline_script=SCRIPT, redaction_patterns=[r"EMP-(\d{6}"])
