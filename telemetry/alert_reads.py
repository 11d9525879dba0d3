"""Reads of the alert stream (``keys.ALERTS_STREAM``), oldest first or newest first.

An entry that does not parse as an ``Alert`` is logged and skipped by :func:`read_alerts`;
the ``alert_entries*`` readers return it as ``None`` so a cursor can move past it.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from pydantic import ValidationError
from redis.asyncio import Redis

from turnfleet import keys
from turnfleet.models import Alert

log = structlog.get_logger(__name__)


async def read_alerts(
    redis: Redis, after_id: str = "0-0", count: int = 100, block_ms: int | None = None
) -> list[tuple[str, Alert]]:
    """Alerts written after stream id ``after_id``, oldest first; wait ``block_ms`` if none.

    Entries that do not parse as an ``Alert`` are skipped with a warning.
    """
    entries = await alert_entries(redis, after_id, count, block_ms)
    return [(entry_id, alert) for entry_id, alert in entries if alert is not None]



async def alert_entries(
    redis: Redis, after_id: str = "0-0", count: int = 100, block_ms: int | None = None
) -> list[tuple[str, Alert | None]]:
    """Like :func:`read_alerts`, but every entry read comes back, ``None`` for one that does
    not parse: a reader's cursor must move past unreadable entries too, or it reads them
    again forever."""
    reply = await redis.xread({keys.ALERTS_STREAM: after_id}, count=count, block=block_ms)
    return [parsed for _stream, entries in reply or [] for parsed in _alerts_of(entries)]


def _alerts_of(entries: Sequence[tuple[str, dict[str, str] | None]]) -> list[tuple[str, Alert | None]]:
    out: list[tuple[str, Alert | None]] = []
    for entry_id, fields in entries:
        try:
            out.append((entry_id, Alert.model_validate_json((fields or {}).get("alert", ""))))
        except ValidationError as exc:
            log.warning("alerts.unreadable_entry", entry_id=entry_id, error=str(exc))
            out.append((entry_id, None))
    return out



async def alert_entries_before(
    redis: Redis, before_id: str = "+", count: int = 100
) -> list[tuple[str, Alert | None]]:
    """Like :func:`alert_entries`, newest first: up to ``count`` entries before stream id
    ``before_id`` (exclusive; ``"+"``: from the newest)."""
    end = before_id if before_id == "+" else f"({before_id}"
    return _alerts_of(await redis.xrevrange(keys.ALERTS_STREAM, max=end, min="-", count=count) or [])
