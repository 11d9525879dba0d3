"""A workflow that is not the Support Desk, on the offline model by its own script (issue 16,
"Models"), written with names from ``turnfleet`` alone, as a team writes it: one agent naming
no model, its own tool, its own ``offline_script`` and a default ``model`` name (``app``).
``with_desk`` adds the Desk's agents naming no model either (``desk-n``), so one worker runs
two workflows' agents on two scripts; ``noscript`` is refused offline."""

from __future__ import annotations

import json

from agents import Agent, function_tool

from turnfleet import App, Call, Intent, Outcome, Rule, Script, Slot, Step, Workflow

USERNAME = Slot("username", r"\buser(?:name)?\s+([a-z][a-z0-9._-]*[a-z0-9])")
RESET = "reset_password"
HELPDESK_MODEL = "tf-helpdesk"  # the workflow's default model name
HELPDESK_SCRIPT = Script(
    rules=(Rule("reset", (r"\b(reset|forgot)\b", r"\bpassword\b")),),
    intents=(
        Intent(
            "reset",
            steps=(
                Step(
                    Call(RESET, {"username": "{username}", "notify": True}),
                    outcomes=(
                        Outcome("reset", "Done: {username} can log in with {temporary} now."),
                        Outcome(None, "I could not reset {username}: {reason}"),
                    ),
                    failed="Something went wrong resetting {username}.",
                ),
            ),
            route=("accounts",),
            ask="Which username is it?",
        ),
        Intent("other", reply="I reset passwords; tell me the username."),
    ),
    fallback="other",
    slot=USERNAME,
    home=("front",),
)



@function_tool
def reset_password(username: str, notify: bool) -> str:
    """Reset an account's password and return a temporary one."""
    return json.dumps({"reset": True, "temporary": f"tmp-{username}"})


helpdesk = Agent(name="Helpdesk", instructions="You are the IT helpdesk. Reset passwords with reset_password.",
                 tools=[reset_password])
workflow = Workflow(name="it-scripted", agent=helpdesk, offline_script=HELPDESK_SCRIPT, model=HELPDESK_MODEL)
app = App([workflow])


def _desk_naming_no_model() -> Workflow:
    from turnfleet.workers.support_desk import build_support_desk
    from turnfleet.workers.support_desk_script import SUPPORT_DESK_SCRIPT

    return Workflow(name="desk-n", agent=build_support_desk(None).triage, offline_script=SUPPORT_DESK_SCRIPT)


with_desk = App([workflow, _desk_naming_no_model()])
noscript = Workflow(name="it-noscript", agent=Agent(name="Bare", instructions="Answer briefly."))
