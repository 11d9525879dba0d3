"""Heartbeats: which worker and telemetry processes are alive, written and read in one place.

arq's health-check key is shared by every worker of a queue, so it cannot say which worker
died (DESIGN.md). Each process beats instead: every :data:`BEAT_S` it writes its name with
the time (ms) into its role's zset (``keys.WORKERS`` for a worker, whose beat also carries
the turns it is running in ``keys.WORKER_INFLIGHT`` and the workflows it serves in
``keys.WORKER_WORKFLOWS``; ``keys.TELEMETRY_CONSUMERS`` for a telemetry consumer), and it
removes itself on the way out. Readers count a process as alive
while its beat is at most ``max_age_s`` old: ``turnfleet health``, /readyz, /metrics, the
demo. A killed process's entry stays behind until it is too old to count. :func:`unserved` says
which known workflows have turns queued and no live worker serving them (routing: a
workflow's turns wait in its own queue for a worker of its own), for ``turnfleet health``,
``/readyz`` and ``turnfleet stats``.

Names: ``TURNFLEET_WORKER_NAME`` / ``TURNFLEET_CONSUMER_NAME`` when set, otherwise
:func:`default_name`, ``<hostname>:<pid>`` (the container id under Docker), so a probe can
find this host's process without knowing its pid (:func:`beats_of`).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Literal

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from turnfleet import keys, registry
from turnfleet.models import DEFAULT_WORKFLOW

log = structlog.get_logger(__name__)

Role = Literal["worker", "telemetry"]
ZSETS: dict[str, str] = {"worker": keys.WORKERS, "telemetry": keys.TELEMETRY_CONSUMERS}
BEAT_S = 2.0  # readers' max age is several beats (15 s by default), not one slow one
_NAME_FIELD = {"worker": "worker", "telemetry": "consumer"}  # the log field naming a process


def default_name() -> str:
    """``<hostname>:<pid>``: the name of a process that was given none."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- writer -----------------------------------------------------------------------------------


async def beat(redis: Redis, role: Role, name: str, in_flight: int | None = None,
               workflows: Sequence[str] | None = None) -> None:
    """One beat: ``name`` is alive now (and, for a worker, runs ``in_flight`` turns of the
    ``workflows`` it serves)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zadd(ZSETS[role], {name: _now_ms()})
        if role == "worker":
            pipe.hset(keys.WORKER_INFLIGHT, name, in_flight or 0)
            if workflows is not None:
                pipe.hset(keys.WORKER_WORKFLOWS, name, json.dumps(list(workflows)))
        await pipe.execute()


async def beat_forever(redis: Redis, role: Role, name: str,
                       in_flight: Callable[[], int] | None = None,
                       workflows: Sequence[str] | None = None) -> None:
    """Beat every :data:`BEAT_S` until cancelled; a failed beat is logged, the next one tries
    again. Cancel it and wait for it before :func:`forget`, so no beat lands after."""
    while True:
        try:
            await beat(redis, role, name, in_flight() if in_flight else None, workflows)
        except RedisError as exc:
            log.warning(f"{role}.heartbeat_failed", **{_NAME_FIELD[role]: name}, error=str(exc))
        await asyncio.sleep(BEAT_S)


async def forget(redis: Redis, role: Role, name: str) -> None:
    """Remove ``name``'s beat (and in-flight count): it stopped, it is not alive."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zrem(ZSETS[role], name)
        if role == "worker":
            pipe.hdel(keys.WORKER_INFLIGHT, name)
            pipe.hdel(keys.WORKER_WORKFLOWS, name)
        await pipe.execute()


# -- readers ----------------------------------------------------------------------------------


async def alive(redis: Redis, role: Role, max_age_s: float, now_ms: int | None = None) -> dict[str, int]:
    """Processes of ``role`` whose beat is at most ``max_age_s`` old: name -> last beat ms."""
    now_ms = now_ms if now_ms is not None else _now_ms()
    beats = await redis.zrangebyscore(ZSETS[role], now_ms - int(max_age_s * 1000), "+inf",
                                      withscores=True)
    return {name: int(score) for name, score in beats}


async def newest(redis: Redis, role: Role) -> tuple[str, int] | None:
    """The most recent beat of ``role`` however old, ``(name, ms)``; ``None`` if none ever."""
    top = await redis.zrevrange(ZSETS[role], 0, 0, withscores=True)
    return (top[0][0], int(top[0][1])) if top else None


async def last_beat(redis: Redis, role: Role, name: str) -> int | None:
    """``name``'s last beat (ms), ``None`` if it has none (never beat, or stopped)."""
    score = await redis.zscore(ZSETS[role], name)
    return None if score is None else int(score)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def beats_of(redis: Redis, role: Role, *, name: str | None = None,
                   hostname: str | None = None) -> list[tuple[str, float]]:
    """The beats ``(name, ms)`` of the process named ``name``, or without it of every process
    with a default name on ``hostname`` (``<hostname>:*``; this host by default)."""
    zset = ZSETS[role]
    if name:
        score = await redis.zscore(zset, name)
        return [] if score is None else [(name, score)]
    host = hostname or socket.gethostname()
    return [(member, score) async for member, score in
            redis.zscan_iter(zset, match=f"{_glob_escape(host)}:*", count=500)]


def _served(raw: str | None) -> list[str]:
    """A beat's workflows; a worker that beats without them (older than routing) reads only
    the built-in workflow's queue."""
    try:
        found = json.loads(raw) if raw else None
    except ValueError:
        found = None
    return [w for w in found if isinstance(w, str)] if isinstance(found, list) else [DEFAULT_WORKFLOW]


async def serving(redis: Redis, max_age_s: float, now_ms: int | None = None) -> dict[str, list[str]]:
    """Live workers by workflow served: workflow -> worker names."""
    live = sorted(await alive(redis, "worker", max_age_s, now_ms))
    found = await redis.hmget(keys.WORKER_WORKFLOWS, live) if live else []
    out: dict[str, list[str]] = {}
    for name, raw in zip(live, found):
        for workflow in _served(raw):
            out.setdefault(workflow, []).append(name)
    return out


async def unserved(redis: Redis, max_age_s: float, now_ms: int | None = None) -> dict[str, int]:
    """Known workflows (``turnfleet/registry.py``) with turns queued (either lane) and no live
    worker serving them: workflow -> turns queued. Those turns stay queued until one comes."""
    known = sorted(await registry.workflows(redis))
    async with redis.pipeline(transaction=False) as pipe:
        for workflow in known:
            pipe.zcard(keys.workflow_queue(workflow))
            pipe.zcard(keys.workflow_isolated_queue(workflow))
        counts = await pipe.execute()
    queued = {w: int(counts[2 * i]) + int(counts[2 * i + 1]) for i, w in enumerate(known)}
    waiting = {w: n for w, n in queued.items() if n}
    if not waiting:
        return {}
    served = await serving(redis, max_age_s, now_ms)
    return {w: n for w, n in waiting.items() if not served.get(w)}


def unserved_notes(waiting: dict[str, int]) -> list[str]:
    """One line per workflow :func:`unserved` found."""
    return [f"turns of {w} are waiting: no worker serves it ({n} queued)" for w, n in sorted(waiting.items())]
