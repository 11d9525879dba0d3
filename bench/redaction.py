"""Section 9: what redaction costs per turn, with and without the detectors issue 14 added.

Real Support Desk turns (offline model, in this process) are run once with the telemetry hooks
and the trace buffer but no redactor, so their raw events and span records are kept; then the
same payloads are redacted the way a worker does at the end of an attempt
(``TelemetryHooks.batch_json`` and ``trace_store.redact_record``) by a ``Redactor`` built with
the detectors before issue 14 and by one with all of them, interleaved, each rep on a fresh
redactor whose text memory fills up over the turns as a worker's does. Log lines are not
included (the worker logs a few short lines a turn).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from bench.common import PrivateRedis, stats

# The detectors issue 14 added; "before" is every other one (the card detector is the new one
# in both: it differs only in accepting mixed separators).
NEW_DETECTORS = ("iban", "ssn", "phone-national", "phone-context")

PLAIN = "Where is order 1043?"
PERSONAL = ("Where is order 1043? Call me on 020 7946 {i:04d} or +44 7700 900{i:03d}, mail "
            "dana{i}@example.com; refund to GB82 WEST 1234 5698 7654 32, card 4111 1111-1111 1111, "
            "SSN 078-05-1120.")
PROSE = ("You are the Support Desk's triage agent. Decide which specialist should handle the "
         "customer's message and hand the conversation over; never answer order questions "
         "yourself. ") * 3
PROSE = PROSE[:300]
NUMBERS = ("Order 1043 shipped 2025-06-15T12:00:00Z via UPS, amount 89.00 USD, turn "
           "t_9ab8911835f24b47b141499fd6db1bda, 1 item. ") * 4
NUMBERS = NUMBERS[:300]


async def capture(url: str, texts: list[str], tag: str) -> list[tuple[Any, dict[str, Any]]]:
    """(hooks with their raw events, raw trace record) for one real turn per text."""
    from agents import RunConfig, Runner, set_trace_processors
    from redis.asyncio import Redis

    from turnfleet.context import TurnContext
    from turnfleet.workers.hooks import TelemetryHooks
    from turnfleet.workers.model import OfflineModel
    from turnfleet.workers.support_desk import build_support_desk
    from turnfleet.workers.trace_store import TraceBuffer

    desk = build_support_desk(OfflineModel())
    buffer = TraceBuffer()
    set_trace_processors([buffer])
    redis = Redis.from_url(url)
    out = []
    try:
        for i, text in enumerate(texts):
            turn_id, conv = f"t_{tag}{i:028x}", f"bench-redact-{tag}-{i}"
            ctx = TurnContext(turn_id=turn_id, conversation_id=conv, customer_id="C-100",
                              attempt=1, redis=redis)
            hooks = TelemetryHooks(turn_id=turn_id, attempt=1, conversation_id=conv,
                                   customer_id="C-100", model_name="turnfleet-offline")
            trace_id = f"trace_{tag}{i:028x}"
            cfg = RunConfig(trace_id=trace_id, group_id=conv, workflow_name="support-desk")
            hooks.turn_started(5.0, desk.triage.name)
            result = await Runner.run(desk.triage, text, context=ctx, run_config=cfg, hooks=hooks)
            hooks.turn_completed(40.0, 5.0, str(result.final_output))
            trace, spans, _ = buffer.take(trace_id)
            record = {"trace": {**(trace or {}), "turn_id": turn_id, "conversation_id": conv,
                                "customer_id": "C-100", "kept_because": "sampled"},
                      "spans": spans}
            out.append((hooks, record))
    finally:
        set_trace_processors([])
        await redis.aclose()
    return out


def redact_turns(turns: list[tuple[Any, dict[str, Any]]], detectors: Any) -> float:
    """µs per turn to redact the turns' events and trace records with a fresh redactor."""
    from turnfleet.redaction import Redactor
    from turnfleet.workers.trace_store import redact_record

    redactor = Redactor(detectors=detectors)
    t0 = time.perf_counter()
    for hooks, record in turns:
        hooks.redactor = redactor
        hooks.batch_json()
        json.dumps(redact_record(record, redactor), default=str)
    return (time.perf_counter() - t0) / len(turns) * 1e6


def per_call_us(text: str, detectors: Any, n: int) -> float:
    """µs to redact ``text`` in 60-character pieces, past the redactor's memory of texts
    (``_text``: what a string the redactor has not seen before costs)."""
    from turnfleet.redaction import Redactor

    redactor = Redactor(detectors=detectors)
    chunks = [text[i: i + 60] for i in range(0, len(text), 60)]
    t0 = time.perf_counter()
    for _ in range(n):
        for chunk in chunks:
            redactor._text(chunk)
    return (time.perf_counter() - t0) / n * 1e6


def bench_redaction(n: int, reps: int, url: str) -> dict[str, list[float]]:
    from turnfleet.redaction import DETECTORS

    before = [d for d in DETECTORS if d.name not in NEW_DETECTORS]
    plain = asyncio.run(capture(url, [PLAIN] * n, "a"))
    personal = asyncio.run(capture(url, [PERSONAL.format(i=i) for i in range(n)], "b"))
    calls = 2000
    out: dict[str, list[float]] = {}
    for _ in range(reps):
        for label, detectors in (("before", before), ("after", DETECTORS)):
            for key, value in (
                ("plain", redact_turns(plain, detectors)),
                ("personal", redact_turns(personal, detectors)),
                ("prose", per_call_us(PROSE, detectors, calls)),
                ("numbers", per_call_us(NUMBERS, detectors, calls)),
            ):
                out.setdefault(f"{label}:{key}", []).append(value)
    return out


def redaction_lines(runs: dict[str, list[float]], n: int, reps: int, note: str = "") -> list[str]:
    def row(label: str, key: str) -> str:
        before, after = runs[f"before:{key}"], runs[f"after:{key}"]
        extra = [a - b for a, b in zip(after, before)]
        return f"| {label} | {stats(before)} | {stats(after)} | {stats(extra)} |"

    return [
        "## 9. Redaction per turn: the detectors before and after issue 14",
        "",
        f"{n} real Support Desk turns (offline model, in-process) are run once each with the "
        "telemetry hooks and the trace buffer but no redactor; their events and span records "
        "are then redacted as a worker does at the end of an attempt (`TelemetryHooks."
        "batch_json` + `trace_store.redact_record`, dumped to JSON) by a `Redactor` with the "
        "detectors before issue 14 (secrets, e-mail, card, international and North American "
        "phones) and by one with all of them (+ IBAN, SSN, national phones, phone context), "
        f"interleaved, {reps} reps, each on a fresh redactor (its memory of texts fills "
        "over the turns, as in a worker). 'personal' turns carry a UK phone, an international "
        "phone, an e-mail, an IBAN, a card and an SSN, different in every turn. The last two "
        "rows redact a 300-character text in 60-character pieces, none of them seen before "
        "(past the memory of texts). Log lines are not included. 'before' is the old "
        "detectors in today's engine, whose turn-aways (shortest match, fewest digits, whole "
        "ISO timestamps, one-word ids) and memory of every string (not only long ones) serve "
        "them too; it is not the code before the change. "
        + note,
        "",
        "| workload | before, µs | after, µs | extra µs |",
        "|---|---|---|---|",
        row(f"a turn: `{PLAIN}` (per turn)", "plain"),
        row("a turn with personal data (per turn)", "personal"),
        row("prose without digits, 300 chars (per text)", "prose"),
        row("timestamps, ids and amounts, 300 chars (per text)", "numbers"),
        "",
    ]


def section(base: Path, quick: bool, note: str = "") -> list[str]:
    n, reps = (50, 3) if quick else (200, 9)
    with PrivateRedis(base) as server:
        runs = bench_redaction(n, reps, server.url)
    return redaction_lines(runs, n, reps, note)
