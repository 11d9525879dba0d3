"""The IT helpdesk's tools: look an account up, reset its password, open a ticket.

Every tool answers a short JSON object the model (or the offline script) reads. A customer is
an organisation: it sees its own accounts only; another organisation's account is "not found",
exactly like one that does not exist.

The side effects go through ``turnfleet.once``: a retried attempt of a turn (its worker died
after the tool ran) gets the first attempt's answer back, flagged ``replayed``, instead of
resetting the password twice. ``reset_password`` also appends one entry to the ledger
``it-password-resets`` when, and only when, it resets: that stream is the outbox the
directory's password service reads. No tool ever answers a secret: a reset answers its reset
id and says a temporary password went to the account's e-mail address on file; no tool
answers the e-mail address itself.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from agents import RunContextWrapper, function_tool

from turnfleet import TurnContext, once

DIRECTORY = json.loads((Path(__file__).with_name("accounts.json")).read_text())["accounts"]
RESET_LEDGER = "it-password-resets"  # the stream tf:ledger:it-password-resets
DELIVERY = "a temporary password was sent to the account's e-mail address on file"


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _short_id(prefix: str, *parts: str) -> str:
    """Deterministic per turn, so the same turn always names the same reset or ticket."""
    return f"{prefix}-{hashlib.sha256(':'.join(parts).encode()).hexdigest()[:8].upper()}"


def find_account(customer_id: str, account: str) -> dict[str, Any] | None:
    """The customer's account by username or e-mail address (any case); None when it does not
    exist or belongs to another customer."""
    wanted = account.strip().lstrip("@").lower()
    for row in DIRECTORY:
        if row["customer"] == customer_id and wanted in (row["username"], row["email"].lower()):
            return row
    return None


def _not_found() -> str:
    return _dumps({"found": False, "reason": "no such account in your organisation"})


@function_tool
async def lookup_account(ctx: RunContextWrapper[TurnContext], account: str) -> str:
    """Look up one of the organisation's accounts: status (active or locked), MFA, last sign-in.

    Args:
        account: The username (e.g. "jane.doe") or the account's e-mail address.
    """
    row = find_account(ctx.context.customer_id, account)
    if row is None:
        return _not_found()
    return _dumps({"found": True, "username": row["username"], "name": row["name"],
                   "status": row["status"], "mfa": row["mfa"], "last_sign_in": row["last_sign_in"]})


@function_tool
async def reset_password(ctx: RunContextWrapper[TurnContext], account: str) -> str:
    """Reset an account's password: a temporary password goes to the e-mail address on file
    and must be changed at the next sign-in; a locked account is unlocked. Never tell the
    user a password: there is none to tell.

    Args:
        account: The username (e.g. "jane.doe") or the account's e-mail address.
    """
    turn = ctx.context
    row = find_account(turn.customer_id, account)
    if row is None:
        return _not_found()
    reset = {"reset_id": _short_id("PR", turn.turn_id, row["username"]), "username": row["username"]}
    # Once per turn: the record and its ledger entry (what the password service needs, no
    # e-mail address) are written together, on the first attempt only; a retried attempt of
    # this turn gets the same reset back (replayed).
    done = await once(ctx, "reset_password", reset, ledger=RESET_LEDGER,
                      entry={**reset, "customer_id": turn.customer_id, "turn_id": turn.turn_id})
    return _dumps({"reset": True, "username": done.value["username"], "reset_id": done.value["reset_id"],
                   "delivery": DELIVERY, "replayed": done.replayed})


@function_tool
async def open_ticket(ctx: RunContextWrapper[TurnContext], summary: str) -> str:
    """Open a ticket for the IT team (a person will follow up) when the user asks for a
    person or for something the helpdesk cannot do here.

    Args:
        summary: One sentence on what the user needs.
    """
    turn = ctx.context
    ticket = {"ticket_id": _short_id("IT", turn.turn_id), "summary": summary.strip()[:300]}
    done = await once(ctx, "open_ticket", ticket)  # once per turn: a retry reports the same ticket
    return _dumps({"ticket_id": done.value["ticket_id"], "status": "open", "replayed": done.replayed})
