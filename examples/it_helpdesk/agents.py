"""The IT helpdesk's agents and its workflow: what ``turnfleet worker --app examples.it_helpdesk:app`` serves.

The Helpdesk greets, looks accounts up and opens tickets; password resets go to Accounts (a
handoff). A conversation handed to Accounts starts its next turn there, and Accounts hands
anything outside its tools back to the Helpdesk. No agent names a model: they run on the
worker's (``TURNFLEET_MODEL_*``), and offline on the workflow's script.
"""

from __future__ import annotations

from agents import Agent

from turnfleet import TurnContext, Workflow

from .script import HELPDESK_SCRIPT
from .tools import lookup_account, open_ticket, reset_password

RULES = """
Rules:
- Accounts are named by username (e.g. jane.doe) or e-mail address. If the user gave none, ask.
- Use only what the tools return. Never state, invent or ask for a password, and never repeat
  an e-mail address: a reset sends a temporary password to the address on file.
- If the user asks for a person or for something you cannot do here, call open_ticket with a
  one-sentence summary and give them the ticket id.
""".strip()

accounts = Agent[TurnContext](
    name="Accounts",
    handoff_description="Password resets and account unlocks.",
    instructions=f"""You are Accounts, the IT helpdesk's account specialist.
To reset a password, call reset_password with the account, then confirm with the reset id it
returns and say a temporary password went to the account's e-mail address on file. For
account questions call lookup_account. Hand anything else back to the Helpdesk.

{RULES}""",
    tools=[lookup_account, reset_password, open_ticket],
)
helpdesk = Agent[TurnContext](
    name="Helpdesk",
    handoff_description="Front desk of the IT helpdesk: greets, looks accounts up, opens tickets.",
    instructions=f"""You are the IT helpdesk of the organisation's employees.
Greet users, answer questions about an account with lookup_account (status, MFA, last
sign-in), and hand password resets and unlocks to Accounts. Decline politely what is not
about accounts, saying what you can do: reset a password, check an account, open a ticket.

{RULES}""",
    tools=[lookup_account, open_ticket],
    handoffs=[accounts],
)
accounts.handoffs = [helpdesk]

app = Workflow(name="it-helpdesk", agent=helpdesk, version="1", offline_script=HELPDESK_SCRIPT)
