"""Waiting for an observable condition (a Redis state, a process's output), never for a guess
at how long something takes: the one poll loop the tests share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

POLL_S = 0.01  # how often the condition is looked at again: a poll interval, not a delay


async def until(condition: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = 30,
                gave_up: Callable[[], str | None] | None = None) -> None:
    """Return once ``condition()`` (sync or async) holds; fail naming ``what`` after ``timeout_s``,
    or at once when ``gave_up()`` says why it never will (a process that exited)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        reason = gave_up() if gave_up is not None else None
        if reason:
            raise AssertionError(f"{reason} before {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(POLL_S)
