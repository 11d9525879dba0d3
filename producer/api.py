"""The Python API for handing turns to the fleet. Needs Redis and pydantic, not the Agents SDK.

    async with Producer(redis_url) as producer:
        turn_id = await producer.enqueue_turn(
            conversation_id="c-1", customer_id="C-100", text="Where is order 1042?")
        result = await producer.wait(turn_id, timeout_s=30)

Input is validated before anything is written; a rejected request raises
``TurnValidationError`` naming each bad field and leaves Redis untouched — whatever the
caller passed (wrong types, a list for metadata, lone surrogates). A ``turn_id`` is an
idempotency key, with the HTTP API's rule: the same request again is the same turn (its id
is returned, nothing is enqueued, also long after the result was written); the same id for a
*different* request (other text, conversation, customer, metadata, agent or trace) raises
``TurnIdReused``. Once the turn's raw text has expired (``TURNFLEET_RAW_RETENTION_S``) its
record holds the request redacted, and a repeat is compared in redacted form: the same
request is still the same turn. ``enqueue_batch`` judges each turn on its own and says what became of each
(``EnqueueResult``), like ``POST /v1/turns:batch``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from turnfleet import budget, keys, registry, versions
from turnfleet.events import FeedbackDetail, batch_json, event
from turnfleet.budget import BudgetExceeded, BudgetStatus
from turnfleet.connection import RAW, connect, lenient_text
from turnfleet.erasure import ErasureBusy, ErasureReport, forget
from turnfleet.models import (
    FEEDBACK_COMMENT_KEPT_CHARS,
    FeedbackRequest,
    FeedbackResult,
    TurnRequest,
    TurnResult,
    TurnStatus,
    check_id,
    feedback_id,
    utcnow,
)
from turnfleet.queue import (
    WRONG_WORKFLOW,
    ConversationOwnershipError,
    ConversationWorkflowError,
    CorruptRecord,
    TurnQueue,
    decode_request,
)
from turnfleet.raw_text import redact_request
from turnfleet.redaction import Redactor
from turnfleet.settings import ProducerSettings

__all__ = [
    "Producer", "TurnValidationError", "TurnIdReused", "ConversationOwnershipError", "BudgetExceeded",
    "EnqueueResult", "BulkEnqueueError", "UnknownTurn",
]


UNREADABLE = "unreadable"
"""``known``'s status for a turn id whose stored record cannot be decoded."""


class TurnValidationError(ValueError):
    """A turn (or some turns of a bulk call) was rejected; nothing was enqueued.

    ``errors`` lists ``{"index": i (bulk only), "field": name, "message": text}``.
    """

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        parts = []
        for e in errors:
            where = f"turn {e['index']}: " if "index" in e else ""
            parts.append(f"{where}{e['field']}: {e['message']}")
        super().__init__("; ".join(parts))


class UnknownTurn(LookupError):
    """No such turn (or, for a customer's call, none of that customer's): nothing written."""

    def __init__(self, turn_id: str) -> None:
        self.turn_id = turn_id
        super().__init__(f"turn_id: no turn {turn_id!r}")


class TurnIdReused(TurnValidationError):
    """The turn id was already used for a different request; nothing was enqueued.

    The same request again is not an error (it is the same turn); a different one under the
    same id would otherwise be silently answered with the first turn.
    """

    REASON = "already used for a different request"

    def __init__(self, turn_id: str, index: int | None = None) -> None:
        self.turn_id = turn_id
        error: dict[str, Any] = {"field": "turn_id", "message": self.REASON}
        if index is not None:
            error["index"] = index
        super().__init__([error])


class BulkEnqueueError(ConversationOwnershipError):
    """``enqueue_turns``: some turns were refused after validation, the others were enqueued.

    ``results`` says what became of each turn (``EnqueueResult``, in order), so the caller
    knows which ids it got. A ``ConversationOwnershipError``, as this call raised before it
    said which turns were enqueued.
    """

    def __init__(self, results: list[EnqueueResult]) -> None:
        self.results = results
        refused = [r for r in results if not r.ok]
        super().__init__(
            "; ".join(f"turn {r.index}: {r.message}" for r in refused)
            + f" ({len(refused)} of {len(results)} turns refused, the others were enqueued)"
        )


@dataclass(frozen=True)
class EnqueueResult:
    """What became of one turn of a bulk enqueue; the shape of a ``POST /v1/turns:batch`` item.

    ``status``: ``enqueued`` (new), ``existing`` (the same request was already known: the same
    turn) or ``rejected`` (nothing written; ``error`` is ``validation`` — ``errors`` names each
    bad field, a reused turn id included —, ``forbidden``, ``conflict`` for a conversation of
    another customer, or ``budget_exceeded`` with ``budget``).
    """

    index: int
    status: Literal["enqueued", "existing", "rejected"]
    turn_id: str | None = None
    conversation_id: str | None = None
    turn_status: TurnStatus | None = None
    error: Literal["validation", "forbidden", "conflict", "budget_exceeded"] | None = None
    message: str | None = None
    errors: list[dict[str, str]] = field(default_factory=list)
    budget: BudgetStatus | None = None

    @property
    def ok(self) -> bool:
        """Enqueued now or before: the turn will run (or ran)."""
        return self.status != "rejected"

    @classmethod
    def accepted(cls, index: int, req: TurnRequest, created: bool, status: str | None = None) -> EnqueueResult:
        """``created``: enqueued by this call; else the known turn, in its current ``status``."""
        turn_status = "queued" if created or status is None else status
        return cls(index, "enqueued" if created else "existing", req.turn_id, req.conversation_id,
                   turn_status)  # type: ignore[arg-type]

    @classmethod
    def invalid(cls, index: int, errors: list[dict[str, Any]]) -> EnqueueResult:
        errors = [{"field": e["field"], "message": e["message"]} for e in errors]
        message = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return cls(index, "rejected", error="validation", message=message, errors=errors)

    @classmethod
    def reused(cls, index: int, req: TurnRequest) -> EnqueueResult:
        return cls(index, "rejected", req.turn_id, req.conversation_id, error="validation",
                   message=f"turn_id {req.turn_id!r} was {TurnIdReused.REASON}",
                   errors=[{"field": "turn_id", "message": TurnIdReused.REASON}])

    @classmethod
    def wrong_workflow(cls, index: int, req: TurnRequest, exc: ConversationWorkflowError) -> EnqueueResult:
        """A turn for another workflow than its conversation's: bad input naming ``agent``."""
        return cls(index, "rejected", req.turn_id, req.conversation_id, error="validation",
                   message=f"agent: {exc}", errors=[{"field": "agent", "message": str(exc)}])

    @classmethod
    def conflict(cls, index: int, req: TurnRequest) -> EnqueueResult:
        return cls(index, "rejected", req.turn_id, req.conversation_id, error="conflict",
                   message=f"conversation_id {req.conversation_id!r} belongs to another customer")

    @classmethod
    def over_budget(cls, index: int, req: TurnRequest, exc: BudgetExceeded) -> EnqueueResult:
        return cls(index, "rejected", req.turn_id, req.conversation_id, error="budget_exceeded",
                   message=str(exc), budget=exc.status)


FIELDS_COMPARED = ("conversation_id", "customer_id", "text", "metadata", "agent", "trace")


def same_request(a: TurnRequest, b: TurnRequest) -> bool:
    """The same turn, for idempotency: everything the caller chose (not ``enqueued_at``)."""
    return all(getattr(a, f) == getattr(b, f) for f in FIELDS_COMPARED)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Known(NamedTuple):
    """What is recorded under a turn id (``Producer.known``): ``(None, None)`` if nothing."""

    request: TurnRequest | None
    status: str | None
    raw_expired: bool = False  # the record keeps the request redacted (its raw text expired)

    @property
    def nothing(self) -> bool:
        return self.request is None and self.status is None


def _field_errors(exc: ValidationError, index: int | None = None) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "request"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            message = "is required"
        elif err["type"] == "extra_forbidden":
            message = "is not a known field"
        item: dict[str, Any] = {"field": field, "message": message}
        if index is not None:
            item["index"] = index
        out.append(item)
    return out


class Producer:
    """Enqueue turns and read their outcomes. One instance per process is enough."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        redis: Redis | None = None,
        settings: ProducerSettings | None = None,
    ) -> None:
        self.settings = settings or ProducerSettings()
        url = redis_url or self.settings.redis_url
        if redis is None and not url:
            raise ValueError("no Redis: pass redis_url or a client, or set REDIS_URL")
        self._owns_client = redis is None
        self.redis = redis if redis is not None else connect(url)  # type: ignore[arg-type]
        self.queue = TurnQueue(self.redis)
        self._redactor: Redactor | None = None  # built at the first repeat of an expired turn

    async def __aenter__(self) -> Producer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_client:
            await self.redis.aclose()

    def validate(self, data: Mapping[str, Any], index: int | None = None) -> TurnRequest:
        """A checked ``TurnRequest`` or ``TurnValidationError``; writes nothing."""
        if not isinstance(data, Mapping):
            where = {"index": index} if index is not None else {}
            raise TurnValidationError([{"field": "turn", "message": "must be a mapping of fields (a dict)", **where}])
        payload = {k: v for k, v in data.items() if v is not None}
        try:
            return TurnRequest.model_validate(payload, context=self.settings.limits())
        except ValidationError as exc:
            raise TurnValidationError(_field_errors(exc, index)) from None

    async def enqueue_turn(
        self,
        *,
        conversation_id: str,
        customer_id: str,
        text: str,
        metadata: Mapping[str, str] | None = None,
        turn_id: str | None = None,
        agent: str | None = None,
        trace: bool | None = None,
    ) -> str:
        """Validate and enqueue one turn; returns its turn id (the given one or a new one).

        Raises ``TurnValidationError`` (``TurnIdReused`` for a known id with other content),
        ``ConversationOwnershipError`` or ``BudgetExceeded``; nothing is written then.
        """
        req = self.validate(
            {
                "conversation_id": conversation_id,
                "customer_id": customer_id,
                "text": text,
                "metadata": metadata,
                "turn_id": turn_id,
                "agent": agent,
                "trace": trace,
            }
        )
        outcome = await self.enqueue_request(req)
        if outcome.ok:
            return req.turn_id
        if outcome.error == "conflict":
            raise ConversationOwnershipError(outcome.message)
        if outcome.error == "budget_exceeded" and outcome.budget is not None:
            raise BudgetExceeded(outcome.budget)
        if outcome.errors and outcome.errors[0]["field"] == "agent":
            raise TurnValidationError(outcome.errors)
        raise TurnIdReused(req.turn_id)

    async def enqueue_request(self, req: TurnRequest, index: int = 0) -> EnqueueResult:
        """Enqueue one validated turn, or say why not (``EnqueueResult``); never raises for
        the turn's own sake. A known turn id is ``existing`` for the same request, rejected
        for another; a known turn is answered even when its customer is over budget."""
        refused = await self.unknown_workflows([(index, req)])
        if refused:
            return EnqueueResult.invalid(index, refused[index])
        try:
            await self.check_budget(req.customer_id)
        except BudgetExceeded as exc:
            [known] = await self.known([req.turn_id])
            if known.nothing:  # not a repeat: the budget answers
                return EnqueueResult.over_budget(index, req, exc)
            return self._repeat(index, req, known)
        try:
            if await self.queue.enqueue(req):
                return EnqueueResult.accepted(index, req, True)
        except ConversationOwnershipError:
            return EnqueueResult.conflict(index, req)
        except ConversationWorkflowError as exc:
            return EnqueueResult.wrong_workflow(index, req, exc)
        [known] = await self.known([req.turn_id])
        return self._repeat(index, req, known)

    def _repeat(self, index: int, req: TurnRequest, known: Known) -> EnqueueResult:
        if known.request is not None and same_request(known.request, self._as_stored(req, known)):
            return EnqueueResult.accepted(index, req, False, known.status)
        return EnqueueResult.reused(index, req)

    def _as_stored(self, req: TurnRequest, known: Known) -> TurnRequest:
        """``req`` as the known turn's record would hold it: redacted once the turn's raw text
        has expired (``telemetry/raw_expiry.py``), as it was otherwise."""
        if not known.raw_expired:
            return req
        if self._redactor is None:
            self._redactor = Redactor.from_settings(self.settings)
        return redact_request(req, self._redactor)

    async def known(self, turn_ids: Sequence[str]) -> list[Known]:
        """For each id: the request recorded under it and its status, or ``(None, None)``;
        ``raw_expired`` when the record holds the request in redacted form only."""
        if not turn_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for turn_id in turn_ids:
                pipe.execute_command("HMGET", keys.turn(turn_id), "request", "status", "raw_expired_at", **RAW)
            rows = await pipe.execute(raise_on_error=False)
        known = [self._known_row(row) for row in rows]
        if any(k.raw_expired for k in known):  # compared in redacted form: the fleet's patterns too
            self._redactor = await registry.redactor(self.redis, self.settings)
        return known

    @staticmethod
    def _known_row(row: Any) -> Known:
        """One ``HMGET`` reply, read raw: a record that is not a hash, or whose request cannot
        be decoded, is an id already taken by an unreadable turn (``unreadable``), never an
        exception (a repeat of it is refused as a reused id: nothing can show it is the same)."""
        if isinstance(row, ResponseError):  # WRONGTYPE: the record was replaced by another type
            return Known(None, UNREADABLE)
        if isinstance(row, Exception):
            raise row
        raw, status, expired = row
        if raw is None:
            return Known(None, lenient_text(status))
        try:
            return Known(decode_request(raw), lenient_text(status), expired is not None)
        except CorruptRecord:
            return Known(None, UNREADABLE)

    async def unknown_workflows(self, reqs: Sequence[tuple[int, TurnRequest]]) -> dict[int, list[dict[str, str]]]:
        """The turns naming a workflow (``agent``) no worker ever served, by index, each with
        its error; nothing to ask Redis when every turn is for the built-in workflow."""
        unknown = await registry.unknown(self.redis, (req.agent for _, req in reqs))
        if not unknown:
            return {}
        known = set(await registry.workflows(self.redis))
        return {i: [{"field": "agent", "message": registry.unknown_message(req.agent, known)}]
                for i, req in reqs if req.agent in unknown}

    async def check_budget(self, customer_id: str) -> budget.BudgetStatus | None:
        """Raise ``BudgetExceeded`` if the customer's daily budget is spent (admission control).

        The spend is telemetry's live customer-day aggregate; a customer without a limit
        costs no lookup.
        """
        status = await budget.check(self.redis, self.settings, customer_id)
        if status is not None and status.exceeded:
            raise BudgetExceeded(status)
        return status

    def _items(self, turns: Iterable[Mapping[str, Any]]) -> list[Any]:
        try:
            items = list(turns)
        except TypeError:
            raise TurnValidationError([{"field": "turns", "message": "must be a list of turns"}]) from None
        if len(items) > self.settings.max_bulk:
            raise TurnValidationError(
                [{"field": "turns", "message": f"{len(items)} turns; the limit is {self.settings.max_bulk}"}]
            )
        return items

    async def enqueue_batch(self, turns: Iterable[Mapping[str, Any]]) -> list[EnqueueResult]:
        """Each turn on its own, like ``POST /v1/turns:batch``: one ``EnqueueResult`` per turn,
        in order. A rejected turn writes nothing and does not stop the others; accepted turns
        are written in one pipelined round trip. Raises only for the call itself (``turns``
        not a list, or over ``max_bulk``)."""
        results: list[EnqueueResult | None] = []
        valid: list[tuple[int, TurnRequest]] = []
        for i, item in enumerate(self._items(turns)):
            try:
                valid.append((i, self.validate(item, index=i)))
                results.append(None)
            except TurnValidationError as exc:
                results.append(EnqueueResult.invalid(i, exc.errors))
        for outcome in await self.submit(valid):
            results[outcome.index] = outcome
        return [r for r in results if r is not None]

    async def enqueue_turns(self, turns: Iterable[Mapping[str, Any]]) -> list[str]:
        """Validate all, then enqueue all in one pipelined round trip; returns turn ids in order.

        All or nothing up to the write: if any turn is invalid, ``TurnValidationError`` lists
        every bad item; a customer over its daily budget raises ``BudgetExceeded``; nothing
        is written then. A turn id already known for the same request is the same turn (its
        id is returned). If some turns are refused at the write (a conversation of another
        customer, a turn id reused for a different request), the others are enqueued and
        ``BulkEnqueueError`` is raised with every turn's ``EnqueueResult``. To judge each turn
        on its own instead, use ``enqueue_batch``.
        """
        items = self._items(turns)
        reqs: list[TurnRequest] = []
        errors: list[dict[str, Any]] = []
        for i, item in enumerate(items):
            try:
                reqs.append(self.validate(item, index=i))
            except TurnValidationError as exc:
                errors.extend(exc.errors)
        for i, refused in (await self.unknown_workflows(list(enumerate(reqs)))).items():
            errors.extend({**e, "index": i} for e in refused)
        if errors:
            raise TurnValidationError(sorted(errors, key=lambda e: e.get("index", 0)))
        for customer_id in sorted({r.customer_id for r in reqs}):
            await self.check_budget(customer_id)
        results = await self.submit(list(enumerate(reqs)))
        if not all(r.ok for r in results):
            raise BulkEnqueueError(results)
        return [r.turn_id for r in reqs]

    async def submit(
        self, reqs: Sequence[tuple[int, TurnRequest]], may: Callable[[str], bool] | None = None
    ) -> list[EnqueueResult]:
        """Write validated turns (``(index, request)`` pairs), each judged on its own; one
        ``EnqueueResult`` per pair, in order. ``may(customer_id)``, if given, says whether the
        caller may act for a customer (the HTTP API's keys): if not, ``forbidden``."""
        results: dict[int, EnqueueResult] = {}
        allowed = []
        for i, req in reqs:
            if may is not None and not may(req.customer_id):
                results[i] = EnqueueResult(i, "rejected", req.turn_id, req.conversation_id, error="forbidden",
                                           message=f"this API key may not act for customer {req.customer_id!r}")
            else:
                allowed.append((i, req))
        refused = await self.unknown_workflows(allowed)
        for i, errors in refused.items():
            results[i] = EnqueueResult.invalid(i, errors)
        allowed = [(i, req) for i, req in allowed if i not in refused]
        # Budgets first (no round trip for customers without a limit). A turn of an over-budget
        # customer may still be a repeat of a known turn, which is answered as such.
        over: dict[str, BudgetExceeded | None] = {}
        fresh: list[tuple[int, TurnRequest]] = []
        held: list[tuple[int, TurnRequest]] = []
        for i, req in allowed:
            if req.customer_id not in over:
                try:
                    await self.check_budget(req.customer_id)
                    over[req.customer_id] = None
                except BudgetExceeded as exc:
                    over[req.customer_id] = exc
            (held if over[req.customer_id] is not None else fresh).append((i, req))
        for (i, req), known in zip(held, await self.known([r.turn_id for _, r in held])):
            exceeded = over[req.customer_id]
            assert exceeded is not None
            results[i] = (self._repeat(i, req, known) if not known.nothing
                          else EnqueueResult.over_budget(i, req, exceeded))
        # The enqueue script refuses known ids atomically (0): only those are read back.
        repeats = []
        for (i, req), outcome in zip(fresh, await self.queue.enqueue_many([r for _, r in fresh])):
            if outcome == 1:
                results[i] = EnqueueResult.accepted(i, req, True)
            elif outcome == WRONG_WORKFLOW:
                workflow = await self.queue.conversation_workflow(req.conversation_id)
                results[i] = EnqueueResult.wrong_workflow(i, req, ConversationWorkflowError(req.conversation_id, workflow))
            elif outcome < 0:
                results[i] = EnqueueResult.conflict(i, req)
            else:  # known: a retry, a concurrent request, or the same id earlier in this batch
                repeats.append((i, req))
        for (i, req), known in zip(repeats, await self.known([r.turn_id for _, r in repeats])):
            results[i] = self._repeat(i, req, known)
        return [results[i] for i, _ in reqs]

    async def feedback(self, turn_id: str, *, score: int, comment: str | None = None,
                       source: str = "customer", customer_id: str | None = None,
                       idempotency_key: str | None = None) -> FeedbackResult:
        """Link a score (-1 or 1) to a turn; returns the feedback with its id.

        Feedback is telemetry: one entry on the telemetry stream (batch version
        ``versions.BATCH_FEEDBACK``), counted once per feedback id by the consumer (per turn,
        conversation, customer, customer-day, version, fleet) however often it is delivered.
        ``idempotency_key``: the same key on the same turn is the same feedback (same id,
        counted once); without one every call is a new feedback. The comment is redacted
        (settings and the workflows' patterns) and clipped before it is written anywhere.
        ``customer_id`` (a customer's call): only that customer's turns; another's is unknown.

        Raises ``TurnValidationError`` naming the bad field, ``UnknownTurn``; nothing is
        written then.
        """
        data = {"turn_id": turn_id, "score": score, "comment": comment, "source": source,
                "idempotency_key": idempotency_key}
        try:
            req = FeedbackRequest.model_validate(
                data, context={"max_feedback_comment_chars": self.settings.max_feedback_comment_chars})
        except ValidationError as exc:
            raise TurnValidationError(_field_errors(exc)) from None
        if customer_id is not None:
            try:
                check_id(customer_id)
            except ValueError as exc:
                raise TurnValidationError([{"field": "customer_id", "message": str(exc)}]) from None
        turn = await self.queue.get(req.turn_id)
        if turn is None or (customer_id is not None and turn.customer_id != customer_id):
            raise UnknownTurn(req.turn_id)
        kept = None
        if req.comment is not None:
            redactor = await registry.redactor(self.redis, self.settings)
            kept = _clip(redactor.text(req.comment), FEEDBACK_COMMENT_KEPT_CHARS)
        fid = feedback_id(req.turn_id, req.idempotency_key)
        at = utcnow()
        ev = event(FeedbackDetail(feedback_id=fid, score=req.score, source=req.source, comment=kept),
                   turn_id=req.turn_id, attempt=0, seq=0, conversation_id=turn.conversation_id,
                   customer_id=turn.customer_id, event_id=fid, ts=at)
        entry = {"turn_id": req.turn_id, versions.FIELD: str(versions.BATCH_FEEDBACK)}
        if turn.workflow:
            entry["workflow"] = turn.workflow
        if turn.version:
            entry["version"] = turn.version
        entry["batch"] = batch_json([ev])
        await self.redis.xadd(keys.TELEMETRY_STREAM, entry)
        return FeedbackResult(feedback_id=fid, turn_id=req.turn_id, conversation_id=turn.conversation_id,
                              customer_id=turn.customer_id, score=req.score, source=req.source,
                              comment=kept, at=at)

    async def result(self, turn_id: str) -> TurnResult | None:
        return await self.queue.get(turn_id)

    async def forget(self, *, customer_id: str | None = None, conversation_id: str | None = None,
                     wait_s: float = 0.0, who: str = "python") -> ErasureReport:
        """Erase one customer or one conversation as ``turnfleet forget`` does
        (``turnfleet.erasure``): everything the fleet keeps of it but the refund ledger, in this
        Redis and the trace store's (``TURNFLEET_TRACE_REDIS_URL``). Raises ``ErasureBusy``
        (nothing erased) while a turn of it is still queued or running after ``wait_s``, and
        ``ValueError`` for a bad id. ``who`` is what the audit log records."""
        url = self.settings.trace_redis_url
        trace_redis = connect(url) if url else None
        try:
            return await forget(self.redis, customer_id=customer_id, conversation_id=conversation_id,
                                trace_redis=trace_redis, wait_s=wait_s, who=who)
        finally:
            if trace_redis is not None:
                await trace_redis.aclose()

    async def wait(self, turn_id: str, timeout_s: float = 30.0) -> TurnResult | None:
        """The turn's outcome once it ends, or its current state after ``timeout_s``."""
        return await self.queue.wait(turn_id, timeout_s)
