"""A team's workflow whose tool makes its side effect once (``turnfleet.once``).

The tool is named and shaped like the Desk's ``escalate_to_human(reason)`` only so that the
tests' model server, which plays the Desk's script, calls it when a customer asks for a
person; its body is a team's own: it files a ticket once per turn, with a ledger entry.
"""

import json

from agents import Agent, RunContextWrapper, function_tool

from turnfleet import TurnContext, Workflow, once

LEDGER = "once-test-tickets"


@function_tool
async def escalate_to_human(ctx: RunContextWrapper[TurnContext], reason: str) -> str:
    """Open a ticket for the human support team.

    Args:
        reason: One sentence on what the customer needs.
    """
    turn = ctx.context
    ticket = {"ticket_id": f"T-{turn.turn_id}", "reason": reason[:200], "filed_in_attempt": turn.attempt}
    made = await once(ctx, "ticket", ticket, ledger=LEDGER)
    return json.dumps({**made.value, "replayed": made.replayed, "idempotency_key": made.idempotency_key})


helpdesk = Agent(name="Helpdesk", instructions="Open tickets for people who ask for a human.",
                 tools=[escalate_to_human])
workflow = Workflow(name="once-desk", agent=helpdesk)
