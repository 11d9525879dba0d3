"""Section 8: after a SIGKILL, how long until a killed worker's turns run again.

``python -m bench.run --only sigkill`` runs it alone. Each kill has its own private Redis and
the local OpenAI-compatible model server (``tests/llm_server.py``) holding the victim's calls.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import CUSTOMER, TEXT, PrivateRedis, conv_turns, percentile, worker_env
from turnfleet.shell.fleet import FleetProcess

# ~18 s a kill (two worker start-ups, the stagger, up to a lease): many turns per kill rather
# than many kills keeps the full run within its 15 minutes.
KILL_TURNS, KILL_BACKLOG = 10, 600


async def _until_async(check: Callable[[], Any], what: str, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"sigkill: timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _sigkill_trial(url: str, env: dict[str, str], base: Path, trial: str, turns: int,
                         lease_s: float, backlog: int, release: Callable[[], None]) -> list[dict[str, float]]:
    """One kill: ``turns`` turns running on a victim worker (their model calls held, started
    a third of a lease apart in all, so their renewals are spread over the renewal period),
    a survivor polling (with ``backlog`` more turns queued to keep it busy), SIGKILL the
    victim and ``release`` the held calls; per turn, the lease left at the kill, when the
    survivor's ``START`` found it lost (the ``WorkerLost`` record) and when its next attempt
    started (in the isolated lane: one lost turn at a time, see workers/isolation.py)."""
    from turnfleet.producer.api import Producer
    from turnfleet import heartbeat, keys
    from turnfleet.connection import connect

    redis = connect(url)
    victim = FleetProcess(f"{trial}-victim", ["worker"], {**env, "TURNFLEET_WORKER_NAME": f"{trial}-victim"},
                          base / "logs" / f"{trial}-victim.log").start()
    survivor = FleetProcess(f"{trial}-survivor", ["worker"], {**env, "TURNFLEET_WORKER_NAME": f"{trial}-survivor"},
                            base / "logs" / f"{trial}-survivor.log")
    try:
        await _until_async(lambda: heartbeat.last_beat(redis, "worker", f"{trial}-victim"), "the victim's heartbeat", 60)
        ids = []
        async with Producer(url) as p:
            for i in range(turns):
                ids.append(await p.enqueue_turn(conversation_id=f"bench-kill-{trial}-{i}", customer_id=CUSTOMER,
                                                text=f"{TEXT} (held)"))
                await asyncio.sleep(lease_s / 3 / turns)
            if backlog:
                await p.enqueue_turns(conv_turns(backlog, f"kill-{trial}-load"))

        async def all_running() -> bool:
            async with redis.pipeline(transaction=False) as pipe:
                for t in ids:
                    pipe.hmget(keys.turn(t), "status", "worker")
                rows = await pipe.execute()
            return all(r == ["running", f"{trial}-victim"] for r in rows)

        await _until_async(all_running, "the turns to run on the victim", 60)
        survivor.start()
        await _until_async(lambda: heartbeat.last_beat(redis, "worker", f"{trial}-survivor"), "the survivor's heartbeat", 60)
        async with redis.pipeline(transaction=False) as pipe:
            for t in ids:
                pipe.pttl(keys.ARQ_IN_PROGRESS_PREFIX + t)
            left_ms = await pipe.execute()
        killed_at = time.time()
        victim.kill()
        release()

        async def taken_over() -> list[Any] | None:
            async with redis.pipeline(transaction=False) as pipe:
                for t in ids:
                    pipe.hmget(keys.turn(t), "attempts", "started_at")
                    pipe.lindex(keys.turn_errors(t), 0)
                rows = await pipe.execute()
            pairs = list(zip(rows[::2], rows[1::2]))
            return pairs if all(int(a or 0) >= 2 and lost for (a, _), lost in pairs) else None

        rows = await _until_async(taken_over, "the survivor to take every turn over", 300)
        out = []
        for ((_, started), lost), left in zip(rows, left_ms):
            noticed = datetime.fromisoformat(json.loads(lost)["at"]).timestamp() - killed_at
            again = datetime.fromisoformat(started).timestamp() - killed_at
            out.append({"takeover_s": again, "noticed_s": noticed, "lease_left_s": left / 1000,
                        "pickup_s": noticed - left / 1000})
        return out
    finally:
        victim.kill()
        survivor.kill()
        await redis.aclose()


def bench_sigkill(kills: int, turns: int, base: Path, backlog: int = 0, tag: str = "idle") -> list[dict[str, float]]:
    """Section 8: ``kills`` kills, each of a worker running ``turns`` turns, default lease and
    poll delay; each kill on its own private Redis."""
    from tests.llm_server import LLMServer
    from turnfleet.settings import WorkerProcessSettings

    lease_s = WorkerProcessSettings().turn_lease_s
    samples: list[dict[str, float]] = []
    with LLMServer(latency=0.2 if backlog else 0.0) as llm:
        for k in range(kills):
            llm.hold(match="(held)")
            with PrivateRedis(base) as server:
                env = llm.worker_env(worker_env(server.url, base / "state"), TURNFLEET_MODEL_TIMEOUT_S="300")
                samples += asyncio.run(_sigkill_trial(server.url, env, base, f"{tag}{k}", turns, lease_s,
                                                      backlog, llm.release))
            print(f"[sigkill {tag}] kill {k + 1}/{kills}: max takeover "
                  f"{max(x['takeover_s'] for x in samples):.2f} s", file=sys.stderr, flush=True)
        llm.release()
    return samples


def sigkill_lines(runs: dict[str, list[dict[str, float]]], kills: dict[str, int], turns: int,
                  backlog: int, note: str = "") -> list[str]:
    from turnfleet.settings import WorkerProcessSettings

    s = WorkerProcessSettings()

    def row(label: str, values: list[float]) -> str:
        return (f"| {label} | {len(values)} | {percentile(values, 50):.2f} | {percentile(values, 95):.2f} | "
                f"{max(values):.2f} |")

    lines = [
        "## 8. After a SIGKILL: time until the turn runs again",
        "",
        f"A worker running {turns} turns (model calls held at the local OpenAI-compatible server, "
        f"started within {s.turn_lease_s / 3:.2f} s, so their lease renewals are spread over "
        "the renewal period) is SIGKILLed while a second worker polls, and the held calls are "
        "released; per turn: the lease left at the kill (PTTL of its in-progress key), the time "
        "from the kill to the second worker's `START` finding the turn lost (its `WorkerLost` "
        "record), split into the lease that was left and the pickup after it lapsed, and the time "
        "from the kill to the turn's next attempt (`started_at`): since issue 13 the lost turns are "
        "suspects and run again in the isolated lane, one at a time, once the survivor's running "
        f"turns have ended (workers/isolation.py). Defaults: lease {s.turn_lease_s:g} s, "
        f"renewed every {s.turn_lease_s / 3:.2f} s, poll delay {s.poll_delay_s:g} s. 'busy' runs the "
        f"same with {backlog} more turns queued (model calls 0.2 s each), so the second worker "
        f"has all {s.max_jobs} of its slots taken when the lease lapses. " + note,
        "",
        "| survivor | measure | turns | p50 s | p95 s | max s |",
        "|---|---|---|---|---|---|",
    ]
    for name, samples in runs.items():
        for label, key in (("kill → loss noticed", "noticed_s"), ("lease left at the kill", "lease_left_s"),
                           ("lapse → noticed (pickup)", "pickup_s"),
                           ("kill → runs again (isolated lane)", "takeover_s")):
            lines.append(row(f"{name} ({kills[name]} kills) | {label}", [x[key] for x in samples]))
    lease_left = [x["lease_left_s"] for name in runs for x in runs[name]]
    pickups = {name: max(x["pickup_s"] for x in samples) for name, samples in runs.items()}
    lines += [
        "",
        f"Where the time goes. The lease left at the kill is at most the lease (max "
        f"{max(lease_left):.2f} s here) and at least two thirds of it (the last renewal was at most "
        "a third of a lease before the kill): that is the bound the lease gives. After it lapses, "
        "the turn's job is still in `arq:queue` with its old score, so it is first in line at the "
        "next read of a worker with a free slot: an idle worker takes it at its next poll "
        f"(pickup max {pickups.get('idle', 0):.2f} s). A worker with every slot taken does not read "
        "the queue; arq's `start_jobs` works through the ids it read last (up to 5 × max_jobs, "
        "running ones included), waiting for a slot before each, and the lapsed turn is seen only "
        f"at the read after that (pickup max {pickups.get('busy', 0):.2f} s here). So the bound is "
        "the lease plus the time until some worker has a free slot and reads the queue again: "
        "the same wait any queued turn has on a saturated fleet. The lost turns then run again "
        f"alone, one after the other ({turns} of them here): the last one starts after the "
        "others have run, and on a busy survivor only after its running turns have ended.",
        "",
    ]
    return lines


def section(base: Path, quick: bool, note: str = "") -> list[str]:
    """The section's table: kills of an idle worker and of a busy one (a backlog queued)."""
    kills = {"busy": 1} if quick else {"idle": 2, "busy": 2}
    runs = {name: bench_sigkill(k, KILL_TURNS, base, KILL_BACKLOG if name == "busy" else 0, name)
            for name, k in kills.items()}
    return sigkill_lines(runs, kills, KILL_TURNS, KILL_BACKLOG, note)
