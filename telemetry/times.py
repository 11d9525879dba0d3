"""Times as the read side takes them (ISO 8601 or "30m ago") and gives them (ISO 8601 UTC),
and epoch ms, the unit the aggregates store."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(value: str | None, now: datetime | None = None) -> datetime | None:
    """An ISO 8601 time (naive means UTC), or a time ago: ``30m``, ``2h``, ``7d``, ``90s``.

    ``ValueError`` names what is wrong. ``None`` for ``None`` or an empty string.
    """
    if not value:
        return None
    unit, amount = value[-1:], value[:-1]
    if unit in _TIME_UNITS and amount.replace(".", "", 1).isdigit():
        try:
            return (now or datetime.now(timezone.utc)) - timedelta(
                seconds=float(amount) * _TIME_UNITS[unit])
        except OverflowError:
            raise ValueError(f"too long ago: {value!r}") from None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not a time: {value!r} (use ISO 8601 or 30m / 2h / 7d ago)") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def ms_of(ts: datetime) -> int:
    """Epoch ms of ``ts`` (naive means UTC)."""
    ts = ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts
    return int(ts.timestamp() * 1000)


def iso_of_ms(ms: float | str | None) -> str | None:
    """ISO 8601 UTC of epoch ms (a stored field's string too); ``None`` for none."""
    if ms in (None, ""):
        return None
    return datetime.fromtimestamp(float(ms) / 1000, timezone.utc).isoformat()
