"""``turnfleet rerun`` and ``turnfleet regress``: a stored turn (or every turn ``find``'s
filters match) re-run against a candidate, shown side by side, summed up for CI.

The engine is ``turnfleet.workers.rerun`` (nothing written to production but the rerun's own
record); this module picks the turns (through ``telemetry/find.py``, the same filters as
``turnfleet find``), bounds the concurrency, prices both sides with the fleet's price table,
draws the progress bar (stderr) and renders the reports.

``regress`` exits 0 when no check newly fails on the candidate, 1 otherwise: a team's CI can
run it before a prompt or model change ships.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from redis.asyncio import Redis
from rich import box
from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from turnfleet import keys
from turnfleet.formatting import money
from turnfleet.queue import TurnQueue
from turnfleet.settings import TelemetrySettings
from turnfleet.telemetry.find import find_conversations
from turnfleet.telemetry.pricing import PriceTable
from turnfleet.workers.rerun import LIVE, NOT_MADE, Candidates, CandidateSpec, RerunError, rerun_turn

DEFAULT_CONCURRENCY = 4
SOURCE_MARK = {LIVE: " [live]", NOT_MADE: " [side effect NOT made]"}


def rerun_context(spec: CandidateSpec) -> tuple[Candidates, Callable[..., Any], int]:
    """The candidates, the fleet's pricing and the raw-text lifetime (the rerun record's TTL)."""
    telemetry = TelemetrySettings()
    return Candidates(spec), PriceTable.from_settings(telemetry).cost_usd, telemetry.raw_retention_s


async def rerun_one(redis: Redis, turn_id: str, spec: CandidateSpec) -> dict[str, Any]:
    candidates, pricing, raw_s = rerun_context(spec)
    return await rerun_turn(redis, turn_id, candidates, raw_retention_s=raw_s, pricing=pricing)


# -- which turns -------------------------------------------------------------------------------

FIND_PARAMETERS = frozenset(inspect.signature(find_conversations).parameters) - {"redis", "limit"}


async def matching_turns(redis: Redis, filters: dict[str, Any], limit: int) -> list[str]:
    """The finished turns of the conversations ``find`` matches (``filters``: its keyword
    arguments), narrowed per turn where a filter names a turn's property: ``feedback`` (the
    turns given it), ``check_failed`` (the turns on which the check failed), ``tool`` (the turns that called it), ``since``/``until`` (when the turn
    finished). Oldest conversation first, turns in conversation order."""
    unknown = sorted(k for k, v in filters.items() if v is not None and k not in FIND_PARAMETERS)
    if unknown:
        raise RerunError(f"--{unknown[0].replace('_', '-')}: find does not support this filter in this turnfleet")
    given = {k: v for k, v in filters.items() if v is not None}
    rows = await find_conversations(redis, **given, limit=limit)
    queue = TurnQueue(redis)
    turns: list[str] = []
    for row in reversed(rows):
        ids: list[str] | None = None
        if given.get("feedback"):
            ids = row.get("feedback_turns")
        if given.get("check_failed"):  # both: the turns named by each
            named = row.get("check_failed_turns") or []
            ids = named if ids is None else [t for t in ids if t in named]
        if ids is None:
            ids = await redis.lrange(keys.conversation_turns(row["conversation_id"]), 0, -1)
        for turn_id in ids:
            record = await queue.get(turn_id)
            if record is None or not record.done or not _turn_matches(record, given):
                continue
            turns.append(turn_id)
    return turns


def _turn_matches(record: Any, given: dict[str, Any]) -> bool:
    if given.get("tool") and given["tool"] not in {c.tool for c in record.tool_calls}:
        return False
    finished: datetime | None = record.finished_at
    if finished is not None:
        if given.get("since") and finished < _aware(given["since"]):
            return False
        if given.get("until") and finished > _aware(given["until"]):
            return False
    return True


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


# -- regress -----------------------------------------------------------------------------------


async def regress(redis: Redis, turn_ids: list[str], spec: CandidateSpec, *, concurrency: int = DEFAULT_CONCURRENCY,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Re-run every turn (at most ``concurrency`` at once) and sum up: turns whose decisions
    changed, checks fixed and broken (per check, the turns), cost delta, turns skipped (what
    retention removed) with why."""
    candidates, pricing, raw_s = rerun_context(spec)
    limit = asyncio.Semaphore(max(1, concurrency))
    task = progress.add_task("re-running", total=len(turn_ids)) if progress else None

    async def one(turn_id: str) -> dict[str, Any]:
        async with limit:
            try:
                return await rerun_turn(redis, turn_id, candidates, raw_retention_s=raw_s, pricing=pricing)
            except RerunError as exc:
                if exc.code == "validation":
                    raise  # the candidate itself is wrong: every turn would say so
                return {"turn_id": turn_id, "skipped": str(exc)}
            finally:
                if progress is not None and task is not None:
                    progress.advance(task)

    reports = await asyncio.gather(*(one(t) for t in turn_ids))
    return summarize(reports, spec)


def summarize(reports: list[dict[str, Any]], spec: CandidateSpec) -> dict[str, Any]:
    ran = [r for r in reports if "skipped" not in r]
    fixed: dict[str, list[str]] = {}
    broken: dict[str, list[str]] = {}
    for r in ran:
        for name in r["checks"]["fixed"]:
            fixed.setdefault(name, []).append(r["turn_id"])
        for name in r["checks"]["broken"]:
            broken.setdefault(name, []).append(r["turn_id"])
    costs = [(r["usage"]["original"]["cost_usd"], r["usage"]["candidate"]["cost_usd"]) for r in ran]
    known = all(a is not None and b is not None for a, b in costs)
    original = round(sum(a for a, _ in costs), 9) if known else None
    candidate = round(sum(b for _, b in costs), 9) if known else None
    return {
        "candidate": spec.describe(),
        "turns": len(reports), "rerun": len(ran),
        "changed": [r["turn_id"] for r in ran if r["changed"]],
        "checks_fixed": fixed, "checks_broken": broken,
        "cost": {"original_usd": original, "candidate_usd": candidate,
                 "delta_usd": None if not known else round(candidate - original, 9)},  # type: ignore[operator]
        "skipped": [{"turn_id": r["turn_id"], "reason": r["skipped"]} for r in reports if "skipped" in r],
        "results": [{"turn_id": r["turn_id"], "changed": r["changed"], "differences": [d["what"] for d in r["differences"]],
                     **r["checks"], "cost_delta_usd": r["usage"]["cost_delta_usd"]} for r in ran],
        "ok": not broken,
    }


def progress_bar() -> Progress:
    """A progress bar on stderr (stdout stays the report, or the JSON)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)


# -- rendering ----------------------------------------------------------------------------------


def _cost(value: float | None) -> str:
    return "unknown" if value is None else money(value)


def _call(call: dict[str, Any]) -> Text:
    text = Text(f"{call['tool']}({call['arguments']})")
    mark = SOURCE_MARK.get(call.get("source", ""))
    if mark:
        text.append(mark, style="yellow" if call["source"] == LIVE else "bold red")
    text.append(f"\n  → {call['result']}", style="dim")
    return text


def _decision(d: dict[str, Any] | None) -> str:
    if not d:
        return ""
    who = f"{d.get('agent')}: "
    if d.get("calls"):
        return who + ", ".join(f"{c.get('name')}({c.get('arguments', '')})" for c in d["calls"])
    message = d.get("message")
    return who + ("answered" if message is True else f"answered {str(message)[:160]!r}")


def _checks(side: dict[str, Any]) -> str:
    return "\n".join(f"{'pass' if c['passed'] else 'FAIL'} {c['check']}"
                     + ("" if c["applicable"] else " (n/a)") for c in side["checks"]) or "none"


def render_rerun(report: dict[str, Any]) -> Group:
    """The original and the candidate side by side, then what changed."""
    o, c = report["original"], report["candidate"]
    table = Table(box=box.SIMPLE_HEAVY, show_lines=True, title=f"turn {report['turn_id']} re-run",
                  title_justify="left")
    table.add_column("", style="bold", no_wrap=True)
    table.add_column("original", overflow="fold")
    table.add_column("candidate", overflow="fold")
    table.add_row("run by", f"{o['workflow']} {o['version']}\nmodel {o['model']}",
                  f"{c['workflow']} {c['version']}\nmodel {c['model']}")
    table.add_row("agents", " → ".join(o["agents"]), " → ".join(c["agents"]))
    for i in range(max(len(o["decisions"]), len(c["decisions"]))):
        label = f"decision {i + 1}" + (" (derived)" if i == 0 and o["decisions_source"] == "tool_calls" else "")
        table.add_row(label, _decision(o["decisions"][i] if i < len(o["decisions"]) else None),
                      _decision(c["decisions"][i] if i < len(c["decisions"]) else None))
    for i in range(max(len(o["tool_calls"]), len(c["tool_calls"]))):
        table.add_row(f"tool call {i + 1}", _call(o["tool_calls"][i]) if i < len(o["tool_calls"]) else "",
                      _call(c["tool_calls"][i]) if i < len(c["tool_calls"]) else "")
    table.add_row("handoffs", ", ".join(f"{a} → {b}" for a, b in o["handoffs"]) or "none",
                  ", ".join(f"{a} → {b}" for a, b in c["handoffs"]) or "none")
    table.add_row("final answer", o["final_output"] or "", c["final_output"] or "")
    table.add_row("checks", _checks(o), _checks(c))
    table.add_row("tokens", f"{o['usage']['input_tokens']} in / {o['usage']['output_tokens']} out",
                  f"{c['usage']['input_tokens']} in / {c['usage']['output_tokens']} out")
    table.add_row("cost", _cost(o["cost_usd"]), _cost(c["cost_usd"]))
    lines = [table]
    if report["changed"]:
        lines.append(Text(f"CHANGED: {', '.join(d['what'] for d in report['differences'])}", style="bold yellow"))
    else:
        lines.append(Text("unchanged: the candidate decided what the original decided", style="green"))
    checks = report["checks"]
    if checks["fixed"] or checks["broken"]:
        lines.append(Text(f"checks fixed: {', '.join(checks['fixed']) or 'none'}; "
                          f"broken: {', '.join(checks['broken']) or 'none'}"))
    lines.append(Text("[live]: a read-only tool the original did not call so, run against today's data; "
                      "[side effect NOT made]: the candidate asked for it, the rerun did not make it.", style="dim"))
    return Group(*lines)


def render_regress(summary: dict[str, Any]) -> Group:
    c = summary["cost"]
    lines: list[Any] = [Text(f"{summary['rerun']} of {summary['turns']} turn(s) re-run against "
                             f"{json.dumps({k: v for k, v in summary['candidate'].items() if v})}", style="bold")]
    lines.append(Text(f"decisions changed: {len(summary['changed'])}"
                      + (f" ({', '.join(summary['changed'])})" if summary["changed"] else "")))
    for title, found, style in (("checks fixed", summary["checks_fixed"], "green"),
                                ("checks broken", summary["checks_broken"], "bold red")):
        lines.append(Text(f"{title}: " + ("none" if not found else
                                           "; ".join(f"{n} on {len(t)} turn(s): {', '.join(t)}" for n, t in found.items())),
                          style=style if found else ""))
    lines.append(Text(f"cost: original {_cost(c['original_usd'])}, candidate {_cost(c['candidate_usd'])}, "
                      f"delta {_cost(c['delta_usd'])}"))
    for s in summary["skipped"]:
        lines.append(Text(f"skipped {s['turn_id']}: {s['reason']}", style="yellow"))
    lines.append(Text("OK: no check newly fails" if summary["ok"] else "FAIL: a check newly fails (exit 1)",
                      style="green" if summary["ok"] else "bold red"))
    return Group(*lines)
