"""Section 14: observability's CPU per turn beside the peers', and the OTLP bytes per turn (issues 19, 18).

The same Support Desk turn (offline model, ``Where is order 1043?``: Triage → handoff to
Orders → ``lookup_order`` → answer) is run ``turns`` times, one at a time, in a fresh process
per variant: the instrumentations patch globals (the SDK's trace provider and processors,
OpenTelemetry's tracer provider) that cannot be undone in-process. Each process runs a
warm-up, flushes its exporter, then reads its own CPU time (``resource.getrusage``: user +
sys, every thread, so the exporters' background threads count), runs the measured turns,
flushes again (the export of those turns is inside the window) and reads it again.

Variants (``VARIANTS``): (a) tracing off (and, for reference, the SDK's spans built with no
processor); (b) the SDK's tracing with its own exporter
(``BackendSpanExporter`` in its ``BatchTraceProcessor``) posting to the local receiver; (c)
OpenInference's instrumentation → OpenTelemetry ``BatchSpanProcessor`` → OTLP/HTTP; (d)
Logfire's ``instrument_openai_agents`` → OTLP/HTTP (``send_to_logfire=False``); (e) what a
turnfleet worker does around a run for observability (telemetry hooks, the trace buffer as the
SDK's only processor, the trace store: sampling, redaction, and the redacted telemetry batch,
both written with the turn's result); (f) (e) plus the OTLP export (``OtlpSink``) to the local
receiver. Every variant ends a turn by writing its result with one script call
(``Variant.finish``), as any queue-based runner does; (e) and (f) add the trace record and the
telemetry batch to that call, as the worker's finish script does.

The peers' packages are bench-only: the processes run from ``.venv-peers`` (``make
bench-tools`` builds it: this project with ``-c constraints.txt`` plus the peers, pinned in the
Makefile). The receiver is a small HTTP server in the parent process answering 200 and counting
the bodies it gets; nothing leaves loopback. ``python -m bench.peers child --variant e
--turns 2000`` runs one process alone (its own Redis and receiver), e.g. under py-spy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.common import CUSTOMER, ROOT, TEXT, PrivateRedis, col, interleave, stats

PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
VARIANTS = {
    "a": "(a) tracing off",
    "s": "for reference: SDK tracing on, spans built, no processor",
    "b": "(b) SDK tracing, its own exporter (`BackendSpanExporter`)",
    "c": "(c) OpenInference → OTel `BatchSpanProcessor` → OTLP/HTTP",
    "d": "(d) Logfire `instrument_openai_agents` → OTLP/HTTP",
    "e": "(e) turnfleet: hooks + trace store + redaction + telemetry batch",
    "f": "(f) (e) + turnfleet's OTLP export (`OtlpSink`)",
}
EXPORTING = ("b", "c", "d", "f")  # variants that send to the receiver
NEEDS = {"c": "openinference.instrumentation.openai_agents", "d": "logfire"}  # a peer's module
WARMUP = 20


# -- the receiver ------------------------------------------------------------------------------


class Receiver:
    """A local HTTP endpoint answering 200 to every POST, counting requests and body bytes.

    ``GET /count`` answers the totals so far as JSON (a child reads it around its window).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the exporters' clients expect

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with receiver.lock:
                    receiver.requests += 1
                    receiver.bytes += len(body)
                self._answer(b"", "application/x-protobuf")

            def do_GET(self) -> None:  # noqa: N802
                with receiver.lock:
                    totals = {"requests": receiver.requests, "bytes": receiver.bytes}
                self._answer(json.dumps(totals).encode(), "application/json")

            def _answer(self, body: bytes, content_type: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="bench-receiver", daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def receiver_totals(url: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{url}/count", timeout=10) as answer:
        return json.loads(answer.read())


# -- one variant, in its own process ------------------------------------------------------------


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


# What a turn's end writes in every variant (``Variant.finish``): the result; in (e)/(f) also the
# kept trace record and the telemetry batch, as the worker's finish script adds them.
FINISH = (Path(__file__).parent / "peers_finish.lua").read_text()


class Variant:
    """What one variant sets up, how it runs a turn, and how it flushes its export."""

    def __init__(self, name: str, redis: Any, receiver: str) -> None:
        from agents import set_trace_processors

        from turnfleet.workers.model import OfflineModel
        from turnfleet.workers.support_desk import builtin_app

        self.name = name
        self.redis = redis
        self.finish_script = redis.register_script(FINISH)
        self.app = builtin_app(OfflineModel())
        self.workflow = self.app.workflows[0]
        self.agent = self.workflow.starting_agent(None)
        self.flushes: list[Any] = []
        self.store: Any = None
        self.redactor: Any = None
        if name in ("a", "s"):
            set_trace_processors([])
        elif name == "b":
            from agents.tracing.processors import default_exporter, default_processor

            exporter = default_exporter()  # what the SDK registers by default, as it is
            exporter.endpoint = f"{receiver}/v1/traces/ingest"
            # Against api.openai.com the exporter sanitizes each item (field sizes, usage keys);
            # it skips that for any other endpoint. Keep it: it is what the exporter costs.
            exporter._should_sanitize_for_openai_tracing_api = lambda: True  # type: ignore[method-assign]
            set_trace_processors([default_processor()])
            self.flushes.append(default_processor().force_flush)
        elif name == "c":
            from openinference.instrumentation.openai_agents import OpenAIAgentsInstrumentor
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider = TracerProvider(resource=Resource.create({"service.name": "bench-peers"}))
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver}/v1/traces")))
            OpenAIAgentsInstrumentor().instrument(tracer_provider=provider)  # replaces the SDK's processors
            self.flushes.append(provider.force_flush)
        elif name == "d":
            import logfire

            set_trace_processors([])  # Logfire's spans only, not the SDK's exporter as well
            os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = f"{receiver}/v1/traces"
            logfire.configure(send_to_logfire=False, console=False, service_name="bench-peers")
            logfire.instrument_openai_agents()
            self.flushes.append(logfire.force_flush)
        elif name in ("e", "f"):
            self._turnfleet(receiver if name == "f" else None)
        else:
            raise ValueError(f"unknown variant {name!r}")

    def _turnfleet(self, receiver: str | None) -> None:
        """The worker's objects (workers/settings.py ``startup``), assembled the same way."""
        from agents import set_trace_processors

        from turnfleet import registry
        from turnfleet.redaction import redactor_for
        from turnfleet.settings import WorkerProcessSettings
        from turnfleet.workers.otlp import OtlpSink
        from turnfleet.workers.trace_store import TraceBuffer, TraceSampler, TraceStore

        settings = WorkerProcessSettings(
            trace_sample_rate=1.0, **({"otlp_endpoint": f"{receiver}/v1/traces"} if receiver else {}))
        self.settings = settings
        served = registry.registrations(self.app.workflows)
        self.redactor = redactor_for(settings, [p for r in served for p in r.redaction_patterns])
        buffer = TraceBuffer(max_spans=settings.trace_buffer_spans)
        set_trace_processors([buffer])
        sink = OtlpSink.from_settings(settings)
        if sink is not None:
            self.flushes.append(sink.force_flush)
        self.store = TraceStore(buffer, self.redis,
                                TraceSampler(settings.trace_sample_rate, settings.trace_keep_slower_than_ms),
                                self.redactor, settings.trace_retention_s, sink,
                                {w.name: w.trace_processors for w in self.app.workflows})

    def flush(self) -> None:
        for flush in self.flushes:
            flush()

    async def turn(self, i: int) -> None:
        from agents import RunConfig, Runner

        from turnfleet.context import TurnContext

        conv = f"bench-peers-{os.getpid()}-{i}"
        ctx = TurnContext(turn_id=f"t-{conv}", conversation_id=conv, customer_id=CUSTOMER, attempt=1,
                          redis=self.redis, workflow=self.workflow.name)
        if self.store is not None:
            await self._turnfleet_turn(ctx)
            return
        cfg = RunConfig(tracing_disabled=self.name == "a", workflow_name=self.workflow.trace_name,
                        group_id=conv)
        result = await Runner.run(self.agent, TEXT, context=ctx, run_config=cfg)
        assert result.final_output
        await self.finish(ctx.turn_id, str(result.final_output))

    async def finish(self, turn_id: str, output: str, trace: str = "", batch: str = "") -> None:
        """The turn's result written, as any queue-based runner ends a turn: one script call in
        every variant. (e) and (f) add the trace record and the telemetry batch to it, as the
        worker's finish script does (``turnfleet/lua/finish.lua``): bytes, not round trips."""
        await self.finish_script(keys=[f"bench:result:{turn_id}", f"bench:trace:{turn_id}", "bench:telemetry"],
                                 args=[json.dumps({"turn_id": turn_id, "output": output}), 3600, trace, 3600, batch])

    async def _turnfleet_turn(self, ctx: Any) -> None:
        """What ``workers/attempt.py`` does around ``Runner.run`` for telemetry and tracing
        (not the queue: no START, lease, memory or finish script)."""
        from agents import RunConfig, Runner, flush_traces, trace

        from turnfleet.models import utcnow
        from turnfleet.workers.hooks import TelemetryHooks

        settings, name = self.settings, self.workflow.trace_name
        started_at = utcnow()
        hooks = TelemetryHooks(turn_id=ctx.turn_id, attempt=1, conversation_id=ctx.conversation_id,
                               customer_id=CUSTOMER, model_name="turnfleet-offline", redactor=self.redactor,
                               include_data=settings.trace_include_sensitive_data)
        hooks.turn_started(0.0, self.agent.name, model=hooks.model_of(self.agent))
        t0 = time.perf_counter()
        try:
            with trace(name, group_id=ctx.conversation_id,
                       metadata={"customer_id": CUSTOMER, "turn_id": ctx.turn_id, "attempt": "1",
                                 "channel": ""}) as current:
                ran = await Runner.run(self.agent, TEXT, context=ctx, hooks=hooks,
                                       max_turns=settings.max_agent_turns,
                                       run_config=RunConfig(workflow_name=name, group_id=ctx.conversation_id,
                                                            trace_include_sensitive_data=True))
        finally:
            flush_traces()
        duration_ms = (time.perf_counter() - t0) * 1000
        final = str(ran.final_output)
        turn = {"turn_id": ctx.turn_id, "attempt": 1, "final": True, "conversation_id": ctx.conversation_id,
                "customer_id": CUSTOMER, "status": "completed", "started_at": started_at.isoformat(),
                "ended_at": utcnow().isoformat(), "input": TEXT, "output": final}
        kept, dropped = self.store.prepare(current.trace_id, turn, failed=False, duration_ms=duration_ms,
                                           workflow=self.workflow.name)
        assert kept is not None  # sample rate 1.0
        hooks.spans_dropped(dropped)
        hooks.turn_completed(duration_ms, 0.0, final)
        await self.finish(ctx.turn_id, final, kept.json, hooks.batch_json())  # one call, as the worker's
        self.store.written(kept)  # then the OTLP sink (f) and the team's processors


async def run_child(variant: str, turns: int, warmup: int, redis_url: str, receiver: str) -> dict[str, float]:
    from redis.asyncio import Redis

    from turnfleet.startup_heap import freeze_startup_heap

    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-dummy")  # (b)'s exporter wants one; nothing is sent out
    redis = Redis.from_url(redis_url)
    v = Variant(variant, redis, receiver)
    for i in range(warmup):
        await v.turn(-1 - i)
    v.flush()
    # As a worker does at startup (turnfleet/startup_heap.py), in every variant: the heap built so
    # far (the SDK, the instrumentation, ~210k objects) is never garbage. Unfrozen, one full
    # collection walks it (~130 ms here) whenever the allocation count says so: one or none fell
    # into a 200-turn window, ±0.7 ms a turn by luck, more often in the variants that allocate
    # more (issue 19: most of the noise of (f) − (e)).
    freeze_startup_heap()
    before = receiver_totals(receiver)
    redis_cpu0 = await _redis_cpu(redis)
    cpu0 = cpu_seconds()
    for i in range(turns):
        await v.turn(i)
    v.flush()
    cpu = cpu_seconds() - cpu0
    redis_cpu = await _redis_cpu(redis) - redis_cpu0
    after = receiver_totals(receiver)
    await redis.aclose()
    return {"cpu_ms_turn": cpu / turns * 1000, "redis_cpu_us_turn": redis_cpu / turns * 1e6,
            "bytes_turn": (after["bytes"] - before["bytes"]) / turns,
            "posts": float(after["requests"] - before["requests"])}


async def _redis_cpu(redis: Any) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def child_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peers child")
    ap.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    ap.add_argument("--turns", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=WARMUP)
    ap.add_argument("--redis", help="Redis URL (default: a private redis-server of its own)")
    ap.add_argument("--receiver", help="receiver URL (default: one in this process)")
    args = ap.parse_args(argv)
    import contextlib
    import tempfile

    from turnfleet.logging import configure_logging

    configure_logging("WARNING")  # as the bench's own process; the worker's INFO logs no per-call line either
    with contextlib.ExitStack() as stack:
        redis_url = args.redis or stack.enter_context(
            PrivateRedis(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-peers-"))))).url
        receiver = args.receiver or stack.enter_context(Receiver()).url
        out = asyncio.run(run_child(args.variant, args.turns, args.warmup, redis_url, receiver))
    print(json.dumps(out))
    return 0


# -- the parent: processes interleaved, the table ----------------------------------------------


def available() -> dict[str, str | None]:
    """Per variant: None when it can run, else why not (the peers' venv or package missing)."""
    if not PEERS_PYTHON.exists():
        return {v: "not run: .venv-peers is missing (`make bench-tools` builds it)"
                for v in VARIANTS}
    probe = ("import importlib.util, json, sys\n"
             "def found(m):\n"
             "    try: return importlib.util.find_spec(m) is not None\n"
             "    except ImportError: return False\n"  # a parent package missing
             "print(json.dumps({m: found(m) for m in sys.argv[1:]}))")
    found = json.loads(subprocess.run([str(PEERS_PYTHON), "-c", probe, *NEEDS.values()], capture_output=True,
                                      text=True, check=True, cwd=ROOT).stdout)
    return {v: None if found.get(NEEDS.get(v, ""), True) else
            f"not run: `{NEEDS[v]}` is not in .venv-peers (`make bench-tools` says whether it installs "
            "beside our pins)" for v in VARIANTS}


def peer_versions() -> dict[str, str]:
    code = ("import json\nfrom importlib import metadata\nout = {}\n"
            "for d in ('openai-agents', 'openinference-instrumentation-openai-agents', 'openinference-instrumentation', "
            "'logfire', 'opentelemetry-sdk', 'opentelemetry-exporter-otlp-proto-http'):\n"
            "    try: out[d] = metadata.version(d)\n"
            "    except metadata.PackageNotFoundError: out[d] = 'not installed'\n"
            "print(json.dumps(out))")
    done = subprocess.run([str(PEERS_PYTHON), "-c", code], capture_output=True, text=True, cwd=ROOT)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def run_variant(variant: str, turns: int, redis_url: str, receiver: str, log: Path,
                profile: Path | None = None) -> dict[str, float]:
    """One variant's process; under ``py-spy record`` into ``profile`` when given."""
    from bench.profile import RATE, py_spy

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": "sk-bench-dummy"}
    for name in list(env):  # nothing of the parent's telemetry settings leaks into a variant
        if name.startswith(("OTEL_", "LOGFIRE_", "TURNFLEET_")):
            del env[name]
    cmd = [str(PEERS_PYTHON), "-m", "bench.peers", "child", "--variant", variant, "--turns", str(turns),
           "--redis", redis_url, "--receiver", receiver]
    if profile is not None:
        cmd = [py_spy() or "py-spy", "record", "-r", str(RATE), "-f", "raw", "-o", str(profile), "--", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"peers ({variant}): exited {done.returncode}:\n{done.stderr[-2000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


# Where (e)'s and (f)'s CPU goes: each on-CPU sample goes to the first part its stack belongs to
# (most specific first); the rest is the agent run itself, the event loop and redis-py.


def _calls(*names: str) -> Any:
    return lambda frames: any(f.startswith(names) for f in frames)


def _in(*paths: str) -> Any:
    return lambda frames: any(p in f for f in frames for p in paths)


PROFILE_PARTS: list[tuple[str, Any]] = [
    ("OTLP: the sender's thread (batching, the POST)",
     _calls("OtlpSink._run ", "BatchProcessor.worker ")),  # ours; OpenTelemetry's BatchSpanProcessor thread
    ("OTLP: record → OTLP protobuf bytes (`OtlpSink.export`)", _calls("OtlpSink.export ")),
    ("trace store: redacting the record (`redact_record`)", _calls("redact_record ")),
    ("trace store: the record's JSON (`TraceStore.prepare`)", _calls("TraceStore.prepare ")),
    ("the result write, with (e)'s trace record and batch (`Variant.finish`)", _calls("Variant.finish ")),
    ("telemetry batch (`batch_json`: event export, redaction, JSON)", _calls("TelemetryHooks.batch_json ")),
    ("hooks: events built during the run", _in("workers/hooks.py", "turnfleet/events.py")),
    ("trace store: buffer callbacks (`TraceBuffer.on_*`), sampling", _in("workers/trace_store.py")),
    ("the SDK's spans (agents/tracing/)", _in("agents/tracing/")),
]
REST = "the rest: the agent run, the event loop, redis-py"
IDLE = ("select (", "_PollLikeSelector.select ", "EpollSelector.select ", "Condition.wait ", "Event.wait ")
STARTUP = ("_find_and_load", "_call_with_frames_removed")


def profile_split(raw: str, turns: int) -> dict[str, float]:
    """CPU µs per turn by part, from py-spy's raw output (samples while not idle / rate)."""
    from bench.profile import RATE

    out: dict[str, float] = {}
    for line in raw.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        if frames[-1].startswith(IDLE) or any(f.startswith(STARTUP) for f in frames):
            continue
        part = next((label for label, belongs in PROFILE_PARTS if belongs(frames)), REST)
        out[part] = out.get(part, 0.0) + int(n)
    return {k: v / RATE / turns * 1e6 for k, v in out.items()}


Profiles = dict[str, dict[str, float]]  # variant -> part -> CPU µs per turn


def bench_peers(base: Path, turns: int, reps: int, profile_turns: int) -> tuple[
        dict[str, list[dict[str, float]]], dict[str, str], Profiles]:
    """The interleaved reps, what could not run and why, and (with py-spy) one profiled process
    of (e) and of (f) after them."""
    from bench.profile import py_spy

    why_not = available()
    runnable = [v for v in VARIANTS if why_not[v] is None]
    skipped = {v: why for v, why in why_not.items() if why is not None}
    profiles: Profiles = {}
    # Each process gets a fresh redis-server of its own, so none runs against what the earlier
    # ones left (their traces, an AOF growing ~3 MB a process and fsynced every second). What
    # made (f) − (e) read ~2 ms a turn across processes was mostly not the export (~0.55 ms
    # paired in one process: blocks of turns with the sink on and off, alternated): a full
    # collection falling into the window or not (see run_child) and the machine's load.
    with Receiver() as receiver:
        def run(v: str, n: int, log: Path, raw: Path | None = None) -> dict[str, float]:
            with PrivateRedis(base) as server:
                return run_variant(v, n, server.url, receiver.url, log, raw)

        runs = interleave(reps, {
            v: (lambda v: lambda r: run(v, turns, base / "logs" / f"peers-{v}-{r}.log"))(v)
            for v in runnable}, "peers")
        if py_spy() is not None:
            for v in (v for v in ("e", "f") if v in runnable):
                raw = base / f"peers-{v}.raw"
                run(v, profile_turns, base / "logs" / f"peers-{v}-spy.log", raw)
                profiles[v] = profile_split(raw.read_text(), profile_turns + WARMUP)
    return runs, skipped, profiles


def peers_lines(runs: dict[str, list[dict[str, float]]], skipped: dict[str, str], turns: int, reps: int,
                versions: dict[str, str], profiles: Profiles, profile_turns: int, note: str = "") -> list[str]:
    off = col(runs["a"], "cpu_ms_turn") if "a" in runs else []

    def extra(v: str) -> list[float]:
        return [c - o for c, o in zip(col(runs[v], "cpu_ms_turn"), off)]

    def signed(values: list[float]) -> str:
        if not values:
            return "n/a"
        med = statistics.median(values)
        return f"{med:+.2f} ({min(values):+.2f} to {max(values):+.2f})"

    rows = []
    for v, label in VARIANTS.items():
        if v in skipped:
            rows.append(f"| {label} | {skipped[v]} | | | |")
            continue
        r = runs[v]
        bytes_cell = (f"{stats(col(r, 'bytes_turn'))} ({statistics.median(col(r, 'posts')):.0f} posts)"
                      if v in EXPORTING else "–")
        rows.append(f"| {label} | {stats(col(r, 'cpu_ms_turn'))} | {'0' if v == 'a' else signed(extra(v))} | "
                    f"{bytes_cell} | {stats(col(r, 'redis_cpu_us_turn'))} |")
    goals: list[str] = []
    missed: set[str] = set()
    if all(v in runs for v in ("a", "b", "e")):
        e, b = statistics.median(extra("e")), statistics.median(extra("b"))
        if e > b:
            missed.add("e")
        goals.append(f"(e) adds no more CPU than the SDK's own exporter (b): {e:+.2f} vs {b:+.2f} ms a turn, "
                     f"{'met' if e <= b else '**missed**'}")
    if all(v in runs for v in ("a", "c", "f")):
        f, c = statistics.median(extra("f")), statistics.median(extra("c"))
        if f >= c / 2:
            missed.add("f")
        goals.append(f"(f) adds less than half of OpenInference's (c): {f:+.2f} vs {c / 2:+.2f} "
                     f"(half of {c:+.2f}) ms a turn, {'met' if f < c / 2 else '**missed**'}")
    pins = ", ".join(f"{d} {v}" for d, v in versions.items()) or "versions unknown"
    lines = [
        "## 14. Observability's CPU per turn, side by side with the peers (issues 19 and 18)",
        "",
        f"The same Support Desk turn in every variant: the offline model, `{TEXT}` from {CUSTOMER} "
        "(Triage → handoff to Orders → `lookup_order` → answer: 2 model calls, 1 tool call), one turn "
        f"at a time (`bench/peers.py`). Each variant runs in a **fresh process** (the "
        f"instrumentations patch globals that cannot be undone in-process) with a fresh redis-server "
        f"of its own, {reps} reps, the variants "
        f"interleaved (rep 1 of each, then rep 2, ...); a process runs {WARMUP} warm-up turns and "
        f"flushes its exporter, then {turns} measured turns and a final flush (their export is inside "
        "the window). CPU per turn is the process's CPU time over that window "
        "(`resource.getrusage`, user + sys, all threads: the exporters' background threads count) ÷ "
        "turns; 'over (a)' subtracts the same rep's (a). Bytes per turn are the request bodies a "
        "local HTTP receiver (in the bench's process, answering 200; its own CPU is not counted) got "
        "during the window ÷ turns: this replaces the one-off export measurement of issue 18. "
        "redis-server CPU per turn (INFO cpu over the window) shows what (e)'s trace write costs "
        "Redis (the tool reads Redis in every variant).",
        "",
        "- (a) `RunConfig(tracing_disabled=True)`, no processor. The reference row below it: "
        "tracing on, `set_trace_processors([])` (the SDK's spans built, nothing exports them).",
        "- (b) the SDK's default `BatchTraceProcessor` + `BackendSpanExporter` (as a user gets it "
        "with `OPENAI_API_KEY` set), its endpoint pointed at the receiver, sanitizing its items as "
        "it does for api.openai.com (it skips that for other endpoints).",
        "- (c) `OpenAIAgentsInstrumentor().instrument(tracer_provider=...)` (it replaces the SDK's "
        "processors) with an OpenTelemetry `TracerProvider` + `BatchSpanProcessor` + "
        "`OTLPSpanExporter` (protobuf over HTTP): what Phoenix and Langfuse users run.",
        "- (d) `logfire.configure(send_to_logfire=False, console=False)` with "
        "`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` at the receiver (Logfire adds a `BatchSpanProcessor` "
        "+ OTLP exporter for it; its scrubbing on, as by default), then "
        "`logfire.instrument_openai_agents()`; the SDK's own processors emptied so only Logfire's "
        "spans are made and sent.",
        "- (e) what a worker does around a run for observability (`workers/settings.py` startup, "
        "`workers/attempt.py`), assembled from the same objects: `TelemetryHooks` with the "
        "worker's redactor, `TraceBuffer` as the SDK's only processor, the run in a `trace(...)` "
        "with the worker's metadata, then `TraceStore.prepare` (sample rate 1.0: every turn "
        "kept; redaction of the record; its JSON) and the redacted telemetry batch (`batch_json`), "
        "both added to the turn's result write, as the worker's finish script takes them. Every "
        "variant ends a turn with that result write (one script call: SET of the result; in (e) "
        "and (f) also RPUSH + EXPIRE of the record and XADD of the batch), so what (e) adds is "
        "bytes in a call, not a round trip. Not the queue: no START, lease or memory.",
        "- (f) (e) with `OtlpSink.from_settings` (`TURNFLEET_OTLP_ENDPOINT` at the receiver): each "
        "kept record converted (OpenInference + GenAI attributes, messages, cost) straight to OTLP "
        "protobuf bytes (`workers/otlp_wire.py`: no OpenTelemetry span objects, no encoder) and "
        "POSTed in batches by one background thread.",
        "",
        f"Processes run from `.venv-peers` (`make bench-tools`: the project with `-c constraints.txt` "
        f"plus the peers, bench-only, never runtime dependencies): {pins}. " + note,
        "",
        "| variant | CPU ms per turn | over (a), ms per turn | OTLP/export bytes per turn (posts in the window) | "
        "redis-server CPU µs per turn |",
        "|---|---|---|---|---|",
        *rows,
        "",
        *(f"- Goal: {g}." for g in goals),
        "",
        "Measured the same way once before issue 19 (200 turns × 5 reps, over tracing off at 3.16 ms): "
        "SDK spans with no processor +0.18 ms, the SDK's exporter +0.60, OpenInference → OTLP "
        "+2.58, Logfire → OTLP +5.32, turnfleet's path (e) +1.30.",
        "",
        "What each change bought (issue 19; by thread CPU time of the function in one process on this "
        "turn's record, old and new interleaved, or by this table): the OTLP request written as "
        "protobuf bytes straight from the kept record by one sender thread (`workers/otlp_wire.py`, "
        "no OpenTelemetry span objects or encoder: the export ~1.4 → ~0.55 ms a turn), then each "
        "distinct message JSON-encoded once a record (a call's input repeats the earlier calls'), "
        "the parts of agent, handoff and guardrail spans and a model's settings remembered as bytes "
        "by value, a request one join (~0.42 → ~0.18 ms); `redact_record` passing the SDK's ids and "
        "times by shape, walking by exact type, copying dicts whose keys stay whole, remembering JSON "
        "strings as texts (~200 → ~90 µs); the telemetry batch by orjson unless a hook passed a NaN "
        "(~110 → ~20 µs); the hooks' usage summed as counts, events with only numbers not copied, "
        "timestamps from `time_ns` (~34 → ~26 µs for a turn's 15 hook calls); the result write "
        "carrying the record and the batch (no round trip of their own). Not kept: caches keyed on "
        "a call's token counts (every bench turn has the same counts; production calls rarely do).",
        "",
    ]
    if profiles:
        parts = [label for label, _ in PROFILE_PARTS] + [REST]
        have = [v for v in ("e", "f") if v in profiles]
        lines += [
            "### 14b. Where (e)'s and (f)'s CPU goes",
            "",
            f"One more process of each, {profile_turns} turns (+ {WARMUP} warm-up), under `py-spy record` "
            "(bench/profile.py's rate): samples taken while a thread is on the CPU (idle waits in "
            "`select` and `Condition.wait` left out, imports too) ÷ rate ÷ turns. Each sample goes "
            "to the first part its stack belongs to, in the order below. py-spy slows the process, "
            "so the sums run above the table's figures; read the parts against each other.",
            "",
            "| part | " + " | ".join(f"({v}) µs per turn" for v in have) + " |",
            "|---|" + "---|" * len(have),
            *[f"| {p} | " + " | ".join(f"{profiles[v].get(p, 0):,.0f}" for v in have) + " |" for p in parts],
            "| **all** | " + " | ".join(f"{sum(profiles[v].values()):,.0f}" for v in have) + " |",
            "",
        ]
    if "e" in missed:
        lines += [
            "(e) over the SDK's exporter: the parts above are what turnfleet adds to the SDK's spans "
            "(which (b) pays too). The trace store writes each kept attempt's record (~13 kB of JSON, "
            "uncompressed, JSON by orjson), added with the telemetry batch to the turn's result write as "
            "the worker's finish script takes them: what it costs the worker is those bytes on the "
            "socket, and redis-server pays the RPUSH, the XADD and their AOF write (the last column). `redact_record` runs "
            "the detectors over the content (span data, metadata, errors, the turn's text and ids), "
            "not over the SDK's own ids and timestamps; the hooks' events are redacted and encoded "
            "once a turn, as one batch.",
            "",
        ]
    if "f" in missed:
        ratio = statistics.median(col(runs["f"], "bytes_turn")) / statistics.median(col(runs["c"], "bytes_turn"))
        lines += [
            f"(f) against OpenInference: `OtlpSink` sends {ratio:.1f}× OpenInference's bytes for the same "
            "turn (the turn-wide attributes are on the root only and each model call's messages "
            "go once, in the GenAI form). What is left is the conversion in the turn "
            "(`OtlpSink.export`: the attributes, then their protobuf bytes), which grows with the "
            "number of attributes (14b).",
            "",
        ]
    return lines


def section(base: Path, quick: bool, note: str = "") -> list[str]:
    # The profiled processes run longer than the measured ones: at bench/profile.py's rate a
    # part of ~50 µs a turn got ~6 samples in 600 turns, and (e) and (f) read 2× apart in parts
    # they do alike (issue 19: the buffer's callbacks, 48 vs 105 µs; ~50 µs each in one process,
    # by thread CPU time). A higher rate would slow the process more (py-spy pauses it per sample).
    turns, reps, profile_turns = (60, 3, 600) if quick else (200, 5, 3000)
    runs, skipped, profiles = bench_peers(base, turns, reps, profile_turns)
    versions = peer_versions() if PEERS_PYTHON.exists() else {}
    return peers_lines(runs, skipped, turns, reps, versions, profiles, profile_turns, note)


if __name__ == "__main__":
    if sys.argv[1:2] != ["child"]:
        sys.exit("usage: python -m bench.peers child --variant a|s|b|c|d|e|f [--turns N] (the section: "
                 "python -m bench.run --only peers)")
    sys.exit(child_main(sys.argv[2:]))
