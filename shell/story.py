"""``turnfleet demo --story NAME``: the demo told as a story a newcomer can follow.

``wrong-refund`` (issue 17): a fleet on the flawed offline model (``turnfleet-offline-flawed``:
on some refund requests of a customer with several eligible orders it refunds another of their
orders, for that order's right amount — a mistake every tool guard lets through) serves a
morning of traffic; the money-path check ``refund_order_named_by_customer`` flags exactly the
wrong refunds (the one nobody will complain about too) and a critical ``check_failed`` alert
fires for each; some customers complain (feedback, score -1); ``find --feedback negative``
lists exactly the complained-about turns; the replay of one shows the generation that chose
the wrong order next to the order the customer named, and the failed check; ``regress`` on the
fixed model (``turnfleet-offline``, in-process, as the CLI runs it) fixes the complained turns,
then, over every refund turn of the run, fixes the wrong ones and leaves the others unchanged,
exit 0, with nothing added to the ledger or the results, telemetry and alert streams. Each step
prints what happened and the command that reproduces it, with this run's real ids.

A story is a list of step functions (:data:`STORIES`) over one :class:`StoryRun`, so later
steps slot in. Which turns go wrong is decided in advance: the flawed model picks its turns by
a digest of the customer's message (``flawed_turn``), and every run asks about its own fresh
copies of the orders (order numbers differ per run, so the digests do too); each refund request
is therefore phrased, from a fixed list of phrasings, as the first one the flaw picks (a turn
meant to go wrong) or skips (a turn meant to go right) for this run's order number.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import product
from pathlib import Path
from typing import Any

from rich.padding import Padding
from rich.rule import Rule
from rich.text import Text

from turnfleet import heartbeat, keys
from turnfleet.connection import connect
from turnfleet.formatting import money
from turnfleet.models import TurnResult
from turnfleet.settings import CommonSettings
from turnfleet.shell.fleet import FleetProcess, fleet_env

FLAWED_MODEL = "turnfleet-offline-flawed"  # turnfleet.workers.llm.FLAWED_OFFLINE_MODEL
FIXED_MODEL = "turnfleet-offline"
MONEY_CHECK = "refund_order_named_by_customer"
OFFLINE_IGNORES = ("TURNFLEET_MODEL_BASE_URL", "TURNFLEET_APP")  # the story is the built-in Desk, offline


class StoryFailed(Exception):
    """A step did not see what the story says happens: the story stops, exit 1."""


@dataclass(frozen=True)
class Refund:
    """A refund request for ``order`` (a packaged order number), phrased so the flawed model
    gets it wrong (``wrong``) or right; ``complaint``: the customer complains afterwards."""

    order: str
    wrong: bool = False
    complaint: bool = False


Message = str | Refund  # a plain message names packaged order numbers; this run's copies replace them

# (label, customer, messages): a morning at the Support Desk. Dana (C-100: boots 1042, socks
# 1043) and Tomás (C-103: desk frame 1049, lamp 1050) have several eligible orders; Priya's
# other order (C-102, 1048) was cancelled, so the flaw has nothing else to refund for her.
# A conversation that goes wrong names only the order it asks about (the check judges the
# refunded order against every order the customer named in the conversation).
MORNING: list[tuple[str, str, list[Message]]] = [
    ("dana-boots", "C-100", [Refund("1042", wrong=True, complaint=True)]),
    ("tomas-desk", "C-103", [Refund("1049")]),
    ("aiko-jacket", "C-104", ["Where is order 1052?"]),
    ("priya-headphones", "C-102", ["Hi, I'm Priya.", Refund("1047")]),
    ("tomas-lamp", "C-103", [Refund("1050", wrong=True, complaint=True)]),
    ("marcus-pour-over", "C-101", ["Has order 1046 shipped yet?"]),
    ("dana-socks", "C-100", ["Hello, this is Dana.", Refund("1043", wrong=True, complaint=True)]),
    ("dana-boots-again", "C-100", [Refund("1042")]),
    ("tomas-desk-again", "C-103", [Refund("1049", wrong=True)]),  # nobody complains about this one
    ("dana-where", "C-100", ["What's the status of order 1043?"]),
    ("tomas-lamp-again", "C-103", [Refund("1050")]),
    ("dana-socks-again", "C-100", [Refund("1043")]),
]

_ASKS = ("Please refund order {}.", "I want a refund for order {}.", "Can I get my money back for order {}?",
         "I need a refund on order {}.", "Could you refund order {}?", "I'd like a refund for order {}.")
_OPENINGS = ("", "Hi. ", "Good morning. ", "Hello! ")
_REASONS = ("", " It arrived damaged.", " I changed my mind.", " It's not what I expected.", " Thanks.")


def phrasings(order: str) -> Iterator[str]:
    """Ways to ask for a refund of ``order``, in a fixed order (120 of them)."""
    for ask, opening, reason in product(_ASKS, _OPENINGS, _REASONS):
        yield f"{opening}{ask.format(order)}{reason}"


def refund_text(order: str, wrong: bool) -> str:
    """The first phrasing the flawed model gets wrong (``wrong``) or right for ``order``."""
    from turnfleet.workers.support_desk_script import flawed_turn

    for text in phrasings(order):
        if flawed_turn(text) == wrong:
            return text
    raise StoryFailed(f"no phrasing of a refund for order {order} that the flaw {'picks' if wrong else 'skips'}")


@dataclass
class StepReport:
    """What a step printed: what happened, the commands that reproduce it, its figures."""

    story: list[str]
    commands: list[str]
    figures: dict[str, Any] = field(default_factory=dict)
    details: list[Text] = field(default_factory=list)  # printed under the story, above the commands


@dataclass
class Turn:
    """One turn of the morning: who asked, which order they named, what the model refunded."""

    turn_id: str
    conversation_id: str
    customer: str
    text: str
    named: str | None = None  # the order asked about (a refund request), this run's copy
    complaint: bool = False
    result: TurnResult | None = None

    @property
    def refunded(self) -> list[str]:
        calls = self.result.tool_calls if self.result else []
        return [str(_json(c.arguments).get("order_id")) for c in calls
                if c.tool == "process_refund" and _json(c.output).get("refunded") is True]

    @property
    def wrong(self) -> bool:
        return self.named is not None and any(order != self.named for order in self.refunded)


@dataclass
class StoryRun:
    """What the steps share: the fleet's Redis, this run's ids and turns, the steps so far."""

    redis: Any
    run_id: str
    since: str  # ISO 8601 UTC, whole seconds: this run's telemetry is at or after it
    out: Any  # a rich console, or None for --json
    alerts_after: str = "0-0"  # the alert stream's last entry before this run: its alerts come after
    turns: list[Turn] = field(default_factory=list)
    steps: list[StepReport] = field(default_factory=list)

    def say(self, *renderables: Any) -> None:
        if self.out is not None:
            self.out.print(*renderables)

    @property
    def wrong(self) -> list[Turn]:
        return [t for t in self.turns if t.wrong]

    @property
    def complained(self) -> list[Turn]:
        return [t for t in self.turns if t.complaint]


@dataclass(frozen=True)
class Step:
    """One numbered step of a story: its title (printed before it runs) and what it does."""

    title: str
    run: Callable[[StoryRun], Awaitable[StepReport]]


# -- the steps ------------------------------------------------------------------------------


async def morning_of_traffic(run: StoryRun) -> StepReport:
    """Serve MORNING through the fleet; each conversation on its own fresh copies of its
    customer's orders (a refund is once per order, ever)."""
    from turnfleet.producer import Producer
    from turnfleet.shell.demo import with_orders
    from turnfleet.workers.orderbook import copy_orders, load_order_book

    book = load_order_book()
    batch, by_id = [], {}
    for label, customer, messages in MORNING:
        cid = f"story-{run.run_id}-{label}"
        renamed = await copy_orders(run.redis, sorted(o.order_id for o in book.orders.values()
                                                      if o.customer_id == customer))
        for i, message in enumerate(messages, 1):
            turn = Turn(f"{cid}-t{i}", cid, customer, "")
            if isinstance(message, Refund):
                turn.named, turn.complaint = renamed[message.order], message.complaint
                turn.text = refund_text(turn.named, message.wrong)
            else:
                turn.text = with_orders(message, renamed)
            run.turns.append(turn)
            by_id[turn.turn_id] = turn
            batch.append({"conversation_id": cid, "customer_id": customer, "text": turn.text,
                          "turn_id": turn.turn_id, "metadata": {"channel": "story"}})
    tail = await run.redis.xrevrange(keys.RESULTS_STREAM, count=1)
    last = tail[0][0] if tail else "0-0"
    async with Producer(redis=run.redis) as producer:
        await producer.enqueue_turns(batch)
        pending = set(by_id)
        deadline = time.monotonic() + 120
        while pending:
            if time.monotonic() > deadline:
                raise StoryFailed(f"timed out waiting for {len(pending)} turns")
            for _s, items in await run.redis.xread({keys.RESULTS_STREAM: last}, block=1000, count=100) or []:
                for entry_id, fields in items:
                    last = entry_id
                    if fields.get("turn_id") in pending:
                        pending.discard(fields["turn_id"])
                        by_id[fields["turn_id"]].result = await producer.queue.get(fields["turn_id"])
    failed = [t.turn_id for t in run.turns if t.result is None or t.result.status != "completed"]
    if failed:
        raise StoryFailed(f"turns did not complete: {', '.join(failed)}")
    refunds = [t for t in run.turns if t.refunded]
    wrong = run.wrong
    details = [Text.assemble(f"{t.customer} ", (t.turn_id, "cyan"), f"  named {t.named}  ",
                             (f"✗ refunded {', '.join(t.refunded)}", "red") if t.wrong
                             else (f"✓ refunded {', '.join(t.refunded)}", "green"))
               for t in refunds]
    others = len(run.turns) - len(refunds)
    return StepReport(
        story=[
            f"{len(run.turns)} turns in {len(MORNING)} conversations ran on {FLAWED_MODEL}: "
            f"{len(refunds)} refunds were issued, and {others} turns were greetings and order questions.",
            f"In {len(wrong)} of the refunds the model refunded another of the customer's orders than "
            "the one they named — for that order's right amount, so no tool guard stopped it — "
            "and told the customer the order they named was refunded.",
        ],
        commands=[f"turnfleet find --tool process_refund --since {run.since}",
                  f"turnfleet conversation {wrong[0].conversation_id}" if wrong else ""],
        figures={"turns": len(run.turns), "conversations": len(MORNING), "refunds": len(refunds),
                 "wrong_refunds": [_turn_figures(t) for t in wrong]},
        details=details,
    )


async def complaints_arrive(run: StoryRun) -> StepReport:
    """The customers of some wrong refunds complain: feedback -1 with a comment, on the turn."""
    from turnfleet.producer import Producer
    from turnfleet.workers.orderbook import load_order_book

    book = load_order_book()
    complaints, details = [], []
    async with Producer(redis=run.redis) as producer:
        for t in run.complained:
            [refunded] = t.refunded
            got, wanted = book.orders[refunded[:4]], book.orders[t.named[:4]]  # type: ignore[index]
            comment = (f"You said order {t.named} was refunded, but the ${got.amount} I got back is for "
                       f"order {refunded} ({got.items[0]}). I wanted order {t.named} ({wanted.items[0]}) "
                       "refunded.")
            fb = await producer.feedback(t.turn_id, score=-1, comment=comment, source="customer",
                                         idempotency_key=f"story-{run.run_id}")
            complaints.append({"turn_id": t.turn_id, "feedback_id": fb.feedback_id, "comment": comment})
            details.append(Text.assemble((t.turn_id, "cyan"), f"  -1  “{comment}”"))
    first = complaints[0]
    silent = [t.turn_id for t in run.wrong if not t.complaint]
    return StepReport(
        story=[f"{len(complaints)} of those customers wrote in. Each complaint became feedback linked to "
               "the turn it is about: score -1, the source, and the customer's words (redacted like "
               "everything else)."
               + (f" Nobody complained about the other wrong refund{'s' if len(silent) > 1 else ''} "
                  f"({', '.join(silent)}): only the check caught it." if silent else "")],
        commands=[f"turnfleet feedback {first['turn_id']} --score -1 --comment \"...\""],
        figures={"complaints": complaints, "wrong_without_complaint": silent},
        details=details,
    )


async def find_lists_the_complaints(run: StoryRun) -> StepReport:
    """``find --feedback negative`` (this run's time window): exactly the complained-about turns."""
    from turnfleet.telemetry.consumer import caught_up
    from turnfleet.telemetry.find import find_conversations
    from turnfleet.telemetry.times import parse_time

    await _until(lambda: caught_up(run.redis), "telemetry did not catch up")
    rows = await find_conversations(run.redis, feedback="negative", since=parse_time(run.since))
    listed = sorted(tid for row in rows for tid in row.get("feedback_turns") or [])
    expected = sorted(t.turn_id for t in run.complained)
    if listed != expected:
        raise StoryFailed(f"find --feedback negative listed {listed}, expected {expected}")
    return StepReport(
        story=[f"The telemetry consumer counted each complaint once; find --feedback negative lists "
               f"{len(rows)} conversations and names the {len(listed)} turns the customers complained "
               "about — nothing else."],
        commands=[f"turnfleet find --feedback negative --since {run.since}"],
        figures={"listed_turns": listed},
        details=[Text.assemble((row["conversation_id"], "cyan"), "  negative feedback on: ",
                               ", ".join(row.get("feedback_turns") or [])) for row in rows],
    )


async def replay_shows_the_decision(run: StoryRun) -> StepReport:
    """The replay of the first complained-about turn: the generation that chose the wrong order."""
    from turnfleet.telemetry.replay import turn_replay

    t = run.complained[0]
    replay = await turn_replay(run.redis, t.turn_id)
    if replay is None:
        raise StoryFailed(f"no replay for {t.turn_id}")
    decisions = [(n["name"], call) for a in replay["attempts"] for n in _walk(a.get("tree") or [])
                 if n["kind"] == "generation"
                 for call in ((n.get("detail") or {}).get("decision") or {}).get("calls") or []
                 if call.get("name") == "check_refund_eligibility"]
    chosen = [(model, str(_json(call.get("arguments")).get("order_id"))) for model, call in decisions]
    wrong = [(model, order) for model, order in chosen if order != t.named]
    if not wrong:
        raise StoryFailed(f"the replay of {t.turn_id} shows no generation choosing another order: {chosen}")
    model, order = wrong[0]
    failed = [c for c in replay.get("checks") or [] if c.get("outcome") == "failed"]
    if [c["check"] for c in failed] != [MONEY_CHECK]:
        raise StoryFailed(f"the replay of {t.turn_id} shows the failed checks {failed}, expected {MONEY_CHECK}")
    return StepReport(
        story=[f"The replay of turn {t.turn_id} shows, step by step, the customer naming order {t.named} "
               f"and the model's generation deciding to check — and then refund — order {order}. The tools "
               "did exactly what they were asked: the mistake is the model's decision, and the replay ends "
               "with the check that caught it."],
        commands=[f"turnfleet turn {t.turn_id}"],
        figures={"turn_id": t.turn_id, "named": t.named, "chosen_by_generation": order, "model": model,
                 "failed_checks": [c["check"] for c in failed]},
        details=[Text.assemble(("user:       ", "dim"), t.text),
                 Text.assemble(("generation: ", "dim"), f"{model} → call check_refund_eligibility(order_id={order})",
                               (f"  ← not {t.named}, the order the customer named", "red")),
                 Text.assemble(("check:      ", "dim"), (f"FAIL {MONEY_CHECK}", "red"), f": {failed[0].get('reason')}")],
    )


async def money_path_check_flagged(run: StoryRun) -> StepReport:
    """Every turn's checks ran (the worker's check job, from the turn's record); the money-path
    check ``refund_order_named_by_customer`` failed on exactly the wrong refunds — the one
    nobody complained about too — and no check failed anywhere else."""
    from turnfleet.telemetry.consumer import caught_up
    from turnfleet.telemetry.find import find_conversations
    from turnfleet.telemetry.replay import turn_checks
    from turnfleet.telemetry.times import parse_time

    async def all_judged() -> bool:  # the outcomes and their check events are written together
        return await run.redis.exists(*(keys.turn_checks(t.turn_id) for t in run.turns)) == len(run.turns)

    await _until(all_judged, "not every turn of the run got its checks")
    await _until(lambda: caught_up(run.redis), "telemetry did not catch up")
    failures = {t.turn_id: [c for c in await turn_checks(run.redis, t.turn_id) if c.get("outcome") == "failed"]
                for t in run.turns}
    failed = sorted((turn_id, c["check"]) for turn_id, cs in failures.items() for c in cs)
    wrong = run.wrong
    expected = sorted((t.turn_id, MONEY_CHECK) for t in wrong)
    if failed != expected:
        raise StoryFailed(f"the checks failed on {failed}, expected {MONEY_CHECK} on the wrong refunds {expected}")
    rows = await find_conversations(run.redis, check_failed=MONEY_CHECK, since=parse_time(run.since))
    listed = sorted(tid for row in rows for tid in row.get("check_failed_turns") or [])
    if listed != sorted(t.turn_id for t in wrong):
        raise StoryFailed(f"find --check-failed {MONEY_CHECK} listed {listed}, expected the wrong refunds")
    silent = [t for t in wrong if not t.complaint]
    details = [Text.assemble((t.turn_id, "cyan"), ("  ✗ ", "red"), failures[t.turn_id][0].get("reason") or "",
                             ("  (nobody will complain about this one)", "yellow") if not t.complaint else "")
               for t in wrong]
    return StepReport(
        story=[f"Every one of the {len(run.turns)} turns was judged by the Support Desk's checks as it finished. "
               f"The money-path check {MONEY_CHECK} flagged {len(wrong)} turns — exactly the wrong refunds, "
               "and no check failed on any other turn."
               + (f" {len(silent)} of them ({', '.join(t.turn_id for t in silent)}) is one no customer will "
                  "complain about: the check found it before any customer did." if silent else "")],
        commands=[f"turnfleet find --check-failed {MONEY_CHECK} --since {run.since}"],
        figures={"judged_turns": len(run.turns), "check": MONEY_CHECK, "flagged_turns": listed,
                 "failed_checks": [list(f) for f in failed],
                 "flagged_without_complaint": [t.turn_id for t in silent]},
        details=details,
    )


async def alert_fired(run: StoryRun) -> StepReport:
    """The ``check_failed`` rule (money path: at once) alerted, critical, on each flagged turn."""
    from turnfleet.telemetry.alert_reads import read_alerts
    from turnfleet.telemetry.alerts import RULE_CHECK_FAILED

    alerts = [a for _i, a in await read_alerts(run.redis, after_id=run.alerts_after, count=1000)
              if a.rule == RULE_CHECK_FAILED and a.turn_id in {t.turn_id for t in run.turns}]
    got = sorted((a.turn_id or "", str(a.figures.get("check")), a.severity) for a in alerts)
    expected = sorted((t.turn_id, MONEY_CHECK, "critical") for t in run.wrong)
    if got != expected:
        raise StoryFailed(f"the check_failed alerts were {got}, expected {expected}")
    return StepReport(
        story=[f"Because {MONEY_CHECK} guards money, each failure raised a critical check_failed alert at once "
               f"— {len(alerts)} alerts, one per flagged turn — before any customer wrote in."],
        commands=["turnfleet alerts"],
        figures={"rule": RULE_CHECK_FAILED, "alerts": [{"turn_id": a.turn_id, "severity": a.severity,
                                                        "check": a.figures.get("check")} for a in alerts]},
        details=[Text.assemble(("critical ", "bold red"), a.message) for a in alerts],
    )


async def _regress(run: StoryRun, filters: dict[str, Any]) -> tuple[list[str], dict[str, Any], int]:
    """``turnfleet regress`` with ``filters`` against the fixed model, in-process as the CLI
    runs it: the turns it picked, its summary and its exit code."""
    from turnfleet.shell.regress import matching_turns, regress
    from turnfleet.telemetry.times import parse_time
    from turnfleet.workers.rerun import CandidateSpec

    turns = await matching_turns(run.redis, {**filters, "since": parse_time(run.since)}, 200)
    before = await _production(run.redis)
    with _offline():
        summary = await regress(run.redis, turns, CandidateSpec(model=FIXED_MODEL))
    after = await _production(run.redis)
    if after != before:
        raise StoryFailed(f"regress wrote to production: {before} → {after}")
    return turns, summary, 0 if summary["ok"] else 1


@contextmanager
def _offline() -> Iterator[None]:
    """The candidate is the built-in Desk, offline, like the story's fleet: this process's
    endpoint and app settings (which the rerun's candidates read) are set aside meanwhile."""
    kept = {k: os.environ.pop(k) for k in OFFLINE_IGNORES if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(kept)


async def _production(redis: Any) -> dict[str, int]:
    """What a rerun must never add to: the refund ledger, the results, telemetry and alert streams."""
    streams = {"refund_ledger": keys.REFUND_LEDGER, "results": keys.RESULTS_STREAM,
               "telemetry": keys.TELEMETRY_STREAM, "alerts": keys.ALERTS_STREAM}
    return {name: await redis.xlen(key) for name, key in streams.items()}


async def _refunded_by_rerun(run: StoryRun, turn_id: str) -> list[str]:
    """The orders the newest rerun of ``turn_id`` asked ``process_refund`` for (its record)."""
    stored = [json.loads(v) for v in (await run.redis.hgetall(keys.turn_reruns(turn_id))).values()]
    newest = max(stored, key=lambda r: r["at"]) if stored else {}
    calls = next((d["candidate"] for d in newest.get("differences", []) if d["what"] == "tool_calls"), [])
    return [str(_json(arguments).get("order_id")) for tool, arguments in calls if tool == "process_refund"]


async def regress_fixes_the_complaints(run: StoryRun) -> StepReport:
    """``regress --feedback negative`` on the fixed model: the complained turns fixed, none broken."""
    turns, summary, exit_code = await _regress(run, {"feedback": "negative"})
    complained = [t.turn_id for t in run.complained]
    fixed = summary["checks_fixed"].get(MONEY_CHECK, [])
    if sorted(turns) != sorted(complained) or sorted(fixed) != sorted(complained) or summary["checks_broken"] \
            or exit_code != 0:
        raise StoryFailed(f"regress --feedback negative: turns {turns}, fixed {summary['checks_fixed']}, "
                          f"broken {summary['checks_broken']}, exit {exit_code}; expected {complained} fixed")
    refunded = {t.turn_id: await _refunded_by_rerun(run, t.turn_id) for t in run.complained}
    wrong = [t.turn_id for t in run.complained if refunded[t.turn_id] != [t.named]
             or await run.redis.exists(keys.order_refund(t.named or ""))]  # asked for, never made
    if wrong:
        raise StoryFailed(f"on {FIXED_MODEL} these turns did not refund the order the customer named: {wrong}")
    return StepReport(
        story=[f"A candidate fix — the model without the flaw, {FIXED_MODEL} — is re-run on the "
               f"{len(turns)} complained-about turns, from their stored records and memory: "
               f"{MONEY_CHECK} goes from failed to passed on {len(fixed)} of {len(turns)}, process_refund "
               f"asks for the order each customer named, no check breaks (exit {exit_code}). Nothing is "
               "written to production: no refund, ledger entry, aggregate or alert."],
        commands=[f"turnfleet regress --feedback negative --since {run.since} --model {FIXED_MODEL}"],
        figures={"turns": turns, "checks_fixed": summary["checks_fixed"], "checks_broken": summary["checks_broken"],
                 "changed": summary["changed"], "refunded_by_candidate": refunded, "exit_code": exit_code},
        details=[Text.assemble((t.turn_id, "cyan"), f"  process_refund: {', '.join(t.refunded)} → ",
                               (", ".join(refunded[t.turn_id]), "green"), f"  {MONEY_CHECK}: failed → passed")
                 for t in run.complained],
    )


async def regress_changes_nothing_else(run: StoryRun) -> StepReport:
    """``regress --tool process_refund``: every refund of the run; the wrong ones fixed, the
    others ``changed: false``."""
    turns, summary, exit_code = await _regress(run, {"tool": "process_refund"})
    refunds = [t.turn_id for t in run.turns if t.refunded]
    wrong = sorted(t.turn_id for t in run.wrong)
    unchanged = sorted(r["turn_id"] for r in summary["results"] if not r["changed"])
    right = sorted(set(refunds) - set(wrong))
    if (sorted(turns) != sorted(refunds) or sorted(summary["changed"]) != wrong or unchanged != right
            or sorted(summary["checks_fixed"].get(MONEY_CHECK, [])) != wrong or summary["checks_broken"]
            or summary["skipped"] or exit_code != 0):
        raise StoryFailed(f"regress --tool process_refund: turns {turns}, changed {summary['changed']}, fixed "
                          f"{summary['checks_fixed']}, broken {summary['checks_broken']}, skipped "
                          f"{summary['skipped']}, exit {exit_code}; expected the {len(wrong)} wrong ones fixed "
                          "and the others unchanged")
    return StepReport(
        story=[f"Before it ships, the same candidate re-runs all {len(turns)} refund turns of the morning: the "
               f"{len(wrong)} wrong refunds are fixed (the one nobody complained about too) and the other "
               f"{len(unchanged)} are unchanged (changed: false) — nothing else changed; exit {exit_code}, "
               "so a CI job would let it ship."],
        commands=[f"turnfleet regress --tool process_refund --since {run.since} --model {FIXED_MODEL}"],
        figures={"turns": len(turns), "changed": summary["changed"], "unchanged": unchanged,
                 "checks_fixed": summary["checks_fixed"], "checks_broken": summary["checks_broken"],
                 "cost": summary["cost"], "exit_code": exit_code},
        details=[Text.assemble((f"{len(wrong)} changed and fixed", "green"), f", {len(unchanged)} unchanged, ",
                               ("0 broken", "green"), f"; cost delta {money(summary['cost']['delta_usd'])}")],
    )


STORIES: dict[str, list[Step]] = {
    "wrong-refund": [
        Step("A morning of traffic on a flawed model", morning_of_traffic),
        Step("The money-path check flagged the wrong refunds", money_path_check_flagged),
        Step("An alert fired", alert_fired),
        Step("Customers complain", complaints_arrive),
        Step("find lists exactly the complained-about turns", find_lists_the_complaints),
        Step("The replay shows the decision that went wrong", replay_shows_the_decision),
        Step("regress against the fixed model: the complained turns are fixed", regress_fixes_the_complaints),
        Step("regress over every refund: nothing else changed", regress_changes_nothing_else),
    ],
}


# -- running a story ------------------------------------------------------------------------


async def run_story(redis_url: str, name: str, workers: int = 2, as_json: bool = False) -> int:
    """Start the fleet on the flawed model, run the story's steps in order, print each."""
    from turnfleet.shell.render import console

    out = None if as_json else console()
    run_id = uuid.uuid4().hex[:6]
    log_dir = Path(CommonSettings().state_dir) / "logs" / f"story-{run_id}"
    since = datetime.now(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
    redis = connect(redis_url)
    run = StoryRun(redis=redis, run_id=run_id, since=since, out=out)
    env = fleet_env(redis_url, {"TURNFLEET_LOG_FORMAT": "json", "TURNFLEET_MODEL_NAME": FLAWED_MODEL})
    for setting in OFFLINE_IGNORES:
        env.pop(setting, None)  # the story is the built-in Desk, offline
    procs = [FleetProcess("telemetry", ["telemetry"], env, log_dir / "telemetry.log")]
    procs += [FleetProcess(f"worker-{i}", ["worker"], {**env, "TURNFLEET_WORKER_NAME": f"story-worker-{i}"},
                           log_dir / f"worker-{i}.log") for i in range(1, workers + 1)]
    started = time.monotonic()
    run.say(Rule(f"turnfleet demo --story {name} · run {run_id}"))
    run.say(f"Redis: {redis_url} · telemetry + {workers} workers on {FLAWED_MODEL} (logs in {log_dir})")
    error = None
    try:
        tail = await redis.xrevrange(keys.ALERTS_STREAM, count=1)
        run.alerts_after = tail[0][0] if tail else "0-0"
        for p in procs:
            p.start()
        await _until(lambda: _workers_alive(redis, workers, procs), "the workers did not start")
        for number, step in enumerate(STORIES[name], 1):
            run.say()
            run.say(Text(f"{number}. {step.title}", style="bold"))
            report = await step.run(run)
            run.steps.append(report)
            for line in report.story:
                run.say(Padding(Text(line), (0, 0, 0, 3)))
            for detail in report.details:
                run.say(Padding(detail, (0, 0, 0, 5)))
            for command in filter(None, report.commands):
                run.say(Text.assemble(("   $ ", "dim"), (command, "bold blue")))
    except StoryFailed as exc:
        error = str(exc)
    finally:
        for p in procs:
            p.stop()
        await redis.aclose()
    seconds = round(time.monotonic() - started, 1)
    if as_json:
        print(json.dumps({"story": name, "run_id": run_id, "since": since, "model": FLAWED_MODEL,
                          "seconds": seconds, "error": error,
                          "steps": [{"number": i, "title": step.title, "story": s.story,
                                     "commands": [c for c in s.commands if c], "figures": s.figures}
                                    for i, (step, s) in enumerate(zip(STORIES[name], run.steps), 1)]}, indent=2))
    elif error:
        run.say(Text(f"\nThe story stopped: {error} (logs in {log_dir})", style="red"))
    else:
        run.say(f"\nThe story took {seconds} s. Every command above works now, on the same Redis.")
    return 1 if error else 0


async def _workers_alive(redis: Any, workers: int, procs: list[FleetProcess]) -> bool:
    dead = [p.name for p in procs if not p.running()]
    if dead:
        raise StoryFailed(f"process(es) exited early: {', '.join(dead)}")
    return len(await heartbeat.alive(redis, "worker", 10)) >= workers


async def _until(ready: Callable[[], Awaitable[bool]], failure: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not await ready():
        if time.monotonic() > deadline:
            raise StoryFailed(failure)
        await asyncio.sleep(0.05)


def _walk(nodes: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for node in nodes:
        yield node
        yield from _walk(node.get("children") or [])


def _json(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _turn_figures(t: Turn) -> dict[str, Any]:
    return {"turn_id": t.turn_id, "customer": t.customer, "named": t.named, "refunded": t.refunded,
            "complained": t.complaint}
