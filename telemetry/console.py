"""The web console: search, conversation replay and a live view, as server-rendered HTML.

Served by ``turnfleet serve`` under ``/console`` (``turnfleet/server.py`` composes this router
beside the JSON API). It reads what the JSON API reads, through the same functions
(``telemetry/stats.py``, ``find.py``, ``live_figures.py``, ``replay.py``, the scoping helpers
of ``telemetry/http.py``), so a page shows exactly what ``/v1/...`` answers for the same key.

Pages (each needs a key; without one the browser is sent to the login form):

- ``/console/search``: conversations by customer, time range, agent, tool, error type, workflow, version and
  minimum cost, newest first, a page at a time (``find_visible``, as ``/v1/find``);
- ``/console/conversations/{id}``: every turn with its attempts, each attempt's span tree
  (collapsible ``<details>``) and timeline (one bar per span on the attempt's time axis), the
  turn's split into queue wait, model, tool and other time, tokens and cost per turn and in
  total, failed attempts with their errors; each ``process_refund`` call with its refund's
  order, amount and eligibility amount, marked when a money-path check failed on its turn
  (the money view's anomaly, with the check's name and reason: ``place_refunds``), each turn
  an anchor (``#turn:<turn id>``) the money view links to;
- ``/console/money``: every refund (``process_refund`` call) with its order, amount, the
  eligibility amount, turn, conversation, customer and time, filterable (customer, order,
  anomalies only) and sortable, a refund whose turn failed a money-path check marked with the
  check and its reason (``telemetry/refunds.py``), each row linking to its turn on the
  conversation page; ``/console/money.json``: the same rows;
- ``/console/live``: alerts as they arrive (Server-Sent Events from the same generator as
  ``/v1/alerts?follow=true``), spend per customer and model today, and turns/s, error rate
  and p95 latency per minute over the last hour as small inline-SVG charts (refreshed from
  ``/console/live/panels`` every 15 s).

Authentication: ``/console/login`` takes an API key, checks it with the server's
``KeyStore`` and puts it in a cookie (``HttpOnly``, ``SameSite=Strict``, ``Path=/console``,
``Secure`` over https, 8 hours). Each request authenticates the cookie again (or an
``Authorization: Bearer`` / ``X-API-Key`` header), so a key removed from the keys file stops
working at once. Scoping is the JSON API's: a customer key sees its customers only, a
conversation of another customer is the same 404 page as one that does not exist, and the
fleet-wide charts and per-model figures need an operator key. Every value is escaped
(Jinja autoescape); what the worker redacted shows as its ``[REDACTED:kind]`` marker, and the
turn's own text (business data, stored as written) passes through the same redactor before it
is shown. Pages carry a Content-Security-Policy allowing only this server's own script and
stylesheet (vendored under ``telemetry/console/static``: nothing is fetched from elsewhere).
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
import structlog
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from markupsafe import Markup, escape
from redis.asyncio import Redis

from turnfleet.telemetry.http import (
    alert_stream,
    alerts_tail,
    find_visible,
    recent_alerts,
)
from turnfleet.telemetry.find import FIND_PAGE_MAX
from turnfleet.telemetry.live_figures import last_hour, spend_today
from turnfleet.telemetry.refunds import PROCESS_REFUND, SORTS, conversation_refunds, refunds
from turnfleet.telemetry.replay import conversation_replay
from turnfleet.telemetry.times import parse_time
from turnfleet import keys, registry
from turnfleet.auth import Principal
from turnfleet.formatting import money, ms
from turnfleet.http import redis_of, settings_of, trace_redis_of

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/console", include_in_schema=False)

HERE = Path(__file__).parent / "console"
STATIC = {  # what /console/static/ serves, and nothing else
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}
COOKIE = "turnfleet_console"
COOKIE_MAX_AGE_S = 8 * 3600
PAGE_SIZE = 25
RECENT_ALERTS = 30
MAX_FILTER_CHARS = 128
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_MARKER = re.compile(r"\[REDACTED:(\w{1,64})\]")


# -- templates and filters -----------------------------------------------------------------


def _redacted(value: Any) -> Markup:
    """Escaped text with each ``[REDACTED:kind]`` marker wrapped in ``<mark class=redacted>``."""
    text = str(escape("" if value is None else value))
    return Markup(_MARKER.sub(
        lambda m: f'<mark class="redacted" title="redacted: {m.group(1)}">{m.group(0)}</mark>', text))


def _pretty(value: Any) -> str:
    """A JSON document (or a string holding one) indented; anything else as text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, indent=2, ensure_ascii=False)
    return "" if value is None else str(value)


def _call(name: str, arguments: Any) -> str:
    """``name(k="v", ...)`` from a tool call's JSON arguments."""
    try:
        data = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        return f"{name}({arguments})"
    if not isinstance(data, dict):
        return f"{name}({'' if data is None else data})"
    return f"{name}(" + ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in data.items()) + ")"


def _decision(decision: dict[str, Any] | None) -> str:
    """What a generation decided, in words: a handoff, tool calls, or the answer."""
    if not decision:
        return ""
    parts = []
    for call in decision.get("calls") or []:
        name = str(call.get("name") or "?")
        if name.startswith("transfer_to_"):
            parts.append("handoff to " + name.removeprefix("transfer_to_").replace("_", " ").title())
        else:
            parts.append("call " + _call(name, call.get("arguments")))
    message = decision.get("message")
    if message:
        parts.append("final answer" if message is True else f"answer: {message}")
    return "; ".join(parts)


def _when(value: str | None) -> str:
    if not value:
        return "–"
    try:
        return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return value


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _money(value: float | None) -> str:
    return money(value) if value is None or value >= 0.0001 or value == 0 else f"${value:.6f}"


_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every template, whatever its name
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_templates.filters.update(
    redacted=_redacted, pretty=_pretty, call=_call, decision=_decision, when=_when, money=_money,
    ms=ms, num=_num, pct=_pct, path=lambda v: quote(str(v), safe=""),
    turn_anchor=lambda v: "turn:" + quote(str(v), safe=":@"),
)


def _page(request: Request, template: str, status: int = 200, who: Principal | None = None,
          **context: Any) -> HTMLResponse:
    body = _templates.get_template(template).render(
        who=who, path=request.url.path, **context)
    return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)


# -- who is asking ---------------------------------------------------------------------------


def _presented_key(request: Request) -> str | None:
    """The key in the console cookie, else in ``Authorization: Bearer`` or ``X-API-Key``."""
    key = request.cookies.get(COOKIE)
    if key:
        return key
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.headers.get("x-api-key") or None


def _who(request: Request) -> Principal | None:
    return request.app.state.keys.authenticate(_presented_key(request))


def _to_login(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/console/login?{urlencode({'next': target})}", status_code=303,
                            headers=SECURITY_HEADERS)


def _safe_next(target: str | None) -> str:
    """Where to go after login: a path of this console, never another site."""
    if target and target.startswith("/console") and not target.startswith("/console/login") \
            and "//" not in target and "\\" not in target:
        return target
    return "/console/search"


def _same_origin(request: Request) -> bool:
    """A form post from this server's own pages (browsers send ``Origin`` with POSTs)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser's cross-site post: browsers send Origin with every POST
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


def _not_found(request: Request, who: Principal, what: str, ident: str) -> HTMLResponse:
    return _page(request, "not_found.html", status=404, who=who, what=what, ident=ident)


# -- login and logout ------------------------------------------------------------------------


@router.get("")
async def console_home() -> RedirectResponse:
    return RedirectResponse("/console/search", status_code=303, headers=SECURITY_HEADERS)


@router.get("/login")
async def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    return _page(request, "login.html", who=_who(request), next=_safe_next(next), error=None)


@router.post("/login")
async def login(request: Request) -> Response:
    if not _same_origin(request):
        return _page(request, "login.html", status=403, next="/console/search",
                     error="This form must be sent from the console's own page.")
    form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=10)
    key = (form.get("api_key") or [""])[0].strip()
    target = _safe_next((form.get("next") or [None])[0])
    who = request.app.state.keys.authenticate(key)
    if who is None:
        log.info("console.login_refused")
        return _page(request, "login.html", status=401, next=target,
                     error="That key is not known here." if key else "Enter an API key.")
    log.info("console.login", key_name=who.name)
    response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
    response.set_cookie(COOKIE, key, max_age=COOKIE_MAX_AGE_S, path="/console", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
    return response


@router.post("/logout")
async def logout(request: Request) -> RedirectResponse:
    response = RedirectResponse("/console/login", status_code=303, headers=SECURITY_HEADERS)
    response.delete_cookie(COOKIE, path="/console", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
    return response


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in STATIC:
        return Response("not found", status_code=404, media_type="text/plain")
    return FileResponse(HERE / "static" / name, media_type=STATIC[name],
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


# -- search ----------------------------------------------------------------------------------

FILTERS = ("customer", "tool", "agent", "error", "workflow", "version", "since", "until", "min_cost")


@router.get("/search")
async def search(request: Request) -> Response:
    who = _who(request)
    if who is None:
        return _to_login(request)
    redis: Redis = redis_of(request)
    params = {name: (request.query_params.get(name) or "").strip() for name in FILTERS}
    errors: dict[str, str] = {}
    for name, value in params.items():
        if len(value) > MAX_FILTER_CHARS:
            errors[name] = f"at most {MAX_FILTER_CHARS} characters"
    since = until = min_cost = None
    try:
        since = parse_time(params["since"])
    except ValueError as exc:
        errors["since"] = str(exc)
    try:
        until = parse_time(params["until"])
    except ValueError as exc:
        errors["until"] = str(exc)
    if params["min_cost"]:
        try:
            min_cost = float(params["min_cost"])
            if not math.isfinite(min_cost) or min_cost < 0:
                raise ValueError
        except ValueError:
            errors["min_cost"] = "a number of dollars, 0 or more"
    size = _int_param(request, "size", PAGE_SIZE, 1, 100)
    page = _int_param(request, "page", 1, 1, FIND_PAGE_MAX // size)
    offset = (page - 1) * size
    async with redis.pipeline(transaction=False) as pipe:
        for dimension in ("tool", "agent"):
            pipe.smembers(keys.latency_names(dimension))
        pipe.zrange(keys.aggregate_index("version"), 0, -1)
        tools, agents, versions = (sorted(names) for names in await pipe.execute())
    matched_tools = tool_matches(params["tool"], tools) if params["tool"] else [None]
    rows: list[dict[str, Any]] = []
    more = False
    if not errors:
        # Pages by offset: the first offset + size + 1 matches, newest first, then a slice.
        # A tool prefix naming several tools is the union of one search per tool (each its
        # newest offset + size + 1, so the union's newest are among them).
        found: dict[str, dict[str, Any]] = {}
        for tool in matched_tools:
            for row in await find_visible(
                    redis, who, customer=params["customer"] or None, tool=tool,
                    agent=params["agent"] or None, error=params["error"] or None,
                    workflow=params["workflow"] or None, version=params["version"] or None,
                    since=since, until=until, min_cost_usd=min_cost, limit=offset + size + 1):
                found.setdefault(row["conversation_id"], row)
        ordered = sorted(found.values(), key=lambda r: (r["last_event_at"] or "", r["conversation_id"]),
                         reverse=True)  # ties as the search breaks them: pages stay stable
        rows, more = ordered[offset:offset + size], len(ordered) > offset + size
        await _mark_errors(redis, rows)
    kept = {k: v for k, v in params.items() if v}
    if size != PAGE_SIZE:
        kept["size"] = str(size)
    workflows = sorted({keys.split_version_subject(v)[0] for v in versions} - {keys.UNKNOWN_RUN})
    return _page(
        request, "search.html", status=400 if errors else 200, who=who, params=params,
        errors=errors, rows=rows, page=page, offset=offset,
        newer=f"?{urlencode({**kept, 'page': page - 1})}" if page > 1 else None,
        older=f"?{urlencode({**kept, 'page': page + 1})}" if more else None,
        filtered=any(params.values()), tools=tools, agents=agents, size=size,
        workflows=workflows, matched_tools=[t for t in matched_tools if t],
        default_size=PAGE_SIZE,
        customers=sorted(who.customers) if not who.operator else [],
    )


MAX_TOOL_MATCHES = 20


def tool_matches(text: str, known: list[str]) -> list[str]:
    """The known tool names (``keys.latency_names("tool")``: every tool telemetry has timed)
    that start with ``text``: the "Tool called" filter matches a prefix of a known name
    (``process_`` finds ``process_refund``; ``refund`` finds nothing, as no name starts with
    it). At most ``MAX_TOOL_MATCHES``, in name order."""
    return [name for name in known if name.startswith(text)][:MAX_TOOL_MATCHES]


async def _mark_errors(redis: Redis, rows: list[dict[str, Any]]) -> None:
    """Give each row ``error_marks``: its error types as ``(kind, type)``, kind ``failed`` (a
    turn ended failed with it), ``recovered`` (an attempt failed with it, the turn completed
    later) or ``""`` (neither: a tool error the agent handled). A row without failed attempts
    or turns reads nothing more; one with them reads its turns' ``status`` / ``error_type``
    (one pipeline per row: at most a page of rows)."""
    for row in rows:
        failed: set[str] = set()
        recovered: set[str] = set()
        if row["errors"] and (row.get("attempts_failed") or row.get("turns_failed")):
            turn_ids = await redis.lrange(keys.conversation_turns(row["conversation_id"]), 0, -1)
            async with redis.pipeline(transaction=False) as pipe:
                for t in turn_ids:
                    pipe.hmget(keys.aggregate("turn", t), "status", "error_type")
                for status, error_type in await pipe.execute():
                    if error_type:
                        (failed if status == "failed" else recovered).add(error_type)
        row["error_marks"] = [("failed" if e in failed else "recovered" if e in recovered else "", e)
                              for e in row["errors"]]


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    """A whole-number query parameter within [low, high]; the default when absent or not."""
    text = request.query_params.get(name) or ""
    return int(text) if text.isdigit() and low <= int(text) <= high else default


# -- one conversation ------------------------------------------------------------------------

KINDS = ("agent", "generation", "tool", "handoff", "custom", "guardrail")


def _ts(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None


def timeline(attempt: dict[str, Any]) -> dict[str, Any]:
    """One attempt's spans as waterfall rows, depth first (the tree's order): each row has the
    node's ``kind``, ``name``, ``depth``, ``offset_ms`` from the attempt's start and
    ``duration_ms``, and ``x`` / ``w``, its bar's left edge and width in percent of the axis
    (the attempt's start to its end, or to the last span's end if later). A bar is at least
    0.4% wide, so an instant span still shows. One row per node of ``attempt["tree"]``."""
    flat: list[tuple[int, dict[str, Any]]] = []

    def walk(nodes: list[dict[str, Any]], depth: int) -> None:
        for node in nodes:
            flat.append((depth, node))
            walk(node.get("children") or [], depth + 1)

    walk(attempt.get("tree") or [], 0)
    starts = [_ts(n.get("started_at")) for _, n in flat]
    known = [s for s in starts if s is not None]
    base = _ts(attempt.get("started_at")) or (min(known) if known else None)
    rows = []
    for (depth, node), start in zip(flat, starts):
        offset = (start - base).total_seconds() * 1000 if start and base else None
        rows.append({"kind": node.get("kind"), "name": node.get("name"), "depth": min(depth, 8),
                     "offset_ms": offset, "duration_ms": node.get("duration_ms"),
                     "error": node.get("error")})
    end = _ts(attempt.get("ended_at"))
    extent = (end - base).total_seconds() * 1000 if end and base else 0.0
    extent = max([extent] + [(r["offset_ms"] or 0) + (r["duration_ms"] or 0) for r in rows] + [0.001])
    for r in rows:
        width = max(100 * (r["duration_ms"] or 0) / extent, 0.4)
        left = 100 * max(r["offset_ms"] or 0, 0) / extent
        r["w"] = round(min(width, 100.0), 3)
        r["x"] = round(min(left, 100.0 - r["w"]), 3)
    return {"rows": rows, "extent_ms": extent}


def breakdown(telemetry: dict[str, Any], turn: dict[str, Any]) -> list[dict[str, Any]]:
    """The turn's time as stacked segments: queue wait, model, tool, other (ms and percent)."""
    parts = [
        ("queue", "queue wait", telemetry.get("queue_wait_ms", turn.get("queue_wait_ms"))),
        ("model", "model", telemetry.get("model_ms")),
        ("tool", "tools", telemetry.get("tool_ms")),
        ("other", "other", telemetry.get("other_ms")),
    ]
    total = sum(v or 0 for _, _, v in parts)
    out, x = [], 0.0
    for kind, label, value in parts:
        width = 100 * (value or 0) / total if total > 0 else 0.0
        out.append({"kind": kind, "label": label, "ms": value, "x": round(x, 3),
                    "w": round(width, 3)})
        x += width
    return out


def _spent(nodes: list[dict[str, Any]], kind: str) -> float:
    """Milliseconds in the outermost spans of ``kind`` under ``nodes``."""
    return sum((n.get("duration_ms") or 0) if n.get("kind") == kind else _spent(n.get("children") or [], kind)
               for n in nodes)


def failed_turn_times(attempts: list[dict[str, Any]]) -> dict[str, float] | None:
    """A failed turn's time as its attempts spent it: ``duration_ms`` (each attempt's start to
    end, summed), ``model_ms`` and ``tool_ms`` (its generation and tool spans, summed) and
    ``other_ms`` (the rest). A failed model call has no ``llm_end``, so telemetry counts no
    model time for it and the turn record no duration: the spans are what is known. ``None``
    without any attempt's start and end."""
    duration = model = tool = 0.0
    timed = False
    for attempt in attempts:
        start, end = _ts(attempt.get("started_at")), _ts(attempt.get("ended_at"))
        if start and end:
            timed = True
            duration += max((end - start).total_seconds() * 1000, 0.0)
        model += _spent(attempt.get("tree") or [], "generation")
        tool += _spent(attempt.get("tree") or [], "tool")
    if not timed:
        return None
    return {"duration_ms": duration, "model_ms": model, "tool_ms": tool,
            "other_ms": max(duration - model - tool, 0.0)}


def _order_of(arguments: Any) -> str | None:
    try:
        data = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        return None
    order = data.get("order_id") if isinstance(data, dict) else None
    return None if order is None else str(order)


def place_refunds(attempts: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Put each of a turn's refunds (``telemetry/refunds.py`` rows, in call order) on the
    ``process_refund`` tool node that made it, as ``node["refund"]``, in every attempt: the
    node's ``order_id`` argument names its row, else (arguments kept out of telemetry) the
    k-th such node of an attempt is the k-th refund. Returns the rows no node shows, so the
    page can still mark them on their turn."""
    placed: set[int] = set()
    for attempt in attempts:
        nodes: list[dict[str, Any]] = []

        def walk(tree: list[dict[str, Any]]) -> None:
            for node in tree:
                if node.get("kind") == "tool" and node.get("name") == PROCESS_REFUND:
                    nodes.append(node)
                walk(node.get("children") or [])

        walk(attempt.get("tree") or [])
        used: set[int] = set()
        for k, node in enumerate(nodes):
            order = _order_of((node.get("detail") or {}).get("arguments"))
            match = next((i for i, r in enumerate(rows) if i not in used and order is not None
                          and r["order_id"] == order), None)
            if match is None and order is None and k < len(rows) and k not in used:
                match = k
            if match is not None:
                used.add(match)
                node["refund"] = rows[match]
        placed |= used
    return [r for i, r in enumerate(rows) if i not in placed]


@router.get("/conversations/{conversation_id}")
async def conversation(request: Request, conversation_id: str) -> Response:
    who = _who(request)
    if who is None:
        return _to_login(request)
    redis: Redis = redis_of(request)
    owner = await redis.hget(keys.conversation_state(conversation_id), "customer_id")
    if owner is None or not who.may(owner):
        return _not_found(request, who, "conversation", conversation_id)
    replay = await conversation_replay(redis, conversation_id, trace_redis_of(request))
    if replay is None:
        return _not_found(request, who, "conversation", conversation_id)
    # The turn's text, answer and errors are business data, kept as written: redact them as
    # telemetry is before showing them (telemetry itself is redacted already; again is a no-op).
    redactor = await registry.redactor(redis, settings_of(request))
    replay = redactor.value(replay)
    by_turn: dict[str, list[dict[str, Any]]] = {}
    for row in redactor.value(await conversation_refunds(redis, conversation_id)):
        by_turn.setdefault(row["turn_id"], []).append(row)
    for turn in replay["turns"]:
        turn["refunds"] = by_turn.get(turn["turn"]["turn_id"], [])
        turn["unplaced_refunds"] = place_refunds(turn["attempts"], turn["refunds"])
        figures = turn.get("telemetry") or {}
        turn["attempt_times"] = None
        if turn["turn"].get("status") == "failed":
            turn["attempt_times"] = failed_turn_times(turn["attempts"])
            if turn["attempt_times"]:
                figures = {**figures, **{k: v for k, v in turn["attempt_times"].items() if k != "duration_ms"}}
        turn["breakdown"] = breakdown(figures, turn["turn"])
        for attempt in turn["attempts"]:
            attempt["timeline"] = timeline(attempt)
    return _page(request, "conversation.html", who=who, replay=replay, owner=owner,
                 kinds=KINDS)


# -- money -----------------------------------------------------------------------------------


async def _money_rows(request: Request, who: Principal) -> tuple[dict[str, str], dict[str, str], list[dict[str, Any]]]:
    """The money view's filters as given, what is wrong with them, and its rows (redacted as
    every page is): shared by the page and its JSON."""
    params = {name: (request.query_params.get(name) or "").strip()
              for name in ("customer", "order", "anomalies", "sort", "dir")}
    errors = {n: f"at most {MAX_FILTER_CHARS} characters" for n, v in params.items()
              if len(v) > MAX_FILTER_CHARS}
    params["sort"] = params["sort"] or "when"
    params["dir"] = params["dir"] or ("desc" if params["sort"] == "when" else "asc")
    if params["sort"] not in SORTS:
        errors["sort"] = f"one of {', '.join(SORTS)}"
    if params["dir"] not in ("asc", "desc"):
        errors["dir"] = "asc or desc"
    if errors:
        return params, errors, []
    redis: Redis = redis_of(request)
    rows = await refunds(redis, who, customer=params["customer"] or None,
                         order=params["order"] or None, anomalies_only=bool(params["anomalies"]),
                         sort=params["sort"], descending=params["dir"] == "desc")
    return params, errors, (await registry.redactor(redis, settings_of(request))).value(rows)


@router.get("/money")
async def money_view(request: Request) -> Response:
    """Every refund the key may see (``telemetry/refunds.py``), filterable and sortable, with
    the money-path checks that failed on its turn marked."""
    who = _who(request)
    if who is None:
        return _to_login(request)
    params, errors, rows = await _money_rows(request, who)
    kept = {k: v for k, v in params.items() if v and k not in ("sort", "dir")}

    def sort_link(column: str) -> str:
        same = params["sort"] == column
        direction = ("asc" if params["dir"] == "desc" else "desc") if same else \
            ("desc" if column == "when" else "asc")
        return "?" + urlencode({**kept, "sort": column, "dir": direction})

    return _page(request, "money.html", status=400 if errors else 200, who=who, params=params,
                 errors=errors, rows=rows, sort_link=sort_link,
                 anomalies=sum(1 for r in rows if r["anomalies"]),
                 customers=sorted(who.customers) if not who.operator else [])


@router.get("/money.json")
async def money_json(request: Request) -> Response:
    """The money view's rows as JSON (``{"refunds": [...]}``; 400 ``{"error", "field"}`` for a
    bad filter), scoped like every page: a customer key sees its customers' refunds only."""
    who = _who(request)
    if who is None:
        return Response(json.dumps({"error": "an API key is required", "field": "api_key"}),
                        status_code=401, media_type="application/json", headers=SECURITY_HEADERS)
    params, errors, rows = await _money_rows(request, who)
    if errors:
        field, message = next(iter(errors.items()))
        return Response(json.dumps({"error": f"{field}: {message}", "field": field}),
                        status_code=400, media_type="application/json", headers=SECURITY_HEADERS)
    return Response(json.dumps({"refunds": rows}), media_type="application/json",
                    headers=SECURITY_HEADERS)


# -- live ------------------------------------------------------------------------------------


def sparkline(values: list[float | None], width: int = 300, height: int = 64,
              pad: int = 6) -> dict[str, Any]:
    """Polyline segments (gaps where a value is ``None``) of values scaled to the box, and the
    scale's top. Points are ``x,y`` strings in SVG user units (y grows downwards), inset by
    ``pad`` on every side so a point on an edge (the latest minute, the highest value) is
    drawn whole; ``base`` is the zero line's y. ``dots``: the points drawn as dots, each one
    alone between gaps and the latest, so a chart with one data point shows it."""
    top = max([v for v in values if v is not None] + [0.0])
    scale = top if top > 0 else 1.0
    step = (width - 2 * pad) / max(len(values) - 1, 1)
    base = height - pad
    segments: list[list[str]] = []
    current: list[str] = []
    for i, v in enumerate(values):
        if v is None:
            if current:
                segments.append(current)
                current = []
            continue
        current.append(f"{pad + i * step:.1f},{base - (height - 2 * pad) * v / scale:.1f}")
    if current:
        segments.append(current)
    dots = [s[0] for s in segments if len(s) == 1]
    if segments and segments[-1][-1] not in dots:
        dots.append(segments[-1][-1])
    return {"segments": [" ".join(s) for s in segments], "top": top, "width": width,
            "height": height, "base": base, "dots": dots}


async def _panels(redis: Redis, who: Principal) -> dict[str, Any]:
    spend = await spend_today(redis, None if who.operator else sorted(who.customers))
    context: dict[str, Any] = {"spend": spend, "charts": None}
    if who.operator:
        hour = await last_hour(redis)
        minutes = hour["minutes"]
        last = next((m for m in reversed(minutes) if m["turns"]), None)
        context["hour"] = hour["total"]
        context["charts"] = [
            {"id": "turns", "title": "Turns per second", "unit": "turns/s",
             "line": sparkline([m["turns_per_s"] for m in minutes]),
             "now": _num(minutes[-1]["turns_per_s"]), "hour": _num(hour["total"]["turns_per_s"], 3),
             "top": _num(max(m["turns_per_s"] for m in minutes))},
            {"id": "errors", "title": "Error rate", "unit": "failed / finished",
             "line": sparkline([m["error_rate"] for m in minutes]),
             "now": _pct(last["error_rate"]) if last else "–",
             "hour": _pct(hour["total"]["error_rate"]),
             "top": _pct(max((m["error_rate"] or 0) for m in minutes))},
            {"id": "p95", "title": "p95 turn latency", "unit": "ms",
             "line": sparkline([m["p95_ms"] for m in minutes]),
             "now": ms(last["p95_ms"]) if last else "–", "hour": ms(hour["total"]["p95_ms"]),
             "top": ms(max((m["p95_ms"] or 0) for m in minutes))},
        ]
    return context


@router.get("/live")
async def live(request: Request) -> Response:
    who = _who(request)
    if who is None:
        return _to_login(request)
    redis: Redis = redis_of(request)
    tail = await alerts_tail(redis)  # the page's stream starts here: nothing missed, no repeat
    alerts = await recent_alerts(redis, who, RECENT_ALERTS)
    return _page(request, "live.html", who=who, alerts=alerts, after=tail,
                 **await _panels(redis, who))


@router.get("/live/panels")
async def live_panels(request: Request) -> Response:
    who = _who(request)
    if who is None:
        return Response("sign in again", status_code=401, media_type="text/plain")
    return _page(request, "live_panels.html", who=who, **await _panels(redis_of(request), who))


@router.get("/live/alerts")
async def live_alerts(request: Request, after: str | None = None) -> Response:
    """The key's alerts as Server-Sent Events (``/v1/alerts?follow=true``'s generator):
    ``EventSource`` sends the cookie, and ``Last-Event-ID`` when it reconnects."""
    who = _who(request)
    if who is None:
        return Response("sign in again", status_code=401, media_type="text/plain")
    return await alert_stream(request, redis_of(request), who,
                              request.headers.get("last-event-id"), after, new_only=True)


@router.get("/{rest:path}")
async def unknown(request: Request, rest: str) -> Response:
    who = _who(request)
    if who is None:
        return _to_login(request)
    return _not_found(request, who, "page", request.url.path)
