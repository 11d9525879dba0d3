"""Redis connections: one place that decides how every component talks to Redis."""

from __future__ import annotations

from redis.asyncio import Redis


def connect(url: str, **kwargs: object) -> Redis:
    """An asyncio client (hiredis parser when installed) with bytes decoded to str.

    Health checks and keepalive so that a restarted server is noticed on the next command
    rather than after a TCP timeout.
    """
    return Redis.from_url(
        url,
        decode_responses=True,
        health_check_interval=30,
        socket_keepalive=True,
        socket_connect_timeout=5,
        **kwargs,  # type: ignore[arg-type]
    )


def as_text(value: str | bytes) -> str:
    """A reply as ``str``, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else value
