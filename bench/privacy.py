"""Section 10: what the privacy passes cost — raw-text expiry per turn, erasure of one customer.

Real Support Desk turns (offline model) run through two burst workers and the telemetry
consumer into one Redis, in the growth section's way: customers of 2 conversations × 5 turns
each, with a card number and an e-mail address in every text. Then, at each size:

- erasure: ``turnfleet.erasure.forget`` of several customers one after the other, each timed
  (it reads the subject, runs its one script, then SCANs the keyspace for per-day aggregates
  and alert markers and reads the streams that may name it: its time grows with what Redis
  holds, not only with the customer);
- raw-text expiry, at the largest size: one ``RawExpiry.expire`` pass with a ``now`` past the
  retention, over every turn (what the telemetry consumer does once a minute for the turns
  that came due), turns per second and µs per turn.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import PrivateRedis, consume, enqueue_all, worker_env
from turnfleet.shell.fleet import FleetProcess

TEXT = "Where is order 1043? My card is 4111 1111 1111 1111, mail me at dana{c}@example.com"
TURNS_PER_CONV, CONVS_PER_CUSTOMER = 5, 2
PER_CUSTOMER = TURNS_PER_CONV * CONVS_PER_CUSTOMER
ERASED_PER_SIZE = 5


def _turns(first: int, customers: int) -> list[dict[str, Any]]:
    """Turns of customers ``first`` … ``first + customers - 1``, in conversation order."""
    out = []
    for c in range(first, first + customers):
        for k in range(CONVS_PER_CUSTOMER):
            for _ in range(TURNS_PER_CONV):
                out.append({"conversation_id": f"priv-{c}-{k}", "customer_id": f"P-{c}",
                            "text": TEXT.format(c=c)})
    return out


async def _forget_timed(url: str, customers: list[str]) -> list[dict[str, float]]:
    from redis.asyncio import Redis

    from turnfleet.erasure import forget

    redis = Redis.from_url(url)
    out = []
    try:
        for customer in customers:
            dbsize = await redis.dbsize()
            t0 = time.perf_counter()
            report = await forget(redis, customer_id=customer, who="bench")
            ms = (time.perf_counter() - t0) * 1000
            if report.turns != PER_CUSTOMER:
                raise RuntimeError(f"privacy: erased {report.turns} turns of {customer}, not {PER_CUSTOMER}")
            out.append({"ms": ms, "dbsize": float(dbsize), "keys": float(report.keys),
                        "stream_entries": float(report.stream_entries)})
    finally:
        await redis.aclose()
    return out


async def _expire_timed(url: str) -> dict[str, float]:
    from redis.asyncio import Redis

    from turnfleet.telemetry.raw_expiry import RawExpiry
    from turnfleet import keys
    from turnfleet.settings import TelemetrySettings

    redis = Redis.from_url(url)
    try:
        due = await redis.zcard(keys.RAW_TEXT)
        expiry = RawExpiry(redis, TelemetrySettings())
        t0 = time.perf_counter()
        result = await expiry.expire(now_ms=int(time.time() * 1000) + 30 * 86400 * 1000)
        s = time.perf_counter() - t0
        left = await redis.zcard(keys.RAW_TEXT)
    finally:
        await redis.aclose()
    if result.turns != due or left:
        raise RuntimeError(f"privacy: expired {result.turns} of {due} turns, {left} left")
    return {"turns": float(result.turns), "s": s, "memory_items": float(result.memory_items)}


def bench_privacy(sizes: list[int], base: Path) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rows: list[dict[str, Any]] = []
    with PrivateRedis(base) as server:
        url = server.url
        customers = 0
        for size in sizes:
            want = size // PER_CUSTOMER
            asyncio.run(enqueue_all(url, _turns(customers, want - customers)))
            customers = want
            procs = [FleetProcess(f"privacy-{size}-{w}", ["worker", "--burst"], worker_env(url, base / "state"),
                                  base / "logs" / f"privacy-{size}-{w}.log").start() for w in range(2)]
            for p in procs:
                if p.wait(1200) != 0:
                    raise RuntimeError(f"privacy: worker failed:\n{p.output()[-2000:]}")
            asyncio.run(consume(url))
            # Erase the customers added last (their per-day aggregates, alerts and stream
            # entries are the newest), then put them back so the next size starts whole.
            victims = [f"P-{c}" for c in range(customers - ERASED_PER_SIZE, customers)]
            erased = asyncio.run(_forget_timed(url, victims))
            rows.append({"size": size, "erased": erased})
            print(f"[privacy] {size} turns: forget median {statistics.median(e['ms'] for e in erased):.1f} ms",
                  file=sys.stderr, flush=True)
            customers -= ERASED_PER_SIZE
        expiry = asyncio.run(_expire_timed(url))
        expiry["size"] = float(customers * PER_CUSTOMER)
        print(f"[privacy] raw expiry: {expiry['turns']:.0f} turns in {expiry['s']:.2f} s", file=sys.stderr,
              flush=True)
    return rows, expiry


def privacy_lines(rows: list[dict[str, Any]], expiry: dict[str, float], note: str = "") -> list[str]:
    lines = [
        "## 10. Privacy: erasing one customer, expiring raw text",
        "",
        f"A Redis filled by real turns (2 burst workers, offline model, telemetry consumed): customers "
        f"of {CONVS_PER_CUSTOMER} conversations × {TURNS_PER_CONV} turns, a card and an e-mail in "
        f"every text. At each size, {ERASED_PER_SIZE} customers are erased one after the other with "
        "`turnfleet.erasure.forget` (what `turnfleet forget --customer` runs); then one raw-text "
        "expiry pass redacts every turn left (what the telemetry consumer runs every minute for the "
        "turns that came due). " + note,
        "",
        "| turns in Redis | keys in Redis | forget one customer (10 turns), ms: median (min–max) | keys deleted | stream entries deleted |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        erased = row["erased"]
        ms = [e["ms"] for e in erased]
        lines.append(
            f"| {row['size']} | {statistics.median(e['dbsize'] for e in erased):.0f} | "
            f"{statistics.median(ms):.1f} ({min(ms):.1f}–{max(ms):.1f}) | "
            f"{statistics.median(e['keys'] for e in erased):.0f} | "
            f"{statistics.median(e['stream_entries'] for e in erased):.0f} |")
    per_turn_us = expiry["s"] / expiry["turns"] * 1e6 if expiry["turns"] else 0.0
    lines += [
        "",
        "| raw-text expiry | turns | memory items | seconds | turns/s | µs per turn |",
        "|---|---|---|---|---|---|",
        f"| one pass | {expiry['turns']:.0f} | {expiry['memory_items']:.0f} | {expiry['s']:.2f} | "
        f"{expiry['turns'] / expiry['s']:.0f} | {per_turn_us:.0f} |",
        "",
    ]
    return lines


def section(base: Path, quick: bool, note: str = "") -> list[str]:
    sizes = [500] if quick else [1000, 10_000]
    rows, expiry = bench_privacy(sizes, base)
    return privacy_lines(rows, expiry, note)
