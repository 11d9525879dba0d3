"""The worker's own CPU per turn (issue 19): what turnfleet adds around the SDK run.

Two figures from the same run, each in a fresh process, interleaved:

- **worker**: the CPU time (user + sys) of one ``turnfleet worker --burst`` draining ``n``
  pre-enqueued turns (checks lane included: the Support Desk's four checks run for every
  turn), minus the CPU time of the same burst worker on an empty queue (startup and exit),
  ÷ ``n``. Read from ``RUSAGE_CHILDREN`` around the child's run, so nothing samples it.
- **bare**: the CPU time of a process running ``Runner.run`` on the same turns at the
  worker's concurrency (``max_jobs``, 50) with the SDK's tracing on (spans built, no
  processor), ÷ ``n``: the SDK run alone, what any fleet running this agent pays. It runs on
  the worker's event loop (uvloop, ``workers/supervisor.py``), so the loop's gain is not
  counted as turnfleet's.

**outside the SDK run** = worker − bare: queue bookkeeping, telemetry and tracing, redaction,
memory, checks and the event loop's share of them. redis-server's CPU per turn (INFO cpu over
the worker's run) comes with it. ``python -m bench.run --only workercpu`` runs it alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (CUSTOMER, ROOT, TEXT, PrivateRedis, children_cpu, col, conv_turns, enqueue_all,
                          interleave, redis_cpu, stats, worker_env)
from turnfleet.shell.fleet import FleetProcess

CONCURRENCY = 50  # the worker's default max_jobs


def _burst(url: str, base: Path, name: str) -> float:
    """CPU seconds of one burst worker run (the child's own, reaped before this returns)."""
    before = children_cpu()
    proc = FleetProcess(name, ["worker", "--burst"], worker_env(url, base / "state"),
                        base / "logs" / f"{name}.log").start()
    try:
        rc = proc.wait(900)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"{name}: burst worker did not exit") from None
    if rc != 0:
        raise RuntimeError(f"{name}: worker exited {rc}:\n{proc.output()[-2000:]}")
    return children_cpu() - before


async def _checked(url: str, ids: list[str]) -> int:
    """Turns completed whose checks were written (the workload is not bought by skipping them)."""
    from redis.asyncio import Redis

    from turnfleet import keys
    from turnfleet.producer.api import Producer

    async with Producer(url) as p:
        results = [await p.result(t) for t in ids]
    r = Redis.from_url(url)
    checked = sum([1 for t in ids if await r.exists(keys.turn_checks(t))])
    await r.aclose()
    done = sum(1 for x in results if x is not None and x.status == "completed")
    return min(done, checked)


def worker(n: int, base: Path, rep: int) -> dict[str, float]:
    with PrivateRedis(base) as server:
        empty = _burst(server.url, base, f"wcpu-empty-{rep}")
        ids = asyncio.run(enqueue_all(server.url, conv_turns(n, f"wcpu{rep}")))
        r0 = redis_cpu(server.url)
        t0 = time.perf_counter()
        cpu = _burst(server.url, base, f"wcpu-{rep}")
        wall = time.perf_counter() - t0
        r1 = redis_cpu(server.url)
        ok = asyncio.run(_checked(server.url, ids))
        if ok != n:
            raise RuntimeError(f"worker cpu: {ok}/{n} turns completed with their checks written")
    return {"cpu_us": (cpu - empty) / n * 1e6, "startup_cpu_s": empty, "redis_us": (r1 - r0) / n * 1e6,
            "turns_s_wall": n / wall}


def bare(n: int, base: Path, rep: int) -> dict[str, float]:
    with PrivateRedis(base) as server:
        out = subprocess.run([sys.executable, "-m", "bench.worker_cpu", "--bare", str(n), server.url],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                             text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"bare run failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


async def _bare_run(n: int, url: str) -> dict[str, float]:
    """In a fresh process: ``Runner.run`` at CONCURRENCY with tracing on, CPU per turn."""
    from agents import RunConfig, Runner, set_trace_processors
    from redis.asyncio import Redis

    from turnfleet.context import TurnContext
    from turnfleet.workers.model import OfflineModel
    from turnfleet.workers.support_desk import build_support_desk

    desk = build_support_desk(OfflineModel())
    redis = Redis.from_url(url)
    sem = asyncio.Semaphore(CONCURRENCY)
    cfg = RunConfig(tracing_disabled=False)
    set_trace_processors([])  # spans built, nothing exports them

    async def one(i: int) -> None:
        async with sem:
            ctx = TurnContext(turn_id=f"bare-{i}", conversation_id=f"bare-c-{i}", customer_id=CUSTOMER,
                              attempt=1, redis=redis)
            result = await Runner.run(desk.triage, TEXT, context=ctx, run_config=cfg)
            assert result.final_output

    await asyncio.gather(*(one(-1 - i) for i in range(CONCURRENCY)))  # warm-up
    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    await redis.aclose()
    return {"cpu_us": cpu / n * 1e6, "turns_s": n / wall}


def measure(n: int, reps: int, base: Path) -> dict[str, list[dict[str, float]]]:
    return interleave(reps, {"bare": lambda rep: bare(n, base, rep),
                             "worker": lambda rep: worker(n, base, rep)}, "worker cpu")


def outside(runs: dict[str, list[dict[str, float]]]) -> list[float]:
    """Per rep: the worker's CPU per turn minus the same rep's bare CPU per turn (µs)."""
    return [w - b for w, b in zip(col(runs["worker"], "cpu_us"), col(runs["bare"], "cpu_us"))]


def lines(n: int, runs: dict[str, list[dict[str, float]]]) -> list[str]:
    out = outside(runs)
    return [
        "| | CPU µs per turn |",
        "|---|---|",
        f"| `Runner.run`, concurrency {CONCURRENCY}, SDK tracing on (spans built, no processor) | "
        f"{stats(col(runs['bare'], 'cpu_us'))} |",
        f"| `turnfleet worker --burst`, {n} turns (startup subtracted; checks included) | "
        f"{stats(col(runs['worker'], 'cpu_us'))} |",
        f"| **outside the SDK run** (worker − bare, same rep) | **{stats(out)}** |",
        f"| redis-server during the worker's run | {stats(col(runs['worker'], 'redis_us'))} |",
        "",
    ]


def section(base: Path, quick: bool, note: str) -> list[str]:
    n, reps = (300, 2) if quick else (1000, 3)
    runs = measure(n, reps, base)
    return ["### Worker CPU per turn outside the SDK run", "", note, "", *lines(n, runs)]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--bare":
        from turnfleet.logging import configure_logging
        from turnfleet.workers.supervisor import event_loop_factory

        configure_logging("INFO")  # as the worker (unconfigured, structlog prints the model's debug lines)

        # On the worker's own event loop (uvloop where installed): the difference is then
        # turnfleet's work, not the loops'.
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            print(json.dumps(runner.run(_bare_run(int(sys.argv[2]), sys.argv[3]))))
    else:
        import tempfile

        n = int(sys.argv[1]) if len(sys.argv) > 1 else 600
        reps = int(sys.argv[2]) if len(sys.argv) > 2 else 2
        with tempfile.TemporaryDirectory() as d:
            print("\n".join(lines(n, measure(n, reps, Path(d)))))
