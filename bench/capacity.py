"""Capacity from one run's figures: what one Redis carries, and when a deployment needs more.

Nothing is measured here: :func:`lines` turns the figures other tables measured (redis-server's
CPU per turn, bytes per turn, the worker's CPU per turn) into turns/s per Redis core, memory
per day of traffic at a retention, and the traffic at which one Redis is not enough. The
assumptions (headroom, peak factor, memory budget) are constants below, stated in the text.
The sharding plan past that point is docs/capacity.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.common import fmt

DAY_S = 86_400
HEADROOM = 0.5  # plan to keep redis-server's one core at most this busy at peak
PEAK = 3.0  # the busiest hour's rate ÷ the day's mean rate
MEMORY_BUDGET = 16e9  # used_memory one Redis may hold: half of a 32 GB host (the AOF rewrite's fork copies pages)
TRAFFIC = (100_000, 1_000_000, 10_000_000)  # turns a day
RETENTION_DAYS = (1, 7)


@dataclass(frozen=True)
class Measured:
    """The run's medians this section reads (µs and bytes per turn) and where they come from."""

    redis_enqueue_us: float  # 3c: the bulk enqueue's first calls, AOF on
    redis_worker_us: float  # 5: one worker's drain (turns and their check jobs)
    redis_consumer_us: float  # 7c: the consumer's run (aggregation, retention purge), largest size
    worker_cpu_us: float  # 1d: a worker's CPU per turn (startup subtracted)
    bytes_rate1: float  # 7: used_memory growth per turn, sample rate 1.0
    bytes_rate01: float  # 7: the same at rate 0.1

    @property
    def redis_us(self) -> float:
        return self.redis_enqueue_us + self.redis_worker_us + self.redis_consumer_us


def turns_s_per_core(m: Measured) -> float:
    return 1e6 / m.redis_us


def cpu_turns_day(m: Measured) -> float:
    """Turns a day one Redis carries with its core ≤ HEADROOM busy in the peak hour."""
    return turns_s_per_core(m) * HEADROOM / PEAK * DAY_S


def memory_turns_day(bytes_turn: float, days: int) -> float:
    """Turns a day whose data, kept ``days``, fits in MEMORY_BUDGET."""
    return MEMORY_BUDGET / (bytes_turn * days)


def lines(m: Measured) -> list[str]:
    core = turns_s_per_core(m)
    cpu_day = cpu_turns_day(m)
    mem_rows = []
    for rate, b in (("1.0", m.bytes_rate1), ("0.1", m.bytes_rate01)):
        for days in RETENTION_DAYS:
            cells = " | ".join(f"{t * days * b / 1e9:,.1f}" for t in TRAFFIC)
            mem_rows.append(f"| {rate} | {days} d | {cells} | {memory_turns_day(b, days) / 1e6:,.2f}M |")
    cases = [(f"rate {rate}, {days} d", b, days)
             for rate, b in (("1.0", m.bytes_rate1), ("0.1", m.bytes_rate01)) for days in RETENTION_DAYS]
    limits = {name: min(cpu_day, memory_turns_day(b, days)) for name, b, days in cases}
    by = {name: "CPU" if cpu_day <= memory_turns_day(b, days) else "memory" for name, b, days in cases}
    return [
        "## 7d. Capacity: what one Redis carries, and past it",
        "",
        "Computed from this run's figures (nothing new measured; `bench/capacity.py`). Workload: "
        "the bench's Support Desk turn (2 model calls, 1 tool call, 4 checks, tracing at the "
        "sample rate named); a workflow with more calls a turn writes more events and spans, so "
        "scale by its events per turn (table 4).",
        "",
        "| redis-server CPU per turn | µs | from |",
        "|---|---|---|",
        f"| enqueue (bulk, first calls, AOF on) | {fmt(m.redis_enqueue_us)} | table 3c |",
        f"| the worker's run: start, memory, finish, checks | {fmt(m.redis_worker_us)} | table 5, 1 worker |",
        f"| telemetry: aggregation and the retention purge | {fmt(m.redis_consumer_us)} | table 7c, last size |",
        f"| **all** | **{fmt(m.redis_us)}** | |",
        "",
        f"- **One Redis core carries ≈ {fmt(core)} turns/s** of this workload (1 s ÷ {fmt(m.redis_us)} µs), "
        f"at 100% of the core. Workers are the other side of it: at {fmt(m.worker_cpu_us / 1000)} ms of "
        f"worker CPU a turn (table 1d) that rate keeps ≈ {core * m.worker_cpu_us / 1e6:.1f} worker "
        "cores busy, so one Redis is matched by that many worker processes (plus the model's "
        "latency: table 2b).",
        f"- Planning at ≤ {HEADROOM:.0%} of the core in the busiest hour, with that hour at "
        f"{PEAK:g}× the day's mean rate: **≈ {cpu_day / 1e6:,.2f}M turns a day** per Redis "
        f"({fmt(core * HEADROOM)} turns/s at peak).",
        "",
        "Memory held at steady state = turns a day × retention × bytes per turn (table 7's `INFO` "
        f"used_memory growth per turn: {fmt(m.bytes_rate1)} B at sample rate 1.0, "
        f"{fmt(m.bytes_rate01)} B at 0.1), with every per-turn key kept for the retention: "
        "`TURNFLEET_RETENTION_S` = `TURNFLEET_SEEN_TTL_S` = `TURNFLEET_TRACE_RETENTION_S` = the "
        "retention, `TURNFLEET_SESSION_TTL_S` no longer (table 7b shows the purge holding it "
        "flat). What does not grow with turns (fleet, customer, model and per-day aggregates, "
        "capped latency samples, trimmed streams, the ledger) is left out.",
        "",
        "| sample rate | retention | " + " | ".join(f"GB at {t / 1e6:g}M turns/day" for t in TRAFFIC)
        + f" | turns/day in {MEMORY_BUDGET / 1e9:g} GB |",
        "|---|---|" + "---|" * (len(TRAFFIC) + 1),
        *mem_rows,
        "",
        f"**When one Redis is not enough** (memory budget {MEMORY_BUDGET / 1e9:g} GB of used_memory: "
        "half of a 32 GB host, since the AOF rewrite's fork may copy pages the server writes "
        "meanwhile): "
        + "; ".join(f"{name}: past ≈ {v / 1e6:,.2f}M turns a day ({by[name]} first)" for name, v in limits.items())
        + ". Below that, scale workers (table 5), not Redis. Past it, shard by conversation: "
        "docs/capacity.md has the plan (which keys go with the conversation, what stays on one "
        "global Redis, how find, stats, the console and replay merge the shards).",
        "",
    ]
