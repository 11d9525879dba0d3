"""HTTP routes that read what happened: replays, search, stats, alerts, readiness, metrics.

The same data as the CLI's ``--json`` output (``turnfleet conversation``, ``turn``, ``find``,
``stats``, ``alerts``), scoped to the caller's key. Every route but ``/readyz`` needs a key
(``Authorization: Bearer <key>`` or ``X-API-Key``); a key bound to customers sees only their
data, and something of another customer answers exactly as if it did not exist (404 for a
conversation or turn, no rows in a list). An operator key (``*``) sees everything.

Scope of a customer key where figures are fleet-wide:

- ``/v1/find`` without ``customer``: the union over the key's customers (merged by latest
  event); with a ``customer`` the key may not see: no rows.
- ``/v1/stats``: ``by=customer`` / ``by=conversation`` rows of the key's customers only;
  ``totals`` summed over the key's customers; ``slowest`` the slowest of their turns (among
  the 1000 slowest kept); ``latency`` is ``null`` (the percentile samples are fleet-wide);
  ``by=model``, ``by=workflow`` and ``by=version`` are 403 (those figures are not split by
  customer).
- ``/v1/alerts``: alerts whose ``customer_id`` is one of the key's; alerts without a customer
  (fleet-wide ``error_rate`` with no failing turn named) for operator keys only.
- Replays (``/v1/conversations/{id}``, ``/v1/turns/{id}/replay``) are redacted for every key;
  ``?unredacted=true`` needs a key with the ``unredacted`` permission (403 otherwise) and is
  audited (``turnfleet.audit``); ``/v1/audit`` lists those reads, operator keys only.
- ``/metrics``: operator keys only (401 without a key, 403 for a customer key): the
  exposition is fleet-wide. Scrape config: ``authorization: {type: Bearer, credentials:
  <operator key>}``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from redis.asyncio import Redis
from redis.exceptions import RedisError

from turnfleet.telemetry.aggregate import SLOWEST_TURNS_KEPT
from turnfleet.telemetry.alert_reads import alert_entries, alert_entries_before
from turnfleet.telemetry.find import FIND_PAGE_MAX, find_conversations, known_check
from turnfleet.telemetry.lag import telemetry_lag
from turnfleet.telemetry.latency import latency_report, slowest_turns
from turnfleet.telemetry.metrics import exposition
from turnfleet.telemetry.replay import conversation_replay, turn_replay
from turnfleet.telemetry.scoped import stats_of_customers, totals_of_customers
from turnfleet.telemetry.stats import FLEET_WIDE, stats, totals
from turnfleet.telemetry.times import parse_time
from turnfleet import audit, heartbeat, keys, registry
from turnfleet.auth import Principal
from turnfleet.models import Alert
from turnfleet.queue import TurnQueue
from turnfleet.http import ApiError, principal, redis_dep, settings_dep, trace_redis_dep
from turnfleet.settings import ProducerSettings

log = structlog.get_logger(__name__)

router = APIRouter(tags=["telemetry"])

Caller = Annotated[Principal, Depends(principal)]
Store = Annotated[Redis, Depends(redis_dep)]
TraceStore = Annotated[Redis, Depends(trace_redis_dep)]
Settings = Annotated[ProducerSettings, Depends(settings_dep)]

SSE_BLOCK_MS = 1000  # one blocking XREAD at most this long: a disconnect is noticed this fast
SSE_KEEPALIVE_S = 15.0  # a ": ping" comment after this long without an event
SSE_BATCH = 100
READY_TIMEOUT_S = 2.0  # each /readyz probe of Redis, at most
_STREAM_ID = re.compile(r"[0-9]+(?:-[0-9]+)?")  # fullmatch; ASCII digits only (\d takes "١٢٣")


def _not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, "not_found", f"no {what} {ident!r}")


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "validation", "the request is not valid",
                    errors=[{"field": field, "message": message}])


# -- replays -----------------------------------------------------------------------------


Unredacted = Annotated[bool, Query(description="Text as written (keys with the unredacted permission; audited).")]


def _check_unredacted(who: Principal, unredacted: bool) -> None:
    """403 for ``?unredacted=true`` from a key without the permission (before any lookup)."""
    if unredacted and not who.unredacted:
        raise ApiError(403, "forbidden", "unredacted reads need a key with the unredacted permission")


async def _view(redis: Redis, settings: ProducerSettings, who: Principal, unredacted: bool,
                what: str, subject: str, replay: dict[str, Any]) -> JSONResponse:
    """The replay as the caller may read it: redacted, or raw with one audit entry."""
    if unredacted:
        await audit.record(redis, who.name, what, subject)
        return JSONResponse(replay)
    return JSONResponse((await registry.redactor(redis, settings)).value(replay))


@router.get("/v1/conversations/{conversation_id}")
async def get_conversation(
    conversation_id: str, who: Caller, redis: Store, trace_redis: TraceStore, settings: Settings,
    unredacted: Unredacted = False,
) -> JSONResponse:
    """The conversation's replay (``turnfleet conversation ID --json``): every turn's result,
    figures and attempts as trees, and the conversation totals, redacted (``?unredacted=true``:
    as written, for keys with that permission, audited). 404 if unknown or not the key's
    customer's."""
    _check_unredacted(who, unredacted)
    owner = await redis.hget(keys.conversation_state(conversation_id), "customer_id")
    if owner is None or not who.may(owner):
        raise _not_found("conversation", conversation_id)
    replay = await conversation_replay(redis, conversation_id, trace_redis)
    if replay is None:
        raise _not_found("conversation", conversation_id)
    return await _view(redis, settings, who, unredacted, "GET /v1/conversations/{id}", conversation_id, replay)


@router.get("/v1/turns/{turn_id}/replay")
async def get_turn_replay(
    turn_id: str, who: Caller, redis: Store, trace_redis: TraceStore, settings: Settings,
    unredacted: Unredacted = False,
) -> JSONResponse:
    """One turn's replay (``turnfleet turn TURN_ID --json``), redacted unless
    ``?unredacted=true`` (as above). 404 if unknown or not the key's customer's."""
    _check_unredacted(who, unredacted)
    turn = await TurnQueue(redis).get(turn_id)  # never raises on a corrupt record
    if turn is None or not who.may(turn.customer_id):
        raise _not_found("turn", turn_id)
    replay = await turn_replay(redis, turn_id, trace_redis)
    if replay is None:
        raise _not_found("turn", turn_id)
    return await _view(redis, settings, who, unredacted, "GET /v1/turns/{id}/replay", turn_id, replay)


@router.get("/v1/audit")
async def get_audit(
    who: Caller, redis: Store, limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> JSONResponse:
    """The latest unredacted reads (who, what, which id, when), oldest first. Operator keys only."""
    if not who.operator:
        raise ApiError(403, "forbidden", "the audit log is fleet-wide: it needs an operator key")
    return JSONResponse({"entries": await audit.entries(redis, limit)})


# -- find and stats ----------------------------------------------------------------------


def _time_param(name: str, value: str | None) -> datetime | None:
    try:
        return parse_time(value)
    except ValueError as exc:
        raise _invalid(name, str(exc)) from None


@router.get("/v1/find")
async def find(
    who: Caller,
    redis: Store,
    customer: str | None = None,
    tool: str | None = None,
    agent: str | None = None,
    error: str | None = None,
    guardrail: str | None = None,
    workflow: str | None = None,
    version: Annotated[str | None, Query(description="a version label, e.g. 2.1@3f9a0c1d2e4b5a69")] = None,
    feedback: Annotated[Literal["negative", "positive"] | None, Query(description="a turn given such feedback")] = None,
    check_failed: Annotated[str | None, Query(description="a check that failed on a turn, e.g. refund_amount_matches")] = None,
    since: Annotated[str | None, Query(description="ISO 8601, or 30m / 2h / 7d ago")] = None,
    until: Annotated[str | None, Query(description="ISO 8601, or 30m / 2h / 7d ago")] = None,
    min_cost: Annotated[float | None, Query(ge=0, le=1e9, allow_inf_nan=False)] = None,
    limit: Annotated[int, Query(ge=1, le=FIND_PAGE_MAX)] = 50,
) -> JSONResponse:
    """Conversations matching every filter, most recent last event first (``turnfleet find
    --json``). A customer key searches its customers (all of them without ``customer``)."""
    if check_failed is not None:
        try:
            await known_check(redis, check_failed)
        except ValueError as exc:
            raise _invalid("check_failed", str(exc).removeprefix("check_failed: ")) from None
    return JSONResponse(await find_visible(
        redis, who, customer=customer, tool=tool, agent=agent, error=error, guardrail=guardrail,
        workflow=workflow, version=version, feedback=feedback, check_failed=check_failed,
        since=_time_param("since", since), until=_time_param("until", until),
        min_cost_usd=min_cost, limit=limit,
    ))


async def find_visible(redis: Redis, who: Principal, customer: str | None = None,
                       limit: int = 50, **filters: Any) -> list[dict[str, Any]]:
    """:func:`find_conversations` as the key may see it (module docstring): with a
    ``customer`` the key may not see, no rows; a customer key without ``customer``, the union
    over its customers, newest first. Shared by ``/v1/find`` and the console's search."""
    if customer is not None:
        if not who.may(customer):
            return []  # as if the customer had no conversations
        return await find_conversations(redis, customer=customer, limit=limit, **filters)
    if who.operator:
        return await find_conversations(redis, limit=limit, **filters)
    rows: list[dict[str, Any]] = []
    for mine in sorted(who.customers):
        rows += await find_conversations(redis, customer=mine, limit=limit, **filters)
    # Ties (the same last-event millisecond) as Redis breaks them in the fleet-wide search.
    rows.sort(key=lambda r: (datetime.fromisoformat(r["last_event_at"]), r["conversation_id"]), reverse=True)
    return rows[:limit]


@router.get("/v1/stats")
async def get_stats(
    who: Caller,
    redis: Store,
    by: Literal["conversation", "customer", "model", "workflow", "version"] = "model",
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    slowest: Annotated[int, Query(ge=0, le=SLOWEST_TURNS_KEPT)] = 10,
) -> JSONResponse:
    """``{"by", "rows", "totals", "latency", "slowest"}`` as ``turnfleet stats --json``; for a
    customer key scoped to its customers (module docstring)."""
    if who.operator:
        return JSONResponse({
            "by": by,
            "rows": await stats(redis, by, limit=limit),
            "totals": await totals(redis),
            "latency": await latency_report(redis),
            "slowest": await slowest_turns(redis, limit=slowest),
        })
    if by in FLEET_WIDE:
        raise ApiError(403, "forbidden", f"per-{by} figures are fleet-wide: they need an "
                       "operator key (use by=customer or by=conversation)")
    mine = sorted(who.customers)
    kept = await slowest_turns(redis, limit=SLOWEST_TURNS_KEPT) if slowest else []
    return JSONResponse({
        "by": by,
        "rows": await stats_of_customers(redis, by, mine, limit=limit),
        "totals": await totals_of_customers(redis, mine),
        "latency": None,
        "slowest": [t for t in kept if t["customer_id"] in who.customers][:slowest],
    })


# -- alerts ------------------------------------------------------------------------------


def visible_alert(who: Principal, entry_id: str, alert: Alert | None) -> dict[str, Any] | None:
    """``{"id": <stream id>, ...alert}`` if the key may see the alert, else ``None``."""
    if alert is None or not who.may(alert.customer_id):
        return None
    return {"id": entry_id, **alert.model_dump(mode="json")}


def _stream_id(field: str, value: str) -> str:
    """A Redis stream id (``<ms>-<seq>`` or ``<ms>``, each part a 64-bit unsigned), or 422."""
    if not _STREAM_ID.fullmatch(value) or any(int(part) >= 2**64 for part in value.split("-")):
        raise _invalid(field, f"not a stream id: {value!r} (e.g. 1700000000000-0)")
    return value


@router.get(
    "/v1/alerts",
    response_model=None,
    responses={200: {"description": "A JSON list; with follow=true, Server-Sent Events.",
                     "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
async def get_alerts(
    request: Request,
    who: Caller,
    redis: Store,
    follow: bool = False,
    after: Annotated[str | None, Query(description="stream id: only alerts after it")] = None,
    new_only: Annotated[bool, Query(description="with follow: skip the alerts already there")] = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> JSONResponse | StreamingResponse:
    """The key's alerts, oldest first: ``[{"id": <stream id>, ...alert}]`` (``turnfleet
    alerts --json``), at most ``limit`` after ``after``; page on with ``after`` = the last id.

    ``follow=true``: Server-Sent Events (``text/event-stream``), one event per alert
    (``id: <stream id>``, ``event: alert``, ``data: {"id", ...alert}``) from after the
    ``Last-Event-ID`` header, else ``after``, else the stream's end with ``new_only``, else
    its start; a ``: ping`` comment every ~15 s without alerts; it ends when the client goes.
    """
    if not follow:
        start = _stream_id("after", after) if after else "0-0"
        return JSONResponse(await _alert_page(redis, who, start, limit))
    return await alert_stream(request, redis, who, last_event_id, after, new_only)


async def alert_stream(request: Request, redis: Redis, who: Principal, last_event_id: str | None,
                       after: str | None, new_only: bool) -> StreamingResponse:
    """The SSE response of ``/v1/alerts?follow=true`` (and of the console's live page): from
    after ``last_event_id``, else ``after``, else the stream's end with ``new_only``, else its
    start; 422 for an id that is not a stream id."""
    if last_event_id:
        start = _stream_id("Last-Event-ID", last_event_id)
    elif after:
        start = _stream_id("after", after)
    elif new_only:
        start = await alerts_tail(redis)
    else:
        start = "0-0"
    return StreamingResponse(
        _alert_events(request, redis, who, start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def alerts_tail(redis: Redis) -> str:
    """The alert stream's newest id (``0-0`` when empty): follow from here for new alerts only."""
    tail = await redis.xrevrange(keys.ALERTS_STREAM, count=1)
    return tail[0][0] if tail else "0-0"


async def _alert_page(redis: Redis, who: Principal, after_id: str, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` visible alerts after ``after_id``, reading past the invisible ones."""
    out: list[dict[str, Any]] = []
    last = after_id
    while len(out) < limit:
        batch = await alert_entries(redis, after_id=last, count=max(limit, SSE_BATCH))
        if not batch:
            break
        for entry_id, alert in batch:
            shown = visible_alert(who, entry_id, alert)
            if shown is not None and len(out) < limit:
                out.append(shown)
        last = batch[-1][0]
    return out


async def recent_alerts(redis: Redis, who: Principal, limit: int, scan_max: int = 5000) -> list[dict[str, Any]]:
    """The key's ``limit`` newest alerts, newest first, reading back at most ``scan_max``
    entries past the ones it may not see."""
    out: list[dict[str, Any]] = []
    before, scanned = "+", 0
    while len(out) < limit and scanned < scan_max:
        batch = await alert_entries_before(redis, before, count=SSE_BATCH)
        if not batch:
            break
        scanned += len(batch)
        out += [shown for entry_id, alert in batch
                if (shown := visible_alert(who, entry_id, alert)) is not None]
        before = batch[-1][0]
    return out[:limit]


async def _alert_events(request: Request, redis: Redis, who: Principal, after_id: str) -> AsyncIterator[str]:
    """The SSE body: blocking reads of at most ``SSE_BLOCK_MS``, so that a client that left
    is noticed within a second (the server also cancels the body when it sees the disconnect).
    """
    last = after_id
    quiet_since = time.monotonic()
    yield ": connected\n\n"
    try:
        while not await request.is_disconnected():
            batch = await alert_entries(redis, after_id=last, count=SSE_BATCH, block_ms=SSE_BLOCK_MS)
            for entry_id, alert in batch:
                last = entry_id
                shown = visible_alert(who, entry_id, alert)
                if shown is not None:
                    data = json.dumps(shown, separators=(",", ":"))
                    yield f"id: {entry_id}\nevent: alert\ndata: {data}\n\n"
                    quiet_since = time.monotonic()
            if time.monotonic() - quiet_since >= SSE_KEEPALIVE_S:
                yield ": ping\n\n"
                quiet_since = time.monotonic()
    except RedisError as exc:
        log.warning("http.alerts_stream_redis_error", error=str(exc), last_id=last)
        yield f": redis error, reconnect with Last-Event-ID {last}\n\n"


# -- readiness and metrics ---------------------------------------------------------------


@router.get("/readyz", tags=["health"])
async def readyz(redis: Store, settings: Settings) -> JSONResponse:
    """Ready (200) when Redis answers, a worker beat within ``ready_worker_max_age_s`` and the
    telemetry lag is at most ``ready_max_telemetry_lag``; otherwise 503. (A known workflow with
    turns queued and no live worker serving it is said in ``checks.workers.notes`` and
    ``unserved``, not failed: the producer still takes turns.) Either way
    ``{"status": "ready"|"not_ready", "checks": {"redis", "workers", "telemetry"},
    "failing": [names]}``; each check has ``ok`` (``null``: not run, Redis is down)."""
    checks: dict[str, dict[str, Any]] = {}
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await redis.ping()
        checks["redis"] = {"ok": True}
    except (RedisError, OSError, TimeoutError) as exc:
        checks["redis"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        skipped = {"ok": None, "skipped": "Redis does not answer"}
        checks["workers"], checks["telemetry"] = dict(skipped), dict(skipped)
    else:
        checks["workers"], checks["telemetry"] = await _fleet_checks(redis, settings)
    failing = [name for name, check in checks.items() if check["ok"] is False]
    body = {"status": "not_ready" if failing else "ready", "checks": checks, "failing": failing}
    return JSONResponse(body, status_code=503 if failing else 200)


async def _fleet_checks(redis: Redis, settings: ProducerSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    max_age = settings.ready_worker_max_age_s
    max_lag = settings.ready_max_telemetry_lag
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            now = int(time.time() * 1000)
            live = await heartbeat.alive(redis, "worker", max_age, now)
            newest = await heartbeat.newest(redis, "worker")
            lag = await telemetry_lag(redis, cap=max_lag + 1)
            consumers = len(await heartbeat.alive(redis, "telemetry", max_age, now))
            unserved = await heartbeat.unserved(redis, max_age, now)
    except (RedisError, OSError, TimeoutError) as exc:
        error = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return dict(error), dict(error)
    workers: dict[str, Any] = {
        "ok": bool(live), "alive": len(live), "max_age_s": max_age,
        "newest_age_s": round(max(0.0, now - newest[1]) / 1000, 3) if newest else None,
    }
    if not live:
        workers["error"] = (f"no worker heartbeat in the last {max_age:g} s" if newest
                            else "no worker has ever sent a heartbeat")
    if unserved:  # said, not failed: the producer still takes turns; they wait for a worker
        workers["unserved"] = unserved
        workers["notes"] = heartbeat.unserved_notes(unserved)
    telemetry: dict[str, Any] = {
        "ok": lag.entries <= max_lag, "lag": lag.entries, "undelivered": lag.undelivered,
        "pending": lag.pending, "max_lag": max_lag, "consumers_alive": consumers,
    }
    if not telemetry["ok"]:
        telemetry["error"] = f"telemetry lag over {max_lag} entries"
    return workers, telemetry


@router.get("/metrics", tags=["health"], response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def metrics(who: Caller, redis: Store, settings: Settings) -> Response:
    """Prometheus text exposition (``telemetry/metrics.py``), read from Redis now. Operator
    keys only."""
    if not who.operator:
        raise ApiError(403, "forbidden", "/metrics is fleet-wide: it needs an operator key")
    body = await exposition(redis, settings.ready_worker_max_age_s)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
