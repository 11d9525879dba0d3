"""Redis connections: one place that decides how every component talks to Redis."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any
from urllib.parse import urlsplit

import structlog
from redis.asyncio import Redis
from redis.client import NEVER_DECODE
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

log = structlog.get_logger(__name__)

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


# -- a Redis that is misconfigured or not there ---------------------------------------------

REDIS_SCHEMES = ("redis", "rediss", "unix")


class RedisUrlError(ValueError):
    """A Redis URL that cannot be used; the message names the setting and says why."""


class RedisUnavailable(ConnectionError):
    """Redis did not answer within the time a process that must not wait forever allows."""


def check_redis_url(url: str | None, setting: str = "REDIS_URL") -> None:
    """Refuse a URL redis-py or arq would fail on later, with a traceback: a scheme other
    than ``redis``/``rediss``/``unix``, a port out of range or not a number, a database
    that is not a number. The message names ``setting`` and masks a password."""
    if url is None:
        return
    shown = masked(url)
    try:
        parts = urlsplit(url)
        if parts.scheme not in REDIS_SCHEMES:
            raise ValueError(f"the scheme must be one of {', '.join(s + '://' for s in REDIS_SCHEMES)}")
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("a unix:// URL needs a socket path")
            return
        port = parts.port  # raises ValueError for a port out of range or not a number
        if port == 0:
            raise ValueError("port 0 is no port")
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ValueError(f"the database {db!r} is not a number")
    except ValueError as exc:
        raise RedisUrlError(f"{setting} {shown!r} is not a usable Redis URL: {exc}") from None


_USERINFO_PASSWORD = re.compile(r"(//[^/@:]*:)[^/@]*@")


def masked(url: str) -> str:
    """``url`` with the password of its userinfo replaced by ``***`` (for messages); also
    for a URL too malformed to parse."""
    return _USERINFO_PASSWORD.sub(r"\1***@", url, count=1)


async def wait_for_redis(redis: Redis, timeout_s: float, who: str, url: str | None = None) -> None:
    """PING until Redis answers, for at most ``timeout_s`` in all; else ``RedisUnavailable``.

    For processes that must end in bounded time (``--burst``): a retry every 0.2 s doubling
    to 1 s, each logged with the next delay, and a hard deadline over all of them.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    last: BaseException | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            where = f" at {masked(url)}" if url else ""
            raise RedisUnavailable(f"no answer from Redis{where} within {timeout_s:g} s "
                                   f"(TURNFLEET_CONNECT_TIMEOUT_S): {last}")
        try:
            async with asyncio.timeout(remaining):
                await redis.ping()
            return
        except (RedisError, OSError, TimeoutError) as exc:
            last = exc if str(exc) else type(exc).__name__
        pause = min(delay, max(0.0, deadline - time.monotonic()))
        if pause > 0:
            log.debug(f"{who}.redis_unavailable", error=str(last), retry_in_s=round(pause, 2))
            await asyncio.sleep(pause)
        delay = min(delay * 2, 1.0)
