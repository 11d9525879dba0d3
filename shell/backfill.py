"""``turnfleet enqueue --file``: a backfill of turns from a JSON-lines file.

Checked whole before anything is written, so a typo on line 9,000 does not leave 8,999 turns
enqueued and the rest not: every bad line is reported with its number. Idempotent: a line's
``turn_id`` (derived from its content when the line has none) makes re-running the file
enqueue nothing twice. Paced: the producer has no priority lane (a workflow's arq queue is
first in, first out), so a backfill goes in at a bounded rate; live turns enqueued meanwhile
queue behind at most the backfill turns not yet taken, not behind the whole file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from turnfleet.models import TurnRequest

FIELDS = ("conversation_id", "customer_id", "text", "turn_id", "meta", "agent")


@dataclass
class Line:
    """One turn of the file: its line number, the checked request, or what is wrong with it."""

    number: int
    request: TurnRequest | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def derived_turn_id(data: dict[str, Any], occurrence: int) -> str:
    """A turn id from the line's content (and how many identical lines came before it): the
    same file enqueued again names the same turns; two identical lines stay two turns."""
    content = json.dumps([data.get(k) for k in ("conversation_id", "customer_id", "text", "metadata", "agent")]
                         + [occurrence], sort_keys=True, default=str)
    return "bf-" + hashlib.sha256(content.encode()).hexdigest()[:32]


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    from turnfleet.producer.api import _field_errors

    return [{"field": e["field"].replace("metadata", "meta", 1), "message": e["message"]} for e in _field_errors(exc)]


def read_lines(raw_lines: Iterable[str], limits: dict[str, Any]) -> list[Line]:
    """Every non-blank line checked as a turn; nothing touches Redis."""
    lines: list[Line] = []
    seen: dict[str, int] = {}  # content of lines without a turn id -> how many so far
    first: dict[str, tuple[int, TurnRequest]] = {}  # turn id -> its first line and request
    for number, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        line = Line(number)
        lines.append(line)
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            line.errors.append({"field": "line", "message": f"not JSON: {exc.msg} (column {exc.colno})"})
            continue
        if not isinstance(data, dict):
            line.errors.append({"field": "line", "message": "must be a JSON object"})
            continue
        unknown = sorted(set(data) - set(FIELDS))
        for name in unknown:
            line.errors.append({"field": name, "message": f"is not a known field (fields: {', '.join(FIELDS)})"})
        if unknown:
            continue
        payload = {("metadata" if k == "meta" else k): v for k, v in data.items() if v is not None}
        if "turn_id" not in payload:
            key = json.dumps(payload, sort_keys=True, default=str)
            seen[key] = seen.get(key, 0) + 1
            payload["turn_id"] = derived_turn_id(payload, seen[key])
        try:
            line.request = TurnRequest.model_validate(payload, context=limits)
        except ValidationError as exc:
            line.errors.extend(_errors(exc))
            continue
        earlier = first.setdefault(line.request.turn_id, (number, line.request))
        if earlier[0] != number and not _same(earlier[1], line.request):
            line.errors.append({"field": "turn_id", "message": f"also on line {earlier[0]}, for another turn"})
    return lines


def _same(a: TurnRequest, b: TurnRequest) -> bool:
    from turnfleet.producer.api import same_request

    return same_request(a, b)


async def paced(items: list[Any], rate: float, each: Callable[[Any], Awaitable[bool]]) -> None:
    """``each(item)`` in order; ``each`` says whether it enqueued something new, and the n-th
    new turn goes in not before ``n / rate`` seconds from the start (a re-run that finds every
    turn known is not slowed down)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    taken = 0
    for item in items:
        delay = start + taken / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing, not synchronisation: the rate is the point
        if await each(item):
            taken += 1
