"""The ``turnfleet`` command: run the fleet's processes and look into what they did.

Every verb honours ``REDIS_URL``; without it, the embedded Redis is started (or the one
another turnfleet command already runs is used). ``--json`` prints one JSON document (JSON
lines with ``--follow``).

Errors are one line on stderr — with ``--json``, one JSON document ``{"error": code,
"message": ..., "errors": [{"field", "message"}]?}`` on stderr — and the exit status says
what kind: 2 for usage and bad input (nothing written to Redis), 1 for a failed operation
(not found, refused, Redis unreachable), 3 for ``result`` of a turn not finished yet and for
``forget`` while a turn of its subject is queued or running (nothing erased).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from redis.exceptions import ConnectionError as RedisConnectionError

from turnfleet.connection import RedisUrlError, check_redis_url
from turnfleet.shell.embedded import redis_url_for
from turnfleet.logging import configure_logging
from turnfleet.settings import CommonSettings

EXIT_FAILED = 1  # the operation failed: not found, refused, Redis unreachable
EXIT_USAGE = 2  # usage and bad input: nothing was written
EXIT_NOT_FINISHED = 3  # ``result``: the turn has not ended yet; ``forget``: a turn of it has not
DEFAULT_BACKFILL_RATE = 20.0  # ``enqueue --file``: turns a second (see ``shell/backfill.py``)


class CliError(Exception):
    """A user-facing error: one line (or one JSON document with ``--json``) on stderr.

    ``error`` is the code in the JSON form (the HTTP API's codes: ``usage``, ``validation``,
    ``not_found``, ``conflict``, ``budget_exceeded``, ``redis_unreachable``); ``errors``
    names each bad field; ``exit`` is the exit status.
    """

    def __init__(self, message: str, *, exit: int = EXIT_USAGE, error: str = "usage",
                 errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.exit = exit
        self.error = error
        self.errors = errors


def _not_found(what: str, ident: str) -> CliError:
    return CliError(f"no {what} {ident!r}", exit=EXIT_FAILED, error="not_found")


def _invalid(field: str, message: str) -> CliError:
    return CliError(f"{field}: {message}", error="validation", errors=[{"field": field, "message": message}])


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a ``CliError`` (one line, or JSON with ``--json``)."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see {self.prog} --help)")


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
    """An arq worker under our supervisor: reconnects after Redis restarts, drains on
    SIGTERM/SIGINT within ``TURNFLEET_DRAIN_GRACE_S`` (see ``workers/supervisor.py``)."""
    from turnfleet.workers.supervisor import run

    if args.app:
        os.environ["TURNFLEET_APP"] = args.app  # the worker's settings (and its lanes) read it
    spec = os.environ.get("TURNFLEET_APP")
    if spec:
        from turnfleet import registry
        from turnfleet.workflow import AppLoadError, WorkflowError, load_app

        from turnfleet.settings import WorkerProcessSettings
        from turnfleet.workers.llm import check_offline_scripts

        try:  # here, once, so a bad app is one line and exit 2, not a worker that fails to start
            app = load_app(spec)
            check_offline_scripts(app, WorkerProcessSettings())
            registry.registrations(app.workflows)  # redaction patterns that compile
        except (AppLoadError, WorkflowError) as exc:
            raise CliError(str(exc)) from None
    return run(url, burst=args.burst)


def cmd_telemetry(args: argparse.Namespace, url: str) -> int:
    from turnfleet.telemetry.consumer import run_consumer
    from turnfleet.settings import TelemetrySettings

    handled = asyncio.run(run_consumer(TelemetrySettings(), url, burst=args.burst))
    if args.burst:
        print(f"telemetry: {handled} entries aggregated", file=sys.stderr)
    return 0


def _check_enqueue(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    if args.file is None:
        missing = [flag for flag, value in (("--conversation", args.conversation), ("--customer", args.customer),
                                            ("TEXT", args.text)) if value is None]
        if missing:
            raise CliError(f"the following arguments are required: {', '.join(missing)} (or --file PATH)"
                           " (see turnfleet enqueue --help)")
        given = [flag for flag, on in (("--skip-bad", args.skip_bad), ("--rate", args.rate != DEFAULT_BACKFILL_RATE))
                 if on]
        if given:
            raise CliError(f"{', '.join(given)}: only with --file")
    else:
        _check_backfill(args)
        return

    from turnfleet.producer.api import TurnValidationError, _field_errors
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
        error = TurnValidationError(_field_errors(exc))
        raise CliError(str(error), error="validation", errors=error.errors) from None


def _check_backfill(args: argparse.Namespace) -> None:
    """``enqueue --file``: read and check every line before Redis is touched (``args.lines``)."""
    from turnfleet.settings import ProducerSettings
    from turnfleet.shell.backfill import read_lines

    single = [flag for flag, on in (("--conversation", args.conversation), ("--customer", args.customer),
                                    ("--turn-id", args.turn_id), ("--meta", args.meta), ("--agent", args.agent),
                                    ("--no-trace", args.no_trace), ("TEXT", args.text)) if on]
    if single:
        raise CliError(f"{', '.join(single)}: not with --file (each line of the file says its own)")
    if not (0 < args.rate < float("inf")):
        raise _invalid("--rate", f"must be a number of turns a second, more than 0; got {args.rate}")
    try:
        if args.file == "-":
            raw = sys.stdin.read().splitlines()
        else:
            with open(args.file, encoding="utf-8") as stream:
                raw = stream.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise _invalid("--file", f"cannot read {args.file}: {getattr(exc, 'strerror', None) or exc}") from None
    args.lines = read_lines(raw, ProducerSettings().limits())
    if not args.lines:
        raise _invalid("--file", f"{args.file} has no turns (one JSON object a line)")
    _refuse_bad_lines(args)


def _refuse_bad_lines(args: argparse.Namespace) -> None:
    """Unless ``--skip-bad``, any bad line refuses the whole file: exit 2, every bad line named."""
    bad = [line for line in args.lines if not line.ok]
    if not bad or args.skip_bad:
        return
    errors = [{"line": line.number, **e} for line in bad for e in line.errors]
    details = "".join(f"\n  line {e['line']}: {e['field']}: {e['message']}" for e in errors)
    raise CliError(f"{len(bad)} of {len(args.lines)} lines of {args.file} are bad; nothing was enqueued "
                   f"(--skip-bad enqueues the others):{details}", error="validation", errors=errors)


_POSITIONALS = {"text", "turn_id", "conversation_id", "key"}


def _check_args(args: argparse.Namespace) -> None:
    """Input every verb can have wrong, refused before Redis is touched (or started)."""
    from turnfleet.models import check_id, check_unicode

    for dest, value in vars(args).items():  # invalid UTF-8 in argv arrives as lone surrogates
        name = dest if dest in _POSITIONALS else "--" + dest.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                try:
                    check_unicode(item)
                except ValueError as exc:
                    raise _invalid(name, str(exc)) from None
    for dest in ("turn_id", "conversation_id"):
        if args.verb in ("result", "turn", "conversation", "feedback") and getattr(args, dest, None) is not None:
            try:
                check_id(getattr(args, dest))
            except ValueError as exc:
                raise _invalid(dest, str(exc)) from None
    if args.verb == "forget":
        for dest in ("customer", "conversation"):
            if getattr(args, dest) is not None:
                try:  # the grammar only: an id from before the pseudonymous rule can be erased too
                    check_id(getattr(args, dest))
                except ValueError as exc:
                    raise _invalid("--" + dest, str(exc)) from None
    if args.verb in ("result", "forget") and not (args.wait >= 0 and args.wait != float("inf")):
        raise _invalid("--wait", f"must be a number of seconds, at least 0; got {args.wait}")
    if args.verb == "demo" and args.workers < 1:
        raise _invalid("--workers", f"must be at least 1; got {args.workers}")
    if args.verb == "demo" and args.story is not None:
        from turnfleet.shell.story import STORIES

        if args.story not in STORIES:
            raise _invalid("--story", f"no story {args.story!r}; the stories are: {', '.join(STORIES)}")
    if args.verb == "alerts":
        if not args.follow:
            given = [flag for flag, on in (("--new-only", args.new_only), ("--from-start", args.from_start),
                                           ("--cursor", args.cursor is not None)) if on]
            if given:
                raise CliError(f"{', '.join(given)}: only with --follow (without it, the alerts are printed once)")
        elif args.new_only and args.from_start:
            raise CliError("--new-only and --from-start contradict each other: pass one of them")
        if args.cursor is not None:
            try:
                check_id(args.cursor)  # it names a file in the state folder
            except ValueError as exc:
                raise _invalid("--cursor", str(exc)) from None
        if args.limit < 1:
            raise _invalid("--limit", f"must be at least 1; got {args.limit}")


async def _enqueue(args: argparse.Namespace, url: str) -> int:
    if args.file is not None:
        return await _enqueue_file(args, url)
    from turnfleet.producer import BudgetExceeded, ConversationOwnershipError, Producer, TurnValidationError

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
        except TurnValidationError as exc:  # TurnIdReused too: the id was used for other content
            raise CliError(str(exc), error="validation", errors=exc.errors) from None
        except ConversationOwnershipError as exc:
            raise CliError(str(exc), exit=EXIT_FAILED, error="conflict") from None
        except BudgetExceeded as exc:
            raise CliError(str(exc), exit=EXIT_FAILED, error="budget_exceeded") from None
    if args.json:
        _print_json({"turn_id": turn_id})
    else:
        print(turn_id)
    return 0


async def _enqueue_file(args: argparse.Namespace, url: str) -> int:
    """``enqueue --file``: the checked lines at ``--rate``; a result per line (plain lines, JSON
    lines, or a progress bar when stdout is a terminal), a summary on stderr; exit 1 if any line
    was not enqueued (skipped or refused), else 0."""
    from contextlib import nullcontext

    from turnfleet.producer import Producer
    from turnfleet.models import utcnow
    from turnfleet.shell.backfill import paced
    from turnfleet.shell.regress import progress_bar

    counts = {"enqueued": 0, "existing": 0, "rejected": 0, "skipped": 0}
    bar_shown = sys.stdout.isatty() and not args.json
    problems: list[str] = []

    def report(body: dict[str, Any]) -> None:
        counts[body["status"]] += 1
        text = _line_text(body)
        if body["status"] in ("rejected", "skipped"):
            problems.append(text)
        if args.json:
            print(json.dumps(body), flush=True)
        elif not bar_shown:
            print(text, flush=True)

    async with Producer(url) as producer:
        refused = await producer.unknown_workflows([(line.number, line.request) for line in args.lines if line.ok])
        for line in args.lines:
            if line.number in refused:
                line.errors.extend(refused[line.number])
        _refuse_bad_lines(args)  # an unknown workflow is a bad line too: still nothing written
        good = [line for line in args.lines if line.ok]
        for line in args.lines:
            if not line.ok:
                report({"line": line.number, "status": "skipped", "error": "validation", "errors": line.errors})
        with progress_bar() if bar_shown else nullcontext() as bar:
            task = bar.add_task(f"enqueue {Path(args.file).name}", total=len(good)) if bar is not None else None

            async def each(line: Any) -> bool:
                # enqueued now, not when the file was checked: queue-wait figures start here
                req = line.request.model_copy(update={"enqueued_at": utcnow()})
                outcome = await producer.enqueue_request(req, index=line.number)
                body: dict[str, Any] = {"line": line.number, "status": outcome.status, "turn_id": outcome.turn_id,
                                        "conversation_id": outcome.conversation_id}
                if outcome.ok:
                    body["turn_status"] = outcome.turn_status
                else:
                    body.update(error=outcome.error, message=outcome.message)
                    if outcome.errors:
                        body["errors"] = outcome.errors
                report(body)
                if bar is not None:
                    bar.advance(task)
                return outcome.status == "enqueued"  # only new turns take a slot of --rate

            await paced(good, args.rate, each)
    for text in problems if bar_shown else []:
        print(text)
    print(f"turnfleet enqueue: {len(args.lines)} lines: " + ", ".join(f"{n} {k}" for k, n in counts.items()),
          file=sys.stderr)
    return 0 if counts["rejected"] == counts["skipped"] == 0 else EXIT_FAILED


def _line_text(body: dict[str, Any]) -> str:
    """One line of ``enqueue --file``'s plain output."""
    where = f"line {body['line']}: {body['status']}"
    if body["status"] == "skipped":
        return f"{where}: " + "; ".join(f"{e['field']}: {e['message']}" for e in body["errors"])
    if body["status"] == "rejected":
        return f"{where} {body['turn_id']} ({body['error']}): {body['message']}"
    if body["status"] == "existing":
        return f"{where} {body['turn_id']} ({body['turn_status']})"
    return f"{where} {body['turn_id']}"


async def _feedback(args: argparse.Namespace, url: str) -> int:
    from turnfleet.producer import Producer, TurnValidationError, UnknownTurn

    if args.score not in ("-1", "1", "+1"):
        raise _invalid("score", f"must be -1 or 1; got {args.score!r}")
    async with Producer(url) as producer:
        try:
            result = await producer.feedback(args.turn_id, score=int(args.score), comment=args.comment,
                                             source=args.source, idempotency_key=args.idempotency_key)
        except TurnValidationError as exc:
            raise CliError(str(exc), error="validation", errors=exc.errors) from None
        except UnknownTurn:
            raise _not_found("turn", args.turn_id) from None
    if args.json:
        _print_json(result.model_dump(mode="json"))
    else:
        print(result.feedback_id)
    return 0


async def _result(args: argparse.Namespace, url: str) -> int:
    from turnfleet.connection import connect
    from turnfleet.models import TurnResult
    from turnfleet.queue import TurnQueue
    from turnfleet.shell.render import console, render_turn

    redis = connect(url)
    try:
        queue = TurnQueue(redis)
        if args.wait:
            result = await queue.wait(args.turn_id, args.wait)
        else:
            result = await queue.get(args.turn_id)
        if result is None:
            raise _not_found("turn", args.turn_id)
        cost = await _turn_cost(redis, args.turn_id)
        if args.unredacted:
            await _audit(redis, "result", args.turn_id)
        else:
            result = TurnResult.model_validate(await _redacted(redis, result.model_dump(mode="json")))
    finally:
        await redis.aclose()
    if args.json:
        _print_json({**result.model_dump(mode="json"), "cost_usd": cost})
    else:
        console().print(render_turn(result, cost=cost))
    return 0 if result.done else EXIT_NOT_FINISHED


async def _turn_cost(redis: Any, turn_id: str) -> float | None:
    from turnfleet.telemetry.stats import turn_stats

    return (await turn_stats(redis, turn_id)).get("cost_usd")


async def _redacted(redis: Any, data: Any) -> Any:
    """What an operator reads by default: the same redaction as telemetry and the console
    (``TURNFLEET_REDACT_*`` and the fleet's workflows' patterns, from the registry)."""
    from turnfleet import registry

    return (await registry.redactor(redis, CommonSettings())).value(data)


async def _audit(redis: Any, verb: str, subject: str) -> None:
    """One audit entry for an ``--unredacted`` read: ``cli:<user>@<host>``, the verb, the id."""
    from turnfleet.audit import cli_who, record

    await record(redis, cli_who(), f"turnfleet {verb}", subject)


def _trace_redis(url: str) -> Any:
    from turnfleet.connection import connect

    trace_url = CommonSettings().trace_redis_url
    return connect(trace_url) if trace_url else None


async def _conversation(args: argparse.Namespace, url: str) -> int:
    from turnfleet.telemetry.replay import conversation_replay
    from turnfleet.connection import connect
    from turnfleet.shell.render import console, render_replay_conversation

    redis, trace_redis = connect(url), _trace_redis(url)
    try:
        replay = await conversation_replay(redis, args.conversation_id, trace_redis)
        if replay is not None and args.unredacted:
            await _audit(redis, "conversation", args.conversation_id)
        elif replay is not None:
            replay = await _redacted(redis, replay)
    finally:
        await redis.aclose()
        if trace_redis is not None:
            await trace_redis.aclose()
    if replay is None:
        raise _not_found("conversation", args.conversation_id)
    if args.json:
        _print_json(replay)
    else:
        console().print(render_replay_conversation(replay))
    return 0


async def _turn(args: argparse.Namespace, url: str) -> int:
    from turnfleet.telemetry.replay import turn_replay
    from turnfleet.connection import connect
    from turnfleet.shell.render import console, render_replay_turn

    redis, trace_redis = connect(url), _trace_redis(url)
    try:
        replay = await turn_replay(redis, args.turn_id, trace_redis)
        if replay is not None and args.unredacted:
            await _audit(redis, "turn", args.turn_id)
        elif replay is not None:
            replay = await _redacted(redis, replay)
    finally:
        await redis.aclose()
        if trace_redis is not None:
            await trace_redis.aclose()
    if replay is None:
        raise _not_found("turn", args.turn_id)
    if args.json:
        _print_json(replay)
    else:
        console().print(render_replay_turn(replay))
    return 0


async def _audit_log(args: argparse.Namespace, url: str) -> int:
    from turnfleet.audit import entries
    from turnfleet.connection import connect

    redis = connect(url)
    try:
        rows = await entries(redis, args.limit)
    finally:
        await redis.aclose()
    if args.json:
        _print_json({"entries": rows})
    elif not rows:
        print("No unredacted reads or erasures recorded.")
    else:
        for row in rows:
            print(f"{row['at']}  {row['who']}  {row['what']}  {row['subject']}")
    return 0


FORGET_KEPT = "Kept: the refund ledger and the per-order refund records (a financial record)."
FORGET_NOT_REACHED = ("Not reached: copies already sent over OTLP or the alert webhook, log files, "
                      "backups and RDB snapshots, and the AOF until it is rewritten (--rewrite-aof).")


async def _forget(args: argparse.Namespace, url: str) -> int:
    from turnfleet.audit import cli_who
    from turnfleet.connection import connect
    from turnfleet.erasure import ErasureBusy, forget, rewrite_aof

    kind, subject = ("customer", args.customer) if args.customer is not None else ("conversation", args.conversation)
    redis, trace_redis = connect(url), _trace_redis(url)
    try:
        try:
            report = await forget(redis, trace_redis=trace_redis, wait_s=args.wait, who=cli_who(),
                                  **{f"{kind}_id": subject})
        except ErasureBusy as exc:
            raise CliError(f"{exc} (nothing was erased; --wait SECONDS waits for them)",
                           exit=EXIT_NOT_FINISHED, error="busy") from None
        rewritten: list[str] = []
        if args.rewrite_aof:
            for name, client in (("main", redis), ("trace store", trace_redis)):
                if client is not None and await rewrite_aof(client):
                    rewritten.append(name)
    finally:
        await redis.aclose()
        if trace_redis is not None:
            await trace_redis.aclose()
    if args.json:
        _print_json({"erased": kind, "id": subject, **report.to_dict(), "nothing": report.nothing,
                     "aof_rewrite_started": rewritten if args.rewrite_aof else None})
        return 0
    if report.nothing:
        print(f"Nothing to erase for {kind} {subject!r}: never seen, or already erased.")
    else:
        r = report.to_dict()
        print(f"Erased {kind} {subject!r}: {r['conversations']} conversation(s), {r['turns']} turn(s); "
              f"removed {r['keys']} keys, {r['index_entries']} index entries, "
              f"{r['stream_entries']} stream entries.")
    print(FORGET_KEPT)
    if args.rewrite_aof:
        print(f"AOF rewrite started on: {', '.join(rewritten)}." if rewritten
              else "AOF is off on the Redis used: nothing to rewrite.")
    else:
        print(FORGET_NOT_REACHED)
    return 0


async def _stats(args: argparse.Namespace, url: str) -> int:
    from turnfleet.telemetry.latency import latency_report, slowest_turns
    from turnfleet.telemetry.stats import stats, totals
    from turnfleet import heartbeat
    from turnfleet.connection import connect
    from turnfleet.shell.health import DEFAULT_MAX_AGE_S
    from turnfleet.shell.render import console, render_latency, render_slowest, render_stats

    redis = connect(url)
    try:
        rows = await stats(redis, args.by, limit=args.limit)
        overall = await totals(redis)
        unserved = await heartbeat.unserved(redis, DEFAULT_MAX_AGE_S)
        if unserved:
            overall["unserved_workflows"] = unserved
        latency = await latency_report(redis)
        slowest = await slowest_turns(redis, limit=args.slowest)
    finally:
        await redis.aclose()
    if args.json:
        _print_json({"by": args.by, "rows": rows, "totals": overall, "latency": latency, "slowest": slowest})
    else:
        out = console()
        out.print(render_stats(args.by, rows, overall))
        for note in heartbeat.unserved_notes(unserved):
            out.print(note, style="yellow", markup=False)
        out.print(render_latency(latency))
        out.print(render_slowest(slowest))
    return 0


def _when(value: str | None) -> Any:
    """An ISO time, or a time ago: 30m, 2h, 7d."""
    from turnfleet.telemetry.times import parse_time

    try:
        return parse_time(value)
    except ValueError as exc:
        raise CliError(f"--since/--until: {exc}") from None


async def _find(args: argparse.Namespace, url: str) -> int:
    from turnfleet.telemetry.find import find_conversations
    from turnfleet.connection import connect
    from turnfleet.shell.render import console, render_found

    since, until = _when(args.since), _when(args.until)
    redis = connect(url)
    try:
        rows = await find_conversations(
            redis, customer=args.customer, tool=args.tool, agent=args.agent, error=args.error,
            guardrail=args.guardrail, workflow=args.find_workflow, version=args.version,
            feedback=args.feedback, check_failed=args.check_failed, since=since, until=until,
            min_cost_usd=args.min_cost, limit=args.limit,
        )
    except ValueError as exc:  # a --check-failed name that is no check
        raise _invalid("check_failed", str(exc).removeprefix("check_failed: ")) from None
    finally:
        await redis.aclose()
    if args.json:
        _print_json(rows)
    else:
        console().print(render_found(rows))
    return 0


async def _alerts(args: argparse.Namespace, url: str) -> int:
    from turnfleet.telemetry.alert_reads import alert_entries, read_alerts
    from turnfleet import keys
    from turnfleet.connection import connect
    from turnfleet.shell.render import console, render_alert, render_alerts

    redis = connect(url)
    try:
        if not args.follow:
            alerts = await read_alerts(redis, after_id="0-0", count=args.limit)
            if args.json:
                _print_json([{"id": i, **a.model_dump(mode="json")} for i, a in alerts])
            else:
                console().print(render_alerts(alerts))
            return 0
        cursor = CommonSettings().state_dir / f"alerts-{args.cursor or 'default'}.cursor"
        if args.new_only:
            tail = await redis.xrevrange(keys.ALERTS_STREAM, count=1)
            last = tail[0][0] if tail else "0-0"
        elif not args.from_start and cursor.exists():
            last = cursor.read_text().strip() or "0-0"  # resume where this follower left off
        else:
            last = "0-0"
        cursor.parent.mkdir(parents=True, exist_ok=True)
        # Ctrl-C / SIGTERM end the loop between reads (a cancelled blocking read can be
        # swallowed by the client), so the cursor is always written on the way out.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            while not stop.is_set():
                batch = await alert_entries(redis, after_id=last, count=100, block_ms=500)
                for alert_id, alert in batch:
                    if alert is None:  # unreadable: move past it, or it is read again forever
                        last = alert_id
                        continue
                    if args.json:
                        print(json.dumps({"id": alert_id, **alert.model_dump(mode="json")}), flush=True)
                    else:
                        console().print(render_alert(alert_id, alert))
                    last = alert_id  # shown: a follower killed now shows it again (at least once)
                    cursor.write_text(last)
        finally:
            cursor.write_text(last)  # Ctrl-C: resume exactly after the last alert shown
    finally:
        await redis.aclose()


def cmd_demo(args: argparse.Namespace, url: str) -> int:
    from turnfleet.shell.demo import run_demo

    if args.story is not None:
        from turnfleet.shell.story import run_story

        return asyncio.run(run_story(url, args.story, workers=args.workers, as_json=args.json))
    return asyncio.run(run_demo(url, workers=args.workers, as_json=args.json))


def cmd_dev(args: argparse.Namespace, url: str) -> int:
    """``turnfleet dev --app module:attr``: the app on N workers and telemetry until Ctrl-C
    (``shell/dev.py``)."""
    from turnfleet.shell.dev import run_dev
    from turnfleet.workflow import AppLoadError, WorkflowError, load_app

    if args.workers < 1:
        raise _invalid("--workers", f"must be at least 1; got {args.workers}")
    try:  # a bad app is one line and exit 2, before any process starts
        app = load_app(args.app)
    except (AppLoadError, WorkflowError) as exc:
        raise CliError(str(exc)) from None
    return asyncio.run(run_dev(url, args.app, app, args.workers))


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when this host's process of ``--role`` is healthy, else 1 with the reason.

    A probe has no side effects: it uses ``REDIS_URL`` and never starts the embedded Redis.
    """
    from turnfleet.shell.health import check

    health = check(args.role, url=args.url, max_age_s=args.max_age, timeout_s=args.timeout)
    if args.json and not health.ok:
        print(json.dumps({"error": "unhealthy", "message": health.reason, "notes": list(health.notes)}),
              file=sys.stderr)
        return 1
    if args.json:
        _print_json({"ok": True, "role": args.role, "reason": health.reason, "notes": list(health.notes)})
        return 0
    if not health.ok:
        print(f"turnfleet health: {health.reason}", file=sys.stderr)
        for note in health.notes:
            print(f"turnfleet health: {note}", file=sys.stderr)
        return 1
    print(health.reason)
    for note in health.notes:
        print(note)
    return 0


def serve_shutdown_s(settings: Any) -> int:
    """How long ``serve`` waits for in-flight requests on SIGTERM: the longest long poll + 5 s."""
    return int(settings.max_wait_s) + 5


def cmd_serve(args: argparse.Namespace, url: str) -> int:
    """The HTTP API under uvicorn until SIGTERM or Ctrl-C.

    Shutdown is graceful: no new connections, in-flight requests (long polls included, at
    most ``max_wait_s``) are answered, then the app's Redis clients are closed. No access
    log: requests that change something are logged by the routes, as structured events.
    """
    import structlog
    import uvicorn

    from turnfleet.shell.server import create_app
    from turnfleet.settings import ProducerSettings

    settings = ProducerSettings()
    host = args.host or settings.http_host
    port = settings.http_port if args.port is None else args.port
    sockets = None
    if args.fd is not None:
        # The family is read from the descriptor itself (socket(fileno=...)).
        sock = socket.socket(fileno=args.fd)
        host, port = sock.getsockname()[:2]
        sockets = [sock]
    log = structlog.get_logger("turnfleet.serve")
    if not settings.api_keys and settings.api_keys_file is None:
        log.warning("http.no_api_keys", hint="every request will get 401; see `turnfleet apikey new`")
    from turnfleet.auth import KeysFileError

    try:
        app = create_app(settings, url)
    except KeysFileError as exc:  # refuse to start: with no keys every request would be 401
        print(f"turnfleet serve: {exc}", file=sys.stderr)
        return 1
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False,
        server_header=False, timeout_graceful_shutdown=serve_shutdown_s(settings),
    ))
    log.info("http.serving", url=f"http://{host}:{port}", docs=f"http://{host}:{port}/docs")
    # uvicorn re-raises the signal that stopped it once it has shut down; under the default
    # SIGTERM disposition that would kill us before an embedded Redis we started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=sockets)
    log.info("http.stopped")
    return 0 if server.started else 1


def cmd_apikey(args: argparse.Namespace) -> int:
    """``apikey new``: a fresh key (printed once) and its entry; ``apikey hash``: a key's digest."""
    from turnfleet.auth import hash_key, new_key
    from turnfleet.models import check_pseudonymous_id

    if args.apikey_verb == "hash":
        key = sys.stdin.readline().strip() if args.key == "-" else args.key
        if not key:
            raise CliError("no key given")
        print(hash_key(key))
        return 0
    try:
        name = check_pseudonymous_id(args.name.strip())  # shown in every log line of the key's requests
    except ValueError as exc:
        raise _invalid("--name", str(exc)) from None
    customers: list[str] = ["*"] if args.operator else []
    for customer in args.customer or []:
        try:
            check_pseudonymous_id(customer)  # as a request's customer_id is checked
        except ValueError as exc:
            raise _invalid("--customer", str(exc)) from None
        if customer not in customers:
            customers.append(customer)
    key = new_key()
    entry: dict[str, Any] = {"name": name, "sha256": hash_key(key), "customers": customers}
    if args.unredacted:
        entry["unredacted"] = True
    if args.json:
        _print_json({"key": key, "entry": entry})
        return 0
    print(key)
    print(json.dumps(entry))
    print("turnfleet apikey: the key (line 1) is shown once; add the entry (line 2) to "
          "TURNFLEET_API_KEYS (a JSON list) or to TURNFLEET_API_KEYS_FILE, then send SIGHUP to "
          "`turnfleet serve` (or let it notice the file change)", file=sys.stderr)
    return 0


COMPLETION_SHELLS = ("bash", "zsh")
PATH_OPTIONS = {("enqueue", "--file")}  # (verb, option) whose value a shell completes as a file


def cmd_completion(args: argparse.Namespace) -> int:
    """``completion bash|zsh``: a completion script for the shell, generated by ``shtab`` from
    this very parser, so every verb, option and choice is there and none goes stale."""
    import shtab

    def options(parser: argparse.ArgumentParser, verb: str = "") -> Iterator[tuple[str, argparse.Action]]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from options(sub, name)
            else:
                yield verb, action

    parser = build_parser()
    for verb, option in options(parser):
        if any((verb, o) in PATH_OPTIONS for o in option.option_strings):
            option.complete = shtab.FILE  # type: ignore[attr-defined]
        if args.shell == "zsh" and isinstance(option.metavar, str):
            # shtab writes a metavar into zsh's "--opt[help]:MESSAGE:ACTION" as it is: a colon
            # in it (MODULE:ATTR) would end the message and make "ATTR" a command zsh runs.
            option.metavar = option.metavar.replace(":", "\\:")
    sys.stdout.write(shtab.complete(parser, shell=args.shell))
    return 0


# -- parser --------------------------------------------------------------------------


JSON_HELP = "print one JSON document on stdout; errors as one JSON document on stderr"
UNREDACTED_HELP = "text as written (cards, e-mails, keys); the read is audited"


def _verb(sub: Any, name: str, help: str, *examples: str) -> argparse.ArgumentParser:
    """A verb's parser: its help, and an "Examples:" epilog laid out as written."""
    return sub.add_parser(
        name, help=help, description=help[:1].upper() + help[1:] + ".",
        epilog="Examples:\n" + "\n".join(f"  {e}" for e in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def find_filters(p: argparse.ArgumentParser, workflow_flag: str = "--workflow") -> None:
    """``find``'s filters, shared by ``regress`` (whose ``--workflow`` is the candidate's, so
    find's is ``--find-workflow`` there)."""
    p.add_argument("--customer", metavar="ID", help="conversations of this customer")
    p.add_argument("--tool", metavar="NAME", help="a tool was called, e.g. process_refund")
    p.add_argument("--agent", metavar="NAME", help="an agent took part, e.g. Billing")
    p.add_argument("--error", metavar="TYPE", help="error type, e.g. MaxTurnsExceeded or ToolError")
    p.add_argument("--guardrail", metavar="NAME", help="a guardrail that tripped, e.g. prompt_injection")
    p.add_argument(workflow_flag, metavar="NAME", dest="find_workflow", help="run by this workflow, e.g. support-desk")
    p.add_argument("--version", metavar="LABEL", help="run by this version label, e.g. 2.1@3f9a0c1d2e4b5a69")
    p.add_argument("--feedback", choices=["negative", "positive"],
                   help="a turn was given such feedback (rows name those turns)")
    p.add_argument("--check-failed", metavar="NAME",
                   help="a turn on which this check failed, e.g. refund_order_named_by_customer (rows name those turns)")
    p.add_argument("--since", metavar="TIME", help="not before: ISO 8601, or 30m / 2h / 7d ago")
    p.add_argument("--until", metavar="TIME", help="not after: ISO 8601, or 30m / 2h / 7d ago")
    p.add_argument("--min-cost", type=float, metavar="USD", help="conversations that cost at least this")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="turnfleet",
        description="Run OpenAI Agents SDK support agents as a fleet on Redis, and see what they did.",
        epilog="Examples:\n  turnfleet demo\n  turnfleet enqueue --help\n  turnfleet --version",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="store_true",
                   help="print the version and exit (with --json: also the Agents SDK's and Python's)")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB", help="what to do (turnfleet VERB --help)")

    d = _verb(sub, "demo", "the Support Desk demo: Redis, telemetry, 2 workers, 5 conversations",
              "turnfleet demo", "turnfleet demo --workers 4 --json", "turnfleet demo --story wrong-refund --json")
    d.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    d.add_argument("--story", metavar="NAME", help="tell a story instead, step by step: wrong-refund")
    d.add_argument("--json", action="store_true",
                   help="only the summary (with --story: its steps and figures), as one JSON document")

    dv = _verb(sub, "dev", "your app on a local fleet (Redis, workers, telemetry) until Ctrl-C",
               "turnfleet dev --app my_agents:app", "turnfleet dev --app my_agents:app --workers 3")
    dv.add_argument("--app", required=True, metavar="MODULE:ATTR", help="the workflows to serve, e.g. my_agents:app")
    dv.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")

    w = _verb(sub, "worker", "run an arq worker process",
              "turnfleet worker", "turnfleet worker --burst", "turnfleet worker --app my_agents:app")
    w.add_argument("--burst", action="store_true", help="drain the queue, then exit")
    w.add_argument("--app", metavar="MODULE:ATTR",
                   help="the workflows to serve (TURNFLEET_APP); default: the built-in Support Desk")

    t = _verb(sub, "telemetry", "run a telemetry consumer", "turnfleet telemetry", "turnfleet telemetry --burst")
    t.add_argument("--burst", action="store_true", help="aggregate what is there, then exit")

    e = _verb(sub, "enqueue", "hand turns to the fleet: one (prints its turn id) or a file of them (--file)",
              'turnfleet enqueue --conversation c-1 --customer C-100 "Where is order 1047?"',
              "turnfleet enqueue --conversation c-1 --customer C-100 --turn-id t-1 --meta channel=chat \"hi\"",
              "turnfleet enqueue --file turns.jsonl",
              "turnfleet enqueue --file turns.jsonl --rate 50 --skip-bad --json")
    e.add_argument("--conversation", metavar="ID", help="the conversation the turn belongs to (not with --file)")
    e.add_argument("--customer", metavar="ID", help="the customer, a pseudonymous id (not with --file)")
    e.add_argument("--turn-id", metavar="ID", help="idempotency key (default: generated)")
    e.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="metadata kept with the turn (repeat for more)")
    e.add_argument("--agent", metavar="NAME", help="workflow (default support-desk)")
    e.add_argument("--no-trace", action="store_true", help="run this turn without tracing")
    e.add_argument("--file", metavar="PATH",
                   help="a backfill: one JSON turn per line ('-': stdin); every line is checked before any is "
                        "enqueued")
    e.add_argument("--skip-bad", action="store_true",
                   help="with --file: enqueue the good lines even if some are bad (default: none if any is bad)")
    e.add_argument("--rate", type=float, default=DEFAULT_BACKFILL_RATE, metavar="N",
                   help=f"with --file: at most N turns a second, so live turns are not queued behind a "
                        f"backfill (default {DEFAULT_BACKFILL_RATE:g})")
    e.add_argument("--json", action="store_true",
                   help="print {\"turn_id\"} (with --file: one JSON line per line of the file)")
    e.add_argument("text", metavar="TEXT", nargs="?", help="what the customer wrote (not with --file)")

    fb = _verb(sub, "feedback", "score a turn (-1 or 1); prints the feedback id",
               "turnfleet feedback t-1 --score -1 --comment \"wrong amount\"",
               "turnfleet feedback t-1 --score 1 --source operator --idempotency-key review-7 --json")
    fb.add_argument("turn_id", metavar="TURN_ID", help="the turn scored")
    fb.add_argument("--score", required=True, metavar="-1|1", help="-1 (bad) or 1 (good)")
    fb.add_argument("--comment", metavar="TEXT", help="redacted before it is stored")
    fb.add_argument("--source", default="customer", metavar="customer|agent|operator",
                    help="who gave it (default customer)")
    fb.add_argument("--idempotency-key", metavar="KEY",
                    help="the same key on the same turn is the same feedback (counted once)")
    fb.add_argument("--json", action="store_true", help=JSON_HELP)

    r = _verb(sub, "result", "a turn's status and result",
              "turnfleet result t-1", "turnfleet result t-1 --wait 30 --json")
    r.add_argument("turn_id", metavar="TURN_ID", help="the turn id enqueue printed")
    r.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait for it to end")
    r.add_argument("--json", action="store_true", help=JSON_HELP)
    r.add_argument("--unredacted", action="store_true", help=UNREDACTED_HELP)

    c = _verb(sub, "conversation", "replay a conversation: every turn as a tree, in order",
              "turnfleet conversation c-1", "turnfleet conversation c-1 --json")
    c.add_argument("conversation_id", metavar="ID", help="the conversation id")
    c.add_argument("--json", action="store_true", help=JSON_HELP)
    c.add_argument("--unredacted", action="store_true", help=UNREDACTED_HELP)

    tr = _verb(sub, "turn", "replay one turn as a tree", "turnfleet turn t-1", "turnfleet turn t-1 --json")
    tr.add_argument("turn_id", metavar="TURN_ID", help="the turn id")
    tr.add_argument("--json", action="store_true", help=JSON_HELP)
    tr.add_argument("--unredacted", action="store_true", help=UNREDACTED_HELP)

    au = _verb(sub, "audit", "unredacted reads and erasures (who, what, which id, when), newest last",
               "turnfleet audit", "turnfleet audit --limit 20 --json")
    au.add_argument("--limit", type=int, default=100, help="entries at most (default 100)")
    au.add_argument("--json", action="store_true", help=JSON_HELP)

    fg = _verb(sub, "forget", "erase one customer or one conversation (all but the refund ledger)",
               "turnfleet forget --customer C-100", "turnfleet forget --conversation c-1 --wait 60 --rewrite-aof")
    subject = fg.add_mutually_exclusive_group(required=True)
    subject.add_argument("--customer", metavar="ID", help="the customer: every conversation, turn and figure of it")
    subject.add_argument("--conversation", metavar="ID", help="one conversation and its turns")
    fg.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                    help="wait this long for its queued or running turns to end (default: refuse at once)")
    fg.add_argument("--rewrite-aof", action="store_true",
                    help="then rewrite Redis's append-only file, so older copies leave the disk")
    fg.add_argument("--json", action="store_true", help=JSON_HELP)

    s = _verb(sub, "stats", "tokens, cost, latency and errors",
              "turnfleet stats", "turnfleet stats --by customer --limit 10", "turnfleet stats --by version --json")
    s.add_argument("--by", choices=["conversation", "customer", "model", "workflow", "version"],
                   default="model", help="one row per this (default model); version: per version of each workflow")
    s.add_argument("--limit", type=int, default=50, help="rows at most (default 50)")
    s.add_argument("--slowest", type=int, default=10, metavar="N", help="slowest turns to list")
    s.add_argument("--json", action="store_true", help=JSON_HELP)

    f = _verb(sub, "find", "find conversations by customer, tool, agent, error, time, cost",
              "turnfleet find --tool process_refund --since 2h",
              "turnfleet find --feedback negative --check-failed refund_order_named_by_customer --json")
    find_filters(f)
    f.add_argument("--limit", type=int, default=50, help="conversations at most (default 50)")
    f.add_argument("--json", action="store_true", help=JSON_HELP)

    def candidate_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--app", metavar="MODULE:ATTR", help="the candidate's workflows (default: the built-in app)")
        p.add_argument("--workflow", metavar="NAME", help="the candidate workflow (default: the turn's)")
        p.add_argument("--model", metavar="NAME", help="the candidate model (default: the turn's), "
                       "e.g. turnfleet-offline")
        p.add_argument("--json", action="store_true", help=JSON_HELP)

    rr = _verb(sub, "rerun", "re-run a stored turn against a candidate; original and candidate side by side",
               "turnfleet rerun t-1", "turnfleet rerun t-1 --model turnfleet-offline --json")
    rr.add_argument("turn_id", metavar="TURN_ID", help="a finished turn")
    candidate_options(rr)

    rg = _verb(sub, "regress", "re-run the turns find's filters match against a candidate; exit 1 "
               "if a check newly fails",
               "turnfleet regress --check-failed refund_order_named_by_customer --model turnfleet-offline",
               "turnfleet regress --since 1d --app my_agents:app --concurrency 8 --json")
    find_filters(rg, workflow_flag="--find-workflow")
    rg.add_argument("--limit", type=int, default=200, help="conversations at most (default 200)")
    rg.add_argument("--concurrency", type=int, default=4, metavar="N", help="turns re-run at once (default 4)")
    candidate_options(rg)

    a = _verb(sub, "alerts", "alerts raised (newest last)",
              "turnfleet alerts", "turnfleet alerts --follow --cursor pager --json")
    a.add_argument("--follow", action="store_true", help="keep printing new alerts")
    a.add_argument("--new-only", action="store_true", help="with --follow: skip the backlog")
    a.add_argument("--from-start", action="store_true", help="with --follow: ignore the saved cursor")
    a.add_argument("--cursor", metavar="NAME",
                   help="with --follow: resume where the follower of this name left off (default 'default')")
    a.add_argument("--limit", type=int, default=100, help="alerts at most, without --follow (default 100)")
    a.add_argument("--json", action="store_true", help=JSON_HELP + " (JSON lines with --follow)")

    from turnfleet.shell.health import DEFAULT_MAX_AGE_S, DEFAULT_TIMEOUT_S, ROLES

    hc = _verb(sub, "health", "exit 0 if this host's worker, telemetry or producer is healthy (healthchecks)",
               "turnfleet health --role worker", "turnfleet health --role producer --url http://127.0.0.1:8080 --json")
    hc.add_argument("--role", required=True, choices=ROLES, help="the process to probe")
    hc.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE_S, metavar="SECONDS",
                    help=f"worker/telemetry: oldest heartbeat that counts (default {DEFAULT_MAX_AGE_S:g})")
    hc.add_argument("--url", metavar="URL",
                    help="producer: base URL to GET /healthz from (default http://127.0.0.1:$TURNFLEET_HTTP_PORT)")
    hc.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                    help=f"give up on Redis or HTTP after this long (default {DEFAULT_TIMEOUT_S:g})")
    hc.add_argument("--json", action="store_true",
                    help="the verdict as one JSON document (unhealthy: a JSON error on stderr)")

    sv = _verb(sub, "serve", "run the HTTP API (uvicorn)",
               "turnfleet serve", "turnfleet serve --host 0.0.0.0 --port 8080", "turnfleet serve --fd 3")
    sv.add_argument("--host", metavar="HOST", help="listen address (default $TURNFLEET_HTTP_HOST, 127.0.0.1)")
    sv.add_argument("--port", type=int, metavar="PORT", help="listen port (default $TURNFLEET_HTTP_PORT, 8080)")
    sv.add_argument("--fd", type=int, metavar="FD",
                    help="serve on this inherited, already listening socket instead of --host/--port "
                         "(socket activation; connections queue on it before the app is ready)")

    ak = _verb(sub, "apikey", "make an API key for the HTTP API, or hash one",
               "turnfleet apikey new --name billing-svc --customer C-100", "turnfleet apikey hash -")
    ak_sub = ak.add_subparsers(dest="apikey_verb", required=True, metavar="ACTION", help="new or hash")
    akn = _verb(ak_sub, "new", "a new key (printed once) and the entry to configure",
                "turnfleet apikey new --name billing-svc --customer C-100 --customer C-101",
                "turnfleet apikey new --name ops-console --operator --unredacted --json")
    akn.add_argument("--name", required=True, help="who holds the key, e.g. the calling service")
    who = akn.add_mutually_exclusive_group(required=True)
    who.add_argument("--customer", action="append", metavar="ID", help="a customer it may act for (repeat)")
    who.add_argument("--operator", action="store_true", help="all customers and fleet-wide reads")
    akn.add_argument("--unredacted", action="store_true",
                     help="may read text as written (?unredacted=true); each such read is audited")
    akn.add_argument("--json", action="store_true", help='print {"key", "entry"}')
    akh = _verb(ak_sub, "hash", "the SHA-256 digest of a key ('-' reads it from stdin)",
                "turnfleet apikey hash tfk_…", "echo \"$KEY\" | turnfleet apikey hash -")
    akh.add_argument("key", metavar="KEY", help="the key, or '-' to read it from stdin")

    co = _verb(sub, "completion", "print a shell completion script for turnfleet (bash or zsh)",
               "turnfleet completion bash > ~/.local/share/bash-completion/completions/turnfleet",
               "source <(turnfleet completion bash)",
               "turnfleet completion zsh > ~/.zfunc/_turnfleet   # with fpath=(~/.zfunc $fpath) before compinit",
               'eval "$(turnfleet completion zsh)"   # in ~/.zshrc, after compinit')
    co.add_argument("shell", choices=COMPLETION_SHELLS, help="the shell the script is for")
    return p


def _candidate(args: argparse.Namespace) -> Any:
    from turnfleet.workers.rerun import CandidateSpec

    return CandidateSpec(app=args.app, workflow=args.workflow, model=args.model)


async def _rerun(args: argparse.Namespace, url: str) -> int:
    from turnfleet.connection import connect
    from turnfleet.shell.regress import render_rerun, rerun_one
    from turnfleet.shell.render import console
    from turnfleet.workers.rerun import RerunError

    redis = connect(url)
    try:
        report = await rerun_one(redis, args.turn_id, _candidate(args))
    except RerunError as exc:
        raise CliError(str(exc), error=exc.code) from None
    finally:
        await redis.aclose()
    if args.json:
        _print_json({k: report[k] for k in ("turn_id", "rerun_id", "changed", "differences", "checks",
                                            "original", "candidate", "usage")})
    else:
        console().print(render_rerun(report))
    return 0


async def _regress(args: argparse.Namespace, url: str) -> int:
    from turnfleet.connection import connect
    from turnfleet.shell.regress import matching_turns, progress_bar, regress, render_regress
    from turnfleet.shell.render import console
    from turnfleet.workers.rerun import RerunError

    if args.concurrency < 1:
        raise _invalid("--concurrency", f"must be at least 1, not {args.concurrency}")
    filters = {"customer": args.customer, "tool": args.tool, "agent": args.agent, "error": args.error,
               "guardrail": args.guardrail, "workflow": args.find_workflow, "version": args.version,
               "feedback": args.feedback, "check_failed": args.check_failed,
               "since": _when(args.since), "until": _when(args.until), "min_cost_usd": args.min_cost}
    redis = connect(url)
    try:
        turns = await matching_turns(redis, filters, args.limit)
        with progress_bar() as bar:
            summary = await regress(redis, turns, _candidate(args), concurrency=args.concurrency, progress=bar)
    except RerunError as exc:
        raise CliError(str(exc), error=exc.code) from None
    finally:
        await redis.aclose()
    if args.json:
        _print_json(summary)
    else:
        console().print(render_regress(summary))
    return 0 if summary["ok"] else EXIT_FAILED


ASYNC_VERBS = {
    "enqueue": _enqueue,
    "feedback": _feedback,
    "result": _result,
    "conversation": _conversation,
    "turn": _turn,
    "stats": _stats,
    "find": _find,
    "alerts": _alerts,
    "audit": _audit_log,
    "forget": _forget,
    "rerun": _rerun,
    "regress": _regress,
}
PROCESS_VERBS = {"worker": cmd_worker, "telemetry": cmd_telemetry, "demo": cmd_demo}
PROCESS_VERBS["serve"] = cmd_serve
PROCESS_VERBS["dev"] = cmd_dev
LOCAL_VERBS = {"apikey": cmd_apikey}  # need no Redis
LOCAL_VERBS["health"] = cmd_health  # reads REDIS_URL itself: a probe never starts a Redis
LOCAL_VERBS["completion"] = cmd_completion


def _fail(exc: CliError, where: str, as_json: bool) -> int:
    """Print the error as one line (or one JSON document) on stderr; its exit status."""
    if as_json:
        body: dict[str, Any] = {"error": exc.error, "message": str(exc)}
        if exc.errors:
            body["errors"] = [{k: e[k] for k in ("line", "field", "message") if k in e} for e in exc.errors]
        print(json.dumps(body), file=sys.stderr)  # ASCII: safe whatever the input was
    else:
        print(f"{where}: {exc}", file=sys.stderr)
    return exc.exit


def _stop_while_starting(signum: int, frame: Any) -> NoReturn:
    print(f"turnfleet: stopped by signal {signum} while starting; nothing was taken", file=sys.stderr)
    raise SystemExit(0)


def versions() -> dict[str, str]:
    """This package's version, the Agents SDK's and Python's (``--version --json``)."""
    from importlib.metadata import version
    import platform

    return {"turnfleet": version("turnfleet"), "openai-agents": version("openai-agents"),
            "python": platform.python_version()}


def _version(argv: list[str]) -> int:
    """``turnfleet --version``: one line, as gh and kubectl print it; ``--json`` adds the SDK's."""
    if set(argv[1:]) - {"--json"}:
        return _fail(CliError("--version takes no verb or option but --json"), "turnfleet", "--json" in argv)
    if "--json" in argv:
        _print_json(versions())
    else:
        print(f"turnfleet {versions()['turnfleet']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        return _version(argv)
    try:
        args = build_parser().parse_args(argv)
    except CliError as exc:
        return _fail(exc, "turnfleet", "--json" in argv)
    common = CommonSettings()
    quiet = args.verb not in ("worker", "telemetry", "serve")
    from turnfleet.redaction import Redactor

    try:
        redactor = Redactor.from_settings(common)
    except ValueError as exc:  # TURNFLEET_REDACT_PATTERNS / _DETECTORS: one line, no traceback
        return _fail(CliError(str(exc)), "turnfleet", "--json" in argv)
    # Redaction runs as a log processor in every process: a log line can't leak what a span can't.
    configure_logging(
        "WARNING" if quiet else common.log_level,
        common.log_format,
        extra_processors=[redactor.structlog_processor()],
    )
    try:
        if args.verb == "enqueue":
            _check_enqueue(args)  # reject bad input before touching (or starting) Redis
        _check_args(args)
        if args.verb in LOCAL_VERBS:
            return LOCAL_VERBS[args.verb](args)
        check_redis_url(common.redis_url)
        check_redis_url(common.trace_redis_url, "TURNFLEET_TRACE_REDIS_URL")
        if args.verb in ("worker", "telemetry"):
            # Until the process installs its own handlers (its event loop's), a SIGTERM means
            # "stop before you start": exit 0 having taken nothing, as a supervisor expects,
            # rather than die of the signal halfway through importing the SDK.
            signal.signal(signal.SIGTERM, _stop_while_starting)
            # A process started in the background by a non-interactive shell inherits SIGINT
            # ignored; a worker must still stop on it (Ctrl-C, kill -INT) while it starts.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        with redis_url_for(common.redis_url, common.state_dir) as url:
            os.environ["REDIS_URL"] = url  # processes this one starts use the same server
            if args.verb in PROCESS_VERBS:
                return PROCESS_VERBS[args.verb](args, url)
            return asyncio.run(ASYNC_VERBS[args.verb](args, url))
    except CliError as exc:
        return _fail(exc, f"turnfleet {args.verb}", getattr(args, "json", False))
    except RedisUrlError as exc:  # configuration, like bad input: nothing was started
        config = CliError(str(exc), exit=EXIT_USAGE, error="configuration")
        return _fail(config, f"turnfleet {args.verb}", getattr(args, "json", False))
    except KeyboardInterrupt:
        return 130
    except (RedisConnectionError, ConnectionError) as exc:
        unreachable = CliError(f"cannot reach Redis: {exc}", exit=EXIT_FAILED, error="redis_unreachable")
        return _fail(unreachable, f"turnfleet {args.verb}", getattr(args, "json", False))


if __name__ == "__main__":
    sys.exit(main())
