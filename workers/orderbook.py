"""The Support Desk's order book: a small, fixed set of orders shipped with the package.

It stands in for an order service so that demos and tests give the same answers on every
machine and every day: the refund policy is judged against the ``as_of`` date stored in
``workers/data/orders.json``, never against the wall clock.

Where the orders come from: the packaged file, or the JSON file ``TURNFLEET_ORDER_BOOK``
names (same layout; the worker calls ``use_order_book`` at start-up). At run time the book
can be extended by orders stored in Redis (``keys.ORDERS``, order id -> the order as JSON,
judged by the same policy and ``as_of``): ``copy_orders`` adds fresh copies of packaged
orders under new numbers, which is how every ``turnfleet demo`` run gets its own orders to
refund (a refund is once per order, ever). A book's own orders win over stored ones.

Policy (``OrderBook.refund_eligibility``): an order is refundable for its full amount when it
is refundable by nature (gift cards and digital goods are not), and it has either shipped (the
window starts at delivery) or was delivered at most ``refund_window_days`` days before
``as_of``. Processing and cancelled orders have nothing to refund.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from redis.asyncio import Redis

from turnfleet import keys

OrderStatus = Literal["processing", "shipped", "delivered", "cancelled"]
DATA_FILE = "orders.json"


@dataclass(frozen=True)
class Order:
    order_id: str
    customer_id: str
    customer_name: str
    items: tuple[str, ...]
    amount: Decimal
    status: OrderStatus
    carrier: str | None
    eta: date | None
    delivered_on: date | None
    refundable: bool

    def summary(self) -> dict[str, Any]:
        """What ``lookup_order`` tells the model: enough to answer, no customer identity."""
        return {
            "order_id": self.order_id,
            "status": self.status,
            "items": list(self.items),
            "amount": f"{self.amount:.2f}",
            "carrier": self.carrier,
            "eta": self.eta.isoformat() if self.eta else None,
            "delivered_on": self.delivered_on.isoformat() if self.delivered_on else None,
        }


@dataclass(frozen=True)
class Eligibility:
    """The refund decision for one order: callers refund ``amount`` only when ``eligible``."""

    order_id: str
    eligible: bool
    amount: Decimal
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "eligible": self.eligible,
            "amount": f"{self.amount:.2f}",
            "reason": self.reason,
        }


class OrderNotFound(LookupError):
    """The order does not exist, or belongs to another customer (callers can't tell which)."""

    def __init__(self, order_id: str) -> None:
        super().__init__(f"Order {order_id} was not found on your account.")
        self.order_id = order_id


def normalize_order_id(order_id: str) -> str:
    """Accept what people and models type ("#1042", " order 1042 ") for the id "1042"."""
    cleaned = order_id.strip().lower().removeprefix("order").strip().lstrip("#").strip()
    return cleaned


@dataclass(frozen=True)
class OrderBook:
    as_of: date
    refund_window_days: int
    currency: str
    orders: dict[str, Order]

    def get(self, order_id: str, customer_id: str) -> Order:
        """The customer's order; another customer's order is reported as not found."""
        order = self.orders.get(normalize_order_id(order_id))
        if order is None or order.customer_id != customer_id:
            raise OrderNotFound(normalize_order_id(order_id))
        return order

    def refund_eligibility(self, order: Order) -> Eligibility:
        def no(reason: str) -> Eligibility:
            return Eligibility(order.order_id, False, Decimal("0.00"), reason)

        if not order.refundable:
            return no(f"{', '.join(order.items)} is a non-refundable item.")
        if order.status == "processing":
            return no("The order is still processing; refunds apply once it has shipped.")
        if order.status == "cancelled":
            return no("The order was cancelled, so there is no charge to refund.")
        if order.status == "shipped":
            return Eligibility(
                order.order_id, True, order.amount,
                "The order has shipped; the refund window starts at delivery.",
            )
        if order.delivered_on is None:
            raise ValueError(f"delivered order {order.order_id} has no delivery date")
        days = (self.as_of - order.delivered_on).days
        if days > self.refund_window_days:
            return no(
                f"The order was delivered on {order.delivered_on.isoformat()}, {days} days ago, "
                f"outside the {self.refund_window_days}-day refund window."
            )
        return Eligibility(
            order.order_id, True, order.amount,
            f"Delivered on {order.delivered_on.isoformat()}, {days} days ago, within the "
            f"{self.refund_window_days}-day refund window.",
        )


def _date(value: str | None) -> date | None:
    return date.fromisoformat(value) if value else None


def parse_order(raw: dict[str, Any]) -> Order:
    return Order(
        order_id=raw["order_id"],
        customer_id=raw["customer_id"],
        customer_name=raw["customer_name"],
        items=tuple(raw["items"]),
        amount=Decimal(raw["amount"]),
        status=raw["status"],
        carrier=raw.get("carrier"),
        eta=_date(raw.get("eta")),
        delivered_on=_date(raw.get("delivered_on")),
        refundable=bool(raw["refundable"]),
    )


def parse_order_book(data: dict[str, Any]) -> OrderBook:
    orders = {raw["order_id"]: parse_order(raw) for raw in data["orders"]}
    return OrderBook(
        as_of=date.fromisoformat(data["as_of"]),
        refund_window_days=int(data["refund_window_days"]),
        currency=data.get("currency", "USD"),
        orders=orders,
    )


_source: Path | None = None  # None: the packaged order book


def use_order_book(path: Path | str | None) -> None:
    """Read orders from ``path`` (a JSON file like ``workers/data/orders.json``) from now on;
    ``None``: the packaged file. Called by the worker at start-up (``TURNFLEET_ORDER_BOOK``)."""
    global _source
    _source = Path(path) if path else None


def _packaged_text() -> str:
    return resources.files("turnfleet.workers").joinpath("data", DATA_FILE).read_text(encoding="utf-8")


@cache
def _book(path: Path | None) -> OrderBook:
    text = path.read_text(encoding="utf-8") if path else _packaged_text()
    return parse_order_book(json.loads(text))


def load_order_book() -> OrderBook:
    """The order book in use (read once per process and source; it never changes at run time)."""
    return _book(_source)


async def find_order(book: OrderBook, redis: Redis, order_id: str, customer_id: str) -> Order:
    """The customer's order, from the book or else from the orders stored in Redis; another
    customer's order is reported as not found, as ``OrderBook.get`` does."""
    try:
        return book.get(order_id, customer_id)
    except OrderNotFound as missing:
        raw = await redis.hget(keys.ORDERS, missing.order_id)
        if raw is None:
            raise
        order = parse_order(json.loads(raw))
        if order.customer_id != customer_id:
            raise
        return order


async def copy_orders(redis: Redis, order_ids: list[str]) -> dict[str, str]:
    """Store fresh copies of packaged orders under new order numbers; old id -> new id.

    The new number is the old one followed by a run number (``keys.ORDER_COPIES``, one
    ``INCR`` per call): ``1047`` becomes ``10470001``, then ``10470002``, ... — never a number
    used before on this Redis, so nothing about it has been refunded yet.
    """
    book = _book(None)
    run = await redis.incr(keys.ORDER_COPIES)
    raw_orders = {raw["order_id"]: raw for raw in json.loads(_packaged_text())["orders"]}
    renamed = {oid: f"{oid}{run:04d}" for oid in order_ids if oid in book.orders}
    copies = {new: json.dumps({**raw_orders[old], "order_id": new}) for old, new in renamed.items()}
    if copies:
        await redis.hset(keys.ORDERS, mapping=copies)
    return renamed
