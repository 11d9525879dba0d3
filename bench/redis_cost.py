"""Where redis-server's CPU and bytes per turn go (issue 19's two Redis goals): a profile.

One burst worker drains ``n`` pre-enqueued turns (sample rate 1.0, the Support Desk's checks
included) on a private ``redis-server`` with its SLOWLOG recording every command
(``slowlog-log-slower-than 0``); then one burst consumer aggregates the stream the same way.
Each entry's execution time is summed per command, and per script for ``EVALSHA`` (named from
the SHA1 of every ``.lua`` file the product loads), ÷ turns. The SLOWLOG times a command's
execution only: reading and parsing the request, writing the reply and the AOF are the rest of
``INFO cpu``, shown beside it. Recording every command costs redis-server CPU itself, so this
runs apart from the tables whose figures are the goals' (5, 7).

Bytes: the stored trace records (``tf:trace:*``) split by span type and field, the events
timelines (``tf:events:*``) split into the fields every event repeats and the rest, and what
zlib (level 1) would make of both, with the CPU it would cost the worker to compress them.
``python -m bench.run --only redis_cost`` runs it alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import zlib
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any

from bench.common import PrivateRedis, conv_turns, consume, enqueue_all, fmt, redis_cpu, worker_env
from turnfleet.shell.fleet import FleetProcess

SLOWLOG_LEN = 1_000_000
PACKAGES = ("turnfleet", "turnfleet.workers", "turnfleet.telemetry")
REPEATED = ("event_id", "turn_id", "attempt", "conversation_id", "customer_id")  # the same in every event of a batch
TOP = 12
INNER = 3  # a script's costliest inner commands shown


def script_names() -> dict[str, str]:
    """SHA1 of every product script's loaded body -> its name (``package:name``)."""
    from turnfleet.scripts import load_script

    out: dict[str, str] = {}
    for package in PACKAGES:
        folder = resources.files(package).joinpath("lua")
        for entry in folder.iterdir():
            if entry.name.endswith(".lua"):
                script = load_script(entry.name.removesuffix(".lua"), package)
                out[hashlib.sha1(script.body.encode()).hexdigest()] = entry.name.removesuffix(".lua")
    return out


def _slowlog_start(url: str) -> None:
    from redis import Redis

    r = Redis.from_url(url)
    r.config_set("slowlog-max-len", SLOWLOG_LEN)
    r.config_set("slowlog-log-slower-than", 0)
    r.slowlog_reset()
    r.close()


def _slowlog_take(url: str, names: dict[str, str]) -> dict[str, dict[str, list[float]]]:
    """name -> {"": [calls, µs], inner command -> [calls, µs]} over the SLOWLOG since the last
    take (which it resets). Redis 6 logs the commands a script calls too (client ``?:0``), just
    before the script's own entry, whose time includes theirs: they go under their script."""
    from redis import Redis

    r = Redis.from_url(url)
    entries = r.execute_command("SLOWLOG", "GET", SLOWLOG_LEN)
    r.slowlog_reset()
    r.close()
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    inner: list[tuple[str, float]] = []
    for entry in sorted(entries, key=lambda e: e[0]):
        duration, args, client = entry[2], entry[3], entry[4]
        command = args[0].decode().upper() if args else "?"
        if client == b"?:0":
            inner.append((command, duration))
            continue
        if command in ("SLOWLOG", "CONFIG", "INFO"):
            inner.clear()
            continue  # this module's own
        if command == "EVALSHA" and len(args) > 1:
            sha = args[1].decode()
            command = f"script {names.get(sha, 'other ' + sha[:8])}"
        elif command == "EVAL":
            command = "EVAL (inline script)"
        row = out[command]
        row[""][0] += 1
        row[""][1] += duration
        for name, us in inner:
            row[name][0] += 1
            row[name][1] += us
        inner.clear()
    return {k: dict(v) for k, v in out.items()}


def _trace_split(records: list[bytes]) -> dict[str, float]:
    """Bytes of the stored trace records (compact JSON as stored) by span type and field."""
    parts: dict[str, float] = defaultdict(float)
    for raw in records:
        rec = json.loads(raw)
        for r in rec if isinstance(rec, list) else [rec]:
            parts["trace header"] += len(json.dumps(r.get("trace"), separators=(",", ":")))
            for span in r.get("spans", []):
                data = span.get("span_data") or {}
                kind = data.get("type", "?")
                size = len(json.dumps(span, separators=(",", ":")))
                body = 0
                for field, value in data.items():
                    if field == "type":
                        continue
                    n = len(json.dumps(value, separators=(",", ":")))
                    body += n
                    if kind == "generation" and field in ("input", "output", "model_config", "usage"):
                        parts[f"generation spans: {field}"] += n
                    else:
                        parts[f"{kind} spans: data"] += n
                parts["every span: ids, times, error, keys"] += size - body
    return dict(parts)


def _events_split(batches: list[bytes]) -> dict[str, float]:
    parts: dict[str, float] = defaultdict(float)
    for raw in batches:
        events = json.loads(raw)
        for ev in events if isinstance(events, list) else []:
            for field, value in ev.items():
                n = len(json.dumps(value, separators=(",", ":"))) + len(field) + 4
                parts["fields every event repeats (" + ", ".join(REPEATED) + ")" if field in REPEATED
                      else "nulls" if value is None else field if field in ("detail", "usage", "ts") else "the rest"] += n
    return dict(parts)


def _zlib(blobs: list[bytes]) -> tuple[int, int, float]:
    """(raw bytes, zlib level-1 bytes, CPU s to compress them)."""
    c0 = time.process_time()
    packed = sum(len(zlib.compress(b, 1)) for b in blobs)
    return sum(len(b) for b in blobs), packed, time.process_time() - c0


async def _stored(url: str) -> tuple[list[bytes], list[bytes]]:
    from redis.asyncio import Redis

    r = Redis.from_url(url)
    traces: list[bytes] = []
    batches: list[bytes] = []
    async for key in r.scan_iter(match="tf:trace:*", count=1000):
        traces += await r.lrange(key, 0, -1)
    async for key in r.scan_iter(match="tf:events:*", count=1000):
        batches += list((await r.hgetall(key)).values())
    await r.aclose()
    return traces, batches


def measure(n: int, base: Path) -> dict[str, Any]:
    names = script_names()
    with PrivateRedis(base) as server:
        url = server.url
        ids = asyncio.run(enqueue_all(url, conv_turns(n, "rcost")))
        _slowlog_start(url)
        cpu0 = redis_cpu(url)
        proc = FleetProcess("rcost", ["worker", "--burst"], worker_env(url, base / "state"),
                            base / "logs" / "rcost.log").start()
        try:
            rc = proc.wait(900)
        finally:
            proc.kill()
        if rc != 0:
            raise RuntimeError(f"redis cost: worker exited {rc}:\n{proc.output()[-2000:]}")
        cpu1 = redis_cpu(url)
        drain = _slowlog_take(url, names)
        asyncio.run(consume(url))
        cpu2 = redis_cpu(url)
        consumer = _slowlog_take(url, names)
        traces, batches = asyncio.run(_stored(url))
    if len(traces) < n or len(batches) < n:
        raise RuntimeError(f"redis cost: {len(traces)} trace records, {len(batches)} batches for {n} turns")
    return {"n": len(ids), "drain": drain, "consumer": consumer,
            "drain_cpu_us": (cpu1 - cpu0) / n * 1e6, "consumer_cpu_us": (cpu2 - cpu1) / n * 1e6,
            "trace": _trace_split(traces), "events": _events_split(batches),
            "trace_zlib": _zlib(traces), "events_zlib": _zlib(batches)}


def _command_rows(stats_: dict[str, dict[str, list[float]]], n: int, cpu_us: float) -> list[str]:
    total = sum(v[""][1] for v in stats_.values())
    rows = sorted(stats_.items(), key=lambda kv: -kv[1][""][1])

    def inside(v: dict[str, list[float]]) -> str:
        calls = sorted(((k, c, us) for k, (c, us) in v.items() if k), key=lambda x: -x[2])
        return ", ".join(f"{k} {fmt(c / n)}× {fmt(us / n)} µs" for k, c, us in calls[:INNER]) or "–"

    out = [f"| {name} | {fmt(v[''][0] / n)} | {fmt(v[''][1] / n)} | {100 * v[''][1] / total:.0f}% | {inside(v)} |"
           for name, v in rows[:TOP]]
    rest = rows[TOP:]
    if rest:
        out.append(f"| {len(rest)} others | {fmt(sum(v[''][0] for _n, v in rest) / n)} | "
                   f"{fmt(sum(v[''][1] for _n, v in rest) / n)} | "
                   f"{100 * sum(v[''][1] for _n, v in rest) / total:.0f}% | |")
    out.append(f"| **all commands' execution** | {fmt(sum(v[''][0] for v in stats_.values()) / n)} | "
               f"**{fmt(total / n)}** | 100% | |")
    out.append(f"| `INFO cpu` over the same run (execution + I/O, parsing, replies, AOF, slowlog) | | "
               f"{fmt(cpu_us)} | | |")
    return out


def lines(m: dict[str, Any]) -> list[str]:
    n = m["n"]
    head = ("| command or script | calls per turn | execution µs per turn | share | inside a script: "
            "its costliest commands (calls, µs per turn) |")
    out = ["**redis-server CPU in the worker's drain** (one worker, tracing at 1.0, checks included):", "",
           head, "|---|---|---|---|---|", *_command_rows(m["drain"], n, m["drain_cpu_us"]), "",
           "**redis-server CPU in the burst consumer's run** (aggregation):", "",
           head, "|---|---|---|---|---|", *_command_rows(m["consumer"], n, m["consumer_cpu_us"]), ""]
    trace_total = sum(m["trace"].values())
    out += [f"**A stored trace record** (JSON as stored, {fmt(trace_total / n)} bytes a turn):", "",
            "| part | bytes per turn | share |", "|---|---|---|"]
    out += [f"| {k} | {fmt(v / n)} | {100 * v / trace_total:.0f}% |"
            for k, v in sorted(m["trace"].items(), key=lambda kv: -kv[1])]
    ev_total = sum(m["events"].values())
    out += ["", f"**An events timeline** (`tf:events:*`, the attempt's telemetry batch as stored, "
            f"{fmt(ev_total / n)} bytes a turn):", "", "| part | bytes per turn | share |", "|---|---|---|"]
    out += [f"| {k} | {fmt(v / n)} | {100 * v / ev_total:.0f}% |"
            for k, v in sorted(m["events"].items(), key=lambda kv: -kv[1])]
    out += ["", "**What zlib (level 1) would make of them** (measured here on the stored values; not "
            "what the product does):", "", "| value | bytes per turn | zlib bytes per turn | ratio | "
            "CPU to compress, µs per turn |", "|---|---|---|---|---|"]
    for label, key in (("trace record", "trace_zlib"), ("events timeline", "events_zlib")):
        raw, packed, cpu = m[key]
        out.append(f"| {label} | {fmt(raw / n)} | {fmt(packed / n)} | {raw / packed:.1f}× | {fmt(cpu / n * 1e6)} |")
    return out + [""]


def explain(m: dict[str, Any]) -> list[str]:
    """What the profile says about the two Redis goals, from its own figures."""
    n, drain = m["n"], m["drain"]
    total = sum(v[""][1] for v in drain.values())
    scripts = {k: v for k, v in drain.items() if k.startswith("script ")}
    in_scripts = sum(v[""][1] for v in scripts.values())
    inner = sum(us for v in scripts.values() for k, (_c, us) in v.items() if k)
    top, top_v = max(drain.items(), key=lambda kv: kv[1][""][1])
    t_raw, t_zip, t_cpu = m["trace_zlib"]
    e_raw, e_zip, e_cpu = m["events_zlib"]
    repeated = next((v for k, v in m["events"].items() if k.startswith("fields every event")), 0.0)
    return [
        f"Read against the goals (redis-server ≤ 300 µs a turn, table 5; ≤ 12 / 6 kB a turn, table 7): "
        f"scripts are {100 * in_scripts / total:.0f}% of the drain's command execution, and the "
        f"commands they call only {100 * inner / max(in_scripts, 1e-9):.0f}% of the scripts' time: the "
        f"rest is the script calls themselves (the Lua run, each `redis.call`'s own overhead, copying "
        f"the arguments: the trace record and the batch travel as arguments). The costliest is `{top}` "
        f"({fmt(top_v[''][1] / n)} µs a turn). Execution is {fmt(total / n)} of the {fmt(m['drain_cpu_us'])} µs "
        f"of `INFO cpu` a turn; the rest is reading requests, replies and the AOF's writes.",
        "",
        f"Bytes: the trace record ({fmt(t_raw / n)} bytes a turn) and the events timeline "
        f"({fmt(e_raw / n)}) are most of table 7's sum; zlib at level 1 would hold them in "
        f"{fmt(t_zip / n)} and {fmt(e_zip / n)} bytes ({fmt((t_raw - t_zip + e_raw - e_zip) / n)} fewer a turn) "
        f"for {fmt((t_cpu + e_cpu) / n * 1e6)} µs of the worker's CPU a turn, which the worker's CPU and "
        f"the side-by-side goals (tables 1d, 14) pay; the fields every event of a batch repeats are "
        f"{fmt(repeated / n)} bytes of the timeline. What was tried for these goals in issue 19: a job "
        "claimed and started in one script, the trace record and memory written by the finish script, "
        "the checks of a poll claimed, read and written as one batch (27.9 → 15.6 commands a turn; "
        "redis-server 525 → ~394 µs a turn). Not done yet: a compressed or compact stored record and "
        "timeline (the replay, rerun, console and OTLP read them: a new stored version, "
        "turnfleet/versions.py), and the claim's walk over jobs already in progress (the `EXISTS` "
        "inside `claim_jobs`).",
        "",
    ]


def section(base: Path, quick: bool, note: str = "") -> list[str]:
    n = 200 if quick else 500
    m = measure(n, base)
    return ["## 16. Where redis-server's CPU and bytes per turn go (issue 19's Redis goals)", "",
            *([note, ""] if note else []),
            f"A profile, one run of {n} turns (not a goal's figure: tables 5 and 7 are). One burst "
            "worker drains them (sample rate 1.0, checks included) on a private `redis-server` whose "
            "SLOWLOG records every command (`slowlog-log-slower-than 0`), then one burst consumer "
            "aggregates the stream. Each entry's execution time is summed per command, and per script "
            "for `EVALSHA` (named from the SHA1 of the product's `.lua` files), ÷ turns. The SLOWLOG "
            "times execution only: reading requests, writing replies and the AOF are the rest of "
            "`INFO cpu`, shown under each table (recording every command costs some CPU too). Bytes: "
            "the stored trace records and events timelines split by part, and what zlib would make "
            "of them. `python -m bench.run --only redis_cost` runs it alone.", "", *lines(m), *explain(m)]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print("\n".join(section(Path(d), True)))
