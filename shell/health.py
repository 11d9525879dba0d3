"""Health probes for one process of the fleet: what ``turnfleet health --role ROLE`` checks.

The compose healthchecks call this because the slim image has no curl and no redis-cli, and
because "the container is up" says little about a worker: arq's own health-check key is
shared by every worker of a queue, so it cannot tell which one died (DESIGN.md). Each
process records its own heartbeat instead (:mod:`turnfleet.heartbeat`), and the probe asks
whether *this host's* process has beaten recently:

- ``worker``: Redis answers PING, and this host's worker has a heartbeat younger than
  ``max_age_s``;
- ``telemetry``: the same for this host's telemetry consumer;
- ``producer``: ``GET {url}/healthz`` answers 200.

"This host's" means the name configured for the process (``TURNFLEET_WORKER_NAME`` /
``TURNFLEET_CONSUMER_NAME``) when set, otherwise any name ``<hostname>:<pid>``, the default
name, where the hostname is ``socket.gethostname()`` (the container id under Docker, so each
replica of a scaled service checks its own process). The freshest matching heartbeat counts.

A probe never raises for an unhealthy process: it returns a ``Health`` whose ``reason`` is
one line fit for a healthcheck log, with any password in a URL masked.

The worker and telemetry probes also say, in ``notes`` (printed after the reason, never a
failure: the process is healthy), when items of a newer format version are waiting for a
newer process (:mod:`turnfleet.versions`): a rolling deploy that has not finished; and when
turns of a known workflow are queued with no live worker serving it ("turns of W are waiting:
no worker serves it"; :func:`turnfleet.heartbeat.unserved`).
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from redis.exceptions import RedisError

from turnfleet import heartbeat, versions
from turnfleet.connection import RedisUrlError, check_redis_url, connect, masked

ROLES = ("worker", "telemetry", "producer")
DEFAULT_MAX_AGE_S = 15.0  # processes beat every 2 s: several missed beats, not one slow one
DEFAULT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Health:
    """The probe's verdict; ``reason`` says why in one line either way."""

    ok: bool
    reason: str
    notes: tuple[str, ...] = ()  # more lines worth saying, whatever ``ok`` is


async def heartbeat_health(
    redis_url: str,
    role: str,
    *,
    max_age_s: float = DEFAULT_MAX_AGE_S,
    name: str | None = None,
    hostname: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Health:
    """Whether Redis answers and this host's ``role`` process has a heartbeat under ``max_age_s``.

    ``name`` is the exact process name to look for; without it, any ``<hostname>:*``.
    """
    zset = heartbeat.ZSETS[role]
    hostname = hostname or socket.gethostname()
    who = repr(name) if name else f"host {hostname!r}"
    redis = connect(redis_url)
    try:
        async with asyncio.timeout(timeout_s):
            await redis.ping()
            beats = await heartbeat.beats_of(redis, role, name=name, hostname=hostname)
            note = versions.waiting_note(await versions.read_left(redis))
            unserved = heartbeat.unserved_notes(await heartbeat.unserved(redis, max_age_s))
    except TimeoutError:
        return Health(False, f"Redis at {masked(redis_url)} did not answer within {timeout_s:g} s")
    except (RedisError, OSError) as exc:
        return Health(False, f"Redis at {masked(redis_url)} unreachable: {type(exc).__name__}: {exc}")
    finally:
        await redis.aclose()
    notes = ((note,) if note else ()) + tuple(unserved)
    if not beats:
        return Health(False, f"no {role} heartbeat for {who} in {zset}", notes)
    member, score = max(beats, key=lambda beat: beat[1])
    age_s = max(0.0, time.time() - float(score) / 1000)
    if age_s > max_age_s:
        return Health(
            False, f"{role} {member} last beat {age_s:.1f} s ago (max {max_age_s:g} s) in {zset}", notes
        )
    return Health(True, f"{role} {member} beat {age_s:.1f} s ago", notes)


def http_health(base_url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Health:
    """Whether ``GET {base_url}/healthz`` answers 200 within ``timeout_s``."""
    url = base_url.rstrip("/") + "/healthz"
    shown = masked(url)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (http only)
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Health(False, f"GET {shown} failed: {reason}")
    if status != 200:
        return Health(False, f"GET {shown} answered {status}")
    return Health(True, f"GET {shown} answered 200")


def check(
    role: str,
    *,
    redis_url: str | None = None,
    url: str | None = None,
    max_age_s: float = DEFAULT_MAX_AGE_S,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Health:
    """The probe for ``role``, configured from the role's settings (``TURNFLEET_*``).

    ``url`` (producer) defaults to ``http://127.0.0.1:$TURNFLEET_HTTP_PORT``; ``redis_url``
    (worker, telemetry) to ``REDIS_URL``.
    """
    from pydantic import ValidationError

    from turnfleet.settings import ProducerSettings, TelemetrySettings, WorkerProcessSettings

    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    try:
        if role == "producer":
            base = url or f"http://127.0.0.1:{ProducerSettings().http_port}"
            return http_health(base, timeout_s=timeout_s)
        if role == "worker":
            settings = WorkerProcessSettings()
            name = settings.worker_name
        else:
            settings = TelemetrySettings()
            name = settings.consumer_name
    except ValidationError as exc:
        first = exc.errors()[0]
        return Health(False, f"settings invalid: {'.'.join(map(str, first['loc']))}: {first['msg']}")
    target = redis_url or settings.redis_url
    if not target:
        return Health(False, "no Redis: set REDIS_URL")
    try:
        check_redis_url(target)
    except RedisUrlError as exc:
        return Health(False, str(exc))
    return asyncio.run(
        heartbeat_health(target, role, max_age_s=max_age_s, name=name, timeout_s=timeout_s)
    )
