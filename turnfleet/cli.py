"""The ``turnfleet`` command: run the fleet's processes and look into what they did.

Every verb honours ``REDIS_URL``; without it, the embedded Redis is started (or the one
another turnfleet command already runs is used). Bad input is one line on stderr and exit
status 2, with nothing written to Redis. ``--json`` prints one JSON document (JSON lines
with ``--follow``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from turnfleet.embedded import redis_url_for
from turnfleet.logging import configure_logging
from turnfleet.settings import CommonSettings

EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _meta(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--meta takes KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# -- verbs ---------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace, url: str) -> int:
    from arq.worker import run_worker

    from workers.settings import WorkerSettings, redis_settings

    worker = run_worker(
        WorkerSettings, redis_settings=redis_settings(url), burst=args.burst, ctx={"redis_url": url}
    )
    return 0 if not worker.jobs_failed else 1


def cmd_telemetry(args: argparse.Namespace, url: str) -> int:
    from telemetry.consumer import run_consumer
    from turnfleet.settings import TelemetrySettings

    handled = asyncio.run(run_consumer(TelemetrySettings(), url, burst=args.burst))
    if args.burst:
        print(f"telemetry: {handled} entries aggregated", file=sys.stderr)
    return 0


def _check_enqueue(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from producer.api import TurnValidationError, _field_errors
    from turnfleet.models import TurnRequest
    from turnfleet.settings import ProducerSettings

    data = {
        "conversation_id": args.conversation,
        "customer_id": args.customer,
        "text": args.text,
        "metadata": _meta(args.meta),
        "turn_id": args.turn_id,
        "agent": args.agent,
    }
    try:
        TurnRequest.model_validate(
            {k: v for k, v in data.items() if v is not None}, context=ProducerSettings().limits()
        )
    except ValidationError as exc:
        raise CliError(str(TurnValidationError(_field_errors(exc)))) from None


async def _enqueue(args: argparse.Namespace, url: str) -> int:
    from producer import ConversationOwnershipError, Producer, TurnValidationError

    async with Producer(url) as producer:
        try:
            turn_id = await producer.enqueue_turn(
                conversation_id=args.conversation,
                customer_id=args.customer,
                text=args.text,
                metadata=_meta(args.meta),
                turn_id=args.turn_id,
                agent=args.agent,
                trace=False if args.no_trace else None,
            )
        except (TurnValidationError, ConversationOwnershipError) as exc:
            raise CliError(str(exc)) from None
    if args.json:
        _print_json({"turn_id": turn_id})
    else:
        print(turn_id)
    return 0


async def _result(args: argparse.Namespace, url: str) -> int:
    from turnfleet.connection import connect
    from turnfleet.queue import TurnQueue
    from turnfleet.render import console, render_turn

    redis = connect(url)
    try:
        queue = TurnQueue(redis)
        if args.wait:
            result = await queue.wait(args.turn_id, args.wait)
        else:
            result = await queue.get(args.turn_id)
        if result is None:
            raise CliError(f"no turn {args.turn_id!r}")
        cost = await _turn_cost(redis, args.turn_id)
    finally:
        await redis.aclose()
    if args.json:
        _print_json({**result.model_dump(mode="json"), "cost_usd": cost})
    else:
        console().print(render_turn(result, cost=cost))
    return 0 if result.done else 3


async def _turn_cost(redis: Any, turn_id: str) -> float | None:
    from telemetry.query import turn_stats

    return (await turn_stats(redis, turn_id)).get("cost_usd")


async def _conversation(args: argparse.Namespace, url: str) -> int:
    from telemetry.query import conversation_stats, turn_stats
    from turnfleet.connection import connect
    from turnfleet.queue import TurnQueue
    from turnfleet.render import console, render_conversation

    redis = connect(url)
    try:
        queue = TurnQueue(redis)
        turn_ids = await queue.conversation_turn_ids(args.conversation_id)
        if not turn_ids:
            raise CliError(f"no conversation {args.conversation_id!r}")
        turns = []
        for tid in turn_ids:
            result = await queue.get(tid)
            if result is not None:
                turns.append((result, await turn_stats(redis, tid)))
        totals = await conversation_stats(redis, args.conversation_id)
    finally:
        await redis.aclose()
    if args.json:
        _print_json(
            {
                "conversation_id": args.conversation_id,
                "turns": [{**r.model_dump(mode="json"), "telemetry": s} for r, s in turns],
                "totals": totals,
            }
        )
    else:
        console().print(render_conversation(args.conversation_id, turns, totals))
    return 0


async def _stats(args: argparse.Namespace, url: str) -> int:
    from telemetry.query import stats, totals
    from turnfleet.connection import connect
    from turnfleet.render import console, render_stats

    redis = connect(url)
    try:
        rows = await stats(redis, args.by, limit=args.limit)
        overall = await totals(redis)
    finally:
        await redis.aclose()
    if args.json:
        _print_json({"by": args.by, "rows": rows, "totals": overall})
    else:
        console().print(render_stats(args.by, rows, overall))
    return 0


async def _alerts(args: argparse.Namespace, url: str) -> int:
    from telemetry.query import read_alerts
    from turnfleet.connection import connect
    from turnfleet.render import console, render_alert, render_alerts

    redis = connect(url)
    try:
        if not args.follow:
            alerts = await read_alerts(redis, after_id="0-0", count=args.limit)
            if args.json:
                _print_json([{"id": i, **a.model_dump(mode="json")} for i, a in alerts])
            else:
                console().print(render_alerts(alerts))
            return 0
        last = "$" if args.new_only else "0-0"
        if last == "$":
            tail = await redis.xrevrange("tf:alerts", count=1)
            last = tail[0][0] if tail else "0-0"
        while True:
            batch = await read_alerts(redis, after_id=last, count=100, block_ms=5000)
            for alert_id, alert in batch:
                last = alert_id
                if args.json:
                    print(json.dumps({"id": alert_id, **alert.model_dump(mode="json")}), flush=True)
                else:
                    console().print(render_alert(alert_id, alert))
    finally:
        await redis.aclose()


def cmd_demo(args: argparse.Namespace, url: str) -> int:
    from turnfleet.demo import run_demo

    return asyncio.run(run_demo(url, workers=args.workers))


# -- parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="turnfleet",
        description="Run OpenAI Agents SDK support agents as a fleet on Redis, and see what they did.",
    )
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    d = sub.add_parser("demo", help="the Support Desk demo: Redis, telemetry, 2 workers, 5 conversations")
    d.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")

    w = sub.add_parser("worker", help="run an arq worker process")
    w.add_argument("--burst", action="store_true", help="drain the queue, then exit")

    t = sub.add_parser("telemetry", help="run a telemetry consumer")
    t.add_argument("--burst", action="store_true", help="aggregate what is there, then exit")

    e = sub.add_parser("enqueue", help="hand one turn to the fleet; prints its turn id")
    e.add_argument("--conversation", required=True, metavar="ID")
    e.add_argument("--customer", required=True, metavar="ID")
    e.add_argument("--turn-id", metavar="ID", help="idempotency key (default: generated)")
    e.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--agent", metavar="NAME", help="workflow (default support-desk)")
    e.add_argument("--no-trace", action="store_true", help="run this turn without tracing")
    e.add_argument("--json", action="store_true")
    e.add_argument("text", metavar="TEXT")

    r = sub.add_parser("result", help="a turn's status and result")
    r.add_argument("turn_id", metavar="TURN_ID")
    r.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait for it to end")
    r.add_argument("--json", action="store_true")

    c = sub.add_parser("conversation", help="every turn of a conversation, in order")
    c.add_argument("conversation_id", metavar="ID")
    c.add_argument("--json", action="store_true")

    s = sub.add_parser("stats", help="tokens, cost, latency and errors")
    s.add_argument("--by", choices=["conversation", "customer", "model"], default="model")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--json", action="store_true")

    a = sub.add_parser("alerts", help="alerts raised (newest last)")
    a.add_argument("--follow", action="store_true", help="keep printing new alerts")
    a.add_argument("--new-only", action="store_true", help="with --follow: skip the backlog")
    a.add_argument("--limit", type=int, default=100)
    a.add_argument("--json", action="store_true")
    return p


ASYNC_VERBS = {
    "enqueue": _enqueue,
    "result": _result,
    "conversation": _conversation,
    "stats": _stats,
    "alerts": _alerts,
}
PROCESS_VERBS = {"worker": cmd_worker, "telemetry": cmd_telemetry, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common = CommonSettings()
    quiet = args.verb not in ("worker", "telemetry")
    configure_logging("WARNING" if quiet else common.log_level, common.log_format)
    try:
        if args.verb == "enqueue":
            _check_enqueue(args)  # reject bad input before touching (or starting) Redis
        with redis_url_for(common.redis_url, common.state_dir) as url:
            os.environ["REDIS_URL"] = url  # processes this one starts use the same server
            if args.verb in PROCESS_VERBS:
                return PROCESS_VERBS[args.verb](args, url)
            return asyncio.run(ASYNC_VERBS[args.verb](args, url))
    except CliError as exc:
        print(f"turnfleet {args.verb}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except (RedisConnectionError, ConnectionError) as exc:
        print(f"turnfleet {args.verb}: cannot reach Redis: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
