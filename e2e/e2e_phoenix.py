"""``make e2e-phoenix``: the OTLP export as a real Arize Phoenix reads it back.

1. starts ``phoenix serve`` from its own venv (``.venv-phoenix``) in a temporary working dir
   (``PHOENIX_WORKING_DIR``) on free HTTP and gRPC ports, ready when ``/healthz`` answers;
2. runs the Support Desk on a fleet of real processes: an embedded ``redis-server``,
   ``turnfleet worker --burst`` talking to the local OpenAI-compatible server of
   ``tests/llm_server.py`` (which fails one request of a turn with a 500, so that turn is
   retried, and every request of another, so it ends failed) with
   ``TURNFLEET_OTLP_ENDPOINT=<phoenix>/v1/traces`` and
   ``OTEL_RESOURCE_ATTRIBUTES=openinference.project.name=<project>``: once on gpt-4o-mini,
   once on a self-hosted model only turnfleet's price table knows, once on gpt-4o-mini over
   the Responses API (``TURNFLEET_MODEL_API=responses``: the SDK's ``response`` spans, not
   ``generation`` spans; one of its turns fails too); then ``turnfleet telemetry --burst``
   for turnfleet's own figures;
3. waits for the export to land: the burst worker flushes its OTLP queue when it exits, and
   Phoenix inserts what it received in the background, so the driver polls Phoenix's span
   count until it reaches what the worker exported (every kept record in the trace store:
   its spans plus the attempt's root);
4. reads Phoenix back through its client (``e2e/phoenix_read.py``, run in Phoenix's venv) and
   prints one PASS/FAIL line per check (``check``). Exit 0 only when every check passes; 2 when Phoenix
   or the fleet cannot run (one line, no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import structlog

from tests.console_scenario import process_env
from tests.llm_server import LLMServer
from turnfleet import keys
from turnfleet.connection import connect
from turnfleet.models import TurnResult
from turnfleet.producer import Producer
from turnfleet.shell.embedded import RedisServer, free_port
from turnfleet.shell.fleet import FleetProcess

PROJECT = "turnfleet-e2e"
MODEL = "gpt-4o-mini"  # priced in turnfleet's table, so every call has a cost
CARD, EMAIL = "4242 4242 4242 4242", "dana.whitfield@example.com"
RETRIED_TEXT = f"Please refund order 1042, it was charged twice to my card {CARD}. Send the receipt to {EMAIL}"
FAILED_TEXT = "Is my order 1044 on its way?"
MAX_ATTEMPTS = 2
# (conversation id, customer, turns): several turns each; one retried turn (PII in it), one
# failed turn, refunds, a handoff to a human, an off-topic question the guardrail stops.
CONVERSATIONS: list[tuple[str, str, list[str]]] = [
    ("e2e-dana", "C-100", [
        "Hi, I'm Dana Whitfield, customer C-100.",
        RETRIED_TEXT,
        "Where is order 1043?",
    ]),
    ("e2e-erin", "C-101", [
        "Hello, this is Erin.",
        FAILED_TEXT,
        "Can I get a refund for order 1045?",
    ]),
    ("e2e-aiko", "C-104", [
        "Hello, this is Aiko Tanaka.",
        "What's the status of order 1052?",
        "I want a refund for order 1052.",
        "What's the weather going to be like in Paris tomorrow?",
        "Please escalate this to a manager.",
    ]),
]
# Run by a second worker on a model no receiver knows the price of (turnfleet's price table
# has it through TURNFLEET_PRICES): whose cost does Phoenix show?
SELF_HOSTED = "acme-selfhosted-8b"
PRICES = json.dumps({SELF_HOSTED: {"input": 0.2, "cached_input": 0.1, "output": 0.6}})
SELF_HOSTED_CONVERSATIONS: list[tuple[str, str, list[str]]] = [
    ("e2e-sam", "C-102", [
        "Hi, this is Sam.",
        "I'd like a refund for order 1047, the headphones stopped working.",
    ]),
]
# Run by a third worker on the Responses API (TURNFLEET_MODEL_API=responses), gpt-4o-mini: its
# model calls must read as the chat ones do; its second turn fails on every attempt.
RESPONSES_FAILED_TEXT = "Has order 1046 shipped yet?"
RESPONSES_CONVERSATIONS: list[tuple[str, str, list[str]]] = [
    ("e2e-rui", "C-103", [
        "Hi, I'm Rui.",
        RESPONSES_FAILED_TEXT,
        "I want a refund for order 1049, it arrived broken.",
    ]),
]
STARTUP_S = 240.0  # Phoenix's first start migrates its database: slow on a busy machine
LANDING_S = 120.0


class CannotRun(Exception):
    """Phoenix or the fleet could not run: one line for the user, exit 2."""


# --------------------------------------------------------------------------------------------
# Phoenix


@dataclass
class Phoenix:
    venv: Path
    workdir: Path
    port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "phoenix.log"

    def start(self) -> None:
        binary = self.venv / "bin" / "phoenix"
        if not binary.exists():
            raise CannotRun(f"Phoenix cannot start: {binary} is missing (make e2e-phoenix installs it)")
        env = {**os.environ, "PHOENIX_WORKING_DIR": str(self.workdir / "phoenix"),
               "PHOENIX_HOST": "127.0.0.1", "PHOENIX_PORT": str(self.port),
               "PHOENIX_GRPC_PORT": str(self.grpc_port), "PHOENIX_TELEMETRY_ENABLED": "false"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([str(binary), "serve"], env=env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + STARTUP_S
        while True:  # another process: poll its HTTP port until it answers
            if self.process.poll() is not None:
                raise CannotRun(f"Phoenix cannot start: `phoenix serve` exited with {self.process.returncode}"
                                f" ({self.last_log_line()}); see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise CannotRun(f"Phoenix cannot start: no answer on {self.url} in {STARTUP_S:.0f} s;"
                                f" see {self.log_path}")
            time.sleep(0.5)

    def last_log_line(self) -> str:
        lines = [line.strip() for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1][:200] if lines else "no output"

    def version(self) -> str:
        return httpx.get(f"{self.url}/arize_phoenix_version", timeout=10).text.strip()

    def read(self, count: bool = False) -> Any:
        """The project as Phoenix's client reads it (``e2e/phoenix_read.py``)."""
        reader = Path(__file__).with_name("phoenix_read.py")
        args = [str(self.venv / "bin" / "python"), str(reader), self.url, PROJECT]
        done = subprocess.run(args + (["--count"] if count else []), capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise CannotRun(f"reading Phoenix back failed: {last}")
        return json.loads(done.stdout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


# --------------------------------------------------------------------------------------------
# The fleet


@dataclass
class Ran:
    """What the fleet did, by turnfleet's own account."""

    turns: dict[str, list[str]] = field(default_factory=dict)  # conversation -> turn ids, in order
    customers: dict[str, str] = field(default_factory=dict)  # conversation -> customer
    results: dict[str, TurnResult] = field(default_factory=dict)
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)  # turn id -> telemetry's turn_stats
    conversation_figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    exported_spans: int = 0  # every kept attempt record's spans + its root
    retried: str = ""
    failed: str = ""
    failed_responses: str = ""
    responses: set[str] = field(default_factory=set)  # conversations run on the Responses API

    def attempts(self, conversation_id: str) -> int:
        return sum(self.results[t].attempts for t in self.turns[conversation_id])

    def all_turns(self) -> list[str]:
        return [t for tids in self.turns.values() for t in tids]


def fleet_env(redis_url: str, workdir: Path) -> dict[str, str]:
    """The processes' environment: the tests' (nothing of the caller's turnfleet settings), and
    none of the caller's OpenTelemetry settings either."""
    env = process_env(redis_url, workdir / "state")
    return {k: v for k, v in env.items() if not k.startswith("OTEL_")}


def burst(verb: str, env: dict[str, str], log: Path) -> None:
    proc = FleetProcess(verb, [verb, "--burst"], env, log).start()
    code = proc.wait(600)
    if code != 0:
        raise CannotRun(f"turnfleet {verb} --burst exited with {code}; see {log}")


async def _enqueue(redis_url: str, batch: list[dict[str, Any]]) -> None:
    async with Producer(redis_url) as producer:
        await producer.enqueue_turns(batch)


async def _read_back(redis_url: str, ran: Ran) -> None:
    """turnfleet's own account: results, telemetry's figures, what the trace store kept."""
    from turnfleet.telemetry.stats import conversation_stats, turn_stats

    redis = connect(redis_url)
    try:
        async with Producer(redis=redis) as producer:
            for cid, tids in ran.turns.items():
                ran.conversation_figures[cid] = await conversation_stats(redis, cid)
                for tid in tids:
                    ran.results[tid] = await producer.result(tid)
                    ran.figures[tid] = await turn_stats(redis, tid)
                    for raw in await redis.lrange(keys.trace(tid), 0, -1):
                        ran.exported_spans += len(json.loads(raw)["spans"]) + 1
    finally:
        await redis.aclose()


def _batch(ran: Ran, conversations: list[tuple[str, str, list[str]]]) -> list[dict[str, Any]]:
    batch = []
    for cid, customer, texts in conversations:
        ran.turns[cid], ran.customers[cid] = [], customer
        for i, text in enumerate(texts, 1):
            tid = f"{cid}-t{i}"
            ran.turns[cid].append(tid)
            ran.retried = tid if text == RETRIED_TEXT else ran.retried
            ran.failed = tid if text == FAILED_TEXT else ran.failed
            ran.failed_responses = tid if text == RESPONSES_FAILED_TEXT else ran.failed_responses
            batch.append({"conversation_id": cid, "customer_id": customer, "text": text, "turn_id": tid})
    return batch


def run_fleet(redis_url: str, otlp_endpoint: str, workdir: Path) -> Ran:
    """The conversations through burst workers exporting to Phoenix, then telemetry; what ran."""
    ran = Ran()
    env = {**fleet_env(redis_url, workdir), "TURNFLEET_PRICES": PRICES}
    llm = LLMServer().start()
    try:
        llm.inject("500", times=1, match=RETRIED_TEXT[:40])  # attempt 1 fails, attempt 2 answers
        llm.inject("500", times=None, match=FAILED_TEXT)  # every attempt fails: the turn fails
        llm.inject("500", times=None, match=RESPONSES_FAILED_TEXT)
        for model, api, conversations in ((MODEL, "chat", CONVERSATIONS),
                                          (SELF_HOSTED, "chat", SELF_HOSTED_CONVERSATIONS),
                                          (MODEL, "responses", RESPONSES_CONVERSATIONS)):
            asyncio.run(_enqueue(redis_url, _batch(ran, conversations)))
            if api == "responses":
                ran.responses |= {cid for cid, _, _ in conversations}
            burst("worker", llm.worker_env(
                env, model=model, TURNFLEET_MODEL_API=api, TURNFLEET_MODEL_MAX_RETRIES="0",
                TURNFLEET_RETRY_DELAY_S="0.05",
                TURNFLEET_MAX_ATTEMPTS=str(MAX_ATTEMPTS), TURNFLEET_TRACE_SAMPLE_RATE="1",
                TURNFLEET_OTLP_ENDPOINT=otlp_endpoint,
                OTEL_RESOURCE_ATTRIBUTES=f"openinference.project.name={PROJECT}",
            ), workdir / f"worker-{model}-{api}.log")
    finally:
        llm.stop()
    burst("telemetry", env, workdir / "telemetry.log")
    asyncio.run(_read_back(redis_url, ran))
    return ran


def wait_landed(phoenix: Phoenix, expected: int) -> tuple[int, float]:
    """Poll Phoenix's span count until it reaches ``expected`` (or stops short at the deadline)."""
    started = time.monotonic()
    seen = -1
    while time.monotonic() - started < LANDING_S:
        seen = phoenix.read(count=True)
        if seen >= expected:
            break
        time.sleep(0.5)
    return seen, time.monotonic() - started


# --------------------------------------------------------------------------------------------
# The checks


class Checks:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.failed = 0

    def __call__(self, name: str, ok: bool, figures: str) -> None:
        self.failed += not ok
        line = f"{'PASS' if ok else 'FAIL'}  {name}: {figures}"
        self.lines.append(line)
        print(line, flush=True)


def attrs(span: dict[str, Any]) -> dict[str, Any]:
    """A span's attributes flattened to dotted keys (Phoenix's REST API nests some)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            out[prefix] = value

    walk("", span.get("attributes") or {})
    return out


def leaves(value: Any) -> Iterator[str]:
    """Every string inside ``value`` (attributes, events, status)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for inner in value.values():
            yield from leaves(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from leaves(inner)


class Seen:
    """What Phoenix returned, indexed: spans by id (attributes flattened), by trace, roots by turn."""

    def __init__(self, read: dict[str, Any]) -> None:
        self.spans: list[dict[str, Any]] = read["spans"]
        self.sessions = {s["session_id"]: s for s in read["sessions"]}
        self.session_turns: dict[str, list[dict[str, Any]]] = read["session_turns"]
        self.pages: dict[str, dict[str, Any]] = read.get("session_pages") or {}
        self.flat = {s["context"]["span_id"]: attrs(s) for s in self.spans}
        self.by_trace: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for span in self.spans:
            self.by_trace[span["context"]["trace_id"]].append(span)
        self.roots = [s for s in self.spans if not s.get("parent_id")]
        self.turn_of_trace = {s["context"]["trace_id"]: self.attr(s, "turnfleet.turn_id") for s in self.roots}
        self.roots_of_turn: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for root in sorted(self.roots, key=lambda r: self.attr(r, "turnfleet.attempt") or 0):
            self.roots_of_turn[self.attr(root, "turnfleet.turn_id")].append(root)

    def attr(self, span: dict[str, Any], key: str) -> Any:
        return self.flat[span["context"]["span_id"]].get(key)

    def has(self, span: dict[str, Any], prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.flat[span["context"]["span_id"]])

    def turn(self, span: dict[str, Any]) -> str | None:
        return self.turn_of_trace.get(span["context"]["trace_id"])

    def conversation(self, span: dict[str, Any]) -> str | None:
        """The span's conversation: its trace root's ``session.id`` (the root alone carries it)."""
        roots = [r for r in self.by_trace[span["context"]["trace_id"]] if not r.get("parent_id")]
        return self.attr(roots[0], "session.id") if roots else None

    def final(self, span: dict[str, Any]) -> bool:
        """Whether the span belongs to its turn's last attempt."""
        roots = self.by_trace[span["context"]["trace_id"]]
        return any(self.attr(r, "turnfleet.attempt.final") for r in roots if not r.get("parent_id"))


def check_sessions(seen: Seen, ran: Ran, checks: Checks) -> None:
    traces = {sid: {t["trace_id"] for t in s["traces"]} for sid, s in seen.sessions.items()}
    complete = [cid for cid, tids in ran.turns.items()
                if {seen.turn_of_trace.get(t) for t in traces.get(cid, ())} == set(tids)
                and len(traces[cid]) == ran.attempts(cid)]
    checks("one session per conversation, all its turns",
           set(seen.sessions) == set(ran.turns) and len(complete) == len(ran.turns),
           f"{len(seen.sessions)} sessions for {len(ran.turns)} conversations; "
           + ", ".join(f"{cid}: {len(traces.get(cid, ()))} traces = {len(tids)} turns + "
                       f"{ran.attempts(cid) - len(tids)} extra attempts" for cid, tids in ran.turns.items()))


def check_turn_io(seen: Seen, ran: Ran, checks: Checks) -> None:
    """The session page: each trace's root's input.value / output.value."""
    shown_in = shown_out = expected_out = 0
    wrong: list[str] = []
    for cid in ran.turns:
        for turn in seen.session_turns.get(cid, []):
            tid = seen.turn_of_trace.get(turn["trace_id"])
            result = ran.results.get(tid)
            text = (turn.get("input") or {}).get("value")
            answer = (turn.get("output") or {}).get("value")
            shown_in += bool(text)
            if result is None or not text or CARD in text or EMAIL in text:
                wrong.append(f"{tid} input")
                continue
            if attrs(turn.get("root_span") or {}).get("turnfleet.attempt.final") and result.status == "completed":
                expected_out += 1
                shown_out += answer == result.final_output
                if answer != result.final_output:
                    wrong.append(f"{tid} output")
    retried = [(t.get("input") or {}).get("value") or "" for turns in seen.session_turns.values() for t in turns
               if seen.turn_of_trace.get(t["trace_id"]) == ran.retried]
    redacted = bool(retried) and all("[REDACTED:card]" in v and "[REDACTED:email]" in v for v in retried)
    attempts = sum(ran.attempts(cid) for cid in ran.turns)
    checks("turn text and answer on the session page (root input.value / output.value), redacted",
           not wrong and shown_in == attempts and shown_out == expected_out and redacted,
           f"{shown_in}/{attempts} attempts show the turn's text, {shown_out}/{expected_out} completed turns "
           f"their answer (= turnfleet's final_output); retried turn's text: "
           f"{'…' + retried[0][-64:] if retried else 'missing'}" + (f"; wrong: {', '.join(wrong)}" if wrong else ""))


def check_model_calls(seen: Seen, ran: Ran, checks: Checks) -> None:
    llm = [s for s in seen.spans if s["span_kind"] == "LLM"]
    answered = [s for s in llm if s["status_code"] != "ERROR"]
    failed = [s for s in llm if s["status_code"] == "ERROR"]
    with_messages = [s for s in answered if seen.has(s, "llm.input_messages.") and seen.has(s, "llm.output_messages.")]
    # A failed call shows what it was sent and no output; on the Responses API the SDK records
    # no input for a call that got no Response, so there the call shows its cause only.
    failed_shown = [s for s in failed if seen.attr(s, "output.value") is None
                    and (seen.has(s, "llm.input_messages.") or seen.conversation(s) in ran.responses)
                    and "500" in (s.get("status_message") or "")]
    models = Counter(seen.attr(s, "llm.model_name") for s in llm)
    checks("model calls: llm.input_messages / llm.output_messages, model name",
           bool(answered) and len(with_messages) == len(answered) and len(failed_shown) == len(failed)
           and {MODEL, SELF_HOSTED} <= set(models) <= {MODEL, SELF_HOSTED, None},
           f"{len(with_messages)}/{len(answered)} answered calls carry both; {len(failed_shown)}/{len(failed)} "
           f"failed calls no output and their cause (chat: and their input); models {dict(models)}")

    tokens_ok = cost_ok = 0
    rows = []
    for tid in ran.all_turns():
        calls = [seen.flat[s["context"]["span_id"]] for s in answered if seen.turn(s) == tid]
        prompt = sum(int(a.get("llm.token_count.prompt") or 0) for a in calls)
        completion = sum(int(a.get("llm.token_count.completion") or 0) for a in calls)
        cost = sum(float(a.get("llm.cost.total") or 0) for a in calls)
        figures = ran.figures.get(tid, {})
        ours = (int(figures.get("input_tokens") or 0), int(figures.get("output_tokens") or 0))
        ours_cost = float(figures.get("cost_usd") or 0)
        ok_tokens = (prompt, completion) == ours
        ok_cost = all("llm.cost.total" in a for a in calls) and abs(cost - ours_cost) < 1e-12
        tokens_ok += ok_tokens
        cost_ok += ok_cost
        if not (ok_tokens and ok_cost):
            rows.append(f"{tid}: Phoenix {prompt}/{completion} ${cost:.8f}, turnfleet {ours[0]}/{ours[1]} ${ours_cost:.8f}")
    turns = ran.all_turns()
    total_in = sum(int(ran.figures[t].get("input_tokens") or 0) for t in turns)
    total_out = sum(int(ran.figures[t].get("output_tokens") or 0) for t in turns)
    total_cost = sum(float(ran.figures[t].get("cost_usd") or 0) for t in turns)
    detail = f"; {'; '.join(rows)}" if rows else ""
    checks("model calls: token counts equal turnfleet's, per turn", tokens_ok == len(turns),
           f"{tokens_ok}/{len(turns)} turns equal ({total_in} in / {total_out} out in all){detail}")
    checks("model calls: cost (llm.cost.total) on every answered call, equal to turnfleet's, per turn",
           cost_ok == len(turns), f"{cost_ok}/{len(turns)} turns equal (${total_cost:.6f} in all){detail}")


def check_responses_api(seen: Seen, ran: Ran, checks: Checks) -> None:
    """The Responses API worker's model calls read as the chat ones: model, provider, response
    id, messages (the agent's instructions first), turnfleet's cost; its failed turn's calls
    and roots show the cause."""
    calls = [s for s in seen.spans if s["span_kind"] == "LLM" and seen.conversation(s) in ran.responses]
    answered = [s for s in calls if s["status_code"] != "ERROR"]
    full = [s for s in answered
            if seen.attr(s, "llm.model_name") == seen.attr(s, "gen_ai.request.model")
            == seen.attr(s, "gen_ai.response.model") == MODEL
            and seen.attr(s, "llm.provider") == "openai" and seen.attr(s, "gen_ai.response.id")
            and seen.attr(s, "llm.input_messages.0.message.role") == "system"
            and seen.has(s, "llm.output_messages.") and seen.attr(s, "output.value")
            and "llm.cost.total" in seen.flat[s["context"]["span_id"]]
            and seen.attr(s, "llm.token_count.prompt") is not None]
    failed = [s for s in calls if s["status_code"] == "ERROR"]
    causes = [s.get("status_message") or "" for s in failed]
    roots = [(r["status_code"], r.get("status_message", ""), [e["name"] for e in r.get("events") or []])
             for r in seen.roots_of_turn.get(ran.failed_responses, [])]
    ok_failed = (ran.results[ran.failed_responses].status == "failed" and len(failed) == MAX_ATTEMPTS
                 and all("Error code: 500" in c for c in causes) and len(roots) == MAX_ATTEMPTS
                 and all(code == "ERROR" and "InternalServerError" in m and "exception" in e for code, m, e in roots))
    checks("Responses API (TURNFLEET_MODEL_API=responses): model calls carry model, provider, response id, "
           "messages, tokens and cost like chat ones; the failed call shows its cause",
           bool(answered) and len(full) == len(answered) and ok_failed,
           f"{len(full)}/{len(answered)} answered calls complete (e.g. {answered[0]['name'] if answered else '-'!r}, "
           f"output {str(seen.attr(answered[0], 'output.value') if answered else None)[:48]!r}); "
           f"{ran.failed_responses}: {len(failed)} failed calls {causes[:1]!r}, roots "
           + "; ".join(f"{c} {m!r} events {e}" for c, m, e in roots[:1]))


def check_sessions_list(seen: Seen, ran: Ran, checks: Checks) -> None:
    """Phoenix's own aggregates per session (GraphQL): what its sessions list shows."""
    ok_count, rows = 0, []
    for cid, tids in ran.turns.items():
        page = seen.pages.get(cid) or {}
        ours = ran.conversation_figures.get(cid, {})
        answers = [ran.results[t].final_output for t in tids if ran.results[t].status == "completed"]
        usage = page.get("tokenUsage") or {}
        ok = (page.get("numTraces") == ran.attempts(cid)
              and page.get("userId") == ran.customers[cid]
              and (page.get("firstInput") or {}).get("value") == ran.results[tids[0]].text
              and (page.get("lastOutput") or {}).get("value") == (answers[-1] if answers else None)
              and (usage.get("prompt"), usage.get("completion"))
              == (int(ours.get("input_tokens") or 0), int(ours.get("output_tokens") or 0)))
        ok_count += ok
        if not ok:
            rows.append(f"{cid}: {json.dumps(page)[:300]} vs turnfleet {ours}")
    checks("sessions list: traces, user, first input, last output, tokens per conversation",
           ok_count == len(ran.turns),
           f"{ok_count}/{len(ran.turns)} conversations equal turnfleet's" + (f"; {'; '.join(rows)}" if rows else ""))

    unpriced = {cid for cid, _, _ in SELF_HOSTED_CONVERSATIONS}
    costs = [(cid, ((seen.pages.get(cid) or {}).get("costSummary") or {}).get("total", {}).get("cost"),
              float(ran.conversation_figures.get(cid, {}).get("cost_usd") or 0)) for cid in ran.turns]
    checks(f"cost column: Phoenix prices calls by its own model table (equal for {MODEL}; $0 for "
           f"{SELF_HOSTED}, whose turnfleet cost is in llm.cost.total only)",
           all(shown is not None and abs(shown - ours) < 1e-9 for cid, shown, ours in costs if cid not in unpriced)
           and all(not shown and ours > 0 for cid, shown, ours in costs if cid in unpriced),
           "; ".join(f"{cid}: Phoenix {'$%.6f' % shown if shown is not None else 'none'}, turnfleet ${ours:.6f}"
                     for cid, shown, ours in costs))


def check_tools_and_agents(seen: Seen, ran: Ran, checks: Checks) -> None:
    """Tools: name, arguments and result of every call, equal to turnfleet's (final attempts)."""
    tools = [s for s in seen.spans if s["span_kind"] == "TOOL" and not s["name"].startswith("handoff")]
    with_io = [s for s in tools if seen.attr(s, "input.value") is not None and seen.attr(s, "output.value") is not None]
    shown = Counter((seen.turn(s), seen.attr(s, "tool.name"), seen.attr(s, "input.value"), seen.attr(s, "output.value"))
                    for s in tools if seen.final(s))
    ours = Counter((tid, c.tool, c.arguments, c.output) for tid in ran.all_turns() for c in ran.results[tid].tool_calls)
    names = Counter(seen.attr(s, "tool.name") for s in tools)
    checks("tool spans with arguments and results",
           bool(tools) and len(with_io) == len(tools) and shown == ours,
           f"{len(with_io)}/{len(tools)} tool spans carry input.value and output.value ({dict(names)}); "
           f"final attempts' calls (name, arguments, result) {'equal' if shown == ours else 'differ from'} "
           f"turnfleet's {sum(ours.values())}")

    agents = Counter(seen.attr(s, "agent.name") for s in seen.spans if s["span_kind"] == "AGENT")
    handoffs = Counter((seen.turn(s), seen.attr(s, "turnfleet.handoff.from_agent"), seen.attr(s, "turnfleet.handoff.to_agent"))
                       for s in seen.spans if s["name"].startswith("handoff") and seen.final(s))
    ours_handoffs = Counter((tid, h.from_agent, h.to_agent) for tid in ran.all_turns() for h in ran.results[tid].handoffs)
    checks("agent spans and the handoff",
           bool(agents) and None not in agents and handoffs == ours_handoffs and sum(handoffs.values()) > 0,
           f"agents {dict(agents)}; final attempts' handoffs "
           f"{dict(Counter(f'{a} → {b}' for (_, a, b) in handoffs.elements()))} "
           f"{'equal' if handoffs == ours_handoffs else 'differ from'} turnfleet's {sum(ours_handoffs.values())}")


def check_structure(seen: Seen, ran: Ran, checks: Checks) -> None:
    orphans = [s for s in seen.spans if s.get("parent_id") and s["parent_id"] not in seen.flat]
    one_root = all(sum(not s.get("parent_id") for s in group) == 1 for group in seen.by_trace.values())
    attempts = sum(ran.attempts(cid) for cid in ran.turns)
    marks = [(seen.attr(r, "turnfleet.attempt"), seen.attr(r, "turnfleet.attempt.final"))
             for r in seen.roots_of_turn.get(ran.retried, [])]
    checks("structure: one root per attempt, no orphans, the retried turn's attempts marked",
           one_root and len(seen.roots) == attempts and not orphans and marks == [(1, False), (2, True)]
           and len(seen.spans) == ran.exported_spans,
           f"{len(seen.by_trace)} traces, {len(seen.roots)} roots for {attempts} attempts, {len(orphans)} orphans, "
           f"{len(seen.spans)} spans (exported {ran.exported_spans}); {ran.retried} (attempt, final): {marks}")


def check_failure(seen: Seen, ran: Ran, checks: Checks) -> None:
    causes = [(r["status_code"], r.get("status_message", ""), [e["name"] for e in r.get("events") or []])
              for r in seen.roots_of_turn.get(ran.failed, [])]
    checks("failure cause on the failed attempts' roots",
           ran.results[ran.failed].status == "failed" and len(causes) == MAX_ATTEMPTS
           and all(code == "ERROR" and "InternalServerError" in message and "500" in message and "exception" in events
                   for code, message, events in causes),
           f"{ran.failed}: {len(causes)} attempts, " + "; ".join(f"{c} {m!r} events {e}" for c, m, e in causes[:1]))


def check_redaction(seen: Seen, ran: Ran, checks: Checks) -> None:
    raw = (CARD, CARD.replace(" ", ""), EMAIL)
    leaked = [s["name"] for s in seen.spans
              if any(r in v for v in leaves([s.get("attributes"), s.get("events"), s.get("status_message")]) for r in raw)]
    marked = sum(any("[REDACTED:" in v for v in leaves(s.get("attributes"))) for s in seen.spans)
    checks("redaction: no raw card number or e-mail in any span attribute or event",
           not leaked and marked > 0, f"{len(leaked)} spans leak; {marked} spans carry a [REDACTED:…] mark")


CHECKS = (check_sessions, check_turn_io, check_model_calls, check_responses_api, check_sessions_list,
          check_tools_and_agents, check_structure, check_failure, check_redaction)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="e2e-phoenix", description=__doc__.splitlines()[0])
    parser.add_argument("--phoenix-venv", type=Path, default=Path(".venv-phoenix"))
    parser.add_argument("--keep", action="store_true", help="keep the working dir (logs, Phoenix's db)")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    started = time.monotonic()
    keep = say_kept = args.keep  # and on any failure, for its logs
    workdir = Path(tempfile.mkdtemp(prefix="turnfleet-e2e-phoenix-"))
    phoenix = Phoenix(args.phoenix_venv.resolve(), workdir)
    redis = RedisServer(workdir / "redis")
    try:
        phoenix.start()
        version = phoenix.version()
        print(f"Phoenix {version} on {phoenix.url} (project {PROJECT}), up in {time.monotonic() - started:.0f} s",
              flush=True)
        redis.start()
        ran = run_fleet(redis.url, f"{phoenix.url}/v1/traces", workdir)
        statuses = Counter(r.status for r in ran.results.values())
        print(f"fleet: {len(ran.results)} turns in {len(ran.turns)} conversations {dict(statuses)}, "
              f"{sum(r.attempts for r in ran.results.values())} attempts, {ran.exported_spans} spans exported",
              flush=True)
        landed, waited = wait_landed(phoenix, ran.exported_spans)
        print(f"landed: {landed}/{ran.exported_spans} spans in Phoenix after {waited:.1f} s of polling its span count",
              flush=True)
        checks = Checks()
        seen = Seen(phoenix.read())
        for run_check in CHECKS:
            run_check(seen, ran, checks)
        took = time.monotonic() - started
        verdict = "all checks pass" if not checks.failed else f"{checks.failed} of {len(checks.lines)} checks FAIL"
        print(f"e2e-phoenix: {verdict} against Phoenix {version} in {took:.0f} s", flush=True)
        keep = say_kept = keep or bool(checks.failed)
        return 1 if checks.failed else 0
    except CannotRun as exc:
        keep, say_kept = True, False  # the one line names the log
        print(f"e2e-phoenix: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, httpx.HTTPError, subprocess.SubprocessError) as exc:
        keep, say_kept = True, False
        print(f"e2e-phoenix: could not run: {type(exc).__name__}: {exc} (logs in {workdir})", file=sys.stderr)
        return 2
    finally:
        phoenix.stop()
        redis.kill()
        if say_kept:
            print(f"e2e-phoenix: logs and Phoenix's database kept in {workdir}", file=sys.stderr)
        if not keep or not any(workdir.iterdir()):
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
