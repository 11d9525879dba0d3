"""The Python API for handing turns to the fleet. Needs Redis and pydantic, not the Agents SDK.

    async with Producer(redis_url) as producer:
        turn_id = await producer.enqueue_turn(
            conversation_id="c-1", customer_id="C-100", text="Where is order 1042?")
        result = await producer.wait(turn_id, timeout_s=30)

Input is validated before anything is written; a rejected request raises
``TurnValidationError`` naming each bad field and leaves Redis untouched. Enqueueing a
``turn_id`` that is already known returns it again and enqueues nothing: one job, one result,
also long after the result was written (our record never expires, unlike arq's job ids).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis

from turnfleet import budget
from turnfleet.budget import BudgetExceeded
from turnfleet.connection import connect
from turnfleet.models import TurnRequest, TurnResult
from turnfleet.queue import ConversationOwnershipError, TurnQueue
from turnfleet.settings import ProducerSettings

__all__ = ["Producer", "TurnValidationError", "ConversationOwnershipError", "BudgetExceeded"]


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

    async def __aenter__(self) -> Producer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_client:
            await self.redis.aclose()

    def validate(self, data: Mapping[str, Any], index: int | None = None) -> TurnRequest:
        """A checked ``TurnRequest`` or ``TurnValidationError``; writes nothing."""
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
        """Validate and enqueue one turn; returns its turn id (the given one or a new one)."""
        req = self.validate(
            {
                "conversation_id": conversation_id,
                "customer_id": customer_id,
                "text": text,
                "metadata": dict(metadata) if metadata is not None else None,
                "turn_id": turn_id,
                "agent": agent,
                "trace": trace,
            }
        )
        await self.check_budget(req.customer_id)
        await self.queue.enqueue(req)
        return req.turn_id

    async def check_budget(self, customer_id: str) -> budget.BudgetStatus | None:
        """Raise ``BudgetExceeded`` if the customer's daily budget is spent (admission control).

        The spend is telemetry's live customer-day aggregate; a customer without a limit
        costs no lookup.
        """
        status = await budget.check(self.redis, self.settings, customer_id)
        if status is not None and status.exceeded:
            raise BudgetExceeded(status)
        return status

    async def enqueue_turns(self, turns: Iterable[Mapping[str, Any]]) -> list[str]:
        """Validate all, then enqueue all in one pipelined round trip; returns turn ids in order.

        If any turn is invalid nothing is enqueued and ``TurnValidationError`` lists every bad
        item. Turns whose id is already known are skipped (idempotent) but their id is
        returned. A turn for a conversation owned by another customer raises
        ``ConversationOwnershipError`` naming it; the others of the batch are enqueued.
        A customer over its daily budget raises ``BudgetExceeded`` before anything is written.
        """
        items = list(turns)
        if len(items) > self.settings.max_bulk:
            raise TurnValidationError(
                [{"field": "turns", "message": f"{len(items)} turns; the limit is {self.settings.max_bulk}"}]
            )
        reqs: list[TurnRequest] = []
        errors: list[dict[str, Any]] = []
        for i, item in enumerate(items):
            try:
                reqs.append(self.validate(item, index=i))
            except TurnValidationError as exc:
                errors.extend(exc.errors)
        if errors:
            raise TurnValidationError(errors)
        for customer_id in sorted({r.customer_id for r in reqs}):
            await self.check_budget(customer_id)
        outcomes = await self.queue.enqueue_many(reqs)
        refused = [r.conversation_id for r, o in zip(reqs, outcomes) if o < 0]
        if refused:
            raise ConversationOwnershipError(
                f"conversation_id(s) {sorted(set(refused))} belong to another customer; "
                "those turns were not enqueued, the others were"
            )
        return [r.turn_id for r in reqs]

    async def result(self, turn_id: str) -> TurnResult | None:
        return await self.queue.get(turn_id)

    async def wait(self, turn_id: str, timeout_s: float = 30.0) -> TurnResult | None:
        """The turn's outcome once it ends, or its current state after ``timeout_s``."""
        return await self.queue.wait(turn_id, timeout_s)
