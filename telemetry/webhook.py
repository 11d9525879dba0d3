"""The alert webhook sink: every alert on the alert stream, POSTed to one URL, in order.

Set ``TURNFLEET_ALERT_WEBHOOK_URL`` and the telemetry process (``run_consumer``) runs an
:class:`AlertWebhook` beside its consumer. The sink is a member of the consumer group
``webhook`` on the alert stream (``tf:alerts``), created at id ``0``: alerts fired before the
sink first started are delivered too.

What the receiver gets, one request per alert::

    POST <alert_webhook_url>
    Content-Type: application/json
    Idempotency-Key: <alert_id>
    User-Agent: turnfleet-alerts/<version>

    {"id": "<alert stream entry id>", "alert_id": "al_…", "rule": "turn_failed",
     "severity": "warning", "subject_kind": "turn", "subject": "t-9", "window": "once",
     "message": "…", "figures": {…}, "conversation_id": "c-1", "customer_id": "cust-1",
     "turn_id": "t-9", "fired_at": "2025-03-04T10:00:00.500000Z"}

The body is the ``Alert`` model (``turnfleet/models.py``) as JSON plus ``id``, the stream
entry id (``<ms>-<seq>``), which increases in the order alerts were fired.

Delivery is **at least once**. The entry is acknowledged only after the receiver answered
2xx, so a sink that dies between the POST and the ``XACK`` sends that alert again when it (or
another sink) picks the entry up. Receivers must dedupe on ``Idempotency-Key`` (the alert id,
equal to the body's ``alert_id``): a (rule, subject, window) only ever produces one alert id.

What each answer does:

- 2xx: delivered; acknowledged; counted in ``delivered``.
- connection error, timeout, 408, 429, 5xx: the SAME alert is sent again after a backoff
  (0.2 s doubling up to ``alert_webhook_max_backoff_s``, with jitter; a ``Retry-After``
  header, seconds or HTTP date, is honoured up to that same cap). Later alerts wait: the
  receiver sees alerts in stream order, and an outage delays delivery but loses nothing.
  Each failed attempt is counted in ``retries``.
- any other status (other 4xx, 3xx): a permanent rejection. Logged as an error with the
  status and the start of the body, counted in ``rejected`` and acknowledged, so a receiver
  that refuses one alert does not block all later ones.
- an entry that is not an alert (unparseable, or trimmed from the stream while pending):
  logged, counted in ``malformed``, acknowledged.

Counters live in the hash ``tf:webhook`` (fields ``delivered``, ``rejected``, ``malformed``,
``retries``); the acknowledgement and its counter are one script, so a redelivered entry is
not counted twice.

At start the sink first re-sends its own pending entries (read at id ``0``), then takes over
with ``XAUTOCLAIM`` entries other sinks left pending longer than ``claim_idle_ms`` (a sink that
died), then reads new ones. While it holds entries (retrying a receiver that is down, or
working through a batch) it refreshes their idle time every ``claim_idle_ms / 3``, so a live
sink's entries are not taken from it. Several telemetry processes with the URL set share the
alerts (each alert goes to one of them); order holds per sink, so set the URL on one process
if the receiver needs one global order.

Redis errors (server restarting, connection lost) are logged and retried with backoff; the
entries in hand stay pending and are re-sent after the reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import structlog
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from turnfleet.telemetry.stream_group import Entry, StreamGroupMember, _text
from turnfleet import __version__, heartbeat, keys
from turnfleet.models import Alert
from turnfleet.scripts import load_script
from turnfleet.settings import TelemetrySettings

log = structlog.get_logger(__name__)

STREAM = keys.ALERTS_STREAM
GROUP = "webhook"
STATS = f"{keys.PREFIX}:webhook"  # hash: delivered, rejected, malformed, retries
USER_AGENT = f"turnfleet-alerts/{__version__}"

FIRST_BACKOFF_S = 0.2
REDIS_MAX_BACKOFF_S = 5.0
BODY_EXCERPT_CHARS = 300
RETRYABLE_STATUSES = frozenset({408, 429})  # and every 5xx


# Acknowledge and count an outcome together (lua/webhook_ack.lua); keep the entries in hand
# this consumer's (lua/webhook_touch.lua).
ACK = load_script("webhook_ack", "turnfleet.telemetry")
TOUCH = load_script("webhook_touch", "turnfleet.telemetry")


def backoff_s(attempt: int, cap_s: float, retry_after_s: float | None = None) -> float:
    """Wait before attempt ``attempt + 1``: the receiver's Retry-After, else 0.2 s × 2ⁿ⁻¹
    with equal jitter (half fixed, half random); never more than ``cap_s``."""
    if retry_after_s is not None:
        return max(0.0, min(cap_s, retry_after_s))
    base = min(cap_s, FIRST_BACKOFF_S * 2 ** (attempt - 1))
    return base / 2 + random.uniform(0, base / 2)


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delay-seconds or HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class AlertWebhook(StreamGroupMember):
    """Delivers the alert stream to ``settings.alert_webhook_url``; ``run`` until ``stop``.

    ``client`` lets a caller supply its own ``httpx.AsyncClient`` (proxies, TLS, auth
    headers); the sink closes only a client it created, in :meth:`aclose`.
    """

    def __init__(self, redis: Redis, settings: TelemetrySettings, *,
                 consumer_name: str | None = None, client: httpx.AsyncClient | None = None) -> None:
        if not settings.alert_webhook_url:
            raise ValueError("alert_webhook_url is not set: there is nowhere to send alerts")
        if httpx.URL(settings.alert_webhook_url).scheme not in ("http", "https"):
            raise ValueError(f"alert_webhook_url must be an http(s) URL, not "
                             f"{settings.alert_webhook_url!r}")
        super().__init__(
            redis,
            name=consumer_name or settings.consumer_name or heartbeat.default_name(),
            batch_size=settings.batch_size,
            claim_idle_ms=settings.claim_idle_ms,
        )
        self.settings = settings
        self.url = settings.alert_webhook_url
        self._client = client or httpx.AsyncClient(timeout=settings.alert_webhook_timeout_s)
        self._owns_client = client is None
        self._ack = ACK.bind(redis)
        self._touch = TOUCH.bind(redis)
        self._hand: list[str] = []  # ids read and not yet acknowledged, in stream order
        self._touched_at = 0.0
        # Counted changes (a retry counted, an entry settled), for whoever waits on them.
        self.changes = 0
        self._changed = asyncio.Condition()

    async def wait_changed(self, since: int) -> int:
        """Return once ``changes`` has moved past ``since`` (the value read before a check
        that failed, so no change in between is missed); the new count."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.changes != since)
            return self.changes

    async def _note_change(self) -> None:
        self.changes += 1
        async with self._changed:
            self._changed.notify_all()

    @property
    def _touch_every_s(self) -> float:
        return max(0.05, self.settings.claim_idle_ms / 3000)

    def stop(self) -> None:
        """Ask ``run``/``run_once`` to return; an alert being retried stays pending."""
        super().stop()

    async def process(self, entries: Sequence[Entry]) -> int:
        return await self.deliver(entries)

    stream = STREAM
    group = GROUP
    event_prefix = "webhook"

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> AlertWebhook:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def run(self) -> None:
        """Deliver until ``stop()``. Redis errors are logged and retried with backoff."""
        log.info("webhook.started", consumer=self.name, url=self.url)
        failures = 0
        while not self._stop.is_set():
            try:
                await self.step(block=self.settings.block_ms, claim_now=False)
            except RedisError as exc:
                self.lost_redis(exc)
                if not self._group_ready:
                    continue
                failures += 1
                delay = min(REDIS_MAX_BACKOFF_S, 0.1 * 2**failures)
                log.error("webhook.redis_error", consumer=self.name, error=repr(exc),
                          retry_in_s=delay)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)
                continue
            if failures:
                log.info("webhook.redis_recovered", consumer=self.name, after_failures=failures)
            failures = 0
        log.info("webhook.stopped", consumer=self.name)

    async def run_once(self) -> int:
        """Deliver every alert there is now (own pending, claimable, new); entries acknowledged.

        Retries a failing receiver like ``run`` does, until it answers or ``stop()``; a Redis
        error is raised to the caller.
        """
        handled = 0
        while not self._stop.is_set():
            try:
                n = await self.step(block=None, claim_now=True)
            except ResponseError as exc:
                self.lost_redis(exc)
                if self._group_ready:
                    raise
                continue
            handled += n
            if n == 0 and not self._own_pending:
                break
        return handled

    async def deliver(self, entries: Sequence[Entry]) -> int:
        """Send entries one by one, in order; return how many were acknowledged.

        Stops early (the rest stay pending) on ``stop()`` or when another sink took the
        entry in hand.
        """
        self._hand = [entry_id for entry_id, _ in entries if entry_id is not None]
        self._touched_at = time.monotonic()
        n = 0
        try:
            for entry_id, fields in entries:
                if entry_id is None or entry_id not in self._hand:
                    continue
                if self._stop.is_set() or not await self._deliver_one(entry_id, fields):
                    self._own_pending = True
                    break
                self._hand.remove(entry_id)
                n += 1
        finally:
            self._hand = []
        return n

    async def _deliver_one(self, entry_id: str, fields: dict[str, Any] | None) -> bool:
        """Send one entry until the receiver answers; False if stopped or taken meanwhile."""
        if not fields:
            log.warning("webhook.entry_gone", entry_id=entry_id,
                        hint="trimmed from the stream before it was delivered")
            return await self._settle(entry_id, "malformed")
        try:
            alert = Alert.model_validate_json(fields.get("alert") or "")
        except ValidationError as exc:
            log.error("webhook.malformed", entry_id=entry_id, fields=sorted(fields),
                      error=str(exc))
            return await self._settle(entry_id, "malformed")
        body = json.dumps({"id": entry_id, **alert.model_dump(mode="json")})
        headers = {"Content-Type": "application/json", "Idempotency-Key": alert.alert_id,
                   "User-Agent": USER_AGENT}
        context = {"entry_id": entry_id, "alert_id": alert.alert_id, "rule": alert.rule}
        attempt = 0
        while True:
            attempt += 1
            if time.monotonic() - self._touched_at >= self._touch_every_s:
                await self._keep_hand()
            if entry_id not in self._hand:
                log.warning("webhook.entry_taken", consumer=self.name, **context)
                return False
            started = time.monotonic_ns()
            wait: float | None = None
            try:
                response = await self._client.post(
                    self.url, content=body, headers=headers,
                    timeout=self.settings.alert_webhook_timeout_s,
                )
            except httpx.TransportError as exc:  # connect/read errors and timeouts
                reason, status = f"{type(exc).__name__}: {exc}", None
            else:
                status = response.status_code
                took_ms = (time.monotonic_ns() - started) / 1e6
                if 200 <= status < 300:
                    log.info("webhook.delivered", status=status, attempts=attempt,
                             duration_ms=round(took_ms, 1), **context)
                    return await self._settle(entry_id, "delivered")
                if status not in RETRYABLE_STATUSES and status < 500:
                    log.error("webhook.rejected", status=status, attempts=attempt,
                              body=response.text[:BODY_EXCERPT_CHARS], url=self.url, **context)
                    return await self._settle(entry_id, "rejected")
                reason = f"HTTP {status}"
                wait = retry_after_s(response.headers.get("retry-after"))
            delay = backoff_s(attempt, self.settings.alert_webhook_max_backoff_s, wait)
            await self.redis.hincrby(STATS, "retries", 1)
            await self._note_change()
            log.warning("webhook.retry", attempt=attempt, status=status, reason=reason,
                        retry_in_s=round(delay, 3), **context)
            if not await self._pause(delay):
                return False

    async def _settle(self, entry_id: str, outcome: str) -> bool:
        """Acknowledge and count ``outcome`` (once, however often the entry is delivered)."""
        await self._ack(keys={"stream": STREAM, "stats": STATS},
                        args={"group": GROUP, "entry_id": entry_id, "outcome": outcome})
        await self._note_change()
        return True

    async def _pause(self, delay_s: float) -> bool:
        """Wait ``delay_s`` keeping the entries in hand ours; False if stopped meanwhile."""
        deadline = time.monotonic() + delay_s
        while (remaining := deadline - time.monotonic()) > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=min(remaining, self._touch_every_s))
            if self._stop.is_set():
                return False
            if time.monotonic() - self._touched_at >= self._touch_every_s:
                await self._keep_hand()
        return not self._stop.is_set()

    async def _keep_hand(self) -> None:
        """Reset the idle time of the entries in hand so no other sink claims them."""
        self._touched_at = time.monotonic()
        if not self._hand:
            return
        kept = {_text(i) for i in await self._touch(
            keys={"stream": STREAM}, args={"group": GROUP, "consumer": self.name, "first": self._hand[0],
                                           "last": self._hand[-1], "count": len(self._hand)})}
        taken = [i for i in self._hand if i not in kept]
        if taken:
            log.warning("webhook.entries_taken", consumer=self.name, entries=len(taken),
                        first_id=taken[0])
            self._hand = [i for i in self._hand if i in kept]
