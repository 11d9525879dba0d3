"""Daily spend budgets per customer: the limit (settings) and the spend so far (telemetry).

Shared by the producer (admission control before enqueue) and telemetry (the 80% / 100%
alerts). The spend is telemetry's customer-day aggregate, read directly from Redis so the
producer needs no telemetry import: integer nano-dollars in field ``cost_nusd``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from redis.asyncio import Redis

from turnfleet import keys
from turnfleet.settings import CommonSettings

COST_FIELD = "cost_nusd"  # telemetry's known cost of an aggregate, in nano-USD
NANO_PER_USD = 1_000_000_000


def limit_for(settings: CommonSettings, customer_id: str) -> float | None:
    """The customer's daily limit in USD, or None when it has none."""
    return settings.budgets.get(customer_id, settings.default_daily_budget_usd)


def today(now: datetime | None = None) -> str:
    return (now or datetime.now(timezone.utc)).date().isoformat()


def resets_at(now: datetime | None = None) -> datetime:
    """Budgets are per UTC day: they reset at the next UTC midnight."""
    now = now or datetime.now(timezone.utc)
    return datetime(now.year, now.month, now.day, tzinfo=timezone.utc) + timedelta(days=1)


async def spend_today(redis: Redis, customer_id: str, day: str | None = None) -> float:
    raw = await redis.hget(keys.aggregate_day("customer", customer_id, day or today()), COST_FIELD)
    return int(raw or 0) / NANO_PER_USD


@dataclass(frozen=True)
class BudgetStatus:
    customer_id: str
    limit_usd: float
    spent_usd: float
    day: str
    resets_at: datetime

    @property
    def exceeded(self) -> bool:
        return self.spent_usd >= self.limit_usd


class BudgetExceeded(Exception):
    """The customer's daily budget is spent: no turn is enqueued until it resets."""

    def __init__(self, status: BudgetStatus) -> None:
        self.status = status
        super().__init__(
            f"customer {status.customer_id!r} has spent ${status.spent_usd:.4f} of its "
            f"${status.limit_usd:.2f} daily budget; it resets at {status.resets_at.isoformat()}"
        )


async def check(redis: Redis, settings: CommonSettings, customer_id: str) -> BudgetStatus | None:
    """The customer's budget status, or None when it has no limit."""
    limit = limit_for(settings, customer_id)
    if limit is None:
        return None
    now = datetime.now(timezone.utc)
    return BudgetStatus(customer_id, limit, await spend_today(redis, customer_id, today(now)),
                        today(now), resets_at(now))
