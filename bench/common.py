"""What the benchmark sections share: the workload, private Redis servers, the burst helpers,
repetitions and how a cell is written (median (min–max))."""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from turnfleet.shell.embedded import RedisServer
from turnfleet.shell.fleet import fleet_env

ROOT = Path(__file__).resolve().parent.parent
TEXT = "Where is order 1043?"
CUSTOMER = "C-100"


def stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    med = statistics.median(values)
    return f"{fmt(med)} ({fmt(min(values))}–{fmt(max(values))})"


def fmt(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: always one of the samples."""
    s = sorted(values)
    k = max(1, -(-len(s) * p // 100))
    return s[int(k) - 1]


class PrivateRedis:
    def __init__(self, base: Path) -> None:
        self.server = RedisServer(base / f"redis-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> RedisServer:
        self.server.start()
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.kill()  # nothing here needs to survive


def children_cpu() -> float:
    """CPU seconds (user + sys) of the children this process has reaped: around a child's run,
    its CPU, read without sampling it (nothing else may be reaped meanwhile)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def redis_cpu(url: str) -> float:
    """CPU seconds redis-server has used (INFO cpu, user + sys of its threads)."""
    from redis import Redis

    r = Redis.from_url(url)
    try:
        info = r.info("cpu")
    finally:
        r.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def worker_env(url: str, state_dir: Path) -> dict[str, str]:
    return fleet_env(url, {
        "TURNFLEET_STATE_DIR": str(state_dir),
        "TURNFLEET_TRACE_SAMPLE_RATE": "1.0",
        "TURNFLEET_TRACING_DISABLED": "false",
    })


def conv_turns(n: int, tag: str) -> list[dict[str, Any]]:
    return [{"conversation_id": f"bench-{tag}-{i}", "customer_id": CUSTOMER, "text": TEXT}
            for i in range(n)]


def interleave(reps: int, variants: dict[str, Callable[[int], dict[str, float]]],
               label: str) -> dict[str, list[dict[str, float]]]:
    out: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    for rep in range(reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            out[name].append(fn(rep))
            print(f"[{label}] rep {rep + 1}/{reps} {name}: "
                  f"{ {k: round(v, 2) for k, v in out[name][-1].items()} } "
                  f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
    return out


def col(runs: list[dict[str, float]], key: str) -> list[float]:
    return [r[key] for r in runs]


async def enqueue_all(url: str, turns: list[dict[str, Any]]) -> list[str]:
    from turnfleet.producer.api import Producer

    ids: list[str] = []
    async with Producer(url) as p:
        for i in range(0, len(turns), 1000):
            ids += await p.enqueue_turns(turns[i:i + 1000])
    return ids


async def consume(url: str, env: dict[str, str] | None = None) -> None:
    """A burst consumer run (with ``env``'s settings: retention purges after draining)."""
    from redis.asyncio import Redis

    from turnfleet.telemetry.consumer import caught_up, run_consumer
    from turnfleet.settings import TelemetrySettings

    overrides = {k.removeprefix("TURNFLEET_").lower(): v for k, v in (env or {}).items()
                 if k in ("TURNFLEET_RETENTION_S", "TURNFLEET_SEEN_TTL_S")}
    await run_consumer(TelemetrySettings(**overrides), url, burst=True)
    redis = Redis.from_url(url, decode_responses=True)
    ok = await caught_up(redis)
    await redis.aclose()
    if not ok:
        raise RuntimeError("telemetry: not caught up after a burst run")
