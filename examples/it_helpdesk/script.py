"""What the helpdesk's agents decide when the fleet runs offline: the workflow's ``Script``.

No LLM here: the offline model (and the tests' OpenAI-compatible server) follows this script,
so the example runs anywhere. On a real model the agents' instructions do the same job; the
script stands in for the model, it is not part of the workflow's version. Read
``turnfleet.Script``'s docstring for how a script decides. Understood (latest user message):

* a password reset: "reset", "forgot my password", "locked out", "can't log in";
* an account lookup: "status", "check", "is ... locked", "MFA", "last sign-in";
* a person or a ticket: "ticket", "a human", "someone", "technician", "escalate";
* a message naming only the account ("It's jane.doe") continues what the previous one asked;
* greetings, thanks; anything else is declined with what the helpdesk can do.

The account (the ``account`` slot) is a username with a dot ("jane.doe") or an e-mail
address. The Helpdesk looks accounts up and opens tickets itself, and hands resets to
Accounts; Accounts hands anything outside its tools back to the Helpdesk.
"""

from __future__ import annotations

from turnfleet import Call, Facts, FollowUp, Intent, Outcome, Rule, Script, Slot, Step

OFFER = "I can reset a password, check an account, or open a ticket for the IT team."

ACCOUNT = Slot("account", (
    r"(?i)\b([a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,})\b",  # an e-mail address
    r"(?i)(?<![\w.@+%-])([a-z][a-z0-9]+\.[a-z][a-z0-9]+)(?![\w.-]*@)",  # a username: jane.doe
))
ASK = "Which account is it? Please give its username (e.g. jane.doe) or its e-mail address."
NOT_FOUND = "I couldn't find the account {account} in your organisation. Could you check the username?"


def _failed(what: str) -> str:
    return f"I'm sorry, something went wrong while {what}. Shall I open a ticket for the IT team?"


def _account(facts: Facts) -> str:
    r = facts.result
    text = (f"{r['name']}'s account ({r['username']}) is {r['status']}; MFA is "
            f"{'on' if r.get('mfa') else 'off'}; last sign-in {r['last_sign_in']}.")
    if r["status"] == "locked":
        text += " I can reset the password, which also unlocks it."
    return text


def _ticket_summary(facts: Facts) -> str:
    return f"User asked for the IT team: {facts.text.strip()[:200]}"


RESET = Step(
    Call("reset_password", {"account": "{account}"}),
    outcomes=(
        Outcome(lambda r: r.get("found") is False, NOT_FOUND),
        Outcome("reset", "Done: the password of {username} is reset (reset {reset_id}). A temporary "
                         "password was sent to the account's e-mail address on file; it must be "
                         "changed at the next sign-in."),
    ),
    failed=_failed("resetting the password"),
)
LOOKUP = Step(
    Call("lookup_account", {"account": "{account}"}),
    outcomes=(Outcome(lambda r: r.get("found") is False, NOT_FOUND), Outcome(None, _account)),
    failed=_failed("looking the account up"),
)
TICKET = Step(
    Call("open_ticket", {"summary": _ticket_summary}),
    outcomes=(Outcome("ticket_id", "I've opened ticket {ticket_id} for the IT team; someone will "
                                   "get back to you shortly."),),
    failed=_failed("opening a ticket"),
    per_slot=False,
)

HELPDESK_SCRIPT = Script(
    rules=(
        Rule("ticket", r"\b(ticket|human|a person|someone|technician|escalat\w*|(talk|speak) to)\b"),
        Rule("reset", r"\b(reset|forgot\w*|locked out|(can'?t|cannot) (log|sign) ?in|new password|password)\b"),
        Rule("lookup", r"\b(status|look ?up|check|locked|active|disabled|mfa|2fa|sign[- ]?in|last login)\b"),
        FollowUp(continues=("reset", "lookup"), otherwise="lookup"),  # "It's jane.doe"
        Rule("greeting", r"^\W*(hi|hello|hey|good (morning|afternoon|evening))\b"),
        Rule("thanks", r"\b(thanks|thank you|cheers|bye)\b"),
    ),
    intents=(
        Intent("reset", steps=(RESET,), route=("account",), ask=ASK),
        Intent("lookup", steps=(LOOKUP,), route=("account",), ask=ASK),
        Intent("ticket", steps=(TICKET,)),
        Intent("greeting", reply=f"Hi! This is the IT helpdesk. {OFFER}"),
        Intent("thanks", reply="You're welcome! Anything else I can do for you?"),
        Intent("out_of_scope", reply=f"I'm sorry, I can only help with accounts here. {OFFER}"),
    ),
    fallback="out_of_scope",
    slot=ACCOUNT,
    home=("helpdesk",),
    unavailable=_failed("handling that"),
)
