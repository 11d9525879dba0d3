"""Heartbeats (``turnfleet/heartbeat.py``): one module writes, names and reads them.

Against the test's own redis-server. Ages are judged against a ``now_ms`` the test passes, so
"too old" needs no waiting.
"""

from __future__ import annotations

import re
from pathlib import Path

from turnfleet import heartbeat, keys

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("turnfleet", "workers", "telemetry", "producer", "shell", "bench")
HEARTBEAT_ZSETS = re.compile(r"keys\.(WORKERS|TELEMETRY_CONSUMERS)\b")


def test_heartbeat_zsets_are_touched_only_by_the_heartbeat_module():
    """Every writer and reader of the heartbeat zsets goes through ``turnfleet/heartbeat.py``
    (``keys.py`` names them); no other product module knows their layout."""
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in PRODUCT
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.name not in ("heartbeat.py", "keys.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if HEARTBEAT_ZSETS.search(line.split("#")[0])
    ]
    assert offenders == []


async def test_a_beat_counts_until_too_old_and_is_gone_once_forgotten(redis):
    await heartbeat.beat(redis, "worker", "w-1", in_flight=3)
    beat_ms = await heartbeat.last_beat(redis, "worker", "w-1")
    assert beat_ms is not None
    assert await heartbeat.alive(redis, "worker", 15, now_ms=beat_ms) == {"w-1": beat_ms}
    assert await heartbeat.newest(redis, "worker") == ("w-1", beat_ms)
    assert await redis.hget(keys.WORKER_INFLIGHT, "w-1") == "3"
    # 15 s later without another beat it no longer counts, but is still the newest seen.
    assert await heartbeat.alive(redis, "worker", 15, now_ms=beat_ms + 15_001) == {}
    assert await heartbeat.newest(redis, "worker") == ("w-1", beat_ms)

    await heartbeat.forget(redis, "worker", "w-1")
    assert await heartbeat.last_beat(redis, "worker", "w-1") is None
    assert await heartbeat.newest(redis, "worker") is None
    assert await redis.hexists(keys.WORKER_INFLIGHT, "w-1") == 0


async def test_roles_beat_apart(redis):
    """A worker's beat is not a consumer's, and a consumer's carries no in-flight count."""
    await heartbeat.beat(redis, "telemetry", "t-1")
    assert list(await heartbeat.alive(redis, "telemetry", 15)) == ["t-1"]
    assert await heartbeat.alive(redis, "worker", 15) == {}
    assert await redis.hexists(keys.WORKER_INFLIGHT, "t-1") == 0


async def test_beats_of_a_host_match_its_default_names_only(redis):
    """The probe's lookup: ``<hostname>:*`` with the hostname taken literally (glob characters
    in it match only themselves), or one exact name."""
    for name in ("we[ir]d*:7", "weird:7", "wed:7", "we[ir]d*x:8", heartbeat.default_name()):
        await heartbeat.beat(redis, "worker", name)
    assert [n for n, _ in await heartbeat.beats_of(redis, "worker", hostname="we[ir]d*")] == ["we[ir]d*:7"]
    assert [n for n, _ in await heartbeat.beats_of(redis, "worker")] == [heartbeat.default_name()]
    assert [n for n, _ in await heartbeat.beats_of(redis, "worker", name="wed:7")] == ["wed:7"]
    assert await heartbeat.beats_of(redis, "telemetry", name="wed:7") == []
