"""HTTP routes that hand turns to the fleet: ``POST /v1/turns``, ``POST /v1/turns:batch``,
``GET /v1/turns/{turn_id}``; score them: ``POST /v1/turns/{turn_id}/feedback``
(``Producer.feedback``; a customer key only its own turns, another's is 404); and erase them: ``DELETE /v1/customers/{id}``,
``DELETE /v1/conversations/{id}`` (operator keys; ``turnfleet.erasure``).

The rules are the Python API's: bodies are checked by ``Producer.validate`` (same limits, same
messages naming each field), budgets by ``Producer.check_budget``, and a turn is written by
the same enqueue script, so nothing is written for a rejected request. What HTTP adds:

- **Who may do what.** A key acts only for its customers: writing for another customer is
  403; another customer's turn reads as 404, exactly like a turn that does not exist, so a
  key cannot probe for turn ids it does not own.
- **Safe retries.** The ``Idempotency-Key`` header (or the body's ``turn_id``) is the turn id.
  The first request gets 202; sending the same request again gets 200 and the turn's current
  status, however long after. Reusing a key for a *different* request (other text,
  conversation or customer) is 422, never a silent 200 for something that was not enqueued.
- **Long polls.** ``GET /v1/turns/{id}?wait=S`` answers when the turn ends (it waits on the
  results stream, no polling) or after ``S`` seconds with the current state.

Bodies are read here rather than by FastAPI so that every message comes from the producer's
validation and a body over the size limit is 413 however it is sent; the pydantic models
below document the shapes in OpenAPI.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from turnfleet.producer.api import EnqueueResult, Producer, TurnValidationError, UnknownTurn
from turnfleet import audit, registry
from turnfleet.auth import Principal
from turnfleet.budget import BudgetStatus
from turnfleet.models import ID_PATTERN, ID_SCHEMA_PATTERN, FeedbackResult, TurnRequest, TurnResult, TurnStatus
from turnfleet.http import ApiError, error_body, principal, redis_of, settings_of

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1", tags=["turns"])

_ID = ID_SCHEMA_PATTERN
_ID_RE = ID_PATTERN


# -- shapes (OpenAPI) -----------------------------------------------------------------


class TurnIn(BaseModel):
    """One user message for the fleet. Limits are the producer's settings (defaults shown)."""

    model_config = ConfigDict(extra="forbid")

    conversation_id: str = Field(
        pattern=_ID, max_length=128,
        description="Turns of one conversation run one at a time, in order. Owned by the "
                    "customer that first used it.",
    )
    customer_id: str = Field(pattern=_ID, max_length=128, description="Must be one of the key's customers.")
    text: str = Field(min_length=1, description="The user's message; not blank, at most max_text_chars (8000).")
    metadata: dict[str, str] | None = Field(
        default=None,
        description="Flat string→string map; at most max_metadata_items (32) and max_metadata_bytes (4096).",
    )
    turn_id: str | None = Field(
        default=None, pattern=_ID, max_length=128,
        description="Idempotency key (the Idempotency-Key header wins); generated if absent.",
    )
    agent: str | None = Field(default=None, pattern=_ID, max_length=128,
                              description="Workflow name; default support-desk.")
    trace: bool | None = Field(default=None, description="false: run this turn without tracing.")


class FeedbackIn(BaseModel):
    """A score on a turn. The Idempotency-Key header (or ``idempotency_key``) makes retries
    count once."""

    model_config = ConfigDict(extra="forbid")

    score: int = Field(description="-1 (negative) or 1 (positive).")
    comment: str | None = Field(default=None, description="Redacted before it is stored; at most "
                                                          "max_feedback_comment_chars (2000).")
    source: str = Field(default="customer", description="customer, agent or operator.")
    idempotency_key: str | None = Field(default=None, pattern=_ID, max_length=128)


class TurnBatchIn(BaseModel):
    turns: list[TurnIn] = Field(description="At most max_batch (100) turns; each is judged on its own.")


class TurnAccepted(BaseModel):
    """Where a turn is. 202 when this request enqueued it, 200 when it was already known."""

    turn_id: str
    conversation_id: str
    status: TurnStatus
    status_url: str


class FieldError(BaseModel):
    field: str
    message: str


class BudgetOut(BaseModel):
    customer_id: str
    limit_usd: float
    spent_usd: float
    day: str = Field(description="The UTC day the spend is for (YYYY-MM-DD).")
    resets_at: datetime


class ErrorOut(BaseModel):
    """Every error: a code in ``error``, a sentence in ``message``."""

    error: str = Field(description="unauthorized, forbidden, not_found, conflict, validation, "
                                   "budget_exceeded, too_large, unsupported_media_type, ...")
    message: str
    errors: list[FieldError] | None = Field(default=None, description="validation: each bad field.")
    budget: BudgetOut | None = Field(default=None, description="budget_exceeded: the numbers.")


class BatchItemOut(BaseModel):
    index: int
    status: int = Field(description="202 enqueued, 200 already known, 403, 409, 422 or 429.")
    turn_id: str | None = None
    conversation_id: str | None = None
    turn_status: TurnStatus | None = Field(default=None, description="200/202: the turn's status.")
    status_url: str | None = None
    error: str | None = None
    message: str | None = None
    errors: list[FieldError] | None = None
    budget: BudgetOut | None = None


class BatchOut(BaseModel):
    results: list[BatchItemOut]


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _inline(model)}}}}


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` inlined (routes do not register it)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "No API key, or an unknown one."},
    413: {"model": ErrorOut, "description": "Body over max_body_bytes."},
    422: {"model": ErrorOut, "description": "Invalid request; `errors` names each bad field."},
}
_BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    **_AUTH_ERRORS,
    415: {"model": ErrorOut, "description": "A Content-Type other than application/json."},
}


# -- what routes share ----------------------------------------------------------------


async def producer_of(request: Request) -> Producer:
    """One ``Producer`` per app over the app's Redis client (rebuilt if the client changes)."""
    redis = redis_of(request)
    producer: Producer | None = getattr(request.app.state, "producer", None)
    if producer is None or producer.redis is not redis:
        producer = Producer(redis=redis, settings=settings_of(request))
        request.app.state.producer = producer
    return producer


Caller = Annotated[Principal, Depends(principal)]
Producing = Annotated[Producer, Depends(producer_of)]


def status_url(turn_id: str) -> str:
    return f"/v1/turns/{turn_id}"


def _is_json(content_type: str | None) -> bool:
    """``application/json`` or ``application/<something>+json``, any parameters; no header at
    all is read as JSON too (a client that sends none has sent nothing else)."""
    if content_type is None:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _read_json(request: Request) -> Any:
    """The body as JSON, or a 4xx: 415 for another media type, 422 for anything that is not
    JSON — invalid UTF-8, bad syntax, or nesting deeper than the parser's recursion limit
    (``[`` × 100000 raised ``RecursionError``, a 500, before this caught it)."""
    content_type = request.headers.get("content-type")
    if not _is_json(content_type):
        raise ApiError(415, "unsupported_media_type",
                       f"the body must be application/json, not {ascii(content_type)}")
    raw = await request.body()
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(422, "validation", "the body is nested too deeply",
                       errors=[{"field": "body", "message": "is nested too deeply"}]) from None
    except (UnicodeDecodeError, ValueError):
        raise ApiError(422, "validation", "the body is not valid JSON",
                       errors=[{"field": "body", "message": "is not valid JSON"}]) from None


def _budget(status: BudgetStatus) -> dict[str, Any]:
    return {
        "customer_id": status.customer_id,
        "limit_usd": status.limit_usd,
        "spent_usd": status.spent_usd,
        "day": status.day,
        "resets_at": status.resets_at.isoformat().replace("+00:00", "Z"),
    }


def _retry_after(status: BudgetStatus) -> str:
    return str(max(1, math.ceil((status.resets_at - datetime.now(timezone.utc)).total_seconds())))


def _strip_index(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"field": e["field"], "message": e["message"]} for e in errors]


_KEY_REUSED = ("idempotency key {!r} was already used for a different request; "
               "send a new key for a new turn")
_HTTP_STATUS = {"enqueued": 202, "existing": 200}
_ERROR_STATUS = {"validation": 422, "forbidden": 403, "conflict": 409, "budget_exceeded": 429}


def _batch_item(outcome: EnqueueResult) -> dict[str, Any]:
    """An ``EnqueueResult`` as a ``POST /v1/turns:batch`` item."""
    if outcome.ok:
        assert outcome.turn_id is not None
        return {"index": outcome.index, "status": _HTTP_STATUS[outcome.status], "turn_id": outcome.turn_id,
                "conversation_id": outcome.conversation_id, "turn_status": outcome.turn_status,
                "status_url": status_url(outcome.turn_id)}
    item: dict[str, Any] = {"index": outcome.index, "status": _ERROR_STATUS[outcome.error or "validation"],
                            "error": outcome.error, "message": outcome.message}
    if outcome.errors:
        item["errors"] = outcome.errors
    if outcome.budget is not None:
        item["budget"] = _budget(outcome.budget)
    return item


def _printable(name: str) -> str:
    """A client's field name as it can be answered: a lone surrogate (``"\\ud800"`` as a JSON
    escape) cannot be encoded in the UTF-8 response, so it is shown backslash-escaped."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _validate(producer: Producer, item: dict[str, Any]) -> TurnRequest:
    """``Producer.validate``, and no fields a client may not set (``enqueued_at`` is ours)."""
    unknown = [{"field": _printable(k), "message": "is not a known field"}
               for k in item if k not in TurnIn.model_fields]
    try:
        req = producer.validate({k: v for k, v in item.items() if k in TurnIn.model_fields})
    except TurnValidationError as exc:
        raise TurnValidationError(unknown + exc.errors) from None
    if unknown:
        raise TurnValidationError(unknown)
    return req


def _accepted(req: TurnRequest, status: str) -> dict[str, Any]:
    return {"turn_id": req.turn_id, "conversation_id": req.conversation_id,
            "status": status, "status_url": status_url(req.turn_id)}


# -- routes ---------------------------------------------------------------------------


@router.post(
    "/turns",
    status_code=202,
    response_model=TurnAccepted,
    summary="Hand one turn to the fleet",
    openapi_extra=_json_body(TurnIn),
    responses={
        200: {"model": TurnAccepted, "description": "The same request was already accepted (a retry)."},
        202: {"model": TurnAccepted, "description": "Enqueued. `Location` is the status URL.",
              "headers": {"Location": {"schema": {"type": "string"}}}},
        **_BODY_ERRORS,
        403: {"model": ErrorOut, "description": "The key may not act for this customer."},
        409: {"model": ErrorOut, "description": "The conversation belongs to another customer."},
        429: {"model": ErrorOut, "description": "The customer's daily budget is spent.",
              "headers": {"Retry-After": {"schema": {"type": "integer"},
                                          "description": "Seconds until the budget resets (UTC midnight)."}}},
    },
)
async def create_turn(
    request: Request,
    caller: Caller,
    producer: Producing,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", description="Makes retries safe; becomes the turn id."),
    ] = None,
) -> JSONResponse:
    """Validate, authorise and enqueue one turn; retries with the same key are answered 200."""
    body = await _read_json(request)
    if not isinstance(body, dict):
        raise ApiError(422, "validation", "the body must be a JSON object",
                       errors=[{"field": "body", "message": "must be a JSON object"}])
    if idempotency_key is not None:
        given = body.get("turn_id")
        if given is not None and given != idempotency_key:
            raise ApiError(422, "validation", "Idempotency-Key and turn_id differ",
                           errors=[{"field": "turn_id",
                                    "message": "differs from the Idempotency-Key header; send one or make them equal"}])
        body = {**body, "turn_id": idempotency_key}
    try:
        req = _validate(producer, body)
    except TurnValidationError as exc:
        errors = _strip_index(exc.errors)
        if idempotency_key is not None:
            for e in errors:
                if e["field"] == "turn_id":
                    e["field"] = "Idempotency-Key"
        message = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise ApiError(422, "validation", message, errors=errors) from None
    if not caller.may(req.customer_id):
        raise ApiError(403, "forbidden", f"this API key may not act for customer {req.customer_id!r}")

    outcome = await producer.enqueue_request(req)
    if outcome.status == "enqueued":
        log.info("http.turn.enqueued", turn_id=req.turn_id, conversation_id=req.conversation_id,
                 customer_id=req.customer_id, key=caller.name)
        return JSONResponse(_accepted(req, "queued"), status_code=202,
                            headers={"Location": status_url(req.turn_id)})
    if outcome.status == "existing":
        return JSONResponse(_accepted(req, outcome.turn_status or "queued"), status_code=200,
                            headers={"Location": status_url(req.turn_id)})
    if outcome.error == "budget_exceeded" and outcome.budget is not None:
        log.info("http.turn.over_budget", customer_id=req.customer_id, key=caller.name)
        return JSONResponse(
            error_body("budget_exceeded", outcome.message or "", budget=_budget(outcome.budget)),
            status_code=429, headers={"Retry-After": _retry_after(outcome.budget)},
        )
    if outcome.error == "conflict":
        raise ApiError(409, "conflict", outcome.message or "")
    if outcome.errors and outcome.errors[0]["field"] == "agent":  # another workflow's conversation
        raise ApiError(422, "validation", outcome.message or "", errors=outcome.errors)
    raise ApiError(422, "validation", _KEY_REUSED.format(req.turn_id),
                   errors=[{"field": "Idempotency-Key" if idempotency_key else "turn_id",
                            "message": "already used for a different request"}])


@router.post(
    "/turns:batch",
    response_model=BatchOut,
    summary="Hand many turns to the fleet; each is accepted or rejected on its own",
    openapi_extra=_json_body(TurnBatchIn),
    responses=_BODY_ERRORS,
)
async def create_turns(request: Request, caller: Caller, producer: Producing) -> BatchOut:
    """Every item is validated, authorised and budgeted on its own; a rejected item writes
    nothing and does not stop the others. Items use their ``turn_id`` as idempotency key.
    Accepted items are written in one pipelined round trip."""
    body = await _read_json(request)
    turns = body.get("turns") if isinstance(body, dict) else None
    if not isinstance(turns, list):
        raise ApiError(422, "validation", "the body must be {\"turns\": [...]}",
                       errors=[{"field": "turns", "message": "is required and must be a list"}])
    limit = settings_of(request).max_batch
    if len(turns) > limit:
        raise ApiError(422, "validation", f"{len(turns)} turns; the limit is {limit} a batch",
                       errors=[{"field": "turns", "message": f"has {len(turns)} items; the limit is {limit}"}])

    results: list[dict[str, Any] | None] = [None] * len(turns)
    valid: list[tuple[int, TurnRequest]] = []
    for i, item in enumerate(turns):
        if not isinstance(item, dict):
            results[i] = {"index": i, "status": 422, "error": "validation", "message": "must be a JSON object",
                          "errors": [{"field": "turn", "message": "must be a JSON object"}]}
            continue
        try:
            valid.append((i, _validate(producer, item)))
        except TurnValidationError as exc:
            results[i] = _batch_item(EnqueueResult.invalid(i, exc.errors))
    enqueued = 0
    for outcome in await producer.submit(valid, may=caller.may):
        results[outcome.index] = _batch_item(outcome)
        enqueued += outcome.status == "enqueued"
    log.info("http.turns.batch", items=len(turns), enqueued=enqueued, key=caller.name)
    return BatchOut.model_validate({"results": results})


@router.post(
    "/turns/{turn_id}/feedback",
    status_code=201,
    response_model=FeedbackResult,
    summary="Link feedback (a score, a comment) to a turn",
    openapi_extra=_json_body(FeedbackIn),
    responses={
        **_BODY_ERRORS,
        404: {"model": ErrorOut, "description": "No such turn, or not one of the key's customers'."},
    },
)
async def create_feedback(
    request: Request,
    caller: Caller,
    producer: Producing,
    turn_id: Annotated[str, Path(description="The turn the feedback is about.")],
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", description="The same key again is the same feedback."),
    ] = None,
) -> JSONResponse:
    """Feedback is telemetry: counted once per turn, conversation, customer, day, version and
    fleet; the comment is redacted before it is written. A customer key scores only its own
    customers' turns."""
    body = await _read_json(request)
    if not isinstance(body, dict):
        raise ApiError(422, "validation", "the body must be a JSON object",
                       errors=[{"field": "body", "message": "must be a JSON object"}])
    unknown = sorted(set(body) - set(FeedbackIn.model_fields))
    if unknown:
        raise ApiError(422, "validation", f"{_printable(unknown[0])}: is not a known field",
                       errors=[{"field": _printable(k), "message": "is not a known field"} for k in unknown])
    if "score" not in body:
        raise ApiError(422, "validation", "score: is required", errors=[{"field": "score", "message": "is required"}])
    turn = await producer.queue.get(turn_id) if _ID_RE.fullmatch(turn_id) else None
    if turn is None or not caller.may(turn.customer_id):
        raise ApiError(404, "not_found", f"no turn {turn_id!r}")
    try:
        result = await producer.feedback(
            turn_id, score=body["score"], comment=body.get("comment"), source=body.get("source", "customer"),
            idempotency_key=idempotency_key or body.get("idempotency_key"), customer_id=turn.customer_id)
    except TurnValidationError as exc:
        message = "; ".join(f"{e['field']}: {e['message']}" for e in exc.errors)
        raise ApiError(422, "validation", message, errors=exc.errors) from None
    except UnknownTurn:
        raise ApiError(404, "not_found", f"no turn {turn_id!r}") from None
    log.info("http.feedback", turn_id=turn_id, feedback_id=result.feedback_id, key=caller.name)
    return JSONResponse(result.model_dump(mode="json"), status_code=201)


@router.get(
    "/turns/{turn_id}",
    response_model=TurnResult,
    summary="A turn's status and result; ?wait=S long-polls until it ends",
    responses={
        **_AUTH_ERRORS,
        403: {"model": ErrorOut, "description": "?unredacted=true from a key without that permission."},
        404: {"model": ErrorOut, "description": "No such turn, or not one of the key's customers'."},
    },
)
async def read_turn(
    request: Request,
    caller: Caller,
    producer: Producing,
    turn_id: Annotated[str, Path(description="The turn id (the Idempotency-Key it was sent with).")],
    wait: Annotated[
        float | None,
        Query(description="Seconds to wait for the turn to end (0 < wait ≤ max_wait_s, default 60); "
                          "answers with the current state when the time is up.",
              json_schema_extra={"exclusiveMinimum": 0}),
    ] = None,
    unredacted: Annotated[
        bool, Query(description="Operator keys: the text as written (keys with the unredacted permission; "
                                "audited). A customer key reads its own turns as written anyway."),
    ] = False,
) -> TurnResult | JSONResponse:
    """The ``TurnResult``: status (queued, running, completed, failed), final output, agents,
    tool calls, handoffs, usage, attempts and their errors. A customer key reads its own turn as
    written (the end user's answer); an operator key reads it redacted unless ``?unredacted=true``."""
    if unredacted and not caller.unredacted:
        raise ApiError(403, "forbidden", "unredacted reads need a key with the unredacted permission")
    if wait is not None:
        limit = settings_of(request).max_wait_s
        if not (math.isfinite(wait) and 0 < wait <= limit):
            raise ApiError(422, "validation", f"wait must be > 0 and at most {limit:g} seconds",
                           errors=[{"field": "wait", "message": f"must be > 0 and at most {limit:g}"}])
    result = await producer.queue.get(turn_id)
    if result is None or not caller.may(result.customer_id):
        raise ApiError(404, "not_found", f"no turn {turn_id!r}")
    if wait is not None and not result.done:
        result = await producer.queue.wait(turn_id, wait) or result
    if unredacted:
        await audit.record(redis_of(request), caller.name, "GET /v1/turns/{id}", turn_id)
    elif caller.operator:
        # As JSON values: a redacted string need not satisfy the model's constraints any more.
        redactor = await registry.redactor(redis_of(request), settings_of(request))  # the fleet's patterns too
        return JSONResponse(redactor.value(result.model_dump(mode="json", by_alias=True)))
    return result


# -- erasure --------------------------------------------------------------------------


class ErasureOut(BaseModel):
    """What ``DELETE /v1/customers/{id}`` or ``/v1/conversations/{id}`` removed."""

    erased: str = Field(description="customer or conversation")
    id: str
    customers: int
    conversations: int
    turns: int
    keys: int = Field(description="Redis keys deleted (main Redis and the trace store's)")
    index_entries: int = Field(description="entries removed from indexes (sorted sets, hashes)")
    stream_entries: int = Field(description="stream entries deleted (results, telemetry, alerts, audit...)")
    nothing: bool = Field(description="true when nothing was left to erase (never seen, or erased before)")
    kept: str = Field(description="what erasure keeps on purpose")
    not_reached: str = Field(description="what erasure cannot reach")


_ERASURE_KEPT = "the refund ledger and the per-order refund records (a financial record)"
_ERASURE_NOT_REACHED = ("copies already sent over OTLP or the alert webhook, log files, backups and RDB "
                        "snapshots, and the AOF until it is rewritten (?rewrite_aof=true)")

_ERASURE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_AUTH_ERRORS,
    403: {"model": ErrorOut, "description": "Not an operator key."},
    409: {"model": ErrorOut, "description": "A turn of it is queued or running (after ?wait=S): nothing erased."},
    422: {"model": ErrorOut, "description": "Not a valid id, or a bad wait."},
}

_EraseWait = Annotated[
    float, Query(description="Seconds to wait for its queued or running turns to end (0: refuse at once; "
                             "at most max_wait_s).")]
_RewriteAof = Annotated[
    bool, Query(description="Then rewrite Redis's append-only file, so older copies leave the disk.")]


async def _erase(request: Request, caller: Principal, kind: str, subject: str, wait: float,
                 rewrite_aof: bool) -> ErasureOut:
    """One erasure for an operator key (403 otherwise), as ``turnfleet forget`` does it."""
    from turnfleet.erasure import ErasureBusy, forget
    from turnfleet.erasure import rewrite_aof as rewrite
    from turnfleet.models import check_id

    if not caller.operator:
        raise ApiError(403, "forbidden", "erasure needs an operator key")
    try:
        check_id(subject)  # the grammar only: an id stored before the pseudonymous rule can be erased
    except ValueError as exc:
        raise ApiError(422, "validation", "the request is not valid",
                       errors=[{"field": f"{kind}_id", "message": str(exc)}]) from None
    limit = settings_of(request).max_wait_s
    if not (math.isfinite(wait) and 0 <= wait <= limit):
        raise ApiError(422, "validation", f"wait must be at least 0 and at most {limit:g} seconds",
                       errors=[{"field": "wait", "message": f"must be at least 0 and at most {limit:g}"}])
    redis, trace_redis = redis_of(request), request.app.state.trace_redis
    try:
        report = await forget(redis, trace_redis=trace_redis, wait_s=wait, who=caller.name,
                              **{f"{kind}_id": subject})
    except ErasureBusy as exc:
        raise ApiError(409, "busy", f"{exc}: nothing was erased", unfinished=exc.unfinished) from None
    if rewrite_aof:
        for client in (redis, trace_redis):
            if client is not None:
                await rewrite(client)
    log.info("http.erased", kind=kind, key=caller.name, **report.to_dict())
    return ErasureOut(erased=kind, id=subject, **report.to_dict(), nothing=report.nothing,
                      kept=_ERASURE_KEPT, not_reached=_ERASURE_NOT_REACHED)


@router.delete("/customers/{customer_id}", response_model=ErasureOut, responses=_ERASURE_RESPONSES,
               summary="Erase one customer: its conversations, turns, memory, traces and figures")
async def erase_customer(
    request: Request, caller: Caller,
    customer_id: Annotated[str, Path(description="The customer id.")],
    wait: _EraseWait = 0.0, rewrite_aof: _RewriteAof = False,
) -> ErasureOut:
    """Everything the fleet keeps of the customer, except the refund ledger and per-order refund
    records; anonymous fleet and model totals stay. Idempotent: erasing again answers
    ``nothing: true``. Operator keys only."""
    return await _erase(request, caller, "customer", customer_id, wait, rewrite_aof)


@router.delete("/conversations/{conversation_id}", response_model=ErasureOut, responses=_ERASURE_RESPONSES,
               summary="Erase one conversation: its turns, memory, traces and figures")
async def erase_conversation(
    request: Request, caller: Caller,
    conversation_id: Annotated[str, Path(description="The conversation id.")],
    wait: _EraseWait = 0.0, rewrite_aof: _RewriteAof = False,
) -> ErasureOut:
    """As ``DELETE /v1/customers/{id}``, for one conversation: the customer's totals keep what
    it cost. Operator keys only."""
    return await _erase(request, caller, "conversation", conversation_id, wait, rewrite_aof)
