"""Section 12: what the Support Desk's checks cost per finished turn (issue 17).

Real Desk turns (offline model, the real turn job in this process, private Redis) are run once:
conversations of five turns (a greeting, an order status, a refund of "it", a refund of a named
order, a request for a person), so the refunds' checks read earlier messages and tool calls from
memory. Their records and their memory before each turn are then read once; what is timed is
what the checks' follow-up job will do per turn on top of reading them: build the
``FinishedTurn`` (parse every tool call's JSON, freeze it, walk the memory items) and run the
workflow's four checks; and, separately, the whole check job as a worker runs it
(``workers/check_job.py`` ``run_turn_checks``, in-process on the private Redis: read the
record and the memory, run the checks (the Desk's are ``blocking=False``: on the loop, no thread
hop), redact the reasons, write the outcomes and the ``check`` entry with one script), one job
at a time, its outcomes key deleted before each rep so every run writes. The checks lane
(``workers/checks_lane.py``) runs a poll's jobs as one batch, so in a worker the reads and the
write are shared by every turn of the batch: this is the cost of a batch of one.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from bench.common import PrivateRedis, stats

CONVERSATION = ("Hi, I'm Dana", "Where is order 1042?", "I want a refund for it", "Refund order 1043 too",
                "Please let me talk to a human")


async def capture(url: str, conversations: int) -> list[tuple[Any, list[dict[str, Any]]]]:
    """(TurnResult, memory items before the turn) for every turn of ``conversations``."""
    from agents import set_trace_processors

    from turnfleet import keys
    from turnfleet.connection import connect
    from turnfleet.producer import Producer
    from turnfleet.queue import TurnQueue
    from turnfleet.settings import WorkerProcessSettings
    from turnfleet.workers.job import Runtime, run_turn
    from turnfleet.workers.model import OfflineModel
    from turnfleet.workers.support_desk import builtin_app

    set_trace_processors([])  # no exporter: the turns' traces are not what is measured
    redis = connect(url)
    ctx = {"runtime": Runtime(settings=WorkerProcessSettings(), redis=redis, queue=TurnQueue(redis),
                              app=builtin_app(OfflineModel()), model_name="turnfleet-offline",
                              worker_name="bench-checks")}
    out = []
    ids: list[tuple[str, str]] = []
    try:
        async with Producer(redis=redis) as producer:
            for c in range(conversations):
                conv = f"bench-checks-{c}"
                for text in CONVERSATION:
                    turn_id = await producer.enqueue_turn(conversation_id=conv, customer_id="C-100", text=text)
                    await run_turn(ctx, turn_id, conv)
                    base = int(await redis.hget(keys.turn(turn_id), "memory_base") or 0)
                    raw = await redis.lrange(keys.session_messages(conv), 0, base - 1) if base else []
                    out.append((await producer.result(turn_id), [json.loads(r) for r in raw]))
                    ids.append((turn_id, conv))
        job_runs = await time_check_jobs(ctx, ids, JOB_REPS)
    finally:
        await redis.aclose()
    return out, job_runs


JOB_REPS = 5


async def time_check_jobs(ctx: dict[str, Any], ids: list[tuple[str, str]], reps: int) -> list[float]:
    """µs per turn of the whole check job (``run_turn_checks``), each rep over every turn."""
    from turnfleet import keys
    from turnfleet.workers.check_job import run_turn_checks

    redis = ctx["runtime"].redis
    runs = []
    for _ in range(reps):
        await redis.delete(*[keys.turn_checks(t) for t, _ in ids])
        t0 = time.perf_counter()
        for turn_id, conv in ids:
            assert await run_turn_checks({**ctx, "job_id": keys.checks_job_id(turn_id)}, turn_id, conv) == "written"
        runs.append((time.perf_counter() - t0) / len(ids) * 1e6)
    return runs


def per_turn_us(turns: list[tuple[Any, list[dict[str, Any]]]], workflow: Any) -> tuple[float, float, int]:
    """(µs per turn for view + checks, µs per turn for the checks alone, failed checks)."""
    from turnfleet.checks import FinishedTurn, run_checks

    t0 = time.perf_counter()
    views = [FinishedTurn.from_result(result, items) for result, items in turns]
    t1 = time.perf_counter()
    failed = sum(not o.passed for view in views for o in run_checks(workflow, view))
    t2 = time.perf_counter()
    return (t2 - t0) / len(turns) * 1e6, (t2 - t1) / len(turns) * 1e6, failed


def bench_checks(conversations: int, reps: int, url: str) -> dict[str, list[float]]:
    from turnfleet.workers.model import OfflineModel
    from turnfleet.workers.support_desk import support_desk_workflow

    turns, job_runs = asyncio.run(capture(url, conversations))
    workflow = support_desk_workflow(OfflineModel())
    out: dict[str, list[float]] = {"turns": [len(turns)], "job": job_runs}
    for _ in range(reps):
        total, checks, failed = per_turn_us(turns, workflow)
        out.setdefault("total", []).append(total)
        out.setdefault("checks", []).append(checks)
        out.setdefault("failed", []).append(failed)
    return out


def checks_lines(runs: dict[str, list[float]], reps: int, note: str = "") -> list[str]:
    n = int(runs["turns"][0])
    return [
        "## 12. Checks per finished turn: the Support Desk's four checks",
        "",
        f"{n} real Support Desk turns (offline model, the turn job in-process; conversations of "
        "five turns: greeting, order status, refund of \"it\", refund of a named order, a request "
        "for a person) are run once; their records and memory before each turn are read once. "
        "Timed per turn: building the `FinishedTurn` from the record and the memory items, and "
        "running the Desk's four checks (`run_checks`), "
        f"{reps} reps over the same turns; and the whole check job a worker runs per finished "
        "turn (`run_turn_checks` in-process: read the record and memory, run the checks "
        "(the Desk's on the loop, `blocking=False`), redact the reasons, write the outcomes and the "
        "`check` entry with one script; a batch of one: the checks lane shares the reads and the "
        "write among a poll's jobs), "
        f"{len(runs['job'])} reps. "
        f"Failed checks: {int(max(runs['failed']))} (every real Desk turn passes). " + note,
        "",
        "| per finished turn | µs: median (min–max) |",
        "|---|---|",
        f"| build the view + run the 4 checks | {stats(runs['total'])} |",
        f"| run the 4 checks alone | {stats(runs['checks'])} |",
        f"| the whole check job (Redis read, checks, write script; a batch of one) | {stats(runs['job'])} |",
        "",
    ]


def section(base: Path, quick: bool, note: str = "") -> list[str]:
    conversations, reps = (10, 3) if quick else (40, 9)
    with PrivateRedis(base) as server:
        runs = bench_checks(conversations, reps, server.url)
    return checks_lines(runs, reps, note)
