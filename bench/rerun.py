"""Section 13: how many stored turns ``turnfleet rerun`` / ``regress`` re-run a second (issue 17).

Real Support Desk turns (offline model, the real turn job in this process, private Redis) are
run once: the five-turn conversations of section 12 (greeting, order status, refund of "it",
refund of a named order, a request for a person). Then every turn is re-run through the engine
(``turnfleet.workers.rerun.rerun_turn``: read the record and memory, clone the agent graph,
run the SDK's Runner with recorded tool answers, run the checks on both sides, price both,
store the rerun record), against the unchanged candidate and against the flawed model, one at
a time and with ``regress``'s default concurrency (4).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.checks import CONVERSATION
from bench.common import PrivateRedis, stats


async def _turns(redis: Any, conversations: int) -> list[str]:
    from turnfleet.producer import Producer
    from turnfleet.queue import TurnQueue
    from turnfleet.settings import WorkerProcessSettings
    from turnfleet.workers.job import Runtime, run_turn
    from turnfleet.workers.model import OfflineModel
    from turnfleet.workers.support_desk import builtin_app

    ctx = {"runtime": Runtime(settings=WorkerProcessSettings(), redis=redis, queue=TurnQueue(redis),
                              app=builtin_app(OfflineModel()), model_name="turnfleet-offline",
                              worker_name="bench-rerun")}
    out = []
    async with Producer(redis=redis) as producer:
        for c in range(conversations):
            conv = f"bench-rerun-{c}"
            for text in CONVERSATION:
                turn_id = await producer.enqueue_turn(conversation_id=conv, customer_id="C-100", text=text)
                await run_turn(ctx, turn_id, conv)
                out.append(turn_id)
    return out


async def _rate(redis: Any, turns: list[str], model: str | None, concurrency: int) -> tuple[float, int]:
    """(turns re-run a second, turns whose decisions changed)."""
    from turnfleet.settings import TelemetrySettings
    from turnfleet.telemetry.pricing import PriceTable
    from turnfleet.workers.rerun import Candidates, CandidateSpec, rerun_turn

    candidates = Candidates(CandidateSpec(model=model))
    pricing = PriceTable.from_settings(TelemetrySettings()).cost_usd
    limit = asyncio.Semaphore(concurrency)

    async def one(turn_id: str) -> bool:
        async with limit:
            report = await rerun_turn(redis, turn_id, candidates, raw_retention_s=3600, pricing=pricing)
            return bool(report["changed"])

    began = time.perf_counter()
    changed = await asyncio.gather(*(one(t) for t in turns))
    return len(turns) / (time.perf_counter() - began), sum(changed)


def bench_rerun(conversations: int, reps: int, url: str) -> dict[str, list[float]]:
    from agents import set_trace_processors

    from turnfleet.connection import connect

    set_trace_processors([])  # the original turns' traces are not what is measured

    async def run() -> dict[str, list[float]]:
        redis = connect(url)
        try:
            turns = await _turns(redis, conversations)
            out: dict[str, list[float]] = {"turns": [len(turns)]}
            for _ in range(reps):
                for name, model, concurrency in (("same-1", None, 1), ("same-4", None, 4),
                                                 ("flawed-4", "turnfleet-offline-flawed", 4)):
                    rate, changed = await _rate(redis, turns, model, concurrency)
                    out.setdefault(name, []).append(rate)
                    out.setdefault(f"{name}-changed", []).append(changed)
            return out
        finally:
            await redis.aclose()

    return asyncio.run(run())


def rerun_lines(runs: dict[str, list[float]], reps: int, note: str = "") -> list[str]:
    n = int(runs["turns"][0])
    return [
        "## 13. Re-running stored turns: `turnfleet rerun` / `regress` on the offline model",
        "",
        f"{n} real Support Desk turns (offline model, the turn job in-process; the five-turn "
        "conversations of section 12) are run once; then each is re-run through the engine "
        "(`workers/rerun.py`: read the record and the memory before the turn, clone the agent "
        "graph with intercepted tools, run the SDK's Runner with tracing off, run the checks on "
        "both sides, price both, store the rerun record), "
        f"{reps} reps. Changed turns: unchanged candidate {int(max(runs['same-4-changed']))}, "
        f"flawed model {int(max(runs['flawed-4-changed']))} (its planted mistake). " + note,
        "",
        "| candidate, concurrency | turns/s: median (min–max) |",
        "|---|---|",
        f"| the turn's own workflow and model, 1 at a time | {stats(runs['same-1'])} |",
        f"| the same, 4 at once (`regress` default) | {stats(runs['same-4'])} |",
        f"| `--model turnfleet-offline-flawed`, 4 at once | {stats(runs['flawed-4'])} |",
        "",
    ]


def section(base: Path, quick: bool, note: str = "") -> list[str]:
    conversations, reps = (6, 3) if quick else (20, 5)
    with PrivateRedis(base) as server:
        runs = bench_rerun(conversations, reps, server.url)
    return rerun_lines(runs, reps, note)
