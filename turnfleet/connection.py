"""Redis connections: one place that decides how every component talks to Redis."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.client import NEVER_DECODE
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

RAW: dict[str, Any] = {NEVER_DECODE: []}
"""``execute_command`` option: this reply as bytes. For values anyone with write access may
have stored as something other than UTF-8: decoding them in the client raises before the
caller sees the reply."""


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


def lenient_text(value: str | bytes | None) -> str | None:
    """A reply read raw (``RAW``) as text: invalid UTF-8 is replaced, never raised."""
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else value


async def eval_raw(redis: Redis, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
    """Run a registered script with its reply as bytes (``RAW``); loads it if Redis lost it."""
    try:
        return await redis.execute_command("EVALSHA", script.sha, len(keys), *keys, *args, **RAW)
    except NoScriptError:
        return await redis.execute_command("EVAL", script.script, len(keys), *keys, *args, **RAW)
