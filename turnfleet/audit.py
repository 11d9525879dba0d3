"""Operator views: redacted by default; a read of text as written is an audited opt-in.

What an operator reads (``turnfleet conversation``/``turn``/``result``, the replay routes,
``GET /v1/turns/{id}`` with an operator key) goes through the same ``Redactor`` as telemetry
and the console: a turn's own text, its answer, tool arguments and results, error messages.
Raw text needs ``--unredacted`` (CLI: its user has Redis access anyway) or
``?unredacted=true`` with a key that carries ``unredacted: true``; each such read adds one
entry to ``tf:audit`` — who, what, which id, when — and never the text itself. Each erasure
(``turnfleet.erasure``) adds one too, with subject ``(erased)``: never whom.
"""

from __future__ import annotations

import getpass
import socket
import time
from typing import Any

from redis.asyncio import Redis

from turnfleet import keys

AUDIT_MAXLEN = 100_000  # entries kept (approximately: XADD MAXLEN ~); older ones are trimmed


def cli_who() -> str:
    """Who runs the CLI: ``cli:<user>@<host>``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


async def record(redis: Redis, who: str, what: str, subject: str) -> str:
    """One unredacted read: ``who`` (a key name or ``cli:user@host``), ``what`` (the route or
    verb), ``subject`` (the turn or conversation id). Returns the stream entry id."""
    entry_id = await redis.xadd(
        keys.AUDIT,
        {"who": who, "what": what, "subject": subject, "at_ms": str(int(time.time() * 1000))},
        maxlen=AUDIT_MAXLEN, approximate=True,
    )
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


async def entries(redis: Redis, limit: int = 100) -> list[dict[str, Any]]:
    """The latest ``limit`` audit entries, oldest first."""
    rows = await redis.xrevrange(keys.AUDIT, count=limit)
    out: list[dict[str, Any]] = []
    for entry_id, fields in reversed(rows):
        f = {_s(k): _s(v) for k, v in fields.items()}
        at_ms = int(f.get("at_ms", "0") or 0)
        out.append({
            "id": _s(entry_id), "who": f.get("who"), "what": f.get("what"), "subject": f.get("subject"),
            "at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at_ms / 1000)) + f".{at_ms % 1000:03d}Z",
        })
    return out


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
