"""``turnfleet demo``: the Support Desk through the whole fleet, for real.

Starts a telemetry consumer and worker processes (real subprocesses, on the embedded Redis
or ``REDIS_URL``), enqueues five conversations through the producer API (all turns at once:
the fleet keeps each conversation's turns in order), prints each turn as it completes, then
a summary per conversation and the alerts raised. Conversation ids carry a run id, so runs
against a shared Redis do not mix.

Every run works on its own fresh orders: an order is refunded at most once, ever, so a second
run asking to refund order 1047 again would (rightly) be told it was already refunded. The
demo copies the packaged orders its scenario names to new order numbers stored in Redis
(``turnfleet.workers.orderbook.copy_orders``: 1047 becomes 10470001, then 10470002, ...) and asks about
those, so every run shows a real refund. The packaged order book is left as it is.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from turnfleet import heartbeat, keys
from turnfleet.connection import connect
from turnfleet.shell.fleet import FleetProcess, fleet_env
from turnfleet.models import TurnResult
from turnfleet.formatting import money, ms
from turnfleet.shell.render import console, render_alert, turn_headline
from turnfleet.settings import CommonSettings

# (conversation label, customer, turns). Order numbers are in workers/data/orders.json.
SCENARIO: list[tuple[str, str, list[str]]] = [
    ("dana", "C-100", [
        "Hi, I'm Dana Whitfield, customer C-100.",
        "Where is order 1043?",
        "This is taking too long. I want to talk to a human, please.",
    ]),
    ("priya-refund", "C-102", [
        "I'd like a refund for order 1047, the headphones stopped working.",
    ]),
    ("marcus-late-refund", "C-101", [
        "Can I get a refund for order 1045?",
    ]),
    ("tomas-offtopic", "C-103", [
        "What's the weather going to be like in Paris tomorrow?",
    ]),
    ("aiko-long", "C-104", [
        "Hello, this is Aiko Tanaka.",
        "What's the status of order 1052?",
        "I want a refund for order 1052.",
        "OK. Where is order 1051 then?",
        "Can I get my money back for order 1051?",
        "Please escalate this to a manager.",
    ]),
]

_ORDER_NUMBER = re.compile(r"\b\d{4}\b")


def with_orders(text: str, renamed: dict[str, str]) -> str:
    """``text`` with each order number replaced by this run's copy of it."""
    return _ORDER_NUMBER.sub(lambda m: renamed.get(m.group(0), m.group(0)), text)


# Low enough that the long conversation crosses it, so the demo shows a cost alert.
DEMO_CONVERSATION_COST_ALERT_USD = "0.004"


def _summary_table(rows: list[list[str]]) -> Table:
    table = Table(title="Conversations", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    for col, just in [("conversation", "left"), ("turns", "right"), ("agents", "left"),
                      ("tools", "left"), ("tokens in→out", "right"), ("cost", "right"),
                      ("latency avg", "right"), ("status", "left")]:
        table.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for cells in rows:
        table.add_row(*cells)
    return table


async def run_demo(redis_url: str, workers: int = 2, as_json: bool = False) -> int:
    """The scenario, printed for people; ``as_json``: only the summary, on stdout as one JSON
    document (a failure: one JSON error document on stderr, exit 1)."""
    from turnfleet.producer import Producer
    from turnfleet.telemetry.alert_reads import read_alerts
    from turnfleet.telemetry.consumer import caught_up
    from turnfleet.telemetry.stats import conversation_stats, turn_stats
    from turnfleet.workers.orderbook import copy_orders

    out = Console(file=sys.stderr, highlight=False, quiet=True) if as_json else console()
    state_dir = Path(CommonSettings().state_dir)
    run_id = uuid.uuid4().hex[:6]
    log_dir = state_dir / "logs" / f"demo-{run_id}"
    extra = {"TURNFLEET_LOG_FORMAT": "json"}
    if "TURNFLEET_ALERT_CONVERSATION_COST_USD" not in os.environ:
        extra["TURNFLEET_ALERT_CONVERSATION_COST_USD"] = DEMO_CONVERSATION_COST_ALERT_USD
    env = fleet_env(redis_url, extra)
    procs = [FleetProcess("telemetry", ["telemetry"], env, log_dir / "telemetry.log")]
    procs += [
        FleetProcess(f"worker-{i}", ["worker"], {**env, "TURNFLEET_WORKER_NAME": f"demo-worker-{i}"},
                     log_dir / f"worker-{i}.log")
        for i in range(1, workers + 1)
    ]

    out.print(Rule(f"turnfleet demo · run {run_id}"))
    out.print(f"Redis: {redis_url}")
    out.print(f"Processes: telemetry + {workers} workers (logs in {log_dir})")
    out.print(
        f"Alert rule for the demo: conversation cost > ${env.get('TURNFLEET_ALERT_CONVERSATION_COST_USD', '0.50')}"
    )
    redis = connect(redis_url)
    started = time.monotonic()
    try:
        for p in procs:
            p.start()
        # Wait for the workers' first heartbeat so queue-wait figures measure the fleet, not
        # Python starting up.
        while len(await heartbeat.alive(redis, "worker", 10)) < workers:
            dead = [p.name for p in procs if not p.running()]
            if dead or time.monotonic() - started > 60:
                return _failed(out, as_json, f"Workers did not start ({', '.join(dead) or 'timeout'}); see {log_dir}")
            await asyncio.sleep(0.05)
        tail = await redis.xrevrange(keys.RESULTS_STREAM, count=1)
        results_from = tail[0][0] if tail else "0-0"
        tail = await redis.xrevrange(keys.ALERTS_STREAM, count=1)
        alerts_from = tail[0][0] if tail else "0-0"

        named = sorted({n for _l, _c, texts in SCENARIO for t in texts for n in _ORDER_NUMBER.findall(t)})
        renamed = await copy_orders(redis, named)
        out.print("Fresh orders for this run: " + ", ".join(f"{a} → {b}" for a, b in renamed.items()))
        conv_ids: dict[str, str] = {}
        turn_labels: dict[str, str] = {}
        async with Producer(redis=redis) as producer:
            batch = []
            for label, customer, texts in SCENARIO:
                cid = f"demo-{run_id}-{label}"
                conv_ids[cid] = customer
                for i, text in enumerate(texts, 1):
                    tid = f"{cid}-t{i}"
                    turn_labels[tid] = f"{label} {i}/{len(texts)}"
                    batch.append({"conversation_id": cid, "customer_id": customer,
                                  "text": with_orders(text, renamed),
                                  "turn_id": tid, "metadata": {"channel": "demo"}})
            await producer.enqueue_turns(batch)
        out.print(f"Enqueued {len(batch)} turns in {len(conv_ids)} conversations.\n")

        pending = set(turn_labels)
        results: dict[str, TurnResult] = {}
        deadline = time.monotonic() + 120
        last = results_from
        while pending:
            if time.monotonic() > deadline:
                return _failed(out, as_json, f"Timed out waiting for {len(pending)} turns.")
            dead = [p.name for p in procs if not p.running()]
            if dead:
                return _failed(out, as_json, f"Process(es) exited early: {', '.join(dead)}; see {log_dir}")
            entries = await redis.xread({keys.RESULTS_STREAM: last}, block=1000, count=100)
            for _s, items in entries or []:
                for entry_id, fields in items:
                    last = entry_id
                    tid = fields.get("turn_id")
                    if tid not in pending:
                        continue
                    pending.discard(tid)
                    result = await producer.queue.get(tid)
                    assert result is not None
                    results[tid] = result
                    _print_turn(out, turn_labels[tid], result)

        # Wait until telemetry has aggregated every event, so the figures are complete.
        while not await caught_up(redis):
            if time.monotonic() > deadline:
                return _failed(out, as_json, "Telemetry did not catch up in time.")
            await asyncio.sleep(0.05)

        rows: list[list[str]] = []
        summary: list[dict[str, Any]] = []
        for cid, customer in conv_ids.items():
            turns = [r for tid, r in results.items() if r.conversation_id == cid]
            agg = await conversation_stats(redis, cid)
            agents: list[str] = []
            for r in turns:
                for a in r.agents:
                    if a not in agents:
                        agents.append(a)
            tools = sorted({c.tool for r in turns for c in r.tool_calls})
            latencies = [r.duration_ms or 0 for r in turns]
            failed = sum(r.status == "failed" for r in turns)
            summary.append({"conversation_id": cid, "customer_id": customer, "turns": len(turns), "agents": agents,
                            "tools": tools, "input_tokens": agg.get("input_tokens", 0),
                            "output_tokens": agg.get("output_tokens", 0), "cost_usd": agg.get("cost_usd"),
                            "mean_latency_ms": sum(latencies) / max(1, len(latencies)), "failed": failed})
            rows.append([
                f"{cid.removeprefix(f'demo-{run_id}-')}\n[dim]{customer}[/dim]", str(len(turns)),
                "\n".join(agents),
                "\n".join(tools) or "–",
                f"{agg.get('input_tokens', 0)}→{agg.get('output_tokens', 0)}",
                money(agg.get("cost_usd")),
                ms(sum(latencies) / max(1, len(latencies))),
                "ok" if not failed else f"[red]{failed} failed[/red]",
            ])
        out.print()
        out.print(_summary_table(rows))

        alerts = [(i, a) for i, a in await read_alerts(redis, after_id=alerts_from, count=1000)
                  if a.conversation_id in conv_ids or a.customer_id in conv_ids.values()]
        out.print()
        out.print(Text(f"Alerts raised ({len(alerts)})", style="bold"))
        for alert_id, alert in alerts:
            out.print(render_alert(alert_id, alert))
        if not alerts:
            out.print(Text("none", style="dim"))
        total_cost = 0.0
        for tid in results:
            total_cost += (await turn_stats(redis, tid)).get("cost_usd") or 0.0
        out.print()
        out.print(
            f"{len(results)} turns in {time.monotonic() - started:.1f} s, total cost {money(total_cost)}."
            f" Replay one: turnfleet conversation {next(iter(conv_ids))}"
        )
        out.print("Next, a customer's complaint traced to the decision that caused it: turnfleet demo --story wrong-refund")
        failed = [r for r in results.values() if r.status != "completed"]
        if as_json:
            print(json.dumps({"run_id": run_id, "ok": not failed, "turns": len(results),
                              "seconds": round(time.monotonic() - started, 1), "cost_usd": total_cost,
                              "conversations": summary,
                              "alerts": [{"id": i, **a.model_dump(mode="json")} for i, a in alerts]}, indent=2))
        return 1 if failed else 0
    finally:
        for p in procs:
            p.stop()
        await redis.aclose()


def _failed(out: Any, as_json: bool, message: str) -> int:
    """The demo could not finish: one red line, or one JSON error document on stderr; exit 1."""
    if as_json:
        print(json.dumps({"error": "demo_failed", "message": message}), file=sys.stderr)
    else:
        out.print(f"[red]{message}[/red]")
    return 1


def _print_turn(out: Any, label: str, result: TurnResult) -> None:
    out.print(turn_headline(result, cost=None, label=label, show_cost=False))
    out.print(Text.assemble(("   user:   ", "dim"), result.text))
    path = " → ".join(result.agents)
    out.print(Text.assemble(("   agents: ", "dim"), path))
    for call in result.tool_calls:
        line = Text.assemble(("   tool:   ", "dim"), (call.tool, "blue"), f"({call.arguments}) → ",
                             call.output or "")
        line.truncate(out.width, overflow="ellipsis")
        out.print(line, no_wrap=True)
    if result.final_output:
        out.print(Text.assemble(("   answer: ", "dim"), (result.final_output, "green")))
    if result.status == "failed":
        out.print(Text(f"   error:  {result.error_type}: {result.error_message}", style="red"))
